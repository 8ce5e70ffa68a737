"""Throughput with 1 vs 2 CPU workers (local processes and Ray actors), and Ray's cost per shard.

    python benchmarks/bench_workers.py [--rows 96] [--skip-ray]

Each configuration is one `llava-batch run` process, timed end to end (wall: imports, model loads,
Ray start) and in steady state (rows/s between the first and the last chunk commit, from the
chunk files' mtimes, so start-up is left out). Model: bench-preset llava, 112 px tower
(64 image tokens), greedy, <= 32 new tokens, fp32, on this host's CPUs.

Ray's cost per shard: the test-preset model (a shard is almost all overhead) with 1-row shards,
one worker in-process vs one Ray actor, both torch on 1 thread: (steady-state span difference) / shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.demo import write_image  # noqa: E402
from pipeline.testing.jobs import job_sections, write_job, write_manifest  # noqa: E402
from pipeline.testing.tiny_model import build_tiny_model  # noqa: E402

ONE, TWO = '["cpu"]', '["cpu", "cpu"]'
LOCAL, RAY = ('run.executor="local"',), ('run.executor="ray"', 'run.ray_address="local"')


def run(job: Path, out: Path, *sets: str, threads: int | None = None) -> dict:
    args = [sys.executable, "-m", "pipeline.cli", "run", str(job)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(sets)} failed:\n{proc.stderr[-3000:]}")
    chunks = sorted((p.stat().st_mtime, p) for p in (out / "captions").glob("*.parquet"))
    span = chunks[-1][0] - chunks[0][0]
    # Rows committed after the first chunk, over the time since it: start-up left out.
    rows_after_first = (len(chunks) - 1) * tomllib.loads(job.read_text())["output"]["chunk_rows"]
    return {"wall_s": round(wall, 2), "steady_rows_per_s": round(rows_after_first / span, 2) if span else None,
            "span_s": round(span, 3), "chunks": len(chunks)}


def ray_round_trip_ms(calls: int = 300) -> float:
    """Driver -> actor -> driver for one call that does nothing: what dispatching a shard costs."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        actor = ray.remote(num_cpus=1)(_Echo).remote()
        ray.get(actor.echo.remote(0))
        started = time.perf_counter()
        for i in range(calls):
            ref = actor.echo.remote(i)
            ray.wait([ref], timeout=5)
            ray.get(ref)
        return round(1000 * (time.perf_counter() - started) / calls, 3)
    finally:
        ray.shutdown()


class _Echo:
    def echo(self, x):
        return x


def make(root: Path, name: str, model: Path, manifest: Path, **output) -> tuple[Path, Path]:
    out = root / name
    sections = job_sections(model, manifest, out, output=output,
                            generation={"max_batch_size": 4, "max_output_length": 32},
                            run={"progress": False, "decode_workers": 2})
    return write_job(root / f"{name}.toml", sections), out


def prepare(root: Path, rows: int) -> tuple[Path, int]:
    """A manifest of `rows` rounded down to whole shards and chunks, over 16 images of mixed sizes."""
    images = [str(write_image(root / "media" / f"{i}.png", seed=i, size=(96 + 8 * i, 80))) for i in range(16)]
    n = rows - rows % 12
    manifest = write_manifest(root / "m.parquet", {"id": [str(i) for i in range(n)],
                                                   "path": [images[i % 16] for i in range(n)]})
    return manifest, n


def configs(skip_ray: bool) -> dict:
    """name -> --set overrides, then the torch threads where a config pins them."""
    # A 1-thread single worker too: what each of the two workers (1 thread each) gets on 2 cores.
    found = {"local 1 worker": (*LOCAL, f"run.devices={ONE}"),
             "local 1 worker, 1 thread": (*LOCAL, f"run.devices={ONE}", 1),
             "local 2 workers": (*LOCAL, f"run.devices={TWO}")}
    if not skip_ray:
        found |= {"ray 1 actor": (*RAY, f"run.devices={ONE}"), "ray 2 actors": (*RAY, f"run.devices={TWO}")}
    return found


def throughput(root: Path, model: Path, manifest: Path, skip_ray: bool) -> dict:
    result = {}
    for i, (name, sets) in enumerate(configs(skip_ray).items()):
        job, out = make(root, f"t{i}", model, manifest, rows_per_shard=12, chunk_rows=4)
        threads = sets[-1] if isinstance(sets[-1], int) else None
        result[name] = run(job, out, *[s for s in sets if isinstance(s, str)], threads=threads)
        print(name, result[name], file=sys.stderr, flush=True)
    return result


def ray_overhead(root: Path, manifest: Path, shards: int) -> dict:
    """One row a shard on the test model, local against Ray: what Ray adds to each shard."""
    test = build_tiny_model(root / "test", "llava")
    per = {}
    for name, sets in (("local", LOCAL), ("ray", RAY)):
        job, out = make(root, f"o-{name}", test, manifest, rows_per_shard=1, chunk_rows=1)
        per[name] = run(job, out, *sets, f"run.devices={ONE}", threads=1)  # a 1-CPU Ray actor runs torch on 1 thread
    return {"round_trip_ms": ray_round_trip_ms(), "shards": shards, "local": per["local"], "ray": per["ray"],
            "ms_per_shard": round(1000 * (per["ray"]["span_s"] - per["local"]["span_s"]) / shards, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bw", dir="/tmp"))
    manifest, n = prepare(root, args.rows)
    bench = build_tiny_model(root / "bench", "llava", preset="bench", image_size=112)
    result = {"host_cpus": os.cpu_count(), "rows": n, "load_before": os.getloadavg()[0]}
    result["throughput"] = throughput(root, bench, manifest, args.skip_ray)
    if not args.skip_ray:
        result["ray_overhead"] = ray_overhead(root, manifest, n)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
