"""The fast engine's caption workloads (issue #5), CPU bf16, each engine in its own process.

    python benchmarks/workloads.py w1   # decode-dominated: 112 px tower (64 image tokens), <= 128 new tokens,
                                        # EOS calibrated to a median caption of 40 tokens
    python benchmarks/workloads.py w2   # prefill-dominated: 336 px tower (576 image tokens), <= 64 new tokens,
                                        # the default calibration (median 12)

Both: bench-preset llava (text hidden 512, 4 layers), 160 images of mixed sizes, EOS-driven lengths,
fast engine with 16 slots timed through `run` end to end (decode + write inside the time) against a
plain transformers static-batch loop at batch 8 and 16 (its best is the baseline). Prints one JSON
object with the load average before and after: numbers only mean something on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.demo import write_image  # noqa: E402
from pipeline.testing.jobs import write_manifest  # noqa: E402
from pipeline.testing.tiny_model import build_tiny_model  # noqa: E402

# caption_median: the tiny model's EOS calibration (tiny-model --caption-median). Its default, 12 tokens, suits
# the tests; W1 stands for an accelerator's decode-bound captioning and asks for longer captions.
WORKLOADS = {"w1": {"image_size": 112, "max_output_length": 128, "caption_median": 40},
             "w2": {"image_size": 336, "max_output_length": 64, "caption_median": 12}}


def prepare(work: Path, image_size: int, caption_median: int, images: int) -> tuple[Path, Path]:
    model = work / f"llava-bench-{image_size}-median{caption_median}"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llava", preset="bench", image_size=image_size, caption_median=caption_median)
    manifest = work / f"images-{images}.parquet"
    if not manifest.is_file():
        sizes = [(640, 480), (480, 640), (512, 512), (800, 450), (300, 400)]
        paths = [write_image(work / "images" / f"{i:04d}.png", seed=i, size=sizes[i % len(sizes)])
                 for i in range(images)]
        write_manifest(manifest, {"path": [str(p) for p in paths]})
    return model, manifest


def bench(model: Path, manifest: Path, out: Path, engines: str, max_new: int, dtype: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "bench", "--workload", "captions", "--model", str(model),
           "--manifest", str(manifest), "--engines", engines, "--max-output-length", str(max_new),
           "--dtype", dtype, "--device", "cpu", "--out", str(out), *extra]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    report = json.loads((out / "captions_bench.json").read_text())
    report["process_s"] = round(time.perf_counter() - started, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--work", default="/tmp/llava-batch-bench")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--hf-batch-sizes", default="8,16")
    parser.add_argument("--caption-median", type=int, default=None, help="override the workload's")
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "bfloat16", "float32"],
                        help="auto: what a job on this CPU runs in (devices.resolve_dtype)")
    parser.add_argument("--slots", default="16", help='fast engine slots, or "auto" (the memory plan)')
    parser.add_argument("--compile", action="store_true", help="generation.compile (on the CPU: bucket padding)")
    args = parser.parse_args()
    spec = WORKLOADS[args.workload]
    work = Path(args.work)
    spec["caption_median"] = args.caption_median or spec["caption_median"]
    model, manifest = prepare(work, spec["image_size"], spec["caption_median"], args.images)
    load_before = os.getloadavg()
    out = work / f"{args.workload}-out"
    fast = bench(model, manifest, out / "fast", "fast", spec["max_output_length"], args.dtype,
                 ["--max-batch-size", args.slots, *(["--compile"] if args.compile else [])])
    hf = bench(model, manifest, out / "hf", "hf", spec["max_output_length"], args.dtype,
               ["--hf-batch-sizes", args.hf_batch_sizes])
    print(json.dumps(summary(args, spec, fast, hf, load_before), indent=1))


def summary(args, spec: dict, fast: dict, hf: dict, load_before) -> dict:
    """The one JSON object: both engines' figures side by side, the fast engine's against the peak."""
    best = max(hf["hf"], key=lambda r: r["tokens_per_s"])
    f = fast["fast"]
    peak = fast["machine"][f"{'fp32' if fast['dtype'] == 'float32' else 'bf16'}_matmul_gflop_per_s"]
    return {
        "workload": args.workload, **spec, "images": args.images, "dtype": fast["dtype"], "slots": args.slots,
        "compile": args.compile,
        "fast_tokens_per_s": f["tokens_per_s"], "fast_seconds": f["seconds"], "fast_output_tokens": f["output_tokens"],
        "hf": hf["hf"], "hf_best_tokens_per_s": best["tokens_per_s"],
        "speedup_vs_best_hf": round(f["tokens_per_s"] / best["tokens_per_s"], 2),
        "busy_fraction": f["busy_fraction"], "engine": f["engine"],
        "prefill_gflop_per_s": f["prefill_gflop_per_s"], "matmul_peak_gflop_per_s": peak,
        "prefill_fraction_of_peak": round(f["prefill_gflop_per_s"] / peak, 3) if f["prefill_gflop_per_s"] else None,
        "machine": fast["machine"], "process_s": {"fast": fast["process_s"], "hf": hf["process_s"]},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }

if __name__ == "__main__":
    main()
