"""generation.dedup at 30% duplicate images (issue 16): rows/s with and without, same captions.

    python benchmarks/bench_dedup.py [--images 100] [--work /tmp/llava-batch-dedup]

The bench-preset llava (112 px tower, captions of ~40 tokens), `--images` distinct images plus
copies of some of them (other file names, same bytes) making 30% of the rows, one shard; each
setting in a fresh `llava-batch run`, timed end to end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.demo import write_image  # noqa: E402
from pipeline.testing.jobs import job_sections, write_job, write_manifest  # noqa: E402
from pipeline.testing.tiny_model import build_tiny_model  # noqa: E402


def prepare(work: Path, images: int) -> tuple[Path, Path]:
    model = work / "llava-bench-112"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llava", preset="bench", image_size=112, caption_median=40)
    sizes = [(640, 480), (480, 640), (512, 512), (800, 450)]
    paths = [write_image(work / "images" / f"{i:04d}.png", seed=i, size=sizes[i % 4]) for i in range(images)]
    dups = round(images * 0.3 / 0.7)  # 30% of all rows
    for j in range(dups):
        copy = work / "images" / f"dup{j:04d}.png"
        shutil.copy(paths[(7 * j) % images], copy)
        paths.insert((j * 3) % len(paths) + 1, copy)
    return model, write_manifest(work / "m.parquet", {"path": [str(p) for p in paths]})


def run(work: Path, model: Path, manifest: Path, dedup: bool, rows: int) -> tuple[dict, list]:
    out = work / f"out-{'dedup' if dedup else 'plain'}"
    shutil.rmtree(out, ignore_errors=True)
    sections = job_sections(model, manifest, out, generation={"max_batch_size": 16, "max_output_length": 128,
                                                              "dedup": dedup},
                            output={"rows_per_shard": rows, "chunk_rows": 50}, run={"progress": False})
    sections["model"]["dtype"] = "float32"
    job = write_job(work / f"{out.name}.toml", sections)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    stats = json.loads(next((out / "_stats").glob("shard-*.json")).read_text())
    table = sorted(ds.dataset(out / "captions").to_table(columns=["row_index", "caption"]).to_pylist(),
                   key=lambda r: r["row_index"])
    return {"dedup": dedup, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 2),
            "engine_wall_s": stats.get("engine", {}).get("wall_s"), "reused_rows": stats.get("dedup_reused_rows", 0),
            "skipped_decodes": stats.get("dedup_skipped_decodes", 0),
            "prefill_tokens": stats.get("engine", {}).get("prefill_tokens")}, table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--work", default="/tmp/llava-batch-dedup")
    args = p.parse_args()
    work = Path(args.work)
    model, manifest = prepare(work, args.images)
    rows = ds.dataset(manifest).count_rows()
    plain, a = run(work, model, manifest, False, rows)
    dedup, b = run(work, model, manifest, True, rows)
    print(json.dumps({"rows": rows, "plain": plain, "dedup": dedup, "same_captions": a == b,
                      "speedup": round(dedup["rows_per_s"] / plain["rows_per_s"], 2)}, indent=1))


if __name__ == "__main__":
    main()
