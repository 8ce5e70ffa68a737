"""`status` and resume planning over a large output dir: seconds and peak RSS (issue 13, item 11).

    python benchmarks/bench_status.py [--chunks 100000] [--chunks-per-shard 10] [--in-progress 8]
                                      [--dir DIR] [--scan]

Builds (or reuses, with --dir) an output dir of N committed chunks of 4 rows, as a job leaves it:
`_job.json`, chunk files stamped with the job's fingerprint, a stats marker for every complete shard,
and `--in-progress` shards half done with no marker yet, over a real manifest of the same rows. Then
each measurement runs in a fresh process, so its peak RSS (resource.getrusage) is its own:

- status: `read_status`, what `llava-batch status` prints;
- resume: what `llava-batch run` does before it loads a model: open the manifest and plan it, check
  the dir's job, read which shards are done, the committed chunks, build the shard queue and the
  progress total;
- scan (--scan): what status did before, a pyarrow.dataset read of every chunk's status column.

The targets are under 30 s and under 1 GB at 100k chunks; the figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.config import JobConfig  # noqa: E402
from pipeline.data.manifest import open_manifest  # noqa: E402
from pipeline.data.output import OutputDir  # noqa: E402
from pipeline.data.schema import output_schema  # noqa: E402
from pipeline.data.status import read_status  # noqa: E402

CHUNK_ROWS = 4
FINGERPRINT = "bench-status-0001"
INPUT = pa.schema([("id", pa.string()), ("path", pa.string())])


def job_config(root: Path, chunks_per_shard: int) -> JobConfig:
    cfg = JobConfig()
    cfg.input.manifest = [str(root / "manifest.parquet")]
    cfg.output.dir = str(root / "out")
    cfg.output.rows_per_shard, cfg.output.chunk_rows = chunks_per_shard * CHUNK_ROWS, CHUNK_ROWS
    return cfg


def chunk_table(start: int) -> pa.Table:
    rows = range(start, start + CHUNK_ROWS)
    status = ["error" if i % 7 == 0 else "ok" for i in rows]
    return pa.Table.from_pydict({
        "id": [f"r{i}" for i in rows], "path": [f"/data/{i}.jpg" for i in rows], "row_index": list(rows),
        "caption": [None if s == "error" else "a photo of something on a table" for s in status],
        "status": status,
        "error": ["decode error: truncated" if s == "error" else None for s in status],
        "n_prompt_tokens": [600] * CHUNK_ROWS, "n_output_tokens": [12] * CHUNK_ROWS,
        "finish_reason": ["stop"] * CHUNK_ROWS, "frames": [None] * CHUNK_ROWS,
        "prompt": ["USER: <image>\nDescribe this image. ASSISTANT:"] * CHUNK_ROWS,
        "model": ["bench"] * CHUNK_ROWS,
    }, schema=output_schema(INPUT, None))


def write_shard(args: tuple) -> None:
    """One shard's chunk files (no fsync: building the dir is not what is measured), and its stats
    marker when the shard is complete."""
    out_dir, shard, n_chunks, per_shard, complete = args
    out = OutputDir(out_dir, FINGERPRINT)
    ok = errors = 0
    for k in range(n_chunks):
        table = chunk_table((shard * per_shard + k) * CHUNK_ROWS)
        meta = {"shard": shard, "chunk": k, "seconds": 0.5, "fingerprint": FINGERPRINT}
        table = table.replace_schema_metadata({"llava_batch": json.dumps(meta)})
        pq.write_table(table, out.chunk_path(shard, k))
        counts = Counter(table.column("status").to_pylist())
        ok, errors = ok + counts["ok"], errors + counts["error"]
    if complete:  # what commit_shard writes, less its fsync
        out.shard_path(shard).write_text(json.dumps({
            "shard": shard, "rows": per_shard * CHUNK_ROWS, "ok": ok, "errors": errors,
            "errors_by_kind": {"decode error": errors}, "seconds": 0.5 * n_chunks,
            "fingerprint": FINGERPRINT}))


def build(root: Path, n_chunks: int, per_shard: int, in_progress: int) -> None:
    cfg = job_config(root, per_shard)
    full_shards = (n_chunks - in_progress * (per_shard // 2)) // per_shard
    n_shards = full_shards + 2 * in_progress  # half-done shards, then as many not started
    n_rows = n_shards * per_shard * CHUNK_ROWS
    rows = {"id": [f"r{i}" for i in range(n_rows)], "path": [f"/data/{i}.jpg" for i in range(n_rows)]}
    pq.write_table(pa.table(rows, schema=INPUT), root / "manifest.parquet")
    manifest = open_manifest(cfg.input)
    out = OutputDir(cfg.output.dir, FINGERPRINT)
    out.start(record(cfg, manifest), "resume")
    work = [(cfg.output.dir, s, per_shard, per_shard, True) for s in range(full_shards)]
    work += [(cfg.output.dir, full_shards + s, per_shard // 2, per_shard, False) for s in range(in_progress)]
    with multiprocessing.get_context("spawn").Pool(min(4, multiprocessing.cpu_count())) as pool:
        pool.map(write_shard, work, chunksize=64)
    (root / "built.json").write_text(json.dumps({"chunks": sum(w[2] for w in work), "shards": n_shards}))


def record(cfg: JobConfig, manifest) -> dict:
    plan = {"shards": len(manifest.plan(cfg.output.rows_per_shard)),
            "rows_per_shard": cfg.output.rows_per_shard, "chunk_rows": cfg.output.chunk_rows}
    return {"version": 1, "config": cfg.to_dict(), "manifest": manifest.describe(), "plan": plan,
            "model": "bench", "fingerprint": FINGERPRINT}


def measure_status(root: Path) -> dict:
    status = read_status(root / "out")
    return {"rows done": status["done"], "shards complete": status["shards_complete"]}


def measure_resume(root: Path) -> dict:
    from pipeline.executors import _remaining
    from pipeline.executors.leases import Leases
    from pipeline.executors.shard_queue import ShardQueue, node_share

    job = json.loads((root / "out" / "_job.json").read_text())
    cfg = job_config(root, job["plan"]["rows_per_shard"] // CHUNK_ROWS)
    manifest = open_manifest(cfg.input)
    out = OutputDir(cfg.output.dir, FINGERPRINT)
    out.check_compatible(record(cfg, manifest), "resume")
    mine, others = node_share(manifest.plan(cfg.output.rows_per_shard), cfg.run)
    done = set(out.done_shards())
    queue = ShardQueue(out, Leases(out.root, 60.0), mine, others, cfg.run.max_retries, done)
    return {"shards to run": len(queue.todo), "rows to caption": _remaining(out, mine, CHUNK_ROWS, done)}


def measure_scan(root: Path) -> dict:
    import pyarrow.dataset as ds

    statuses = ds.dataset(root / "out" / "captions", format="parquet").to_table(columns=["status"])
    return {"rows done": len(statuses.column("status").to_pylist())}


def child(what: str, root: Path, args: argparse.Namespace) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if what == "build":
        return build(root, args.chunks, args.chunks_per_shard, args.in_progress)
    result = {"status": measure_status, "resume": measure_resume, "scan": measure_scan}[what](root)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1024), "rss_after_imports_mb":
                      round(before / 1024), **result}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--chunks-per-shard", type=int, default=10)
    p.add_argument("--in-progress", type=int, default=8, help="shards half done, no stats marker")
    p.add_argument("--dir", type=Path, help="build here, or reuse what is here (default: a temp dir)")
    p.add_argument("--scan", action="store_true", help="also time the old full read of every chunk")
    p.add_argument("--measure", choices=["build", "status", "resume", "scan"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return child(args.measure, args.dir, args)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-status-"))
    root.mkdir(parents=True, exist_ok=True)
    # Every step in its own process: Linux keeps a process's peak RSS across fork and exec, so this
    # one stays small, or it would show up as every measurement's peak.
    if not (root / "built.json").is_file():
        started = time.perf_counter()
        _in_child("build", root, args)
        print(f"built {root} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    built = json.loads((root / "built.json").read_text())
    print(f"{built['chunks']} committed chunks, {built['shards']} shards, {args.in_progress} in progress "
          f"({root})")
    for what in ["status", "resume"] + (["scan"] if args.scan else []):
        print(f"{what:>6}: {_in_child(what, root, args)}")


def _in_child(what: str, root: Path, args: argparse.Namespace) -> str:
    sizes = ["--chunks", str(args.chunks), "--chunks-per-shard", str(args.chunks_per_shard),
             "--in-progress", str(args.in_progress)]
    proc = subprocess.run([sys.executable, __file__, "--measure", what, "--dir", str(root), *sizes],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


if __name__ == "__main__":
    main()
