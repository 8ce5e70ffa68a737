"""One accelerator, one command: versions, correctness and speed, written to a folder.

    python benchmarks/device_check.py --out DIR [--device cuda|npu|cpu|auto] [--quick] [--budget-s 450]
                                      [--batch-sizes 1,2,4,8,16,32] [--images 512] [--work DIR]

Writes DIR/device_check.json (every section), DIR/device_check.csv (the MindIE table: one row per
mode and batch size) and DIR/device_check.png (tokens/s against batch size per mode). The sections,
in order (JSON keys), each timed, each recording its error and letting the next one run:

- environment: versions (python, torch, transformers, CUDA or CANN's torch_npu), the device, its
  total / free memory, host->device and device->device copy bandwidth;
- correctness: the three tiny families (preset "test") on the device, fast engine against the hf
  engine in fp32 (token-exact expected) and in the device's 16-bit dtype (agreement), captured
  (generation.compile) against eager, and a W8A16 conversion (quant) against its float model;
- speed_model: a random-weight model of llava-1.5-7B's shape (tiny-model preset "llava-1.5-7b"),
  written to the work dir and loaded through the project's loader like a real checkpoint;
- mindie: MindIE's performance test (pipeline/bench/perf.py: one image, EOS ignored) for the fast
  engine eager, captured, and transformers `generate`, side by side;
- captions: synthetic images end to end through `run_job` (pipeline/bench/captions.py) with
  generation.max_batch_size = "auto", and the transformers static-batch loop on a subset;
- roofline: batch-1 decode against the language model's weight bytes over the measured bandwidth;
- targets: pass / fail of each target side by side with its figure (never asserted).

--quick (for the CPU, `--device cpu --quick`): the "bench" preset instead of 7B, batch sizes 1,2,4,
32 output tokens, 32 caption images. Past --budget-s seconds the remaining heavy sections are
skipped with a note. One progress line per section goes to stderr.

Offline: HF_HUB_OFFLINE is set below, before anything imports huggingface_hub. On a host without
PyAV (only video decoding and the demo's video writer need it), video rows are skipped and noted;
to bring it, on a machine with network:

    pip download av --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d wheels/

(`--platform manylinux_2_28_aarch64` for an Ascend host), copy wheels/ over, then
`pip install --no-index wheels/av-*.whl`.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported: nothing here may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from argparse import Namespace  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("fast_eager", "fast_captured", "hf")
PROMPT = "Describe this image in one sentence."
TINY_SIZES = [(96, 72), (72, 96), (128, 48), (80, 80), (64, 112), (100, 60), (112, 84), (60, 90)]
CAPTION_SIZES = [(640, 480), (480, 640), (512, 512), (800, 450), (300, 400)]
TARGETS = {"fast_over_hf_captions": 5.0, "batch1_over_roofline": 1.5, "busy_fraction": 0.95,
           "captured_over_eager_b1_8": 2.0}


def settings(args) -> Namespace:
    """What --quick changes, in one place."""
    quick = args.quick
    return Namespace(
        preset="bench" if quick else "llava-1.5-7b",
        batch_sizes=args.batch_sizes or ([1, 2, 4] if quick else [1, 2, 4, 8, 16, 32]),
        output_length=32 if quick else 256,
        images=args.images or (32 if quick else 512),
        caption_length=32 if quick else 128,
        hf_images=16 if quick else 64,
        hf_batch_sizes="8,16" if quick else "32,64",
        bandwidth_mib=256 if quick else 1024,
        # Seconds kept for the caption run while the MindIE table runs, and the least it starts with.
        caption_reserve_s=40 if quick else 150,
        caption_min_s=20 if quick else 60,
    )


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


# -- the run: sections, budget, outputs ---------------------------------------------------------


class Skipped(Exception):
    """A section that does not start: its message is the note."""


class Check:
    def __init__(self, args, device: torch.device, av_note: str | None):
        self.args, self.device, self.av_note = args, device, av_note
        self.s = settings(args)
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else self.out / "_work"
        self.started = time.monotonic()
        self.state: dict = {}  # what later sections take from earlier ones (model dir, weight bytes)
        self.report: dict = {"config": {"argv": sys.argv[1:], "device": str(device), "quick": args.quick,
                                        "budget_s": args.budget_s, **vars(self.s)}}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    @property
    def accelerator(self) -> bool:
        return self.device.type != "cpu"

    def speed_dtype(self) -> str:
        """bf16 on CUDA, fp16 on Ascend (what MindIE serves llava in), fp32 on the CPU."""
        return self.half_dtype() if self.accelerator else "float32"

    def half_dtype(self) -> str | None:
        """The device's 16-bit dtype for agreement checks; None on a CPU without bf16 arithmetic."""
        from pipeline import devices

        if self.device.type == "npu":
            return "float16"
        if self.device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if devices.cpu_has_bf16() else None


