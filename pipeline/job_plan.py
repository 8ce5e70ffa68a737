"""`llava-batch plan JOB.toml`: what a job will do, before a 40-hour run does it.

Reads the manifest's Parquet footers only (no media, no weights): rows, shards, chunks, the rows an
earlier run already captioned, and the cache plan for the job's first device (the model dir's
config and processor, its free memory less the weights' size). `--calibrate N` then captions the
first N rows for real, through the same pipeline into a scratch dir, and scales what that took to
the rows left: output tokens and wall time, per worker and for the job.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.data.manifest import open_manifest
from pipeline.data.output import JOB_FILE
from pipeline.data.status import read_status
from pipeline.model import inspect


def plan_job(cfg: JobConfig, calibrate: int = 0) -> dict:
    started = time.perf_counter()
    manifest = open_manifest(cfg.input, cfg.output.dir)
    shards = manifest.plan(cfg.output.rows_per_shard)
    done = _done(cfg)
    info = inspect.inspect_model(cfg.model)
    report = {"rows": manifest.num_rows, "shards": len(shards),
              "chunks": sum(-(-(s.stop - s.start) // cfg.output.chunk_rows) for s in shards),  # counted, not built
              "rows_done": done, "rows_left": manifest.num_rows - done, "prompts_per_row": _prompts_per_row(cfg, manifest)}
    from pipeline import devices  # torch: only once the light checks passed

    workers = devices.worker_devices(cfg.run.devices, cfg.model.device)
    report["workers"] = max(1, len(workers) // cfg.run.tensor_parallel)
    first = workers[0] if cfg.run.tensor_parallel == 1 else "+".join(workers[:cfg.run.tensor_parallel])
    report["cache_plan"] = _cache_plan(cfg, manifest, info, first)
    report["plan_s"] = round(time.perf_counter() - started, 2)
    if calibrate:
        report["calibration"] = _calibrate(cfg, manifest, calibrate, report, first.split("+"))
    return report


def _prompts_per_row(cfg: JobConfig, manifest) -> int | str:
    """Results each row gets: one per prompt (a list-valued prompt column: each row its own count)."""
    column = cfg.input.prompt_column
    kind = manifest.schema.field(column).type if column else None
    if kind is not None and (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return "per row (a list column)"
    return len(cfg.generation.prompts or {}) or 1


def _done(cfg: JobConfig) -> int:
    if cfg.output.mode == "overwrite" or not (Path(cfg.output.dir) / JOB_FILE).is_file():
        return 0
    return read_status(cfg.output.dir)["done"]


def _cache_plan(cfg: JobConfig, manifest, info, device_spec: str) -> dict:
    """The plan a worker on `device_spec` would make before loading the weights."""
    from pipeline import devices
    from pipeline.model import loader
    from pipeline.shard import job_prompt_length, plan_before_loading

    device = devices.resolve_device(device_spec.split("+")[0])
    dtype = loader.compute_dtype(info, devices.resolve_dtype(cfg.model.dtype, device), device)
    processor = loader.load_processor(info, cfg.model.trust_remote_code)
    prompt = job_prompt_length(cfg, manifest, info, processor)
    plan = plan_before_loading(cfg, info, prompt, device, dtype, cfg.run.tensor_parallel)
    return {"device": str(device), **plan.describe()}


def _calibrate(cfg: JobConfig, manifest, n: int, report: dict, group: list[str]) -> dict:
    """Caption the first n rows on one worker's devices into a scratch dir and scale: the engine's
    time per row (model load apart) over the rows left, divided among the workers."""
    from pipeline.job import run_job

    n = min(n, manifest.num_rows)
    with tempfile.TemporaryDirectory(prefix="llava-batch-plan-") as scratch:
        subset = Path(scratch) / "calibration.parquet"
        batches = [b for _, b in manifest.iter_rows(0, n)]
        pq.write_table(pa.Table.from_batches(batches, schema=manifest.schema), subset)
        out = Path(scratch) / "out"
        trial = dataclasses.replace(
            cfg, input=dataclasses.replace(cfg.input, manifest=[str(subset)]),
            output=dataclasses.replace(cfg.output, dir=str(out), mode="overwrite", rows_per_shard=n,
                                       chunk_rows=min(cfg.output.chunk_rows, n)),
            run=dataclasses.replace(cfg.run, progress=False, devices=group, executor="local", num_nodes=1,
                                    node_rank=0))
        started = time.perf_counter()
        summary = run_job(trial)
        total = time.perf_counter() - started
        stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("shard-*.json")]
    seconds = sum(s.get("engine", {}).get("wall_s", s.get("seconds", 0.0)) for s in stats) or total
    tokens = sum(s["output_tokens"] for s in stats)
    per_row_s, per_row_tokens = seconds / n, tokens / n
    left = report["rows_left"]
    return {"rows": n, "ok": summary.ok, "errors": summary.errors, "seconds": round(seconds, 2),
            "load_and_setup_s": round(total - seconds, 2), "tokens_per_row": round(per_row_tokens, 1),
            "rows_per_s": round(n / seconds, 3) if seconds else None,
            "estimated_output_tokens": round(left * per_row_tokens),
            "estimated_wall_s": round(left * per_row_s / report["workers"], 1)}


def describe(report: dict) -> str:
    plan = report["cache_plan"]
    lines = [f"{report['rows']} rows in {report['shards']} shards of {report['chunks']} chunks; "
             f"{report['rows_done']} done, {report['rows_left']} left; {report['workers']} worker(s); "
             f"prompts a row: {report['prompts_per_row']}",
             f"cache plan on {plan['device']}: {plan['slots']} slots x {plan['slot_length']} positions "
             f"(prompts <= {plan['prompt_length']} tokens), {plan['cache_gib']} GiB, limited by {plan['limited_by']}"]
    if cal := report.get("calibration"):
        hours = cal["estimated_wall_s"] / 3600
        lines.append(f"calibration: {cal['rows']} rows in {cal['seconds']} s ({cal['rows_per_s']} rows/s, "
                     f"{cal['tokens_per_row']} tokens a row); estimate for the rows left: "
                     f"{cal['estimated_output_tokens']} tokens, {cal['estimated_wall_s']} s ({hours:.1f} h)")
    return "\n".join(lines)
