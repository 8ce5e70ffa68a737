"""CLIP-score judge over one run output, or an A/B comparison of two (MindIE's llava precision test).

Per row: 100 * max(cos(image_embedding, text_embedding), 0), with L2-normalised fp32 open_clip
embeddings and open_clip's own preprocessing and tokenizer; a video row scores the mean over the
frames the job sampled. Rows are matched by manifest id; rows that errored in either set are counted
and left out. Images are found the way OUT_A's job found them (its path column + media_root, or its
bytes column re-read from the manifest by row_index).

Nothing is downloaded: the open_clip model comes from a built-in name or a local config JSON, built
with pretrained=None, and the weights are loaded here from a local file with weights_only=True.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.eval import ScoreError
from pipeline.eval.clip_model import Clip
from pipeline.eval.media_reader import MediaReader
from pipeline.eval.report import summarize, write_report
from pipeline.eval.run_output import RunOutput, load_run, match_rows


def _resolve_device(device: str, run: RunOutput):
    from pipeline.devices import resolve_device

    if device != "auto":
        try:
            return resolve_device(device)
        except ConfigError as e:
            raise ScoreError(f"--device: {e}") from None
    # The job's device, unless this host lacks it (e.g. judging an NPU run on a GPU box).
    try:
        return resolve_device(str(run.job["config"].get("model", {}).get("device", "auto")))
    except ConfigError:
        return resolve_device("auto")


# ---------------------------------------------------------------- scoring


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def score_chunk(clip: Clip, frames: list[list], captions: list[list[str]], batch_size: int) -> list[list[float]]:
    """frames[k]: row k's images; captions[k]: its captions (one per set). Returns scores[k][set]."""
    flat = [im for fs in frames for im in fs]
    owner = np.repeat(np.arange(len(frames)), [len(fs) for fs in frames])
    img = clip.encode_images(flat, batch_size)
    # Each distinct caption is embedded once, so identical captions get bit-identical scores.
    texts = sorted({c for cs in captions for c in cs})
    txt = dict(zip(texts, clip.encode_texts(texts, batch_size), strict=True))
    out = []
    for k, cs in enumerate(captions):
        rows = img[owner == k]
        # Clamp per frame, then mean: a video row is the mean of its per-frame scores.
        out.append([float((100.0 * (rows @ txt[c]).clamp(min=0)).mean()) for c in cs])
    return out


def score(out_a, out_b=None, *, clip_model: str, clip_weights, out_dir=None, device: str = "auto",
          batch_size: int = 32) -> dict:
    """Score OUT_A (and OUT_B), write REPORT_DIR when out_dir is given, return the report dict."""
    if batch_size < 1:
        raise ScoreError(f"--batch-size must be >= 1, got {batch_size}")
    run_a = load_run(out_a)
    run_b = load_run(out_b) if out_b is not None else None
    plan = match_rows(run_a, run_b)
    # Every argument is checked before any media is read or any embedding computed.
    reader = MediaReader(run_a)
    dev = _resolve_device(device, run_a)
    clip = Clip(clip_model, clip_weights, dev)
    runs = [run_a] if run_b is None else [run_a, run_b]

    table, media_errors = _score_table(clip, reader, runs, plan.compare, batch_size)
    counts = dict(plan.counts, media_errors=len(media_errors), compared=table.num_rows)
    report = summarize(table, counts, runs=[{"dir": str(r.dir.resolve()), "model": r.model} for r in runs])
    report.update(clip_model=clip_model, clip_weights=str(Path(clip_weights).resolve()), device=str(dev),
                  media_error_examples=media_errors[:5])
    if out_dir is not None:
        write_report(report, table, Path(out_dir))
    return report


def _score_table(clip: Clip, reader: MediaReader, runs: list[RunOutput], compare: list, batch_size: int
                 ) -> tuple[pa.Table, list[str]]:
    """(id, score_a, caption_a[, score_b, caption_b]) of every compared row whose media reads, and
    the media errors of the rest."""
    ids, scores, captions, media_errors = [], [], [], []
    for chunk in _chunks(compare, batch_size):
        loaded = reader.load([runs[0].rows[i] for i in chunk])
        keep = [k for k, m in enumerate(loaded) if not isinstance(m, str)]
        media_errors += [m for m in loaded if isinstance(m, str)]
        if not keep:
            continue
        caps = [[r.rows[chunk[k]].caption for r in runs] for k in keep]
        scores += score_chunk(clip, [loaded[k] for k in keep], caps, batch_size)
        ids += [chunk[k] for k in keep]
        captions += caps
    columns = {"id": ids}
    for s, tag in enumerate("ab"[:len(runs)]):
        columns[f"score_{tag}"] = pa.array([sc[s] for sc in scores], pa.float64())
        columns[f"caption_{tag}"] = pa.array([c[s] for c in captions], pa.string())
    return pa.table(columns), media_errors


# ---------------------------------------------------------------- CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score", help="CLIP-score one run output, or compare two (A/B precision test)",
        description="Score captions with an open_clip model: 100 * max(cos(image, caption), 0) per row. "
                    "With OUT_B, compare A and B row by row (matched by manifest id); the higher mean wins.")
    p.add_argument("out_a", metavar="OUT_A", help="output dir of `llava-batch run`")
    p.add_argument("out_b", metavar="OUT_B", nargs="?", help="second output dir to compare against OUT_A")
    p.add_argument("--clip-model", required=True, metavar="NAME_OR_CONFIG_JSON",
                   help="open_clip model name (ViT-H-14 for MindIE's judge) or a local open_clip config JSON")
    p.add_argument("--clip-weights", required=True, metavar="PATH",
                   help="local open_clip_pytorch_model.bin or .safetensors; nothing is downloaded")
    p.add_argument("--out", dest="report_dir", metavar="REPORT_DIR",
                   help="write scores.parquet, report.json, report.md and a histogram PNG here")
    p.add_argument("--device", default="auto", help="auto (the job's device if present) | cpu | cuda[:i] | npu[:i]")
    p.add_argument("--batch-size", type=int, default=32, help="images (and captions) per forward pass")
    # error_prog: pipeline.cli prints this command's errors as "llava-batch score: error: ...".
    p.set_defaults(func=cli, error_prog=p.prog)
    return p


def cli(args: argparse.Namespace) -> int:
    report = score(args.out_a, args.out_b, clip_model=args.clip_model, clip_weights=args.clip_weights,
                   out_dir=args.report_dir, device=args.device, batch_size=args.batch_size)
    if args.report_dir:
        print(report["verdict"])
        print(f"report: {Path(args.report_dir) / 'report.md'}")
    else:
        from pipeline.eval.report import render_markdown

        print(render_markdown(report))
    return 0