def run_section(check: Check, name: str, fn, heavy: bool) -> None:
    started = time.perf_counter()
    if heavy and check.left() <= 0:
        entry = {"status": "skipped", "note": f"the --budget-s of {check.args.budget_s} s was spent"}
    else:
        try:
            entry = {"status": "ok", **fn(check)}
        except Skipped as e:
            entry = {"status": "skipped", "note": str(e)}
        except Exception as e:  # noqa: BLE001 - a failed section is a finding; the next one still runs
            entry = {"status": "error", "error": error_record(e)}
    _free(check.device)  # the section's models are unreferenced now; the next one gets the memory
    entry["seconds"] = round(time.perf_counter() - started, 2)
    check.report[name] = entry
    write_json(check)  # after every section: a run killed later keeps what it measured
    detail = entry["error"]["message"][:160] if entry["status"] == "error" else entry.get("note", "")
    print(f"device_check: {name}: {entry['status']} in {entry['seconds']:.1f} s"
          + (f" ({detail})" if detail else ""), file=sys.stderr, flush=True)


def error_record(e: BaseException) -> dict:
    tail = traceback.format_exception(type(e), e, e.__traceback__)[-3:]
    return {"type": type(e).__name__, "message": str(e), "where": "".join(tail)[-1500:]}


def guarded(fn, *args) -> dict:
    """fn's dict, or its error: one failed sub-check must not hide its neighbours."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return {"error": error_record(e)}


def write_json(check: Check) -> None:
    check.report["elapsed_s"] = round(time.monotonic() - check.started, 2)
    (check.out / "device_check.json").write_text(json.dumps(check.report, indent=1, default=str))


def _free(device: torch.device) -> None:
    from pipeline import devices

    gc.collect()
    devices.empty_cache(device)


# -- environment --------------------------------------------------------------------------------


def environment(check: Check) -> dict:
    import transformers

    from pipeline import devices

    npu = devices.torch_npu()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "torch_npu": getattr(npu, "__version__", None) if npu else None,
            "av": _version("av") if check.av_note is None else None, "av_note": check.av_note,
            "pillow": _version("pillow"), "llava_batch": _version("llava-batch"),
            "device": str(check.device), **device_memory(check.device),
            "bandwidth": bandwidth(check.device, check.s.bandwidth_mib)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_memory(device: torch.device) -> dict:
    from pipeline import devices
    from pipeline.bench.common import cpu_kind

    gib = 2**30
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        return {"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                "total_gib": round(total / gib, 2), "free_gib": round(free / gib, 2)}
    if device.type == "npu":
        free, total = torch.npu.mem_get_info(device)
        return {"device_name": torch.npu.get_device_name(device), "total_gib": round(total / gib, 2),
                "free_gib": round(free / gib, 2)}
    free = devices.free_memory_bytes(device)
    return {"device_name": cpu_kind()["model"], "cpu": cpu_kind(), "cores": os.cpu_count(),
            "total_gib": round(_meminfo_total() / gib, 2), "free_gib": round(free / gib, 2) if free else None}


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def bandwidth(device: torch.device, mib: int) -> dict:
    """Copy bandwidth in GB/s. device->device counts read + write bytes (a copy moves its size twice),
    so it is the rate a decode step reading every weight once can reach: the roofline's."""
    from pipeline.bench.common import machine_peaks

    if device.type == "cpu":
        peaks = machine_peaks()  # the CPU is the device: its memcpy, same read + write counting
        return {"host_to_device_gb_per_s": None, "device_to_device_gb_per_s": peaks["copy_gb_per_s"],
                "machine_peaks": peaks, "note": "on the CPU host and device memory are one"}
    n = mib * 2**20
    src, pinned = _host_buffer(n)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    other = torch.empty_like(dst)
    h2d = _best_seconds(lambda: dst.copy_(src, non_blocking=pinned), device)
    d2d = _best_seconds(lambda: other.copy_(dst), device)
    return {"bytes": n, "pinned_host": pinned, "host_to_device_gb_per_s": round(n / h2d / 1e9, 2),
            "device_to_device_gb_per_s": round(2 * n / d2d / 1e9, 2), "counting": "device->device: read + write"}


