"""A job from config to summary: every check first, then the work, then one summary line.

Order matters for the invariants: nothing is written until the config, the manifest, the model
dir, the device and the output dir have all been checked. The light checks (manifest, output dir,
a resume's settings, the model dir's files) come before anything imports torch, so a bad job is
refused in well under a second and without loading a GB of libraries.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import JobConfig, fingerprint_view
from pipeline.data.manifest import Manifest, open_manifest
from pipeline.data.output import OutputDir
from pipeline.data.schema import output_schema
from pipeline.data.status import read_status
from pipeline.data.webdataset import INDEX_FILE, save_index
from pipeline.executors import make_pool, run_pool
from pipeline.executors.shard_queue import node_share
from pipeline.logs import PLAIN, log
from pipeline.model import inspect  # the light half: the model dir is checked before torch loads


@dataclass
class Summary:
    rows: int
    ok: int
    errors: int
    processed: int
    seconds: float
    out_dir: str
    exit_code: int
    failed_shards: list[int] = field(default_factory=list)

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        failed = f"; shards FAILED: {self.failed_shards}" if self.failed_shards else ""
        return (f"{self.rows} rows: {self.ok} ok, {self.errors} errors; {self.processed} captioned this run "
                f"in {self.seconds:.1f}s ({rate:.2f} rows/s); captions in {self.out_dir}/captions{failed}")


def job_record(cfg: JobConfig, manifest: Manifest, info: inspect.ModelInfo | None = None) -> dict:
    """What `_job.json` holds. Without `info` (before the model dir is read): config, manifest and
    plan, which is what a resume with other settings is refused on."""
    config = cfg.to_dict()
    plan = {"shards": len(manifest.plan(cfg.output.rows_per_shard)), "rows_per_shard": cfg.output.rows_per_shard,
            "chunk_rows": cfg.output.chunk_rows}
    record = {"version": 1, "config": config, "manifest": manifest.describe(), "plan": plan}
    if info is None:
        return record
    record.update(model=inspect.describe(info), model_config_sha=_sha(info.config))
    view = {"config": fingerprint_view(config), "manifest": record["manifest"]["fingerprint"],
            "model": record["model_config_sha"]}
    record["fingerprint"] = _sha(view)
    return record


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_job(cfg: JobConfig) -> Summary:
    manifest = open_manifest(cfg.input, cfg.output.dir)
    out = OutputDir(cfg.output.dir)
    out.check_usable()
    out.check_compatible(job_record(cfg, manifest), cfg.output.mode)
    info = inspect.inspect_model(cfg.model)
    record = job_record(cfg, manifest, info)
    out.check_compatible(record, cfg.output.mode)  # now with the model's fingerprint
    # Imported only now, as they import torch: everything a bad job fails on is checked above.
    from pipeline import devices
    from pipeline.shard import cache_record, open_context, tensor_parallel_groups

    # Local devices are checked here, in the parent, before any worker starts or anything is written.
    workers = devices.worker_devices(cfg.run.devices, cfg.model.device) if cfg.run.executor == "local" else []
    if cfg.run.tensor_parallel > 1:  # the local devices into groups; Ray's pool groups its own
        workers = tensor_parallel_groups(cfg, info, workers)
    out = OutputDir(cfg.output.dir, record["fingerprint"])  # read back, only this job's files count
    shards = manifest.plan(cfg.output.rows_per_shard)
    if not shards:
        return _empty_job(cfg, manifest, out, record)
    mine, others = node_share(shards, cfg.run)
    ours = {s.index for s in mine + others}
    if cfg.output.mode == "resume" and out.read_job() and out.done_shards().keys() >= ours:
        share = "" if len(mine) == len(shards) else f" of node {cfg.run.node_rank}'s share"
        log.info(f"all {manifest.num_rows} rows{share} already done", extra=PLAIN)
        return _summary(cfg, 0, 0.0)
    record["plan"]["cache"] = cache_record(cfg, manifest, info)
    if cfg.input.format == "webdataset" and manifest.scanned:  # before any worker opens the manifest
        save_index(manifest, Path(cfg.output.dir) / INDEX_FILE)
    pool, owner = make_pool(cfg.run, record, workers, len(shards),
                            lambda device: open_context(cfg, manifest, out, info, record["model"], device))
    try:
        out.start(record, cfg.output.mode)  # refuses a run that lost the race for _job.json to another job
    except BaseException:
        pool.close()
        raise
    started = time.perf_counter()
    processed, failed = run_pool(pool, owner, cfg.run, out, mine, others, cfg.output.chunk_rows)
    return _summary(cfg, processed, time.perf_counter() - started, failed)


def _empty_job(cfg: JobConfig, manifest: Manifest, out: OutputDir, record: dict) -> Summary:
    """No rows, so no model to load; the output still gets its columns, so that the readers of an
    empty day's captions (pandas, DuckDB, HF datasets) see a table with no rows, not no table."""
    out.start(record, cfg.output.mode)
    out.commit_empty(output_schema(manifest.schema, cfg.input.bytes_column))
    return _summary(cfg, 0, 0.0)


def _summary(cfg: JobConfig, processed: int, seconds: float, failed: dict | None = None) -> Summary:
    status = read_status(cfg.output.dir)
    results = status["ok"] + status["errors"]  # one per (row, prompt)
    error_rate = status["errors"] / results if results else 0.0
    # A shard that kept killing its workers fails the job, after everything else is finished.
    code = 1 if error_rate > cfg.run.max_error_rate or failed else 0
    return Summary(status["rows"], status["ok"], status["errors"], processed, seconds, cfg.output.dir, code,
                   sorted(failed or {}))
