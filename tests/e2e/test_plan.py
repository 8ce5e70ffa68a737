"""`llava-batch plan`: the job's size, what is done, the cache plan and a calibrated estimate,
without captioning the job itself."""

from __future__ import annotations

import json
import resource
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def test_plan_then_run_then_plan(tiny_model, tmp_path, capsys):
    paths = [str(write_image(tmp_path / "media" / f"{i}.png", seed=i)) for i in range(10)]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": paths})
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, out))
    capsys.readouterr()
    assert main(["plan", str(job), "--json", "--calibrate", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["shards"], report["chunks"], report["rows_done"]) == (10, 2, 3, 0)
    assert report["prompts_per_row"] == 1
    assert report["cache_plan"]["slots"] == 4 and report["cache_plan"]["prompt_length"] > 0
    cal = report["calibration"]
    assert cal["rows"] == 4 and cal["ok"] == 4 and cal["estimated_output_tokens"] > 0 and cal["estimated_wall_s"] > 0
    assert not out.exists(), "planning writes nothing to the job's output"
    assert main(["run", str(job)]) == 0
    capsys.readouterr()
    assert main(["plan", str(job)]) == 0
    text = capsys.readouterr().out
    assert "10 rows in 2 shards of 3 chunks; 10 done, 0 left" in text and "cache plan on cpu: 4 slots" in text
    prompts = write_job(tmp_path / "prompts.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "p",
                                                                generation={"prompts": {"a": "x", "b": "y", "c": "z"}}))
    assert main(["plan", str(prompts)]) == 0
    assert "prompts a row: 3" in capsys.readouterr().out


@pytest.mark.slow
def test_plan_of_a_ten_million_row_manifest(tiny_model, tmp_path, capsys):
    """Footers only: time and peak memory printed, not asserted."""
    rows = 10_000_000
    paths = pa.array([f"images/{i:08d}.jpg" for i in range(rows)])
    pq.write_table(pa.table({"path": paths}), tmp_path / "big.parquet", row_group_size=1_000_000)
    del paths
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), tmp_path / "big.parquet",
                                                        tmp_path / "out", output={"rows_per_shard": 10_000}))
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["plan", str(job), "--json"]) == 0
    seconds = time.perf_counter() - started
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["shards"]) == (rows, 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"plan of {rows} rows: {seconds:.1f} s, peak RSS of the test process {peak:.0f} MiB")