def _host_buffer(n: int) -> tuple[torch.Tensor, bool]:
    try:  # pinned: the rate a loader's transfers can reach; pageable where pinning is refused
        return torch.empty(n, dtype=torch.uint8, pin_memory=True), True
    except RuntimeError:
        return torch.empty(n, dtype=torch.uint8), False


def _best_seconds(fn, device: torch.device, repeats: int = 10) -> float:
    from pipeline import devices

    fn()  # first touch: allocation and lazy init are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        devices.synchronize(device)
        started = time.perf_counter()
        fn()
        devices.synchronize(device)
        best = min(best, time.perf_counter() - started)  # least disturbed run
    return best


# -- correctness --------------------------------------------------------------------------------


def correctness(check: Check) -> dict:
    from pipeline.testing.tiny_model import FAMILIES

    half = check.half_dtype()
    notes = [] if half else ["no 16-bit agreement: this CPU has no bf16 arithmetic (devices.cpu_has_bf16)"]
    videos = tiny_videos(check)
    if not videos:
        notes.append(f"llava_next_video rows are images only: {check.av_note}")
    dtypes = ["float32"] + ([half] if half else [])
    families = {family: guarded(family_check, check, family, dtypes, videos) for family in FAMILIES}
    summary = {f"{d}_{k}": {f: r.get(d, {}).get(k, {}).get("token_match") for f, r in families.items()}
               for d in dtypes for k in ("fast_vs_hf", "captured_vs_eager")}
    return {"dtypes": dtypes, "notes": notes, "summary": summary, "families": families,
            "w8a16": guarded(w8a16_check, check)}


def tiny_dir(check: Check, family: str) -> Path:
    from pipeline.testing.tiny_model import build_tiny_model

    return _build_once(check.work / "tiny" / family, lambda tmp: build_tiny_model(tmp, family, preset="test"))


def _build_once(path: Path, build) -> Path:
    """`build(tmp)` then an atomic rename, so a run killed mid-build never leaves a dir that looks done."""
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    tmp.rename(path)
    return path


def tiny_videos(check: Check) -> list:
    """Frames of two short videos, decoded by the pipeline's own decoder; [] without PyAV."""
    if check.av_note is not None:
        return []
    from pipeline.data.media import decode_media
    from pipeline.testing.demo import write_video

    frames = []
    for name, n, seed in (("a.mp4", 10, 3), ("b.mp4", 5, 4)):
        path = write_video(check.work / "media" / name, n_frames=n, seed=seed)
        with open(path, "rb") as f:
            frames.append(decode_media(f, video_frames=4).frames)
    return frames


def tiny_requests(processor, info, videos: list, n_images: int = 6) -> list:
    from pipeline.engine.base import Request
    from pipeline.model import loader
    from pipeline.testing.demo import synthetic_image

    prompt = loader.build_prompt(processor, info, "What is in the picture?", "image")
    reqs = [Request(i, prompt, "image", image=synthetic_image(10 + i, size), group=0)
            for i, size in enumerate(TINY_SIZES[:n_images])]
    if info.family == "llava_next_video":
        video_prompt = loader.build_prompt(processor, info, "What happens in the video?", "video")
        reqs += [Request(len(reqs) + i, video_prompt, "video", frames=f, group=0) for i, f in enumerate(videos)]
    return reqs


def tiny_gen():
    from pipeline.config import GenerationConfig

    return GenerationConfig(max_batch_size=4, max_input_length=2048, max_output_length=24, video_frames=4)


