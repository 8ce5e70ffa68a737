"""Several prompts per media (generation.prompts, or a list-valued prompt column): one output row
per (row, prompt), each caption the one a single-prompt job gives, the vision tower run once per
media, exactly once through kill -9."""

from __future__ import annotations

import os
import signal

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from transformers import CLIPVisionModel

from pipeline.config import load_job
from pipeline.errors import ConfigError
from pipeline.job import run_job
from pipeline.testing.demo import write_image, write_video
from pipeline.testing.jobs import job_sections, write_job, write_manifest
from tests.e2e.test_resume import run_cli, wait_for_chunks

PROMPTS = {"short": "caption", "dense": "Describe this image in one sentence.", "tags": "What is in the picture?"}
SIZES = [(96, 72), (72, 96), (128, 48), (80, 80), (64, 112), (100, 60), (48, 128)]


def rows_of(out) -> list[dict]:
    table = ds.dataset(out / "captions").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["row_index"], r["prompt_name"] or ""))


def media_manifest(root, family: str):
    paths = [str(write_image(root / "media" / f"img{i}.png", seed=30 + i, size=s)) for i, s in enumerate(SIZES)]
    if family == "llava_next_video":
        paths += [str(write_video(root / "media" / "a.mp4", n_frames=10, seed=3)),
                  str(write_video(root / "media" / "b.mp4", n_frames=6, seed=4))]
    return write_manifest(root / "m.parquet", {"path": paths}), paths


@pytest.fixture
def vision_calls(monkeypatch):
    """Images / frames / tiles the vision tower is run on, counted at the tower itself."""
    seen = []
    forward = CLIPVisionModel.forward

    def counted(self, pixel_values=None, *args, **kwargs):
        seen.append(pixel_values.shape[0])
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(CLIPVisionModel, "forward", counted)
    return seen


def run(root, name, model, manifest, engine="fast", **generation):
    gen = {"engine": engine, "max_batch_size": 6, **generation}
    job = write_job(root / f"{name}.toml", job_sections(model, manifest, root / name, generation=gen))
    summary = run_job(load_job(job))
    assert summary.errors == 0
    return rows_of(root / name)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_next_video"])
def test_each_prompt_captions_as_its_single_prompt_job_with_one_vision_pass(family, tiny_model, tmp_path,
                                                                            vision_calls):
    model = tiny_model(family)
    manifest, paths = media_manifest(tmp_path, family)
    vision_calls.clear()  # making the tiny model runs it
    got = run(tmp_path, "multi", model, manifest, prompts=PROMPTS)
    multi_tower = sum(vision_calls)
    assert len(got) == 3 * len(paths)
    assert [(r["row_index"], r["prompt_name"]) for r in got] == [
        (i, name) for i in range(len(paths)) for name in sorted(PROMPTS)]
    for name, text in PROMPTS.items():
        vision_calls.clear()
        single = run(tmp_path, f"single-{name}", model, manifest, prompt=text)
        assert sum(vision_calls) == multi_tower, "three prompts must cost the vision tower what one does"
        mine = [r for r in got if r["prompt_name"] == name]
        assert [(r["caption"], r["prompt"], r["path"]) for r in mine] == [
            (r["caption"], r["prompt"], r["path"]) for r in single]
        assert all(r["prompt_name"] is None for r in single)
    assert len({r["caption"] for r in got}) > len(paths), "prompts of one media must give different captions"


def test_the_reference_engine_gives_the_same_rows(tiny_model, tmp_path):
    model = tiny_model("llava")
    manifest, _ = media_manifest(tmp_path, "llava")
    fast = run(tmp_path, "fast", model, manifest, prompts=PROMPTS)
    hf = run(tmp_path, "hf", model, manifest, engine="hf", prompts=PROMPTS)
    assert [(r["row_index"], r["prompt_name"], r["caption"]) for r in fast] == [
        (r["row_index"], r["prompt_name"], r["caption"]) for r in hf]


