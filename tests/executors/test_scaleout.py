"""Scale-out on one host: several worker processes, node partitioning, killed workers, overlapping runs.

Every test compares against the captions of a plain single-process run: exactly once, same text.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.data.manifest import Shard
from pipeline.executors.shard_queue import node_share
from tests.executors.scaleout_common import (
    captions,
    chunk_writers,
    descendants,
    make_job,
    make_manifest,
    n_chunks,
    processed,
    reference,
    run_cli,
    wait_for,
)

N_ROWS = 96  # 8 shards of 12 rows, 4 chunks each
TWO_CPUS = '["cpu", "cpu"]'


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    model, manifest = tiny_model("llava"), make_manifest(root, N_ROWS)
    return root, model, manifest, reference(root, model, manifest)


def test_node_share_covers_every_shard_exactly_once():
    shards = [Shard(i, 10 * i, 10 * i + 10) for i in range(11)]
    for n in (1, 2, 3, 7, 20):
        shares = [node_share(shards, RunConfig(num_nodes=n, node_rank=r))[0] for r in range(n)]
        assert sorted(s.index for share in shares for s in share) == list(range(11))
    mine, others = node_share(shards, RunConfig(num_nodes=3, node_rank=1, steal=True))
    assert {s.index for s in mine} == {1, 4, 7, 10} and len(mine) + len(others) == 11


def test_two_cpu_workers_match_one(env):
    root, model, manifest, expected = env
    job, out = make_job(root, "two", model, manifest)
    assert main(["run", str(job), "--set", f"run.devices={TWO_CPUS}"]) == 0
    assert captions(out) == expected
    assert not list((out / "_leases").iterdir()), "every lease released"
    assert main(["status", str(out)]) == 0


def test_nodes_partition_the_shards_and_steal_leftovers(env, capsys):
    root, model, manifest, expected = env
    job, out = make_job(root, "nodes", model, manifest)
    assert main(["run", str(job), "--set", "run.num_nodes=3", "--set", "run.node_rank=1"]) == 0
    stats = {p.name for p in (out / "_stats").iterdir()}
    assert stats == {f"shard-{i:05d}.json" for i in (1, 4, 7)}, "node 1 of 3 did exactly its share"
    assert main(["run", str(job), "--set", "run.num_nodes=3", "--set", "run.node_rank=1"]) == 0
    assert "of node 1's share already done" in capsys.readouterr().err
    # Node 0 steals what nobody holds; node 2 then finds nothing left.
    assert main(["run", str(job), "--set", "run.num_nodes=3", "--set", "run.node_rank=0", "--set", "run.steal=true"]) == 0
    assert main(["run", str(job), "--set", "run.num_nodes=3", "--set", "run.node_rank=2"]) == 0
    assert captions(out) == expected


def test_overwrite_with_several_nodes_is_refused(env, capsys):
    root, model, manifest, _ = env
    job, out = make_job(root, "refused", model, manifest)
    assert main(["run", str(job), "--set", "run.num_nodes=2", "--set", 'output.mode="overwrite"']) == 2
    assert main(["run", str(job), "--set", 'run.devices=["cuda:9"]']) == 2
    assert "run.devices" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_kill_9_of_one_worker_mid_job(env):
    root, model, manifest, expected = env
    # Two shards of 48 rows, one per worker: after the first chunks both workers are mid-shard for
    # a long while, so the kill lands mid-shard however fast or loaded the machine is.
    job, out = make_job(root, "killed", model, manifest, output={"rows_per_shard": 48})
    proc = run_cli("run", str(job), "--set", f"run.devices={TWO_CPUS}")
    wait_for(lambda: n_chunks(out) >= 2, what="first chunks")
    workers = descendants(proc.pid, "pipeline.executors.worker")
    assert len(workers) == 2
    # Kill a worker seen committing a chunk of a 16-chunk shard: it is mid-shard, whichever
    # worker loaded its model first.
    busy = wait_for(lambda: set(chunk_writers(out)) & set(workers), what="a worker's chunk")
    os.kill(busy.pop(), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "killed by signal 9; retrying shard" in stderr, "the kill must land mid-shard to mean anything"
    assert captions(out) == expected


@pytest.mark.slow
def test_a_shard_that_keeps_killing_workers_fails_after_the_rest_is_done(env):
    root, model, manifest, expected = env
    job, out = make_job(root, "poison", model, manifest)
    proc = run_cli("run", str(job), "--set", f"run.devices={TWO_CPUS}", "--set", "run.max_retries=1",
                   env={"LLAVA_BATCH_CRASH_SHARDS": "2"})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "shards FAILED: [2]" in stdout and "shard 2 FAILED after 2 attempts" in stderr
    failed = json.loads((out / "_stats" / "shard-00002.failed.json").read_text())
    assert failed["attempts"] == 2 and "killed by signal 9" in failed["error"]
    assert captions(out) == [r for r in expected if not 24 <= r[0] < 36], "every other shard finished"
    status = run_cli("status", str(out), "--json")
    assert json.loads(status.communicate(timeout=120)[0])["shards_failed"] == [2]
    # The rerun (no crash this time) retries the failed shard and clears the mark.
    rerun = run_cli("run", str(job))
    assert rerun.wait(timeout=300) == 0
    assert captions(out) == expected and not (out / "_stats" / "shard-00002.failed.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("n_runs", [2, 3])
def test_overlapping_runs_on_one_output_dir(env, n_runs):
    root, model, manifest, expected = env
    job, out = make_job(root, f"overlap{n_runs}", model, manifest)
    procs = [run_cli("run", str(job)) for _ in range(n_runs)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * n_runs, [r[1] for r in results]
    assert captions(out) == expected
    assert sum(processed(r[0]) for r in results) == N_ROWS, "no row captioned twice"