def family_check(check: Check, family: str, dtypes: list[str], videos: list) -> dict:
    from pipeline.config import ModelConfig
    from pipeline.model import loader

    info = loader.inspect_model(ModelConfig(path=str(tiny_dir(check, family))))
    processor = loader.load_processor(info)
    requests = tiny_requests(processor, info, videos)
    out = {"rows": {"image": sum(r.kind == "image" for r in requests),
                    "video": sum(r.kind == "video" for r in requests)}}
    for dtype in dtypes:
        out[dtype] = guarded(engines_agree, check, info, processor, requests, getattr(torch, dtype))
    return out


def engines_agree(check: Check, info, processor, requests: list, dtype: torch.dtype) -> dict:
    """fast vs hf, and captured vs eager, on two copies of one model: the fast engine fuses and
    packs the linears of the model it runs, the hf engine gets a plain one."""
    from pipeline.engine.fast import FastEngine
    from pipeline.engine.hf import HFEngine
    from pipeline.model import loader

    gen, device = tiny_gen(), check.device
    fast_model = loader.load_model(info, device, dtype)
    hf_model = loader.load_model(info, device, dtype)
    eager = in_order(FastEngine(fast_model, processor, gen, device), requests)
    hf = in_order(HFEngine(hf_model, processor, gen, device), requests)
    return {"fast_vs_hf": agreement(eager, hf, processor.tokenizer),
            "captured_vs_eager": guarded(captured_vs_eager, fast_model, processor, requests, eager, device)}


def captured_vs_eager(model, processor, requests: list, eager: list, device: torch.device) -> dict:
    from pipeline.engine.fast import FastEngine

    captured = in_order(FastEngine(model, processor, tiny_gen(), device, compile=True), requests)
    return agreement(captured, eager, processor.tokenizer)


def in_order(engine, requests: list) -> list:
    """The engine's results in request order (the fast engine streams them in completion order)."""
    done = {id(req): res for req, res in engine.generate_stream(requests)}
    return [done[id(r)] for r in requests]


def agreement(a: list, b: list, tokenizer) -> dict:
    """Rows with the same caption, and tokens in agreement: each row's common prefix over the longer
    of the two (greedy decoding diverges for good at its first different token)."""
    same = common = longest = 0
    errors = [r.error for r in a + b if r.error]
    for x, y in zip(a, b, strict=True):
        tx, ty = _tokens(x, tokenizer), _tokens(y, tokenizer)
        same += x.error is None and y.error is None and x.caption == y.caption
        prefix = next((i for i, (p, q) in enumerate(zip(tx, ty, strict=False)) if p != q), min(len(tx), len(ty)))
        common += prefix
        longest += max(len(tx), len(ty))
    return {"rows": len(a), "tokens": longest, "rows_identical": round(same / len(a), 4) if a else None,
            "token_match": round(common / longest, 4) if longest else (1.0 if not errors else 0.0),
            "errors": errors[:4]}


def _tokens(result, tokenizer) -> list[int]:
    # Results carry text; the tiny word-level tokenizer maps a caption back to its tokens one to one.
    return tokenizer(result.caption or "", add_special_tokens=False)["input_ids"] if result.error is None else []


def w8a16_check(check: Check) -> dict:
    """The tiny llava converted by the builtin W8A16 converter, both run by the engine a job gets,
    in the device's 16-bit dtype (fp32 on the CPU, where the int8 linear dequantizes in fp32 too)."""
    import quant
    from pipeline.config import ModelConfig
    from pipeline.engine import make_engine
    from pipeline.model import loader

    src = tiny_dir(check, "llava")
    dst = _build_once(check.work / "tiny" / "llava-w8a16", lambda tmp: quant.quantize(src, tmp, backend="builtin"))
    dtype = getattr(torch, check.speed_dtype())
    results, engines = {}, {}
    for name, path in (("float", src), ("w8a16", dst)):
        info = loader.inspect_model(ModelConfig(path=str(path)))
        processor = loader.load_processor(info)
        model = loader.load_model(info, check.device, dtype)
        engine = make_engine(model, processor, tiny_gen(), check.device)
        engines[name] = type(engine).__name__
        results[name] = in_order(engine, tiny_requests(processor, info, [], n_images=len(TINY_SIZES)))
    return {"dtype": str(dtype).removeprefix("torch."), "engines": engines, "model": loader.describe(info),
            **agreement(results["w8a16"], results["float"], processor.tokenizer)}


# -- the 7B-shaped model ------------------------------------------------------------------------


