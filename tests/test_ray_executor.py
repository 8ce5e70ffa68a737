"""Ray executor: a real local Ray cluster, two CPU actors, one killed mid-shard; exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading

import pytest

from pipeline.cli import main
from tests.scaleout_common import (
    captions,
    descendants,
    make_job,
    make_manifest,
    n_chunks,
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
    job, out = make_job(tmp_path, "ray", model, manifest)
    killed: list[int] = []

    def kill_one_actor() -> None:
        wait_for(lambda: n_chunks(out) >= 2, what="first chunks")
        actors = descendants(os.getpid(), "ray::ShardActor.run")
        if actors:
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    code = main(["run", str(job), "--set", 'run.executor="ray"', "--set", 'run.devices=["cpu", "cpu"]'])
    killer.join(timeout=60)
    assert code == 0
    assert killed, "an actor must be killed mid-shard for the test to mean anything"
    assert "retrying shard" in capsys.readouterr().err
    assert captions(out) == expected
    assert not list((out / "_leases").iterdir())
