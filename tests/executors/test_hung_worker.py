"""A worker that hangs (alive, silent: a device call that never returns) is found by its heartbeat
deadline, run.worker_timeout_s. Worker processes: it is killed and replaced, its shard retried, the
job completes exactly once; a Ray actor alike, killed and restarted by Ray. In-process: the run
releases its leases and exits 1 with one line, and the rerun completes exactly once. The hang is the
worker's test hook (LLAVA_BATCH_HANG_SHARDS), once: the marker file it creates lets the retry through."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow.dataset as ds
import pytest

from tests.executors.scaleout_common import make_job, make_manifest

N_ROWS = 36  # 3 shards of 12 rows, chunks of 3


def run(job, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})


def row_indexes(out) -> list[int]:
    return sorted(ds.dataset(out / "captions").to_table(columns=["row_index"]).column(0).to_pylist())


@pytest.mark.slow
def test_a_hung_worker_process_is_replaced_and_its_shard_retried(tiny_model, tmp_path):
    # Healthy workers beat every second while rows flow (starting is not timed), so a short deadline
    # finds the hung one and only it.
    job, out = make_job(tmp_path, "procs", tiny_model("llava"), make_manifest(tmp_path, N_ROWS),
                        run={"devices": ["cpu", "cpu"], "worker_timeout_s": 15.0})
    marker = tmp_path / "hung-once"
    done = run(job, LLAVA_BATCH_HANG_SHARDS="1", LLAVA_BATCH_HANG_MARKER=str(marker))
    assert done.returncode == 0, done.stderr
    assert marker.exists(), "the hook must have hung a worker for the test to mean anything"
    hung = [line for line in done.stderr.splitlines() if "hung" in line]
    assert len(hung) == 1 and "run.worker_timeout_s" in hung[0] and "retrying shard 1" in hung[0], done.stderr
    assert row_indexes(out) == list(range(N_ROWS)), "every row exactly once"
    assert not list(out.glob("_leases/*.json"))


@pytest.mark.slow
def test_a_hung_shard_in_process_exits_1_with_one_line_and_the_rerun_finishes(tiny_model, tmp_path):
    job, out = make_job(tmp_path, "local", tiny_model("llava"), make_manifest(tmp_path, N_ROWS),
                        run={"devices": ["cpu"], "worker_timeout_s": 15.0})
    marker = tmp_path / "hung-once"
    stuck = run(job, LLAVA_BATCH_HANG_SHARDS="1", LLAVA_BATCH_HANG_MARKER=str(marker))
    assert stuck.returncode == 1, stuck.stderr
    assert marker.exists()
    assert "Traceback" not in stuck.stderr
    lines = [line for line in stuck.stderr.splitlines() if "no progress" in line]
    assert len(lines) == 1 and lines[0].startswith("llava-batch: error: "), stuck.stderr
    assert "run.worker_timeout_s" in lines[0]
    assert stuck.stderr.rstrip().endswith(lines[0])
    assert not list(out.glob("_leases/*.json")), "released before exiting, so a rerun need not wait"
    assert 0 < len(row_indexes(out)) < N_ROWS

    rerun = run(job, LLAVA_BATCH_HANG_SHARDS="1", LLAVA_BATCH_HANG_MARKER=str(marker))
    assert rerun.returncode == 0, rerun.stderr
    assert row_indexes(out) == list(range(N_ROWS)), "every row exactly once"


@pytest.mark.slow
def test_a_hung_ray_actor_is_killed_restarted_and_its_shard_retried(tiny_model, tmp_path, capsys,
                                                                     monkeypatch):
    ray = pytest.importorskip("ray")
    from pipeline.cli import main

    marker = tmp_path / "hung-once"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Ray's socket paths must stay under ~107 characters: a short dir, not pytest's tmp_path.
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    hook = {"LLAVA_BATCH_HANG_SHARDS": "1", "LLAVA_BATCH_HANG_MARKER": str(marker)}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False,
             runtime_env={"env_vars": hook})
    try:
        job, out = make_job(tmp_path, "ray", tiny_model("llava"), make_manifest(tmp_path, N_ROWS),
                            run={"executor": "ray", "devices": ["cpu", "cpu"], "worker_timeout_s": 15.0})
        assert main(["run", str(job)]) == 0
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert marker.exists()
    hung = [line for line in capsys.readouterr().err.splitlines() if "hung" in line]
    assert len(hung) == 1 and "retrying shard 1" in hung[0]
    assert row_indexes(out) == list(range(N_ROWS)), "every row exactly once"
    assert not list(out.glob("_leases/*.json"))
