"""A job from config to summary: every check first, then the work, then one summary line.

Order matters for the invariants: nothing is written until the config, the manifest, the model
dir, the device and the output dir have all been checked.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass

from pipeline import devices, models
from pipeline.config import JobConfig, fingerprint_view
from pipeline.engine import HFEngine
from pipeline.executors.local import run_local
from pipeline.manifest import Manifest, open_manifest
from pipeline.output import OutputDir, read_status
from pipeline.runner import JobContext


@dataclass
class Summary:
    rows: int
    ok: int
    errors: int
    processed: int
    seconds: float
    out_dir: str
    exit_code: int

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.rows} rows: {self.ok} ok, {self.errors} errors; {self.processed} captioned this run "
                f"in {self.seconds:.1f}s ({rate:.2f} rows/s); captions in {self.out_dir}/captions")


def job_record(cfg: JobConfig, manifest: Manifest, info: models.ModelInfo) -> dict:
    config = cfg.to_dict()
    plan = {"shards": len(manifest.plan(cfg.output.rows_per_shard)), "rows_per_shard": cfg.output.rows_per_shard,
            "chunk_rows": cfg.output.chunk_rows}
    record = {"version": 1, "config": config, "manifest": manifest.describe(), "plan": plan,
              "model": models.describe(info), "model_config_sha": _sha(info.config)}
    view = {"config": fingerprint_view(config), "manifest": record["manifest"]["fingerprint"],
            "model": record["model_config_sha"]}
    record["fingerprint"] = _sha(view)
    return record


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_job(cfg: JobConfig) -> Summary:
    manifest = open_manifest(cfg.input)
    info = models.inspect_model(cfg.model)
    device = devices.resolve_device(cfg.model.device)
    dtype = devices.resolve_dtype(cfg.model.dtype, device)
    out = OutputDir(cfg.output.dir)
    record = job_record(cfg, manifest, info)
    out.check_compatible(record, cfg.output.mode)
    shards = manifest.plan(cfg.output.rows_per_shard)
    if cfg.output.mode == "resume" and out.read_job() and all(out.shard_done(s.index) for s in shards):
        print(f"all {manifest.num_rows} rows already done", file=sys.stderr)
        return _summary(cfg, 0, 0.0)
    processor = models.load_processor(info, cfg.model.trust_remote_code)
    model = models.load_model(info, device, dtype, cfg.model.trust_remote_code)
    engine = HFEngine(model, processor, cfg.generation, device)
    out.start(record, cfg.output.mode)
    ctx = JobContext(cfg, manifest, out, info, processor, engine, record["model"])
    started = time.perf_counter()
    processed = run_local(ctx, shards)
    return _summary(cfg, processed, time.perf_counter() - started)


def _summary(cfg: JobConfig, processed: int, seconds: float) -> Summary:
    status = read_status(cfg.output.dir)
    done = status["done"]
    error_rate = status["errors"] / done if done else 0.0
    code = 1 if error_rate > cfg.run.max_error_rate else 0
    return Summary(status["rows"], status["ok"], status["errors"], processed, seconds, cfg.output.dir, code)
