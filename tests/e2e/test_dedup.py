"""generation.dedup: rows with the same media bytes and prompt are generated once per shard, and
the output is what a run without dedup writes, every row exactly once."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.testing.demo import write_image, write_video
from pipeline.testing.jobs import job_sections, write_job, write_manifest

ROWS_PER_SHARD = 8


def manifest_with_duplicates(root: Path) -> tuple[Path, list[str]]:
    """14 distinct images and 6 duplicates (30%): copies under other names, and a path listed twice."""
    distinct = [write_image(root / "media" / f"{i}.png", seed=i, size=(40 + 3 * i, 36)) for i in range(14)]
    copies = []
    for j, src in enumerate([distinct[0], distinct[3], distinct[9], distinct[12]]):
        copies.append(root / "media" / f"copy{j}.png")
        shutil.copy(src, copies[-1])
    paths = [str(p) for p in distinct[:5]] + [str(copies[0]), str(distinct[5]), str(distinct[0])] \
        + [str(p) for p in distinct[6:10]] + [str(copies[1]), str(copies[2])] + [str(p) for p in distinct[10:]] \
        + [str(copies[3]), str(distinct[13])]
    return write_manifest(root / "m.parquet", {"path": paths}), paths


def run(model: Path, manifest: Path, out: Path, **generation) -> list[dict]:
    sections = job_sections(model, manifest, out, generation=generation, run={"devices": generation.pop("devices", ["cpu"])},
                            output={"rows_per_shard": ROWS_PER_SHARD, "chunk_rows": 4})
    assert main(["run", str(write_job(out.with_suffix(".toml"), sections))]) == 0
    return sorted(ds.dataset(out / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])


def expected_reuse(paths: list[str]) -> dict[int, int]:
    """row -> the first earlier row of its shard with the same bytes."""
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    reuse = {}
    for i, d in enumerate(digests):
        start = i - i % ROWS_PER_SHARD
        first = next((j for j in range(start, i) if digests[j] == d), None)
        if first is not None:
            reuse[i] = first
    return reuse


@pytest.mark.parametrize("devices", [["cpu"], pytest.param(["cpu", "cpu"], marks=pytest.mark.slow)])
def test_duplicates_reuse_the_first_rows_caption(tiny_model, tmp_path, devices):
    manifest, paths = manifest_with_duplicates(tmp_path)
    plain = run(tiny_model("llava"), manifest, tmp_path / "plain")
    deduped = run(tiny_model("llava"), manifest, tmp_path / "dedup", dedup=True, devices=devices)
    assert len(deduped) == len(paths) and [r["row_index"] for r in deduped] == list(range(len(paths)))
    reuse = expected_reuse(paths)
    assert len(reuse) >= 3, "some duplicates must share a shard with their first occurrence"
    for a, b in zip(plain, deduped, strict=True):
        assert (a["status"], a["caption"], a["n_output_tokens"]) == (b["status"], b["caption"], b["n_output_tokens"])
        assert b["dedup_of"] == reuse.get(b["row_index"]) and a["dedup_of"] is None
    stats = [json.loads(p.read_text()) for p in (tmp_path / "dedup" / "_stats").glob("shard-*.json")]
    assert sum(s["dedup_reused_rows"] for s in stats) == len(reuse)
    # not decoded either, unless a decode thread hashed the copy before its first row
    assert 0 < sum(s["dedup_skipped_decodes"] for s in stats) <= len(reuse)


def test_a_duplicate_video_is_not_decoded_and_keeps_its_frames(tiny_model, tmp_path):
    first = write_video(tmp_path / "media" / "a.mp4", n_frames=9, seed=1)
    shutil.copy(first, tmp_path / "media" / "copy.mp4")
    other = write_image(tmp_path / "media" / "b.png", seed=2, size=(40, 36))
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(first), str(other), str(tmp_path / "media" / "copy.mp4")]})
    sections = job_sections(tiny_model("llava_next_video"), manifest, tmp_path / "out", generation={"dedup": True},
                            run={"decode_workers": 1})  # one thread: hashes in row order
    assert main(["run", str(write_job(tmp_path / "job.toml", sections))]) == 0
    rows = sorted(ds.dataset(tmp_path / "out" / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])
    assert rows[2]["dedup_of"] == 0 and rows[2]["caption"] == rows[0]["caption"]
    assert (rows[2]["frames"], rows[2]["frame_times"]) == (rows[0]["frames"], rows[0]["frame_times"]) != (None, None)
    stats = json.loads(next((tmp_path / "out" / "_stats").glob("shard-*.json")).read_text())
    assert stats["dedup_skipped_decodes"] == 1


def test_dedup_with_sampling_is_refused(tiny_model, tmp_path, capsys):
    manifest, _ = manifest_with_duplicates(tmp_path)
    sections = job_sections(tiny_model("llava"), manifest, tmp_path / "out",
                            generation={"dedup": True, "do_sample": True})
    assert main(["run", str(write_job(tmp_path / "job.toml", sections))]) == 2
    assert "generation.dedup needs greedy decoding" in capsys.readouterr().err


def test_a_row_that_skipped_its_decode_without_a_twin_to_answer_it_is_decoded_after_all(tiny_model, tmp_path,
                                                                                      monkeypatch):
    """The twin's hash can be lost (its read timed out between hashing and registering): the row
    then decodes when its turn comes, and nothing changes in the output."""
    from pipeline.data.dedup import Reuse

    manifest, _ = manifest_with_duplicates(tmp_path)
    plain = run(tiny_model("llava"), manifest, tmp_path / "plain")
    monkeypatch.setattr(Reuse, "hashed_before", lambda self, media, row: True)  # every row skips
    deduped = run(tiny_model("llava"), manifest, tmp_path / "dedup", dedup=True)
    assert [(r["caption"], r["status"]) for r in deduped] == [(r["caption"], r["status"]) for r in plain]
