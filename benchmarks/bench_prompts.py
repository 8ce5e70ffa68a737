"""Several prompts per media (issue 16): one job with three prompts against three single-prompt
jobs on W1-like data: prefill tokens, vision-tower inputs and wall time, same captions.

    python benchmarks/bench_prompts.py [--images 100] [--image-size 112] [--work /tmp/llava-batch-prompts]

The bench-preset llava (`--image-size` px tower: 112 gives W1's 64 image tokens, 336 llava-1.5's
576), captions of ~40 tokens, `--images` images, one shard; each job a fresh `llava-batch run`,
timed end to end (the three single-prompt jobs load the model three times, as a user running
them would; engine time is given apart). Prints one JSON object.
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

PROMPTS = {"short": "Write a short caption for this image.",
           "dense": "Describe this image in detail, one paragraph.",
           "tags": "List the objects in this image as comma separated tags."}


def prepare(work: Path, images: int, image_size: int) -> tuple[Path, Path]:
    model = work / f"llava-bench-{image_size}"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llava", preset="bench", image_size=image_size, caption_median=40)
    sizes = [(640, 480), (480, 640), (512, 512), (800, 450)]
    paths = [write_image(work / "images" / f"{i:04d}.png", seed=i, size=sizes[i % 4]) for i in range(images)]
    return model, write_manifest(work / "m.parquet", {"path": [str(p) for p in paths]})


def run(work: Path, model: Path, manifest: Path, name: str, rows: int, **generation) -> tuple[dict, dict]:
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    sections = job_sections(model, manifest, out, generation={"max_batch_size": 16, "max_output_length": 128,
                                                              **generation},
                            output={"rows_per_shard": rows, "chunk_rows": 50}, run={"progress": False})
    job = write_job(work / f"{out.name}.toml", sections)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    engine = json.loads(next((out / "_stats").glob("shard-*.json")).read_text()).get("engine", {})
    table = ds.dataset(out / "captions").to_table(columns=["row_index", "prompt_name", "caption"]).to_pylist()
    captions = {(r["row_index"], r["prompt_name"] or name): r["caption"] for r in table}
    keys = ("prefill_tokens", "shared_prefix_tokens", "media_encoded", "generated_tokens", "busy_s", "wall_s")
    return {"seconds": round(seconds, 2), **{k: engine.get(k) for k in keys}}, captions


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--work", default="/tmp/llava-batch-prompts")
    args = p.parse_args()
    work = Path(args.work)
    model, manifest = prepare(work, args.images, args.image_size)
    rows = ds.dataset(manifest).count_rows()
    multi, together = run(work, model, manifest, "multi", rows, prompts=PROMPTS)
    singles, apart = {}, {}
    for name, text in PROMPTS.items():
        singles[name], captions = run(work, model, manifest, name, rows, prompt=text)
        apart.update(captions)
    total = {k: round(sum(s[k] for s in singles.values()), 2) for k in ("seconds", "prefill_tokens", "media_encoded",
                                                                         "busy_s", "wall_s")}
    print(json.dumps({
        "rows": rows, "image_size": args.image_size, "prompts": len(PROMPTS),
        "one_job_three_prompts": multi, "three_jobs": total, "per_job": singles,
        "same_captions": together == apart,
        "prefill_tokens_ratio": round(multi["prefill_tokens"] / total["prefill_tokens"], 3),
        "speedup_end_to_end": round(total["seconds"] / multi["seconds"], 2),
        "speedup_engine_wall": round(total["wall_s"] / multi["wall_s"], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
