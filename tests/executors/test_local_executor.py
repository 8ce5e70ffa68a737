"""The in-process executor: shards on the main thread (see executors/local.py for why), the driver
beside it, and a shard that raises crashes the job with that error, its finished chunks kept."""

from __future__ import annotations

import threading

import pytest

from pipeline.config import from_dict
from pipeline.data.output import OutputDir
from pipeline.executors import worker
from pipeline.job import run_job
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_manifest


@pytest.fixture
def job(tiny_model, tmp_path):
    paths = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(6)]
    manifest = write_manifest(tmp_path / "m.parquet", {"path": paths})
    sections = job_sections(tiny_model("llava"), manifest, tmp_path / "out")
    sections["output"].update(rows_per_shard=3, chunk_rows=3)
    sections["generation"].update(max_output_length=4)
    return from_dict(sections)


def test_shards_run_on_the_main_thread(job, monkeypatch):
    threads, process_shard = [], worker.process_shard

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return process_shard(*args, **kwargs)

    monkeypatch.setattr(worker, "process_shard", recording)
    summary = run_job(job)
    assert summary.ok == 6
    assert threads and all(t is threading.main_thread() for t in threads)


def test_a_shard_that_raises_crashes_the_job_and_keeps_the_other_shards_work(job, monkeypatch):
    process_shard = worker.process_shard

    def second_fails(ctx, shard, on_commit):
        if shard.index == 1:
            raise RuntimeError("disk on fire")
        return process_shard(ctx, shard, on_commit)

    monkeypatch.setattr(worker, "process_shard", second_fails)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_job(job)
    monkeypatch.setattr(worker, "process_shard", process_shard)
    committed = {shard for shard, _ in OutputDir(job.output.dir).committed_chunks()}
    assert committed == {0}
    assert run_job(job).ok == 6  # the rerun finishes the rest
