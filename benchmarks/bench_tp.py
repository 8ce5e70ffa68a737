"""Tensor parallel on the CPU (issue 15): what one rank holds, and what the collectives cost a step.

    python benchmarks/bench_tp.py [--work /tmp/llava-batch-tp] [--images 32] [--skip-rss]

- rss: peak RSS of one rank loading its shard of a synthetic ~1.6 GB fp16 model (text hidden 2048,
  16 layers), each rank in a fresh process, one at a time, at world size 1, 2 and 4, beside the
  whole model through transformers' loader and the sizes of what a rank holds;
- speed: the same caption job (bench preset, fp32, greedy) at world size 1 and 2 through `run`:
  tokens/s side by side. On two cores ws 2 is expected slower; the gap is the cost of four
  broadcasts and two all-reduces a layer per step, which is what this reports.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_RANK = r"""
import json, sys, torch
from pipeline.config import ModelConfig
from pipeline.model import loader
from pipeline.model.tensor_parallel import Placement, load_shard
path, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = loader.inspect_model(ModelConfig(path=path))
def status(key):  # MiB; VmHWM starts afresh at exec (ru_maxrss would keep the parent's)
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024
hwm = lambda: status("VmHWM")
before, anon_before = hwm(), status("RssAnon")
if world == 0:
    model = loader.load_model(info, torch.device("cpu"), torch.float16)
else:
    model = load_shard(loader.MODEL_CLASSES[info.family], info, torch.device("cpu"), torch.float16,
                       Placement(rank, world))
held = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
held += sum(b.numel() * b.element_size() for b in model.buffers() if b.device.type != "meta")
peak = hwm()
print(json.dumps({"rank": rank, "world": world, "held_mib": round(held / 2**20, 1),
                  "peak_rss_mib": round(peak, 1), "rss_over_imports_mib": round(peak - before, 1),
                  # private memory the load added; the rest of RSS is the safetensors files' page
                  # cache, mapped and shared by every rank on the host
                  "anon_added_mib": round(status("RssAnon") - anon_before, 1),
                  "file_mapped_mib": round(status("RssFile"), 1)}))
"""


def synthetic_model(work: Path) -> Path:
    """A bench-preset llava dir (tokenizer, processor, vision tower) with a ~1.1 GB language model."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from pipeline.testing.tiny_model import build_tiny_model

    out = work / "llava-1g6"
    if (out / "done").is_file():
        return out
    build_tiny_model(out, "llava", preset="bench")
    config = LlavaConfig.from_pretrained(out)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 2048, 5504, 16
    text.num_attention_heads = text.num_key_value_heads = 16
    text.head_dim = 128
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.float16)
    for name in list(out.glob("*.safetensors")):
        name.unlink()
    model.save_pretrained(out)
    (out / "done").touch()
    return out


def rss(model: Path) -> list[dict]:
    rows = []
    for world in (0, 1, 2, 4):  # 0: the whole model through transformers' from_pretrained
        for rank in range(max(1, world)):
            done = subprocess.run([sys.executable, "-c", _RANK, str(model), str(rank), str(world)], cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def speed(work: Path, images: int) -> list[dict]:
    from pipeline.cli import main
    from pipeline.testing.demo import write_image
    from pipeline.testing.jobs import job_sections, write_job, write_manifest
    from pipeline.testing.tiny_model import build_tiny_model

    model = work / "llava-bench"
    if not (model / "config.json").is_file():
        build_tiny_model(model, "llava", preset="bench", image_size=112, caption_median=40)
    paths = [str(write_image(work / "images" / f"{i}.png", seed=i, size=(320, 240))) for i in range(images)]
    manifest = write_manifest(work / "m.parquet", {"path": paths})
    rows = []
    for world in (1, 2):
        out = work / f"speed-ws{world}"
        shutil.rmtree(out, ignore_errors=True)
        sections = job_sections(model, manifest, out, generation={"max_batch_size": 16, "max_output_length": 64},
                                run={"tensor_parallel": world, "progress": False},
                                output={"rows_per_shard": images, "chunk_rows": images})
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the report's
            assert main(["run", str(write_job(work / f"ws{world}.toml", sections))]) == 0
        seconds = time.perf_counter() - started
        stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("shard-*.json")]
        tokens = sum(s["output_tokens"] for s in stats)
        engine = stats[0].get("engine", {})
        rows.append({"world": world, "seconds": round(seconds, 2), "output_tokens": tokens,
                     "tokens_per_s": round(tokens / engine.get("wall_s", seconds), 1),
                     "steps": engine.get("steps"), "ms_per_step": round(1000 * engine.get("decode_s", 0)
                                                                       / max(1, engine.get("steps", 1)), 2)})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_ws1"] = round(row["tokens_per_s"] / base, 3)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/llava-batch-tp")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--skip-rss", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"speed": speed(work, args.images)}
    if not args.skip_rss:
        report["rss"] = rss(synthetic_model(work))
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
