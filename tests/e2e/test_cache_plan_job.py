"""The cache plan in a real job: sized by the model's image-token arithmetic, stored in `_job.json`
and each shard's stats, and a prompt over max_input_length a row error, never an out-of-memory."""

from __future__ import annotations

import json

import pyarrow.dataset as ds

from pipeline.cli import main
from pipeline.engine.cache_plan import CPU_MAX_SLOTS
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest

# (width, height): the tiny models' 28-pixel tiles in each pinpoint's shape, then odd ones.
SIZES = [(28, 56), (56, 28), (56, 56), (28, 84), (84, 28), (40, 33), (100, 30), (64, 64)]


def run(tiny_model, tmp_path, name: str, **generation) -> tuple[dict, list[dict], list[dict]]:
    paths = [str(write_image(tmp_path / "media" / f"{i}.png", seed=i, size=s)) for i, s in enumerate(SIZES)]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": paths})
    out = tmp_path / name
    sections = job_sections(tiny_model("llava_next"), manifest, out,
                            generation={"max_batch_size": "auto", **generation})
    assert main(["run", str(write_job(tmp_path / f"{name}.toml", sections))]) == 0
    rows = sorted(ds.dataset(out / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])
    stats = [json.loads(p.read_text()) for p in sorted((out / "_stats").glob("*.json"))]
    return json.loads((out / "_job.json").read_text()), rows, stats


def test_the_plan_is_the_longest_prompt_and_is_recorded(tiny_model, tmp_path):
    job, rows, stats = run(tiny_model, tmp_path, "auto")
    plan = job["plan"]["cache"]
    assert all(r["status"] == "ok" for r in rows)
    # An image in a pinpoint's shape is cut into that grid whole: the longest prompt, reached.
    assert plan == {"max_batch_size": "auto", "prompt_length": max(r["n_prompt_tokens"] for r in rows),
                    "slot_length": max(r["n_prompt_tokens"] for r in rows) + 24}
    for shard in stats:
        worker = shard["cache_plan"]
        assert (worker["slots"], worker["limited_by"]) == (CPU_MAX_SLOTS, "cap")  # host memory is plenty
        assert worker["slot_length"] == plan["slot_length"] and worker["bytes_per_slot"] > 0


def test_prompts_over_max_input_length_are_row_errors(tiny_model, tmp_path):
    _, full, _ = run(tiny_model, tmp_path, "full")
    lengths = sorted({r["n_prompt_tokens"] for r in full})
    limit = lengths[len(lengths) // 2]
    job, rows, stats = run(tiny_model, tmp_path, "capped", max_input_length=limit)
    assert job["plan"]["cache"]["prompt_length"] == limit == stats[0]["cache_plan"]["prompt_length"]
    for before, row in zip(full, rows, strict=True):
        if before["n_prompt_tokens"] > limit:
            assert row["status"] == "error" and row["error"].startswith("prompt too long"), row
        else:
            assert (row["status"], row["caption"]) == ("ok", before["caption"])
    assert any(r["status"] == "error" for r in rows) and any(r["status"] == "ok" for r in rows)