def speed_model(check: Check) -> dict:
    from pipeline.families import meta_model
    from pipeline.testing.tiny_model import build_tiny_model

    preset = check.s.preset
    path = check.work / f"llava-{preset}"
    reused = (path / "config.json").is_file()
    started = time.perf_counter()
    _build_once(path, lambda tmp: build_tiny_model(tmp, "llava", preset=preset))
    check.state["model_dir"] = path
    params = sum(p.numel() for p in meta_model(path).parameters())
    disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"preset": preset, "path": str(path), "reused": reused, "build_s": round(time.perf_counter() - started, 2),
            "params_b": round(params / 1e9, 3), "safetensors_gib": round(disk / 2**30, 2)}


def _model_dir(check: Check) -> Path:
    if "model_dir" not in check.state:
        raise RuntimeError("no speed model: the speed_model section did not complete")
    return check.state["model_dir"]


# -- MindIE table -------------------------------------------------------------------------------


def mindie(check: Check) -> dict:
    from pipeline.bench import perf
    from pipeline.bench.common import load
    from pipeline.engine.base import Request
    from pipeline.model import loader
    from pipeline.testing.demo import synthetic_image

    if check.left() < check.s.caption_reserve_s:  # the budget's rest is the caption run's
        raise Skipped(f"{check.left():.0f} s of the budget left, kept for the caption run")
    info, processor, model, device = load(str(_model_dir(check)), str(check.device), check.speed_dtype())
    check.state["lm_weight_bytes"] = perf.lm_weight_bytes(model)  # before the fast engine packs it
    hf_model = loader.load_model(info, device, model.dtype)  # transformers on a plain copy, as perf does
    prompt = loader.build_prompt(processor, info, PROMPT, "image")
    request = Request(0, prompt, "image", image=synthetic_image(0, (640, 480)))
    n_input = int(processor(text=[prompt], images=[request.image], return_tensors="pt")["input_ids"].shape[1])
    runs = {"fast_eager": lambda reqs, n: perf._fast(model, processor, device, reqs, n_input, n, False),
            "fast_captured": lambda reqs, n: perf._fast(model, processor, device, reqs, n_input, n, True),
            "hf": lambda reqs, n: perf._hf(hf_model, processor, device, reqs, n)}
    rows, errors, skipped = table(check, runs, request, n_input)
    check.state["mindie_rows"] = rows
    note = f"{len(skipped)} measurements skipped: the budget's rest is kept for the caption run" if skipped else ""
    return {"note": note, "model": info.name, "dtype": check.speed_dtype(), "input_tokens": n_input,
            "output_tokens": check.s.output_length, "rows": rows, "side_by_side": side_by_side(rows),
            "errors": errors, "skipped": skipped}


def table(check: Check, runs: dict, request, n_input: int) -> tuple[list, list, list]:
    """perf's measurement (a warm-up, then first token and full length, one timed run each: the
    budget is minutes) per batch size and mode, modes side by side so a budget cut keeps them paired."""
    from pipeline.bench import perf

    rows, errors, skipped = [], [], []
    length = check.s.output_length
    for n in check.s.batch_sizes:
        for mode, run in runs.items():
            if check.left() < check.s.caption_reserve_s:
                skipped.append({"mode": mode, "batch_size": n})
                continue
            try:
                row = perf._measure(lambda k, run=run, n=n: run([request] * n, k), n, n_input, length, repeats=1)
                rows.append({"mode": mode, **row})
            except Exception as e:  # noqa: BLE001 - one mode failing (a capture, an OOM) leaves the others
                errors.append({"mode": mode, "batch_size": n, "error": error_record(e)})
                _free(check.device)
    return rows, errors, skipped