def test_a_list_valued_prompt_column_gives_each_row_its_own_prompts(tiny_model, tmp_path):
    """Lists of any length; an empty or missing list (or item) is generation.prompt. Each caption is
    the one a scalar prompt column with that text gives."""
    model = tiny_model("llava")
    _, paths = media_manifest(tmp_path, "llava")
    lists = [["caption", "What is in the picture?"], [], None, ["Describe it."], ["a", None, "b c"],
             ["caption"] * 2, ["What is in the picture?"]]
    manifest = write_manifest(tmp_path / "lists.parquet", {
        "path": paths, "asks": pa.array(lists, type=pa.list_(pa.string()))})
    got = run(tmp_path, "lists", model, manifest, prompt="the default", **{})  # noqa: PIE804
    # the job above has no prompt column: every row is the default prompt once
    assert len(got) == len(paths) and all(r["prompt_name"] is None for r in got)
    job = write_job(tmp_path / "col.toml", job_sections(model, manifest, tmp_path / "col",
                                                        input={"prompt_column": "asks"},
                                                        generation={"prompt": "the default", "max_batch_size": 6}))
    assert run_job(load_job(job)).errors == 0
    got = rows_of(tmp_path / "col")
    expected = [(i, str(j) if v else None, t or "the default") for i, v in enumerate(lists)
                for j, t in enumerate(v or [None])]
    assert [(r["row_index"], r["prompt_name"]) for r in got] == [(i, n) for i, n, _ in expected]
    flat = write_manifest(tmp_path / "flat.parquet", {"path": [paths[i] for i, _, _ in expected],
                                                      "ask": [t for _, _, t in expected]})
    job = write_job(tmp_path / "flat.toml", job_sections(model, flat, tmp_path / "flat", input={"prompt_column": "ask"},
                                                         generation={"max_batch_size": 6}))
    assert run_job(load_job(job)).errors == 0
    assert [r["caption"] for r in got] == [r["caption"] for r in rows_of(tmp_path / "flat")]
    assert [r["asks"] for r in got] == [lists[i] for i, _, _ in expected]  # passed through on each row


def test_dedup_and_bad_rows_with_several_prompts(tiny_model, tmp_path):
    model = tiny_model("llava")
    good = [str(write_image(tmp_path / "media" / f"{i}.png", seed=i, size=(80, 64))) for i in range(3)]
    (tmp_path / "media" / "bad.png").write_bytes(b"not an image")
    paths = good + [good[0], str(tmp_path / "media" / "bad.png"), good[1], str(tmp_path / "media" / "bad.png")]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": paths})
    job = write_job(tmp_path / "d.toml", job_sections(model, manifest, tmp_path / "d",
                                                      generation={"prompts": PROMPTS, "dedup": True},
                                                      output={"rows_per_shard": 8, "chunk_rows": 8}))
    summary = run_job(load_job(job))
    assert (summary.ok, summary.errors) == (15, 6)
    got = rows_of(tmp_path / "d")
    by = {(r["row_index"], r["prompt_name"]): r for r in got}
    for name in PROMPTS:
        assert by[(3, name)]["dedup_of"] == 0 and by[(3, name)]["caption"] == by[(0, name)]["caption"]
        assert by[(5, name)]["dedup_of"] == 1
        assert by[(4, name)]["status"] == "error" and by[(4, name)]["prompt_name"] == name
        assert by[(6, name)]["error"] == by[(4, name)]["error"] and by[(6, name)]["dedup_of"] == 4
    status = run_cli("status", str(tmp_path / "d"))
    assert status.wait(timeout=120) == 0
    assert "7/7 rows done (15 ok, 6 errors)" in status.stdout.read()


@pytest.mark.slow
def test_kill_9_then_rerun_is_exactly_once_per_row_and_prompt(tiny_model, tmp_path):
    model = tiny_model("llava")
    n = 30
    paths = [str(write_image(tmp_path / "media" / f"{i}.png", seed=200 + i, size=(64 + 4 * i, 72))) for i in range(n)]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": paths}, row_group_size=5)

    def job(name):
        return write_job(tmp_path / f"{name}.toml", job_sections(
            model, manifest, tmp_path / name, output={"rows_per_shard": 10, "chunk_rows": 2},
            generation={"max_batch_size": 3, "prompts": PROMPTS}))

    clean = run_cli("run", str(job("clean")))
    assert clean.wait(timeout=600) == 0, clean.stderr.read()
    proc = run_cli("run", str(job("killed")))
    wait_for_chunks(tmp_path / "killed", 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < len(list((tmp_path / "killed" / "captions").glob("*.parquet"))) < 15, "the kill must land mid-job"
    rerun = run_cli("run", str(job("killed")))
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    got = [(r["row_index"], r["prompt_name"], r["caption"]) for r in rows_of(tmp_path / "killed")]
    assert [(i, p) for i, p, _ in got] == [(i, p) for i in range(n) for p in sorted(PROMPTS)], "exactly once"
    assert got == [(r["row_index"], r["prompt_name"], r["caption"]) for r in rows_of(tmp_path / "clean")]


@pytest.mark.parametrize("generation,input_,message", [
    ({"prompts": {}}, {}, "generation.prompts must name at least one prompt"),
    ({"prompts": {"a": " "}}, {}, "generation.prompts.a must not be empty"),
    ({"prompts": {"a": "x"}}, {"prompt_column": "p"}, "generation.prompts and input.prompt_column"),
])
def test_bad_prompt_tables_are_configuration_errors(generation, input_, message, tmp_path):
    job = write_job(tmp_path / "j.toml", job_sections(tmp_path / "model", tmp_path / "m.parquet", tmp_path / "out",
                                                      generation=generation, input=input_))
    with pytest.raises(ConfigError, match=message):
        load_job(job)
