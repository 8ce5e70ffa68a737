"""The output dir's state: who owns `_job.json`, which chunks are this job's, what status reads,
an unusable or full output dir, and an empty manifest's output. Real Parquet, real processes."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import JobConfig
from pipeline.data import output
from pipeline.data.disk_full import DiskFullError
from pipeline.data.output import OutputDir
from pipeline.data.schema import RESULT_FIELDS
from pipeline.data.status import read_status, shard_stats
from pipeline.errors import ConfigError, LlavaBatchError
from pipeline.executors.leases import Leases
from pipeline.executors.shard_queue import ShardQueue
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def record(prompt: str = "Describe.", shards: int = 2) -> dict:
    """A `_job.json` record as job_record writes it; the fingerprint follows the prompt."""
    cfg = JobConfig()
    cfg.generation.prompt = prompt
    return {"version": 1, "config": cfg.to_dict(), "manifest": {"files": [], "num_rows": 4 * shards,
                                                                "fingerprint": "manifest-1"},
            "plan": {"shards": shards, "rows_per_shard": 4, "chunk_rows": 2},
            "fingerprint": hashlib.sha256(prompt.encode()).hexdigest()[:16]}


def chunk_table(start: int, statuses: list[str]) -> pa.Table:
    n = len(statuses)
    errors = [None if s == "ok" else "decode error: x" for s in statuses]
    return pa.table({"row_index": pa.array(range(start, start + n), pa.int64()), "caption": ["c"] * n,
                     "status": statuses, "error": errors,
                     "n_prompt_tokens": pa.array([3] * n, pa.int32()),
                     "n_output_tokens": pa.array([2] * n, pa.int32())})


def commit(out: OutputDir, shard: int, chunk: int, statuses: list[str]) -> None:
    out.commit_chunk(shard, chunk, chunk_table(4 * shard + 2 * chunk, statuses), {"seconds": 0.1})


def _start_at_barrier(root: str, job: dict, barrier, results) -> None:
    barrier.wait()
    try:
        OutputDir(root).start(job, "resume")
        results.put((job["config"]["generation"]["prompt"], "started"))
    except ConfigError as e:
        results.put((job["config"]["generation"]["prompt"], str(e)))


def test_job_file_first_writer_wins_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    prompts = ["A", "B", "C", "D"]
    barrier, results = ctx.Barrier(len(prompts)), ctx.Queue()
    procs = [ctx.Process(target=_start_at_barrier, args=(str(tmp_path / "out"), record(p), barrier, results))
             for p in prompts]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in prompts)
    for p in procs:
        p.join()
    winners = [p for p, outcome in got.items() if outcome == "started"]
    assert len(winners) == 1, got
    assert json.loads((tmp_path / "out" / "_job.json").read_text()) == record(winners[0])
    for prompt, outcome in got.items():
        if prompt != winners[0]:
            assert f"generation.prompt = {winners[0]!r}, this job has {prompt!r}" in outcome
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "claim temp files left"


def test_a_run_of_the_same_job_joins_and_the_first_record_stays(tmp_path):
    first, again = OutputDir(tmp_path), OutputDir(tmp_path)
    first.start(record("A"), "resume")
    job = record("A")
    job["config"]["run"]["devices"] = ["cpu", "cpu"]  # not part of the fingerprint
    again.start(job, "resume")
    assert json.loads((tmp_path / "_job.json").read_text())["config"]["run"]["devices"] == ["auto"]


def test_chunks_of_another_job_are_not_this_jobs(tmp_path):
    ours, theirs = OutputDir(tmp_path), OutputDir(tmp_path, fingerprint=record("B")["fingerprint"])
    ours.start(record("A"), "resume")
    commit(ours, 0, 0, ["ok", "ok"])
    commit(theirs, 0, 1, ["ok", "error"])  # a run of another job that got past the _job.json check
    legacy = chunk_table(4, ["ok", "ok"]).replace_schema_metadata({"llava_batch": json.dumps({"seconds": 0})})
    pq.write_table(legacy, ours.chunk_path(1, 0))  # written before chunks carried a fingerprint
    assert ours.committed_chunks() == {(0, 0), (1, 0)} and ours.committed_chunks(shard=0) == {(0, 0)}
    status = read_status(tmp_path)
    assert (status["done"], status["ok"], status["errors"]) == (4, 4, 0)
    assert shard_stats(ours, 0, 4)["ok"] == 2
    # A resume captions the foreign chunk again; its commit replaces the file, and it counts.
    commit(ours, 0, 1, ["ok", "ok"])
    assert ours.committed_chunks() == {(0, 0), (0, 1), (1, 0)}
    assert read_status(tmp_path)["done"] == 6


def test_a_stats_marker_of_another_job_does_not_complete_the_shard(tmp_path):
    ours, theirs = OutputDir(tmp_path), OutputDir(tmp_path, fingerprint=record("B")["fingerprint"])
    ours.start(record("A"), "resume")
    commit(theirs, 0, 0, ["ok", "ok"])
    commit(theirs, 0, 1, ["ok", "ok"])
    theirs.commit_shard(0, shard_stats(theirs, 0, 4))
    assert not ours.shard_done(0) and ours.done_shards() == {}
    assert read_status(tmp_path)["shards_complete"] == 0
    ours.reset_shard(0)  # what the queue does before it hands the shard out again
    assert not ours.shard_path(0).exists() and ours.committed_chunks() == set()


def test_status_of_complete_shards_reads_their_markers_not_their_chunks(tmp_path):
    out = OutputDir(tmp_path)
    out.start(record("A", shards=3), "resume")
    commit(out, 0, 0, ["ok", "error"])
    commit(out, 0, 1, ["ok", "ok"])
    out.commit_shard(0, shard_stats(out, 0, 4))
    commit(out, 1, 0, ["ok", "ok"])  # shard 1 in progress, shard 2 not started
    for path in out.chunk_files(0):
        path.write_bytes(b"not parquet: status must not open the chunks of a complete shard")
    status = read_status(tmp_path)
    assert (status["done"], status["ok"], status["errors"], status["shards_complete"]) == (6, 5, 1, 1)
    assert out.committed_chunks() == {(0, 0), (0, 1), (1, 0)}
    out.chunk_path(1, 0).write_bytes(b"garbage in a shard in progress")
    with pytest.raises(LlavaBatchError, match="shard-00001-chunk-00000.parquet is not a readable Parquet"):
        read_status(tmp_path)


def test_disk_full_reported_by_a_worker_stops_the_job_in_one_line(tmp_path):
    """A worker process reports its error as `<type>: <message>` (executors/worker.py); the queue
    turns a DiskFullError among them back into that one line instead of retrying the shard."""
    from pipeline.data.manifest import Shard

    out = OutputDir(tmp_path)
    out.start(record("A"), "resume")
    full = out.no_space(OSError(errno.ENOSPC, "No space left on device"), "writing shard-00000-chunk-00000")
    shards = [Shard(0, 0, 4), Shard(1, 4, 8)]
    with Leases(tmp_path, 60.0) as leases:
        queue = ShardQueue(out, leases, shards, [], max_retries=2)
        first = queue.next()
        with pytest.raises(DiskFullError) as raised:
            queue.died(first, f"worker 0: {type(full).__name__}: {full}")
        assert str(raised.value) == str(full)
        assert f"output.dir {tmp_path}: no space left on device (" in str(full)
        assert " free) while writing shard-00000-chunk-00000; free some space and rerun" in str(full)
        second = queue.next()
        queue.died(second, "worker 0: ValueError: something else")  # other errors are still retried
        assert queue.todo[0] == second and second.index not in queue.failed


# -- whole jobs, in this process --------------------------------------------------------------

@pytest.fixture
def job(tiny_model, tmp_path):
    paths = [str(write_image(tmp_path / "media" / f"{i}.png", seed=300 + i)) for i in range(8)]
    manifest = write_manifest(tmp_path / "m.parquet", {"id": [f"r{i}" for i in range(8)], "path": paths})

    def make(name: str, manifest: Path = manifest, **overrides) -> tuple[Path, Path]:
        out = tmp_path / name
        sections = job_sections(tiny_model("llava"), manifest, out, generation={"max_output_length": 8},
                                output={"rows_per_shard": 4, "chunk_rows": 2})
        for section, values in overrides.items():
            sections[section].update(values)
        return write_job(tmp_path / f"{name}.toml", sections), out

    return make


def captions(out: Path) -> list[tuple]:
    t = ds.dataset(out / "captions").to_table(columns=["row_index", "id", "caption", "status"])
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("llava-batch: error:")]


def test_disk_full_is_one_line_and_a_rerun_completes_exactly_once(job, monkeypatch, capsys):
    job_file, out = job("full")
    reference_job, reference_out = job("reference")
    assert main(["run", str(reference_job)]) == 0
    real_write, writes = pq.write_table, []

    def write_until_full(table, where, **kw):  # the third chunk finds the disk full, half written
        writes.append(where)
        if len(writes) > 2:
            Path(where).write_bytes(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "Error writing bytes to file: No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(output.pq, "write_table", write_until_full)
    capsys.readouterr()
    assert main(["run", str(job_file)]) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert f"output.dir {out}: no space left on device (" in line, line
    assert "free) while writing shard-" in line, line
    assert len(list((out / "captions").iterdir())) == 2 and not list((out / "_tmp").iterdir())
    monkeypatch.undo()
    assert main(["run", str(job_file)]) == 0
    assert captions(out) == captions(reference_out)


@pytest.mark.parametrize("case", ["regular file", "parent is a file", "unwritable (/sys)"])
def test_unusable_output_dir_exits_2_before_the_model_dir_is_read(case, job, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a dir")
    where = {"regular file": tmp_path / "file", "parent is a file": tmp_path / "file" / "out",
             "unwritable (/sys)": Path("/sys/llava-batch-out")}[case]
    # A missing model dir too: the output dir is refused first, so long before any weights load.
    job_file, _ = job("unused", model={"path": str(tmp_path / "no-model")}, output={"dir": str(where)})
    assert main(["run", str(job_file)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"output.dir {where}" in line and "model.path" not in line, line
    assert not where.exists() or where.is_file()


def test_unusable_output_dir_is_refused_before_torch_is_imported(job, tmp_path):
    (tmp_path / "file").write_text("")
    job_file, _ = job("unused", output={"dir": str(tmp_path / "file")})
    code = ("import sys; from pipeline.cli import main; rc = main(['run', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(job_file)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip() == "False", (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == f"llava-batch: error: output.dir {tmp_path / 'file'} is not a directory"


def test_empty_manifest_writes_the_output_schema(job, tmp_path):
    import pandas as pd

    manifest = write_manifest(tmp_path / "empty.parquet", {"id": pa.array([], pa.string()),
                                                           "path": pa.array([], pa.string())})
    job_file, out = job("empty", manifest=manifest)
    assert main(["run", str(job_file)]) == 0
    names = ["id", "path"] + [f.name for f in RESULT_FIELDS]
    frame = pd.read_parquet(out / "captions")
    assert len(frame) == 0 and list(frame.columns) == names
    table = ds.dataset(out / "captions").to_table()
    assert table.num_rows == 0 and table.schema.names == names
    assert table.schema.field("row_index").type == pa.int64()
    (out / "captions" / output.EMPTY_FILE).unlink()  # as if killed before it was written
    assert main(["run", str(job_file)]) == 0
    assert ds.dataset(out / "captions").to_table().schema.names == names
    assert read_status(out) == {"rows": 0, "done": 0, "ok": 0, "errors": 0, "shards": 0, "shards_complete": 0,
                                "shards_failed": [], "flags": {}}