def side_by_side(rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({r["batch_size"] for r in rows}):
        tps = {r["mode"]: r["tokens_per_s"] for r in rows if r["batch_size"] == n}
        entry = {"batch_size": n, **{f"{m}_tokens_per_s": tps.get(m) for m in MODES}}
        for a, b in (("fast_captured", "fast_eager"), ("fast_eager", "hf"), ("fast_captured", "hf")):
            entry[f"{a}_over_{b}"] = round(tps[a] / tps[b], 3) if tps.get(a) and tps.get(b) else None
        out.append(entry)
    return out


# -- the caption run ----------------------------------------------------------------------------


def captions_run(check: Check) -> dict:
    if check.left() < check.s.caption_min_s:
        raise Skipped(f"{check.left():.0f} s of the budget left, the caption run needs {check.s.caption_min_s}")
    manifest, subset = caption_manifests(check)
    captured = check.accelerator and _captured_ok(check)
    args = Namespace(model=str(_model_dir(check)), dtype=check.speed_dtype(), device=str(check.device),
                     manifest=str(manifest), prompt=PROMPT, max_output_length=check.s.caption_length,
                     compile=captured, out=str(check.work / "captions"), max_batch_size="auto")
    out = {"images": check.s.images, "max_output_length": check.s.caption_length, "compile": captured}
    out["fast"] = fast_run(check, args)
    run_dir = Path(args.out) / "run-fast"
    out["cache_plan"] = _cache_plan(run_dir)
    out["shards"] = _shard_engines(run_dir)
    _free(check.device)
    if check.left() < check.s.caption_min_s / 2:
        out["hf"] = {"note": f"skipped: {check.left():.0f} s of budget left"}
    else:
        out["hf"] = guarded(hf_run, check, args, subset)
    return out


def caption_manifests(check: Check) -> tuple[Path, Path]:
    """JPEGs of mixed sizes (the pipeline decodes them as it would a photo set), all of them, and
    the first few for the transformers loop."""
    from pipeline.testing.demo import write_image
    from pipeline.testing.jobs import write_manifest

    folder = check.work / "images"
    sizes = CAPTION_SIZES

    def one(i: int) -> str:
        path = folder / f"{i:05d}.jpg"
        return str(path if path.is_file() else write_image(path, seed=i, size=sizes[i % len(sizes)]))

    with ThreadPoolExecutor(8) as pool:  # Pillow's encoder releases the GIL
        paths = list(pool.map(one, range(check.s.images)))
    full = write_manifest(check.work / f"captions-{len(paths)}.parquet", {"path": paths})
    subset = write_manifest(check.work / f"captions-hf-{check.s.hf_images}.parquet",
                            {"path": paths[:check.s.hf_images]})
    return full, subset


def _captured_ok(check: Check) -> bool:
    """Graph capture for the caption run only where the MindIE table showed it works at batch 1."""
    return any(r["mode"] == "fast_captured" for r in check.state.get("mindie_rows", []))


def fast_run(check: Check, args) -> dict:
    """captions.run_fast with max_batch_size = "auto", and on CUDA the peak memory torch allocated,
    to hold against the plan (cache + activation reserve + margin)."""
    from pipeline.bench import captions

    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    result = captions.run_fast(args)
    result["images_per_s"] = round(result["ok"] / result["seconds"], 3) if result["seconds"] else None
    if check.device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(check.device) / 2**30, 2)
        result["total_gib"] = round(torch.cuda.get_device_properties(check.device).total_memory / 2**30, 2)
    return result


def _cache_plan(run_dir: Path):
    """The run's cache plan: `_job.json["plan"]["cache"]` (slot length) and the worker's, with its
    slots and memory, from the first shard's stats."""
    try:
        plan = json.loads((run_dir / "_job.json").read_text()).get("plan", {})
        shards = sorted((run_dir / "_stats").glob("shard-*[0-9].json"))
        worker = json.loads(shards[0].read_text()).get("cache_plan") if shards else None
    except (OSError, ValueError) as e:
        return {"error": error_record(e)}
    return {**plan.get("cache", {"note": "no plan.cache in _job.json"}), "worker": worker}


def _shard_engines(run_dir: Path) -> list[dict]:
    """Each shard's engine counters from _stats/shard-*.json (busy_fraction = busy_s / shard wall)."""
    stats = [json.loads(p.read_text()) for p in sorted((run_dir / "_stats").glob("shard-*.json"))
             if not p.name.endswith(".failed.json")]
    return [s.get("engine", {}) for s in stats]


def hf_run(check: Check, args, subset: Path) -> dict:
    from pipeline.bench import captions

    hf_args = Namespace(**{**vars(args), "manifest": str(subset), "hf_batch_sizes": check.s.hf_batch_sizes})
    rows = captions.run_hf_loop(hf_args)
    _free(check.device)
    return {"images": check.s.hf_images, "rows": rows, "best": max(rows, key=lambda r: r["tokens_per_s"])}


