"""A job's progress read back from its output dir alone: `read_status` (the `status` command, the
job summary) and a finished shard's stats."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.output import JOB_FILE, OutputDir, open_chunk
from pipeline.errors import ConfigError


def error_kind(message: str | None) -> str:
    """Messages read `<cause>: <detail>`; the cause is what stats count by."""
    return (message or "").split(":", 1)[0].strip() or "unknown"


def shard_stats(out: OutputDir, shard: int, rows: int) -> dict:
    """Stats of a shard computed from its chunk files, so resumed shards count every run's work."""
    ok, errors, prompt_tokens, output_tokens, seconds = 0, Counter(), 0, 0, 0.0
    flags = Counter()
    for path in out.chunk_files(shard):
        pf = pq.ParquetFile(path)
        meta = json.loads(pf.schema_arrow.metadata[b"llava_batch"])
        if not out.is_ours(meta):
            continue
        seconds += meta.get("seconds", 0.0)
        flags.update(_flags(pf))
        t = pf.read(columns=["status", "error", "n_prompt_tokens", "n_output_tokens"]).to_pydict()
        for status, err, n_in, n_out in zip(t["status"], t["error"], t["n_prompt_tokens"], t["n_output_tokens"],
                                            strict=True):
            if status == "ok":
                ok += 1
                prompt_tokens += n_in or 0
                output_tokens += n_out or 0
            else:
                errors[error_kind(err)] += 1
    return {"shard": shard, "rows": rows, "ok": ok, "errors": sum(errors.values()),
            "errors_by_kind": dict(errors), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "seconds": round(seconds, 3), "flags": dict(flags)}


def _flags(pf: pq.ParquetFile) -> Counter:
    """Quality flags (data/quality.py) in one chunk; none in a chunk written before they existed."""
    if "flags" not in pf.schema_arrow.names:
        return Counter()
    return Counter(f for row in pf.read(columns=["flags"]).column("flags").to_pylist() for f in row or ())


def _chunk_statuses(out: OutputDir, path: Path) -> tuple[list[str], Counter, int]:
    """The status column, the flags and the manifest rows of one of this job's chunks (a row has a
    result per prompt); nothing for another job's (or a vanished) chunk."""
    with open_chunk(path) as pf:
        if pf is None or not out.chunk_is_ours(path, pf):
            return [], Counter(), 0
        table = pf.read(columns=["status", "row_index"])
        rows = pc.count_distinct(table.column("row_index")).as_py()
        return table.column("status").to_pylist(), _flags(pf), rows


def read_status(root: str | os.PathLike) -> dict:
    """Rows done and shards complete. Complete shards count from their stats markers; only the
    chunks of shards in progress are read, so the cost follows the work in flight, not the job."""
    out = OutputDir(root)
    job = out.read_job()
    if job is None:
        raise ConfigError(f"{root} is not a llava-batch output dir (no {JOB_FILE})")
    n_shards = job["plan"]["shards"]
    done = {s: stats for s, stats in out.done_shards().items() if s < n_shards}
    counts = Counter(ok=sum(s["ok"] for s in done.values()), error=sum(s["errors"] for s in done.values()))
    rows = sum(s["rows"] for s in done.values())
    flags = Counter()
    for stats in done.values():
        flags.update(stats.get("flags", {}))
    for shard, _, path in out.all_chunk_files():
        if shard not in done:
            statuses, chunk_flags, chunk_rows = _chunk_statuses(out, path)
            counts.update(statuses)
            flags.update(chunk_flags)
            rows += chunk_rows
    failed = [s for s in out.failed_shards() if s not in done]
    # done: manifest rows; ok + errors: results, one per (row, prompt)
    return {"rows": job["manifest"]["num_rows"], "done": rows, "ok": counts["ok"],
            "errors": counts["error"], "shards": n_shards, "shards_complete": len(done),
            "shards_failed": failed, "flags": dict(flags)}
