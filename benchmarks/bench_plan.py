"""`llava-batch plan` on a synthetic 100M-row manifest (issue 16: under 30 s and 2 GB RSS).

    python benchmarks/bench_plan.py [--rows 100000000] [--files 10] [--work /tmp/llava-batch-plan]

Writes the manifest once (files of short path strings), then times `llava-batch plan JOB --json`
in a fresh process and reads its peak RSS (VmHWM) from /proc. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.jobs import job_sections, write_job  # noqa: E402
from pipeline.testing.tiny_model import build_tiny_model  # noqa: E402


def manifest(work: Path, rows: int, files: int) -> Path:
    folder = work / f"manifest-{rows}"
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    per = rows // files
    for f in range(files):
        start = f * per
        paths = pa.array([f"images/{i:09d}.jpg" for i in range(start, start + per)])
        pq.write_table(pa.table({"path": paths}), folder / f"part-{f:03d}.parquet", row_group_size=1_000_000)
    (folder / "done").touch()
    return folder


def peak_rss_mib(proc: subprocess.Popen) -> float:
    """Poll the child's VmHWM until it exits: its own peak, not an inherited one."""
    peak = 0.0

    def poll() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=poll)
    thread.start()
    proc.wait()
    thread.join()
    return peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000_000)
    p.add_argument("--files", type=int, default=10)
    p.add_argument("--work", default="/tmp/llava-batch-plan")
    args = p.parse_args()
    work = Path(args.work)
    model = work / "llava"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llava")
    folder = manifest(work, args.rows, args.files)
    job = write_job(work / "job.toml", job_sections(model, folder, work / "out", output={"rows_per_shard": 10_000}))
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "plan", str(job), "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = peak_rss_mib(proc)
    seconds = time.perf_counter() - started
    report = json.loads(proc.stdout.read())
    print(json.dumps({"rows": report["rows"], "shards": report["shards"], "files": args.files,
                      "seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1),
                      "plan_s_inside": report["plan_s"]}, indent=1))


if __name__ == "__main__":
    main()
