"""Manifest files -> a fixed plan of shards and chunks -> one shard's rows as a stream.

Row ids are global positions across the manifest files in sorted order, so the plan (and with it
every chunk file name) is the same on every run over the same manifest. Only Parquet footers are
read to plan; rows are streamed record batch by record batch.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ManifestFile:
    path: str  # path as the filesystem understands it
    num_rows: int
    start: int  # global index of its first row


@dataclass(frozen=True)
class Chunk:
    shard: int
    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    def chunks(self, chunk_rows: int) -> list[Chunk]:
        bounds = range(self.start, self.stop, chunk_rows)
        return [Chunk(self.index, k, b, min(b + chunk_rows, self.stop)) for k, b in enumerate(bounds)]


class Manifest:
    def __init__(self, fs: pafs.FileSystem, files: list[ManifestFile], schema: pa.Schema):
        self.fs, self.files, self.schema = fs, files, schema

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def plan(self, rows_per_shard: int) -> list[Shard]:
        n = self.num_rows
        return [Shard(i, s, min(s + rows_per_shard, n)) for i, s in enumerate(range(0, n, rows_per_shard))]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            info = self.fs.get_file_info(f.path)
            h.update(f"{f.path}|{f.num_rows}|{info.size}\n".encode())
        h.update(self.schema.to_string().encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"files": [f.path for f in self.files], "num_rows": self.num_rows, "fingerprint": self.fingerprint()}

    def iter_rows(self, start: int, stop: int, batch_rows: int = 256) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Yield (global index of first row, record batch) covering rows [start, stop)."""
        for f in self.files:
            lo, hi = max(start, f.start), min(stop, f.start + f.num_rows)
            if lo < hi:
                yield from self._iter_file(f, lo - f.start, hi - f.start, batch_rows)

    def _iter_file(self, f: ManifestFile, lo: int, hi: int, batch_rows: int):
        with self.fs.open_input_file(f.path) as handle:
            pf = pq.ParquetFile(handle)
            groups, first = _row_groups_covering(pf.metadata, lo, hi)
            pos = first
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
                a, b = max(lo, pos), min(hi, pos + batch.num_rows)
                if a < b:
                    yield f.start + a, batch.slice(a - pos, b - a)
                pos += batch.num_rows
                if pos >= hi:
                    return


def _row_groups_covering(meta: pq.FileMetaData, lo: int, hi: int) -> tuple[list[int], int]:
    """Row groups that hold rows [lo, hi) and the file row index where the first of them starts."""
    groups, first, pos = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if pos + n > lo and pos < hi:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    return groups, first or 0


def _list_paths(spec: str) -> tuple[pafs.FileSystem, list[str]]:
    if "://" in spec:
        fs, root = pafs.FileSystem.from_uri(spec)
    else:
        fs, root = pafs.LocalFileSystem(), spec
    if any(c in root for c in "*?["):
        if not isinstance(fs, pafs.LocalFileSystem):
            raise ConfigError(f"input.manifest: globs are only supported on local paths: {spec}")
        return fs, sorted(p for p in glob.glob(root, recursive=True) if os.path.isfile(p))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input.manifest: not found: {spec}")
    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(root, recursive=True)
        infos = fs.get_file_info(selector)
        return fs, sorted(i.path for i in infos if i.is_file and i.path.endswith(".parquet"))
    return fs, [root]


def open_manifest(cfg: InputConfig) -> Manifest:
    fs, paths = None, []
    for spec in cfg.manifest:
        spec_fs, spec_paths = _list_paths(spec)
        if fs is not None and type(spec_fs) is not type(fs):
            raise ConfigError("input.manifest: all manifest locations must be on one filesystem")
        fs = spec_fs
        paths.extend(spec_paths)
    if not paths:
        raise ConfigError(f"input.manifest: no Parquet files in {cfg.manifest}")
    files, schema, start = [], None, 0
    for path in paths:
        try:
            meta = pq.read_metadata(path, filesystem=fs)
            file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"input.manifest: {path} is not a readable Parquet file: {e}") from None
        if schema is not None and not file_schema.equals(schema):
            raise ConfigError(f"input.manifest: {path} has a different schema than {paths[0]}")
        schema = file_schema
        files.append(ManifestFile(path, meta.num_rows, start))
        start += meta.num_rows
    check_columns(cfg, schema)
    return Manifest(fs, files, schema)


def check_columns(cfg: InputConfig, schema: pa.Schema) -> None:
    names = set(schema.names)
    for key in ("path_column", "bytes_column", "kind_column", "prompt_column", "id_column"):
        col = getattr(cfg, key)
        if col and col not in names:
            if key == "path_column" and cfg.bytes_column and col == "path":
                cfg.path_column = None  # the default does not apply to a bytes-only manifest
                continue
            raise ConfigError(f"input.{key}: column {col!r} not in manifest (columns: {', '.join(schema.names)})")
    if cfg.bytes_column:
        t = schema.field(cfg.bytes_column).type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t)):
            raise ConfigError(f"input.bytes_column: {cfg.bytes_column!r} must be binary or a {{bytes, path}} struct")
