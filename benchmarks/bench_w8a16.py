"""W8A16 figures on the tiny-model "bench" preset (CPU): accuracy, interop, size, memory, speed.

    python benchmarks/bench_w8a16.py [--images 8] [--new-tokens 24] [--threads N] [--big]

Prints one JSON object. The source model is the bench preset cast to bf16 (as llava-hf ships
16-bit weights). `--big` adds a ~1 GB synthetic llava (random weights, real layout) to show that
the builtin converter's peak memory stays flat while the model grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402
from pipeline.testing.tiny_model import build_tiny_model  # noqa: E402

_RSS_CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import torch, transformers, quant, quant.builtin, pipeline.families
# one-time costs (lazy transformers imports, torch op and thread-pool init) are the baseline, not
# conversion memory: they do not grow with the model
pipeline.families.meta_model({src!r})
quant.builtin.quantize_rows(torch.randn(8, 8, dtype=torch.bfloat16), torch.bfloat16)
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
base = kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
t = time.time()
quant.quantize({src!r}, {dst!r}, backend="builtin")
print(base, kb("VmHWM:"), time.time() - t)
"""


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def conversion_memory(src: Path, dst: Path) -> dict:
    """Peak RSS growth of a fresh process converting src (imports excluded) vs the weights' size."""
    code = _RSS_CHILD.format(root=str(ROOT), src=str(src), dst=str(dst))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    base_kb, peak_kb, seconds = out.stdout.split()[-3:]
    growth = (int(peak_kb) - int(base_kb)) * 1024
    size = dir_bytes(src)
    return {"model_bytes": size, "peak_rss_growth_bytes": growth, "ratio": round(growth / size, 4),
            "seconds": round(float(seconds), 2)}


def images(n: int, size: int = 336):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):  # smooth random blobs: less like noise, more like photos
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return out


def inputs_for(processor, imgs):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(text=[prompt] * len(imgs), images=imgs, return_tensors="pt", padding=True)


@torch.inference_mode()
def captions(model, processor, imgs, new_tokens):
    out = []
    for img in imgs:
        inputs = inputs_for(processor, [img])
        ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


@torch.inference_mode()
def teacher_forced_error(ref, model, processor, imgs, seqs) -> float:
    """Relative L2 error of next-token logits along the float model's own greedy captions."""
    num = den = 0.0
    for img, seq in zip(imgs, seqs, strict=True):
        inputs = inputs_for(processor, [img])
        ids = torch.cat([inputs["input_ids"], torch.tensor([seq])], dim=1)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"])
        a = ref(**kw).logits[0, -len(seq) - 1:].float()
        b = model(**kw).logits[0, -len(seq) - 1:].float()
        num += (a - b).pow(2).sum().item()
        den += a.pow(2).sum().item()
    return (num / den) ** 0.5


@torch.inference_mode()
def decode_tps(models: dict, processor, imgs, batch: int, new_tokens: int, repeats: int = 3) -> dict:
    """Decode tokens/s per model: prefill once, then time greedy one-token steps on the KV cache.
    Models alternate and the best of `repeats` counts, so a busy host skews both alike."""
    inputs = inputs_for(processor, (imgs * batch)[:batch])
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for name, model in models.items():
            out = model(**inputs, use_cache=True)
            past, mask = out.past_key_values, inputs["attention_mask"]
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(new_tokens):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: round(batch * new_tokens / t, 1) for name, t in best.items()}


def lm_weight_ratio(qdir: Path) -> float:
    """Bytes of the quantized LM linears (int8 + scale + offset) over the same weights in bf16."""
    from safetensors import safe_open

    desc = quant.read_description(qdir)
    q = bf16 = 0
    for path in qdir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if desc.get(k) == "W8A16":
                    t = f.get_slice(k)
                    numel = int(np.prod(t.get_shape()))
                    q += numel * (1 if t.get_dtype() == "I8" else 2 if t.get_dtype() in ("BF16", "F16") else 4)
                    bf16 += numel * 2 if k.endswith(".weight") else 0
    return q / bf16


