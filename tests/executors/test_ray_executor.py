"""Ray executor: a real local Ray cluster, two CPU actors, one killed mid-shard; exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading

import pytest

from pipeline.cli import main
from tests.executors.scaleout_common import (
    captions,
    chunk_writers,
    descendants,
    make_job,
    make_manifest,
    reference,
    wait_for,
)

ray = pytest.importorskip("ray")

N_ROWS = 96


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray's socket paths must stay under ~107 characters: a short dir, not pytest's tmp_path.
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_actor_killed_mid_shard_is_replaced_and_exactly_once(cluster, tiny_model, tmp_path, capsys):
    model, manifest = tiny_model("llava"), make_manifest(tmp_path, N_ROWS)
    expected = reference(tmp_path, model, manifest)
    # Two 48-row shards: an actor seen committing a chunk has ~15 more to go when it is killed.
    job, out = make_job(tmp_path, "ray", model, manifest, output={"rows_per_shard": 48})
    killed: list[int] = []

    def busy_actors() -> set[int]:
        return set(chunk_writers(out)) & set(descendants(os.getpid(), "ShardActor"))

    def kill_one_actor() -> None:
        busy = wait_for(busy_actors, what="an actor's chunk")
        pid = busy.pop()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    code = main(["run", str(job), "--set", 'run.executor="ray"', "--set", 'run.devices=["cpu", "cpu"]'])
    killer.join(timeout=60)
    assert code == 0
    assert killed, "an actor must be killed mid-shard for the test to mean anything"
    assert "retrying shard" in capsys.readouterr().err
    assert captions(out) == expected
    assert not list((out / "_leases").iterdir())


@pytest.mark.slow
def test_ray_tensor_parallel_group_is_one_actor(cluster, tiny_model, tmp_path):
    """run.tensor_parallel = 2 on two CPUs: one actor holding both (Ray keeps it on one node) leads
    a group of two ranks; the captions equal one worker's."""
    model, manifest = tiny_model("llava"), make_manifest(tmp_path, 24)
    expected = reference(tmp_path, model, manifest)
    job, out = make_job(tmp_path, "ray-tp", model, manifest)
    code = main(["run", str(job), "--set", 'run.executor="ray"', "--set", 'run.devices=["cpu", "cpu"]',
                 "--set", "run.tensor_parallel=2"])
    assert code == 0
    assert captions(out) == expected