# -- roofline and targets -----------------------------------------------------------------------


def roofline(check: Check) -> dict:
    """Batch-1 decode against memory bandwidth: a step reads every language-model weight once, so
    weight bytes / device->device bandwidth is the least time a token can take."""
    bw = check.report.get("environment", {}).get("bandwidth", {}).get("device_to_device_gb_per_s")
    weight_bytes = check.state.get("lm_weight_bytes")
    if not bw or not weight_bytes:
        raise RuntimeError("needs the environment's bandwidth and the mindie section's model")
    ideal_ms = weight_bytes / (bw * 1e9) * 1e3
    out = {"lm_weight_gib": round(weight_bytes / 2**30, 3), "bandwidth_gb_per_s": bw, "ideal_ms": round(ideal_ms, 4)}
    for r in check.state.get("mindie_rows", []):
        if r["batch_size"] == 1 and r["mode"] != "hf":
            out[r["mode"]] = {"per_token_ms": r["per_token_ms"],
                              "measured_over_ideal": round(r["per_token_ms"] / ideal_ms, 3)}
    return out


def targets(check: Check) -> dict:
    rep = check.report
    caps = rep.get("captions", {})
    fast_tps = caps.get("fast", {}).get("tokens_per_s")
    hf_tps = caps.get("hf", {}).get("best", {}).get("tokens_per_s")
    ratios = [v["measured_over_ideal"] for k, v in rep.get("roofline", {}).items()
              if k.startswith("fast_") and isinstance(v, dict)]
    busy = [s.get("busy_fraction") for s in caps.get("shards", []) if s.get("busy_fraction") is not None]
    cap_eager = [r["fast_captured_over_fast_eager"] for r in rep.get("mindie", {}).get("side_by_side", [])
                 if r["batch_size"] <= 8 and r.get("fast_captured_over_fast_eager") is not None]
    return {
        "fast_over_hf_captions": _target("fast_over_hf_captions", fast_tps / hf_tps if fast_tps and hf_tps else None,
                                         "caption run tokens/s over transformers' best static batch"),
        "batch1_over_roofline": _target("batch1_over_roofline", min(ratios) if ratios else None,
                                        "best fast mode's batch-1 per-token ms over the ideal", lower=True),
        "busy_fraction": _target("busy_fraction", min(busy) if busy else None,
                                 "engine busy / shard wall of the caption run, worst shard"),
        "captured_over_eager_b1_8": _target("captured_over_eager_b1_8", min(cap_eager) if cap_eager else None,
                                            "worst captured / eager tokens/s over batch sizes 1-8"),
    }


def _target(name: str, value: float | None, what: str, lower: bool = False) -> dict:
    """pass is None where the figure is missing (its section failed or was skipped)."""
    threshold = TARGETS[name]
    passed = None if value is None else (value <= threshold if lower else value >= threshold)
    return {"what": what, "value": None if value is None else round(value, 4),
            "threshold": f"{'<=' if lower else '>='} {threshold}", "pass": passed}


# -- CSV and PNG --------------------------------------------------------------------------------


def write_table(check: Check) -> None:
    from pipeline.bench import perf

    rows = check.report.get("mindie", {}).get("rows", [])
    path = check.out / "device_check.csv"
    if rows:
        perf.write_csv(path, rows)
    else:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(["mode", *perf.COLUMNS])
    title = f"{check.s.preset} on {check.device}, {check.speed_dtype()}, {check.s.output_length} tokens, EOS ignored"
    plot_png(check.out / "device_check.png", rows, title)


