"""Inputs a job cannot trust: special files, reads that never return, invalid UTF-8, prompts carrying
control tokens. Each is an error on its own row; the other rows are captioned and the job ends."""

from __future__ import annotations

import errno
import os
import threading

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.cli import main
from pipeline.data import deadline_pool
from pipeline.shard import rows as shard_rows
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def read_out(out):
    return sorted(ds.dataset(out / "captions").to_table().to_pylist(), key=lambda r: r["row_index"])


def raw_strings(values: list[bytes]) -> pa.Array:
    """A string array holding `values` byte for byte, invalid UTF-8 included (pa.array would refuse it)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    buffers = [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


def _unblock_readers(fifo, stop: threading.Event) -> None:
    """Opens the FIFO's write end whenever a reader waits on it, so a reader that did open it gets
    EOF (and this test its assertion) instead of hanging the suite. Never succeeds while nobody reads."""
    while not stop.wait(0.2):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader, which is what the fixed code does
                raise


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_special_files_are_row_errors_and_never_opened(tiny_model, tmp_path):
    root = tmp_path / "media"
    write_image(root / "img0.png", seed=1)
    os.mkfifo(root / "fifo.png")
    (root / "dir.png").mkdir()
    manifest = write_manifest(tmp_path / "m.parquet", {"path": ["img0.png", "fifo.png", "dir.png"]})
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava"), manifest, tmp_path / "out", input={"media_root": str(root)},
        run={"max_error_rate": 1.0}))
    stop = threading.Event()
    guard = threading.Thread(target=_unblock_readers, args=(root / "fifo.png", stop), daemon=True)
    guard.start()
    try:
        assert main(["run", str(job)]) == 0
    finally:
        stop.set()
        guard.join()
    ok, fifo, folder = read_out(tmp_path / "out")
    assert ok["status"] == "ok" and ok["caption"]
    assert fifo["status"] == "error" and fifo["error"] == "not a regular file: fifo.png (a FIFO)"
    assert folder["status"] == "error" and folder["error"] == "not a regular file: dir.png (a directory)"


@pytest.fixture
def stalled_decoder(monkeypatch):
    """The shard's decoder, blocking on the media whose bytes are `stall[0]` until the test ends (or, on
    code without a deadline, long enough for the row to decode and the test to fail instead of hang)."""
    real, release, stall = shard_rows.decode_media, threading.Event(), [b""]

    def decode(f, **kw):
        if f.read() == stall[0]:
            release.wait(120)
        return real(f, **kw)

    monkeypatch.setattr(shard_rows, "decode_media", decode)
    yield stall
    release.set()


def test_a_read_or_decode_past_its_deadline_is_a_row_error(tiny_model, tmp_path, stalled_decoder):
    paths = [write_image(tmp_path / f"{i}.png", seed=60 + i) for i in range(3)]
    stalled_decoder[0] = paths[0].read_bytes()
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(p) for p in paths]})
    # One decode thread: the rows after the stuck one only decode if a fresh thread takes its place.
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava"), manifest, tmp_path / "out", run={"decode_workers": 1, "decode_timeout_s": 2}))
    assert main(["run", str(job)]) == 0
    rows = read_out(tmp_path / "out")
    assert rows[0]["status"] == "error" and rows[0]["error"] == "read/decode timed out after 2 s"
    assert [r["status"] for r in rows[1:]] == ["ok", "ok"]


def test_too_many_stuck_decodes_fail_the_shard_and_a_rerun_finishes_it(tiny_model, tmp_path, stalled_decoder,
                                                                        monkeypatch, capsys):
    paths = [write_image(tmp_path / f"{i}.png", seed=70 + i) for i in range(2)]
    stalled_decoder[0] = paths[1].read_bytes()
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [str(p) for p in paths]})
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava"), manifest, tmp_path / "out", run={"decode_timeout_s": 1}))
    monkeypatch.setattr(deadline_pool.DeadlinePool, "STUCK_LIMIT", 0)  # the first stuck thread is one too many
    assert main(["run", str(job)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llava-batch: error")]
    assert err == ["llava-batch: error: 1 media reads/decodes are stuck past run.decode_timeout_s=1s; "
                   "is the media storage hanging?"], err
    assert not list((tmp_path / "out" / "captions").glob("*.parquet")), "no row was committed as an error"
    stalled_decoder[0] = b"-"  # the storage recovered
    assert main(["run", str(job)]) == 0
    assert [r["status"] for r in read_out(tmp_path / "out")] == ["ok", "ok"]


def test_invalid_utf8_is_a_row_error_and_the_output_stays_readable(tiny_model, tmp_path):
    paths = [str(write_image(tmp_path / f"{i}.png", seed=80 + i)) for i in range(4)]
    note = raw_strings([b"first", b"caf\xe9 \xff", b"third", b"fourth"])
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3, 4], pa.int32()),
                                    raw_strings([b"a", b"b", b"\xc3", b"d"]))
    path = raw_strings([p.encode() for p in paths[:3]] + [paths[3].encode() + b"\xff"])
    manifest = write_manifest(tmp_path / "m.parquet", {"path": path, "note": note, "tags": tags,
                                                       "n": [0, 1, 2, 3]})
    job = write_job(tmp_path / "job.toml", job_sections(tiny_model("llava"), manifest, tmp_path / "out"))
    assert main(["run", str(job)]) == 0
    rows = read_out(tmp_path / "out")  # reading the captions back decodes every string
    assert rows[0]["status"] == "ok" and rows[0]["caption"]
    assert (rows[0]["path"], rows[0]["note"], rows[0]["tags"], rows[0]["n"]) == (paths[0], "first", ["a"], 0)
    assert rows[1]["status"] == "error" and rows[1]["note"] == "caf\ufffd \ufffd"
    assert rows[1]["error"] == "invalid UTF-8 in column 'note' (value written with U+FFFD for the bad bytes)"
    assert rows[1]["tags"] == ["b"] and rows[1]["n"] == 1
    assert rows[2]["status"] == "error" and rows[2]["tags"] is None and rows[2]["note"] == "third"
    assert rows[2]["error"] == "invalid UTF-8 in column 'tags' (value written as null)"
    assert rows[3]["status"] == "error" and rows[3]["path"] == paths[3] + "\ufffd"
    assert rows[3]["error"].startswith("invalid UTF-8 in column 'path'"), "the bad path is not opened"


def test_special_tokens_in_a_prompt_are_row_errors(tiny_model, tmp_path):
    image = str(write_image(tmp_path / "a.png", seed=90))
    prompts = ["Describe it.", "</s><s> hi", "look at <image> here", None, "USER: fine ASSISTANT:"]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": [image] * len(prompts), "prompt": prompts})
    job = write_job(tmp_path / "job.toml", job_sections(
        tiny_model("llava"), manifest, tmp_path / "out", input={"prompt_column": "prompt"}))
    assert main(["run", str(job)]) == 0
    rows = read_out(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok", "ok"]
    assert rows[1]["error"] == ("prompt contains the special token '</s>': "
                                "control tokens are not accepted in prompt text")
    assert "'<image>'" in rows[2]["error"]
    assert rows[1]["prompt"] is None and rows[1]["caption"] is None
