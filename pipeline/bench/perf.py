"""`llava-batch bench`: MindIE's llava performance test, and the caption-workload timing.

    llava-batch bench --model DIR [--batch-sizes 1,...,10] [--output-length 256] [--compare hf] [--out DIR]

One image, batch sizes 1..10, `--output-length` tokens per row with EOS ignored. first_token_ms is
the wall time of the same run stopped after one token; per_token_ms the rest divided by the other
output-length - 1 steps; both include the processor, as a caller would see them. Writes
benchmark.csv and benchmark.png to --out. `--compare hf` times plain transformers `generate` on the
same inputs in the same process and adds hf_* columns and the speedup.

`--workload captions --manifest M` times `run` end to end instead (pipeline/bench/captions.py).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from pipeline import devices
from pipeline.bench.captions import run as run_captions
from pipeline.bench.common import hf_inputs, load, machine_peaks
from pipeline.config import GenerationConfig
from pipeline.engine.base import Request
from pipeline.engine.fast import FastEngine
from pipeline.errors import ConfigError
from pipeline.model import loader
from pipeline.testing.demo import synthetic_image

COLUMNS = ["batch_size", "input_tokens", "output_tokens", "first_token_ms", "per_token_ms", "e2e_s", "tokens_per_s"]


def cli(args) -> int:
    if args.workload == "captions":
        if not args.manifest:
            raise ConfigError("bench --workload captions needs --manifest")
        report = run_captions(args)
    else:
        report = run_perf(args)
    print(json.dumps(report, indent=1))
    return 0


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes must be >= 1, got {text!r}")
    return sizes


def run_perf(args) -> dict:
    sizes = _batch_sizes(args.batch_sizes)
    info, processor, model, device = load(args.model, args.device, args.dtype)
    weight_bytes = lm_weight_bytes(model)  # before the fast engine packs its linears (packed_linear.py)
    # ... so transformers runs on a copy of its own, as plain as in the hf engine's own jobs.
    hf_model = loader.load_model(info, device, model.dtype) if args.compare == "hf" else None
    prompt = loader.build_prompt(processor, info, args.prompt, "image")
    request = Request(0, prompt, "image", image=synthetic_image(0, (640, 480)))
    n_input = int(processor(text=[prompt], images=[request.image], return_tensors="pt")["input_ids"].shape[1])
    rows = []
    for n in sizes:
        row = _measure(lambda length, n=n: _fast(model, processor, device, [request] * n, n_input, length, args.compile),
                       n, n_input, args.output_length)
        if args.compare == "hf":
            hf = _measure(lambda length, n=n: _hf(hf_model, processor, device, [request] * n, length),
                          n, n_input, args.output_length)
            row.update({f"hf_{k}": hf[k] for k in COLUMNS[3:]})
            row["speedup"] = round(row["tokens_per_s"] / hf["tokens_per_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "benchmark.csv", rows)
    plot(out / "benchmark.png", rows, f"{info.name}: {args.output_length} tokens, {args.dtype}")
    report = {"model": info.name, "device": str(device), "dtype": args.dtype, "rows": rows,
              "csv": str(out / "benchmark.csv")}
    if device.type == "cpu" and sizes[0] == 1:
        report["batch1_roofline"] = roofline(weight_bytes, rows[0]["per_token_ms"])
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    return report


def lm_weight_bytes(model) -> int:
    """What a decode step reads: the language model's weights but the embedding table (one row)."""
    lm = [model.model.language_model, model.lm_head]
    weight_bytes = sum(t.numel() * t.element_size() for m in lm for t in [*m.parameters(), *m.buffers()])
    return weight_bytes - model.model.language_model.embed_tokens.weight.numel() * model.dtype.itemsize


def roofline(weight_bytes: int, per_token_ms: float) -> dict:
    """Batch-1 decode against memory bandwidth: every step reads all language-model weights once."""
    peaks = machine_peaks()
    floor_ms = weight_bytes / (peaks["copy_gb_per_s"] / 2 * 1e9) * 1e3  # a read is half a copy's traffic
    return {"lm_weight_mb": round(weight_bytes / 2**20, 1), **peaks, "floor_ms": round(floor_ms, 3),
            "per_token_ms": per_token_ms, "fraction_of_roofline": round(floor_ms / per_token_ms, 3)}


def _measure(run, n: int, n_input: int, length: int, repeats: int = 2) -> dict:
    run(min(length, 4))  # warm-up: first-call allocations and kernel selection
    # Best of `repeats`: on a shared machine the least disturbed run is the one that measures the code.
    first = min(run(1) for _ in range(repeats))
    full = min(run(length) for _ in range(repeats))
    per_token = (full - first) / max(length - 1, 1)
    return {"batch_size": n, "input_tokens": n_input, "output_tokens": length,
            "first_token_ms": round(first * 1e3, 2), "per_token_ms": round(per_token * 1e3, 3),
            "e2e_s": round(full, 3), "tokens_per_s": round(n * length / full, 2)}


def _fast(model, processor, device, requests: list[Request], n_input: int, length: int, compile: bool) -> float:
    gen = GenerationConfig(max_batch_size=len(requests), max_input_length=n_input, max_output_length=length)
    engine = FastEngine(model, processor, gen, device, ignore_eos=True, compile=compile)
    started = time.perf_counter()
    results = engine.generate(requests)
    devices.synchronize(device)
    assert all(r.error is None for r in results), results[0].error
    return time.perf_counter() - started


@torch.inference_mode()
def _hf(model, processor, device, requests: list[Request], length: int) -> float:
    started = time.perf_counter()
    inputs = hf_inputs(processor, model, device, [r.prompt for r in requests], [r.image for r in requests])
    # min_new_tokens masks EOS: every row runs the full length, as in the MindIE test.
    model.generate(**inputs, max_new_tokens=length, min_new_tokens=length, do_sample=False)
    devices.synchronize(device)
    return time.perf_counter() - started


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict], title: str) -> bool:
    """tokens/s and per-token latency against batch size; skipped (False) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r["batch_size"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label in (("", "fast"), ("hf_", "transformers")):
        if f"{prefix}tokens_per_s" in rows[0]:
            a.plot(xs, [r[f"{prefix}tokens_per_s"] for r in rows], marker="o", label=label)
            b.plot(xs, [r[f"{prefix}per_token_ms"] for r in rows], marker="o", label=label)
    a.set(xlabel="batch size", ylabel="tokens / s", title="throughput")
    b.set(xlabel="batch size", ylabel="ms / token step", title="decode latency")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
