"""Quality flags in a real job: the `flags` column, counted in each shard's stats and in `status`."""

from __future__ import annotations

import json

import pyarrow.dataset as ds

from pipeline.cli import main
from pipeline.data.quality import caption_flags
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def test_flags_column_stats_and_status(tiny_model, tmp_path, capsys):
    paths = [str(write_image(tmp_path / "media" / f"{i}.png", seed=i)) for i in range(6)] + ["missing.png"]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": paths})
    out = tmp_path / "out"
    # 10 new tokens: some captions are cut there (truncated), others end before
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, out,
                                                        generation={"max_output_length": 10}))
    assert main(["run", str(job)]) == 0
    rows = ds.dataset(out / "captions").to_table().to_pylist()
    for row in rows:
        assert row["flags"] == caption_flags(row["caption"], row["finish_reason"], row["status"] == "ok")
    truncated = sum("truncated" in r["flags"] for r in rows)
    assert truncated and truncated == sum(r["finish_reason"] == "length" for r in rows)
    stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("shard-*.json")]
    assert sum(s["flags"].get("truncated", 0) for s in stats) == truncated
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert f"flagged: {truncated} truncated" in capsys.readouterr().out
    # stop_on_repetition changes captions: a resume with it switched on is another job
    assert main(["run", str(job), "--set", "generation.stop_on_repetition=true"]) == 2


def test_a_job_written_before_the_setting_keeps_its_fingerprint():
    """generation.stop_on_repetition at its default is left out of the fingerprint, so output dirs of
    earlier versions (whose _job.json lacks it) resume as the same job."""
    from pipeline.config import JobConfig, fingerprint_view

    now = JobConfig().to_dict()
    before = json.loads(json.dumps(now))
    del before["generation"]["stop_on_repetition"]
    assert fingerprint_view(now) == fingerprint_view(before)
    now["generation"]["stop_on_repetition"] = True
    assert fingerprint_view(now) != fingerprint_view(before)
