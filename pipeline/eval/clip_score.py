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
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.eval.clip_model import Clip, ScoreError
from pipeline.eval.report import summarize, write_report


@dataclasses.dataclass
class Row:
    row_index: int
    caption: str
    ok: bool
    path: str | None
    kind: str | None  # the job's kind column: decode_media's hint for content it cannot sniff


@dataclasses.dataclass
class RunOutput:
    dir: Path
    job: dict
    input: InputConfig
    rows: dict  # manifest id -> Row, in row_index order

    @property
    def model(self) -> str:
        return str(self.job.get("model", ""))


# ---------------------------------------------------------------- run outputs


def load_run(out_dir: str | Path) -> RunOutput:
    """Read _job.json and the caption columns the judge needs (never the whole caption table)."""
    d = Path(out_dir)
    job_path = d / "_job.json"
    if not job_path.is_file():
        raise ScoreError(f"{d} is not a llava-batch run output (no _job.json)")
    try:
        job = json.loads(job_path.read_text())
    except (OSError, ValueError) as e:
        raise ScoreError(f"{job_path} is unreadable: {e}") from None
    if not isinstance(job, dict) or job.get("version") != 1 or not isinstance(job.get("config"), dict):
        raise ScoreError(f"{job_path} is not a version-1 llava-batch job file")
    # Only committed chunk files: the writer's temporary files never end in .parquet.
    files = sorted((d / "captions").glob("*.parquet"))
    if not files:
        raise ScoreError(f"{d} is not a llava-batch run output (no captions/*.parquet)")
    known = {f.name for f in dataclasses.fields(InputConfig)}
    inp = InputConfig(**{k: v for k, v in job["config"].get("input", {}).items() if k in known})

    try:
        dataset = pads.dataset([str(f) for f in files], format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise ScoreError(f"{d}/captions is not a readable Parquet dataset: {e}") from None
    names = set(dataset.schema.names)
    needed = {"row_index", "caption", "status"} | ({inp.id_column} if inp.id_column else set())
    if missing := needed - names:
        raise ScoreError(f"{d}/captions lacks column(s) {', '.join(sorted(missing))}")
    path_col = inp.path_column if inp.path_column in names else None
    kind_col = inp.kind_column if inp.kind_column in names else None
    table = dataset.to_table(columns=sorted(needed | {c for c in (path_col, kind_col) if c}))
    table = table.sort_by("row_index")

    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    ids = cols[inp.id_column] if inp.id_column else cols["row_index"]
    rows: dict = {}
    for k, key in enumerate(ids):
        if key is None or key in rows:
            what = "a null" if key is None else f"a duplicate ({key!r})"
            raise ScoreError(f"{d}: {what} manifest id in column {inp.id_column or 'row_index'}; "
                             "rows are matched by id, so ids must be unique")
        rows[key] = Row(
            row_index=cols["row_index"][k],
            caption=cols["caption"][k] or "",
            ok=cols["status"][k] == "ok",
            path=cols[path_col][k] if path_col else None,
            kind=cols[kind_col][k] if kind_col else None,
        )
    return RunOutput(d, job, inp, rows)


@dataclasses.dataclass
class Plan:
    compare: list  # ids ok in both sets (or in A, single-set mode), in A's row order
    counts: dict


def match_rows(a: RunOutput, b: RunOutput | None) -> Plan:
    if b is None:
        errored = sum(not r.ok for r in a.rows.values())
        return Plan([i for i, r in a.rows.items() if r.ok], {"a": len(a.rows), "errored": errored})
    matched = [i for i in a.rows if i in b.rows]
    if a.rows and b.rows and not matched:
        raise ScoreError(f"{a.dir} and {b.dir} share no manifest id "
                         f"(ids by {a.input.id_column or 'row_index'} vs {b.input.id_column or 'row_index'})")
    compare = [i for i in matched if a.rows[i].ok and b.rows[i].ok]
    counts = {
        "a": len(a.rows),
        "b": len(b.rows),
        "matched": len(matched),
        "only_a": len(a.rows) - len(matched),
        "only_b": len(b.rows) - len(matched),
        "errored_a": sum(not a.rows[i].ok for i in matched),
        "errored_b": sum(not b.rows[i].ok for i in matched),
        "errored": len(matched) - len(compare),
    }
    return Plan(compare, counts)


# ---------------------------------------------------------------- media


def _decode(fileobj, *, video_frames: int, max_image_pixels: int, kind_hint: str | None):
    # Imported late so that only the judge's media path needs PyAV and friends.
    from pipeline.data.media import decode_media

    return decode_media(fileobj, video_frames=video_frames, max_image_pixels=max_image_pixels,
                        kind_hint=kind_hint)


class MediaReader:
    """Opens each row's media exactly as the job did: pipeline.data.sources + pipeline.media."""

    def __init__(self, run: RunOutput):
        from pipeline.data.sources import MediaSource

        self.input = run.input
        self.source = MediaSource(run.input)
        self.video_frames = int(run.job["config"].get("generation", {}).get("video_frames", 8))
        self.manifest = None
        if run.input.bytes_column:
            # Bytes are not passed through to the captions; re-read them by global row index.
            from pipeline.data.manifest import open_manifest

            try:
                self.manifest = open_manifest(dataclasses.replace(run.input))
            except ConfigError as e:
                raise ScoreError(f"{run.dir}: cannot re-read the job's manifest for its bytes column: {e}") from None
            expected = run.job.get("manifest", {}).get("num_rows")
            if expected is not None and expected != self.manifest.num_rows:
                raise ScoreError(f"{run.dir}: the manifest now has {self.manifest.num_rows} rows, "
                                 f"the job had {expected}; row indices no longer match")

    def load(self, rows: list[Row]) -> list:
        """Per row: a list of PIL RGB images (1 for an image, T sampled frames for a video) or an error string."""
        from PIL import Image

        out = []
        for row, record in zip(rows, self._records(rows), strict=True):
            try:
                with contextlib.closing(self.source.open(record)) as f:
                    media = _decode(f, video_frames=self.video_frames,
                                    max_image_pixels=self.input.max_image_pixels, kind_hint=row.kind)
            except Exception as e:  # noqa: BLE001 - one unreadable row must not stop the judge
                out.append(f"row {row.row_index}: {e}")
                continue
            if media.kind == "video":
                out.append([Image.fromarray(np.asarray(fr)) for fr in media.frames])
            else:
                out.append([media.image])
        return out

    def _records(self, rows: list[Row]) -> list[dict]:
        if self.manifest is None:
            return [{self.input.path_column: r.path} for r in rows]
        wanted = {r.row_index for r in rows}
        found: dict[int, dict] = {}
        # One ranged read per batch of rows instead of one row-group read per row.
        for start, batch in self.manifest.iter_rows(min(wanted), max(wanted) + 1):
            for g in wanted.intersection(range(start, start + batch.num_rows)):
                found[g] = batch.slice(g - start, 1).to_pylist()[0]
        return [found.get(r.row_index, {}) for r in rows]


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

    ids, scores, captions, media_errors = [], [], [], []
    for chunk in _chunks(plan.compare, batch_size):
        loaded = reader.load([run_a.rows[i] for i in chunk])
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
    table = pa.table(columns)

    counts = dict(plan.counts, media_errors=len(media_errors), compared=len(ids))
    report = summarize(table, counts, runs=[{"dir": str(r.dir.resolve()), "model": r.model} for r in runs])
    report.update(clip_model=clip_model, clip_weights=str(Path(clip_weights).resolve()), device=str(dev),
                  media_error_examples=media_errors[:5])
    if out_dir is not None:
        write_report(report, table, Path(out_dir))
    return report


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
    p.set_defaults(func=cli)
    return p


def cli(args: argparse.Namespace) -> int:
    try:
        report = score(args.out_a, args.out_b, clip_model=args.clip_model, clip_weights=args.clip_weights,
                       out_dir=args.report_dir, device=args.device, batch_size=args.batch_size)
    except ScoreError as e:
        print(f"llava-batch score: error: {e}", file=sys.stderr)
        return 2
    if args.report_dir:
        print(report["verdict"])
        print(f"report: {Path(args.report_dir) / 'report.md'}")
    else:
        from pipeline.eval.report import render_markdown

        print(render_markdown(report))
    return 0


