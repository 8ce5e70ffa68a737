"""`llava-batch bench --workload captions`: a caption manifest, EOS-driven lengths, timed end to end.

fast: `run_job` with the fast engine (decode, generate, write and commit all inside the time).
hf:   a plain transformers static-batch loop over the same files: decode, processor (padding to the
      longest), `generate`, EOS-driven, at each of --hf-batch-sizes; its best is the baseline.
Generated tokens are counted the same way for both (up to and including EOS).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline import devices
from pipeline.bench.common import hf_inputs, load, machine_peaks
from pipeline.config import from_dict, validate
from pipeline.data.media import decode_media
from pipeline.families import meta_model
from pipeline.model import loader


def run(args) -> dict:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.compare == "hf" and "hf" not in engines:
        engines.append("hf")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dtype = devices.resolve_dtype(args.dtype, devices.resolve_device(args.device))
    report = {"model": Path(args.model).name, "manifest": args.manifest, "dtype": str(dtype).removeprefix("torch."),
              "max_output_length": args.max_output_length, "machine": machine_peaks()}
    if "fast" in engines:
        report["fast"] = run_fast(args)
    if "hf" in engines:
        report["hf"] = run_hf_loop(args)
        best = max(report["hf"], key=lambda r: r["tokens_per_s"])
        report["hf_best"] = best
        if "fast" in report:
            report["speedup"] = round(report["fast"]["tokens_per_s"] / best["tokens_per_s"], 3)
    (Path(args.out) / "captions_bench.json").write_text(json.dumps(report, indent=1))
    return report


def run_fast(args) -> dict:
    from pipeline.job import run_job

    out = Path(args.out) / "run-fast"  # kept: the captions behind the figures
    cfg = from_dict({
        "model": {"path": str(Path(args.model).resolve()), "dtype": args.dtype, "device": args.device},
        "input": {"manifest": [str(Path(args.manifest).resolve())]},
        "generation": {"prompt": args.prompt, "max_batch_size": args.max_batch_size,
                       "max_output_length": args.max_output_length, "max_input_length": 1024, "engine": "fast",
                       "compile": args.compile},
        "output": {"dir": str(out), "mode": "overwrite", "rows_per_shard": 100_000, "chunk_rows": 100},
        "run": {"progress": False},
    })
    validate(cfg)
    summary = run_job(cfg)
    stats = [json.loads(p.read_text()) for p in sorted((out / "_stats").glob("*.json"))]
    tokens = sum(s["output_tokens"] for s in stats)
    engine = _sum([s.get("engine", {}) for s in stats])
    flops = prefill_flops(meta_model(args.model), engine.get("prefill_tokens", 0), summary.ok)
    seconds = prefill_seconds(engine)
    return {"rows": summary.rows, "ok": summary.ok, "seconds": round(summary.seconds, 3),
            "output_tokens": tokens, "tokens_per_s": round(tokens / summary.seconds, 2),
            "busy_fraction": round(engine.get("busy_s", 0) / summary.seconds, 4), "engine": engine,
            "prefill_gflop": round(flops / 1e9, 3), "prefill_s_estimated": round(seconds, 3),
            "prefill_gflop_per_s": round(flops / 1e9 / seconds, 1) if seconds > 0 else None}


def prefill_seconds(engine: dict) -> float:
    """Time spent on prefill: plain prefills, plus what steps carrying a refill took over a plain
    decode step (their average); most prefill rides in decode steps, so it has no clock of its own."""
    plain_steps = engine.get("steps", 0) - engine.get("mixed_steps", 0)
    step = engine.get("decode_s", 0.0) / plain_steps if plain_steps else 0.0
    extra = engine.get("mixed_s", 0.0) - engine.get("mixed_steps", 0) * step
    return engine.get("prefill_s", 0.0) + max(extra, 0.0)


def _sum(dicts: list[dict]) -> dict:
    keys = {k for d in dicts for k in d if k not in ("busy_fraction", "wall_s")}
    return {k: round(sum(d.get(k, 0) for d in dicts), 4) for k in sorted(keys)}


@torch.inference_mode()
def run_hf_loop(args) -> list[dict]:
    info, processor, model, device = load(args.model, args.device, args.dtype)
    paths = pq.read_table(args.manifest, columns=["path"]).column("path").to_pylist()
    prompt = loader.build_prompt(processor, info, args.prompt, "image")
    eos = processor.tokenizer.eos_token_id
    rows = []
    for n in [int(x) for x in args.hf_batch_sizes.split(",")]:
        started, tokens = time.perf_counter(), 0
        for i in range(0, len(paths), n):
            images = [_decode(p) for p in paths[i:i + n]]
            tokens += _generated_tokens(model, hf_inputs(processor, model, device, [prompt] * len(images), images),
                                        args.max_output_length, eos)
        devices.synchronize(device)
        seconds = time.perf_counter() - started
        rows.append({"batch_size": n, "seconds": round(seconds, 3), "output_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 2)})
        print(json.dumps({"hf": rows[-1]}), flush=True)
    return rows


def _decode(path: str):
    with open(path, "rb") as f:
        return decode_media(f, video_frames=1).image


def _generated_tokens(model, inputs, max_new_tokens: int, eos: int) -> int:
    """Tokens `generate` makes for one static batch, each row counted up to and including EOS."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return sum(next((j + 1 for j, t in enumerate(new) if t == eos), len(new))
               for new in out[:, inputs["input_ids"].shape[1]:].tolist())


def _linear_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if hasattr(m, "weight") and m.weight is not None
               and m.weight.dim() == 2 and not isinstance(m, torch.nn.Embedding))


def prefill_flops(model, prefill_tokens: int, rows: int) -> float:
    """Estimated FLOPs of prefill: vision tower + projector per image, decoder per prompt token.

    Matmuls only (2 per multiply-add): linears, plus attention scores and values (causal halves
    them in the decoder). Image rows only; enough to set against the machine's matmul peak.
    """
    if not rows:
        return 0.0
    vision, text = model.config.vision_config, model.config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    per_image = (2 * _linear_params(model.model.vision_tower) * patches
                 + 4 * patches ** 2 * vision.hidden_size * vision.num_hidden_layers
                 + 2 * _linear_params(model.model.multi_modal_projector) * (patches - 1))
    n = prefill_tokens / rows
    lm = model.model.language_model
    per_row = 2 * _linear_params(lm) * n + 2 * n ** 2 * text.hidden_size * text.num_hidden_layers
    return rows * (per_image + per_row)
