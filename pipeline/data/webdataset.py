"""WebDataset tar shards as a manifest (`input.format = "webdataset"`): one row per sample, in tar
order, so the plan (and exactly-once) is fixed for a fixed list of tars.

A sample is the run of adjacent members sharing a key (the member name up to the first dot of its
base name, the WebDataset convention): its image or video member (by extension) becomes the `media`
bytes column; `.txt` and `.json` members pass through as the `txt` and `json` columns, beside
`__key__` and `__url__` (the tar).

Python's tarfile over pyarrow.fs files, not the webdataset library: the pipeline needs random access
(a shard, or the chunk a resume starts at, is a row range in the middle of a tar) and webdataset
streams sequentially. Planning reads only the 512-byte member headers, seeking over the data, on any
filesystem pyarrow reaches (local, S3, GCS, HDFS) or fsspec does (data/filesystems.py). A tar cut
short ends its samples where its headers end; a member whose data is cut, or a sample without a
media member, is a row error (`__error__`), never a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.shards import Shard, plan_shards
from pipeline.errors import ConfigError

MEDIA_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "avif", "heic",
              "mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "ts", "flv"}
SCHEMA = pa.schema([("__key__", pa.string()), ("__url__", pa.string()), ("media", pa.binary()),
                    ("txt", pa.string()), ("json", pa.string()), ("__error__", pa.string())])


@dataclass
class Sample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)


@dataclass(frozen=True)
class TarFile:
    path: str
    size: int
    samples: list[Sample]
    start: int  # global index of its first sample
    note: str | None  # why its headers ended early, if they did
    mtime_ns: int | None = None  # with size, what an index of the scan is valid for

    @property
    def num_rows(self) -> int:
        return len(self.samples)


def split_name(name: str) -> tuple[str, str]:
    """"dir/abc.seg.jpg" -> ("dir/abc", "seg.jpg")."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def scan(fs: pafs.FileSystem, info: pafs.FileInfo, start: int) -> TarFile:
    samples: list[Sample] = []
    note = None
    path, size = info.path, info.size
    with fs.open_input_file(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_name(member.name)
                    if not samples or samples[-1].key != key:
                        samples.append(Sample(key))
                    samples[-1].members[ext] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            if not samples:
                raise ConfigError(f"input.manifest: {path} is not a readable tar file: {e}") from None
            note = f"{type(e).__name__}: {e}"  # a cut tar: its samples end where its headers end
    return TarFile(path, size, samples, start, note, _mtime(info))


class WebDatasetManifest:
    """The Manifest interface (pipeline/data/manifest.py) over tar shards."""

    schema = SCHEMA

    def __init__(self, fs: pafs.FileSystem, tars: list[TarFile]):
        self.fs, self.files = fs, tars
        self.scanned = len(tars)  # tars whose headers were read (the others came from an index)

    @property
    def num_rows(self) -> int:
        return sum(t.num_rows for t in self.files)

    def plan(self, rows_per_shard: int) -> list[Shard]:
        return plan_shards(self.num_rows, rows_per_shard)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.files:
            h.update(f"{t.path}|{t.size}|{t.num_rows}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"files": [t.path for t in self.files], "num_rows": self.num_rows, "fingerprint": self.fingerprint(),
                "format": "webdataset", "cut_tars": {t.path: t.note for t in self.files if t.note}}

    def max_bytes(self, column: str) -> int:
        raise ConfigError("input.prompt_column is not available with input.format = \"webdataset\"")

    def iter_rows(self, start: int, stop: int, batch_rows: int = 256) -> Iterator[tuple[int, pa.RecordBatch]]:
        for t in self.files:
            lo, hi = max(start, t.start), min(stop, t.start + t.num_rows)
            if lo >= hi:
                continue
            with self.fs.open_input_file(t.path) as f:
                for first in range(lo, hi, batch_rows):
                    rows = [_row(f, t, t.samples[i - t.start]) for i in range(first, min(first + batch_rows, hi))]
                    yield first, pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def _row(f, tar: TarFile, sample: Sample) -> dict:
    row = {"__key__": sample.key, "__url__": tar.path, "media": None, "txt": None, "json": None, "__error__": None}
    media = next((ext for ext in sample.members if ext.rsplit(".", 1)[-1] in MEDIA_EXTS), None)
    try:
        for ext, column in (("txt", "txt"), ("json", "json")):
            if ext in sample.members:
                row[column] = _read(f, tar, sample.members[ext]).decode("utf-8", errors="replace")
        if media is None:
            row["__error__"] = f"missing media: sample {sample.key!r} has no image or video member " \
                               f"(members: {', '.join(sorted(sample.members)) or 'none'})"
        else:
            row["media"] = _read(f, tar, sample.members[media])
    except ValueError as e:
        row["media"], row["__error__"] = None, f"truncated tar member: {e}"
    return row


def _read(f, tar: TarFile, where: tuple[int, int]) -> bytes:
    offset, size = where
    if offset + size > tar.size:
        raise ValueError(f"{tar.path}: {size} bytes at {offset}, but the file ends at {tar.size}")
    f.seek(offset)
    return f.read(size)


def open_webdataset(fs: pafs.FileSystem, paths: list[str], index: Path | None = None) -> WebDatasetManifest:
    """The tars in order. With `index` (a file in the job's output dir), a tar whose size and mtime
    match its entry there is not scanned again: the workers of a job and its reruns read the member
    headers once, not once per process, which on object storage is a ranged read per member."""
    known = load_index(index) if index is not None else {}
    tars, start, scanned = [], 0, 0
    for info in fs.get_file_info(paths):
        cached = known.get(info.path)
        if _unchanged(cached, info):
            tar = dataclasses.replace(cached, start=start)
        else:
            tar, scanned = scan(fs, info, start), scanned + 1
        tars.append(tar)
        start += tar.num_rows
    manifest = WebDatasetManifest(fs, tars)
    manifest.scanned = scanned
    return manifest


def _unchanged(tar: TarFile | None, info: pafs.FileInfo) -> bool:
    """Whether an indexed tar is still the file there (a filesystem without mtimes: never known)."""
    return tar is not None and tar.mtime_ns is not None and (tar.size, tar.mtime_ns) == (info.size, _mtime(info))


def _mtime(info: pafs.FileInfo) -> int | None:
    return getattr(info, "mtime_ns", None)


INDEX_FILE = "_index/webdataset.parquet"  # in the output dir
INDEX_SCHEMA = pa.schema([
    ("tar", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("note", pa.string()), ("key", pa.string()),
    ("members", pa.list_(pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]))),
])


def save_index(manifest: WebDatasetManifest, path: Path) -> None:
    """One row per sample of every tar with an mtime, written whole or not at all."""
    rows = [{"tar": t.path, "size": t.size, "mtime_ns": t.mtime_ns, "note": t.note, "key": s.key,
             "members": [{"ext": e, "offset": o, "size": n} for e, (o, n) in s.members.items()]}
            for t in manifest.files if t.mtime_ns is not None for s in t.samples]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
    os.replace(tmp, path)


def load_index(path: Path) -> dict[str, TarFile]:
    """The tars an index holds (start 0), by path; none when it is missing or unreadable (a cache)."""
    try:
        table = pq.read_table(path, schema=INDEX_SCHEMA)
    except (OSError, pa.ArrowInvalid):
        return {}
    tars: dict[str, TarFile] = {}
    for row in table.to_pylist():
        tar = tars.get(row["tar"])
        if tar is None:
            tar = tars[row["tar"]] = TarFile(row["tar"], row["size"], [], 0, row["note"], row["mtime_ns"])
        tar.samples.append(Sample(row["key"], {m["ext"]: (m["offset"], m["size"]) for m in row["members"]}))
    return tars
