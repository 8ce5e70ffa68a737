"""Exactly once: kill -9 a running job anywhere, rerun the same command, same rows and captions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest

N_ROWS = 60  # 6 shards of 10 rows, 4 chunks each: 24 chunks


def run_cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def captions(out: Path) -> list[tuple]:
    table = ds.dataset(out / "captions").to_table(columns=["row_index", "id", "caption", "status"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


@pytest.fixture(scope="module")
def job_factory(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    paths = [str(write_image(root / "media" / f"{i}.png", seed=100 + i, size=(64 + 4 * i, 72))) for i in range(N_ROWS)]
    manifest = write_manifest(root / "m.parquet", {"id": [f"r{i}" for i in range(N_ROWS)], "path": paths},
                              row_group_size=5)
    model = tiny_model("llava")

    def make(name: str) -> tuple[Path, Path]:
        out = root / name
        job = write_job(root / f"{name}.toml", job_sections(
            model, manifest, out, output={"rows_per_shard": 10, "chunk_rows": 3}, generation={"max_batch_size": 2}))
        return job, out

    return make


@pytest.fixture(scope="module")
def uninterrupted(job_factory):
    job, out = job_factory("clean")
    proc = run_cli("run", str(job))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return captions(out)


def wait_for_chunks(out: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((out / "captions").glob("*.parquet"))) >= n if (out / "captions").is_dir() else False:
            return
        time.sleep(0.02)
    raise TimeoutError(f"no {n} chunks in {out}")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_chunks", [1, 4])
def test_kill_9_then_rerun_is_exactly_once(job_factory, uninterrupted, kill_after_chunks):
    job, out = job_factory(f"killed{kill_after_chunks}")
    proc = run_cli("run", str(job))
    wait_for_chunks(out, kill_after_chunks)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "captions").glob("*.parquet")))
    assert 0 < done_before < 20, "the kill must land mid-job for the test to mean anything"

    rerun = run_cli("run", str(job))
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    got = captions(out)
    assert [r[0] for r in got] == list(range(N_ROWS)), "every row exactly once"
    assert got == uninterrupted
    assert not list((out / "_tmp").iterdir()) or all(p.name.startswith("shard-") for p in (out / "_tmp").iterdir())

    again = run_cli("run", str(job))
    assert again.wait(timeout=600) == 0
    assert f"all {N_ROWS} rows already done" in again.stderr.read()
    status = run_cli("status", str(out))
    assert status.wait(timeout=120) == 0
    assert f"{N_ROWS}/{N_ROWS} rows done" in status.stdout.read()