def plot_png(path: Path, rows: list[dict], title: str) -> None:
    """tokens/s against batch size (log2 axis), one line per mode, with Pillow only."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (960, 600), "white")
    draw = ImageDraw.Draw(img)
    box = (90, 50, 740, 520)  # plot area: left, top, right, bottom
    draw.text((box[0], 15), title, fill="black", font=_font(16))
    sizes = sorted({r["batch_size"] for r in rows}) or [1]
    ymax = _nice(max((r["tokens_per_s"] for r in rows), default=1.0))
    xs = _x_positions(sizes, box)
    _axes(img, draw, box, xs, ymax)
    colours = {"fast_eager": (31, 119, 180), "fast_captured": (214, 39, 40), "hf": (44, 160, 44)}
    for i, mode in enumerate(MODES):
        pts = [(xs[r["batch_size"]], box[3] - r["tokens_per_s"] / ymax * (box[3] - box[1]))
               for r in rows if r["mode"] == mode]
        colour = colours[mode]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        for x, y in pts:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        draw.line((760, 70 + 26 * i, 790, 70 + 26 * i), fill=colour, width=3)
        draw.text((798, 62 + 26 * i), mode, fill="black", font=_font(14))
    if not rows:
        draw.text((box[0] + 200, (box[1] + box[3]) // 2), "no measurements (see device_check.json)", fill="black",
                  font=_font(16))
    img.save(path)


def _axes(img, draw, box, xs: dict, ymax: float) -> None:
    from PIL import Image, ImageDraw

    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    for size, x in xs.items():
        draw.line((x, bottom, x, bottom + 5), fill="black")
        draw.text((x - 6, bottom + 8), str(size), fill="black", font=_font(13))
    for k in range(6):
        y = bottom - k / 5 * (bottom - top)
        draw.line((left - 5, y, right, y), fill=(220, 220, 220) if k else "black")
        text = f"{ymax * k / 5:,.0f}"
        draw.text((left - 9 - draw.textlength(text, font=_font(13)), y - 7), text, fill="black", font=_font(13))
    draw.text(((left + right) // 2 - 40, bottom + 32), "batch size", fill="black", font=_font(15))
    text = "tokens / s"
    label = Image.new("RGB", (int(draw.textlength(text, font=_font(15))) + 2, 20), "white")
    ImageDraw.Draw(label).text((0, 0), text, fill="black", font=_font(15))
    label = label.rotate(90, expand=True)
    img.paste(label, (6, (top + bottom - label.height) // 2))


def _x_positions(sizes: list[int], box) -> dict:
    lo, hi = math.log2(sizes[0]), math.log2(sizes[-1])
    span = (box[2] - box[0] - 60) / (hi - lo) if hi > lo else 0
    return {s: box[0] + 30 + (math.log2(s) - lo) * span for s in sizes}


def _nice(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten at or above `value`."""
    power = 10 ** math.floor(math.log10(max(value, 1e-9)))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


# -- PyAV -----------------------------------------------------------------------------------------


def missing_av_note() -> str | None:
    """None when PyAV is installed; else why video rows are left out (the pipeline itself runs
    without it: pipeline/data/video_decode.py makes a video row an error that says so)."""
    if importlib.util.find_spec("av") is not None:
        return None
    return "PyAV is not installed: video rows skipped (see the docstring for the wheel)"


# -- main -----------------------------------------------------------------------------------------

SECTIONS = [("environment", environment, False), ("correctness", correctness, True),
            ("speed_model", speed_model, True), ("mindie", mindie, True), ("captions", captions_run, True),
            ("roofline", roofline, False), ("targets", targets, False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for device_check.json / .csv / .png")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    p.add_argument("--quick", action="store_true", help="bench preset, batch 1,2,4, 32 tokens, 32 images")
    p.add_argument("--budget-s", type=float, default=450.0, help="heavy sections past this are skipped")
    p.add_argument("--batch-sizes", type=_sizes, default=None,
                   help="MindIE table (default 1,2,4,8,16,32; quick 1,2,4)")
    p.add_argument("--images", type=int, default=None, help="caption run images (default 512; quick 32)")
    p.add_argument("--work", default=None,
                   help="models and media, kept and reused (default: OUT/_work, removed at the end)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    av_note = missing_av_note()
    from pipeline import devices
    from pipeline.errors import ConfigError

    try:
        device = devices.resolve_device(args.device)
    except ConfigError as e:
        print(f"device_check: {e}", file=sys.stderr)
        return 2
    check = Check(args, device, av_note)
    check.out.mkdir(parents=True, exist_ok=True)
    check.work.mkdir(parents=True, exist_ok=True)
    try:
        for name, fn, heavy in SECTIONS:
            run_section(check, name, fn, heavy)
    finally:
        write_table(check)
        write_json(check)
        if args.work is None:
            shutil.rmtree(check.work, ignore_errors=True)
    print(f"device_check: wrote {check.out}/device_check.json, .csv, .png in {check.report['elapsed_s']:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