def big_synthetic(root: Path) -> Path:
    """A ~1 GB bf16 llava (hidden 2048, 8 layers, vocab 32000) written shard by shard."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(text_config=LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                              num_attention_heads=16, vocab_size=32000),
                      vision_config=CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=336, patch_size=14))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlavaForConditionalGeneration(cfg).state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(root)
    gen = torch.Generator().manual_seed(0)
    shard, idx, weight_map = {}, 0, {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if sum(t.numel() for t in shard.values()) > 100_000_000 or i == len(shapes) - 1:
            idx += 1
            fname = f"model-{idx:05d}.safetensors"
            save_file(shard, str(root / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            shard = {}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def bf16_source(tmp: Path):
    """The bench preset cast to bf16 (as llava-hf ships 16-bit weights), and its processor."""
    from transformers import AutoProcessor
    from transformers import LlavaForConditionalGeneration as Llava

    fp32_dir = build_tiny_model(tmp / "fp32", "llava", preset="bench")
    src = tmp / "bf16"
    Llava.from_pretrained(fp32_dir, dtype=torch.bfloat16).save_pretrained(src)
    processor = AutoProcessor.from_pretrained(fp32_dir)
    processor.save_pretrained(src)
    return src, processor


def load(model_dir: Path, dtype: torch.dtype, quantized: bool):
    from transformers import LlavaForConditionalGeneration as Llava

    if quantized:
        return quant.load_quantized_model(Llava, model_dir, device=torch.device("cpu"), dtype=dtype)
    return Llava.from_pretrained(model_dir, dtype=dtype).eval()


def accuracy(models: dict, processor, imgs, new_tokens: int) -> tuple[dict, list]:
    """Teacher-forced logit error and greedy agreement against the fp32 float model, and the
    fp32 quantized model's captions."""
    ref32, q32 = models["fp32"], models["w8a16 fp32"]
    ref_caps = captions(ref32, processor, imgs, new_tokens)
    q_caps = captions(q32, processor, imgs, new_tokens)
    errors = {name: round(teacher_forced_error(ref32, models[m], processor, imgs, ref_caps), 5) for name, m in (
        ("teacher_forced_rel_l2_fp32", "w8a16 fp32"), ("teacher_forced_rel_l2_bf16_vs_fp32_float", "w8a16 bf16"),
        ("teacher_forced_rel_l2_bf16_float_vs_fp32_float", "bf16"))}
    tok_agree = [np.mean([a == b for a, b in zip(r, q, strict=False)] or [1.0]) for r, q in
                 zip(ref_caps, q_caps, strict=True)]
    greedy = {"identical_captions": f"{sum(r == q for r, q in zip(ref_caps, q_caps, strict=True))}/{len(imgs)}",
              "token_agreement": round(float(np.mean(tok_agree)), 4)}
    return {**errors, "greedy_fp32": greedy}, q_caps


def interop(qb: Path, qm: Path, q_caps: list, processor, imgs, new_tokens: int) -> dict:
    """The builtin converter's output against msModelSlim's: int8 steps apart, scales, captions."""
    from safetensors import safe_open

    steps, frac, scales_equal = 0, [], True
    fb, fm = safe_open(str(qb / "quant_model_weight_w8a16.safetensors"), "pt"), \
        safe_open(str(qm / "quant_model_weight_w8a16.safetensors"), "pt")
    for k in fb.keys():
        a, b = fb.get_tensor(k), fm.get_tensor(k)
        if a.dtype == torch.int8:
            d = (a.int() - b.int()).abs()
            steps, frac = max(steps, d.max().item()), frac + [(d > 0).float().mean().item()]
        else:
            scales_equal &= torch.equal(a, b)
    m_caps = captions(load(qm, torch.float32, True), processor, imgs, new_tokens)
    return {"max_int8_step": steps, "frac_int8_differing": round(float(np.mean(frac)), 4),
            "scales_and_float_tensors_identical": bool(scales_equal),
            "captions_identical": f"{sum(a == b for a, b in zip(q_caps, m_caps, strict=True))}/{len(imgs)}"}


def speed(ref16, q16, processor, imgs, new_tokens: int) -> dict:
    kernels = {m.kernel for m in q16.modules() if isinstance(m, quant.W8A16Linear)}
    result = {"kernels": sorted(kernels)}
    for batch in (1, 8):
        result[f"batch{batch}"] = decode_tps({"bf16": ref16, "w8a16": q16}, processor, imgs, batch, new_tokens)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, processor = bf16_source(tmp)
        qb = tmp / "q_builtin"
        report["conversion_memory"] = conversion_memory(src, qb)
        report["lm_linear_bytes_vs_bf16"] = round(lm_weight_ratio(qb), 4)
        try:
            qm = quant.quantize(src, tmp / "q_ms", backend="msmodelslim")
        except quant.QuantError as e:
            qm, report["interop"] = None, f"skipped: {e}"
        imgs = images(args.images)
        models = {"fp32": load(src, torch.float32, False), "w8a16 fp32": load(qb, torch.float32, True),
                  "bf16": load(src, torch.bfloat16, False), "w8a16 bf16": load(qb, torch.bfloat16, True)}
        figures, q_caps = accuracy(models, processor, imgs, args.new_tokens)
        report.update(figures)
        if qm is not None:
            report["interop"] = interop(qb, qm, q_caps, processor, imgs, args.new_tokens)
        report["decode_tokens_per_s_cpu"] = speed(models["bf16"], models["w8a16 bf16"], processor, imgs,
                                                  args.new_tokens)
        if args.big:
            report["conversion_memory_big"] = conversion_memory(big_synthetic(tmp / "big"), tmp / "q_big")
    print(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
