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
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.data.filesystems import from_uri
from pipeline.data.shards import Chunk, Shard, plan_shards  # noqa: F401 - Chunk re-exported
from pipeline.data.sources import check_media_root
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ManifestFile:
    path: str  # path as the filesystem understands it
    num_rows: int
    start: int  # global index of its first row


class Manifest:
    def __init__(self, fs: pafs.FileSystem, files: list[ManifestFile], schema: pa.Schema):
        self.fs, self.files, self.schema = fs, files, schema

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def plan(self, rows_per_shard: int) -> list[Shard]:
        return plan_shards(self.num_rows, rows_per_shard)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            info = self.fs.get_file_info(f.path)
            h.update(f"{f.path}|{f.num_rows}|{info.size}\n".encode())
        h.update(self.schema.to_string().encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"files": [f.path for f in self.files], "num_rows": self.num_rows, "fingerprint": self.fingerprint()}

    def max_bytes(self, column: str) -> int:
        """The longest value of a string column (or of any item of a list-of-strings column), in
        bytes: one column streamed, every file."""
        longest = 0
        for f in self.files:
            with self.fs.open_input_file(f.path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=65536, columns=[column]):
                    values = batch.column(0)
                    if _is_list(values.type):
                        values = pc.list_flatten(values)
                    if _is_view(values.type, "string"):  # binary_length has no kernel for views
                        values = values.cast(pa.large_string())
                    most = pc.max(pc.binary_length(values)).as_py()
                    longest = max(longest, most or 0)
        return longest

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


def repair_utf8(table: pa.Table) -> tuple[pa.Table, dict[int, str]]:
    """Parquet readers do not check that strings are UTF-8, and one invalid value would crash every
    conversion to Python and poison the output file for its readers. Returns the table with each
    invalid value replaced (a string: U+FFFD for each bad byte; inside a nested value: the whole
    value by null) and {row: why} for the rows that had one."""
    try:
        table.validate(full=True)  # the common case: one fast pass over the whole chunk
        return table, {}
    except pa.ArrowInvalid:
        pass
    errors: dict[int, str] = {}
    for i, f in enumerate(table.schema):
        fixed, bad = _repair_column(table.column(i), f)
        if bad:
            table = table.set_column(i, f, fixed)
            for row, how in bad.items():
                note = f"invalid UTF-8 in column {f.name!r} ({how})"
                errors[row] = f"{errors[row]}; {note}" if row in errors else note
    return table, errors


def _repair_column(col: pa.ChunkedArray, f: pa.Field) -> tuple[pa.Array | None, dict[int, str]]:
    try:
        col.validate(full=True)
        return None, {}
    except pa.ArrowInvalid:
        pass
    col = col.combine_chunks()
    bad = {row for row in range(len(col)) if not _converts(col[row])}
    if not bad:
        return None, {}
    if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
        mask = pa.array([row in bad for row in range(len(col))])
        return pc.if_else(mask, pa.nulls(len(col), f.type), col), dict.fromkeys(bad, "value written as null")
    raw = col.cast(pa.large_binary())  # the bytes as they are: this cast checks nothing
    values = [raw[row].as_py().decode("utf-8", "replace") if row in bad else col[row].as_py()
              for row in range(len(col))]
    return pa.array(values, type=f.type), dict.fromkeys(bad, "value written with U+FFFD for the bad bytes")


def _converts(value: pa.Scalar) -> bool:
    try:
        value.as_py()
        return True
    except UnicodeDecodeError:
        return False


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


def _list_paths(spec: str, suffix: str = ".parquet") -> tuple[pafs.FileSystem, list[str]]:
    if "://" in spec:
        fs, root = from_uri(spec)
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
        return fs, sorted(i.path for i in infos if i.is_file and i.path.endswith(suffix))
    return fs, [root]


def open_manifest(cfg: InputConfig, out_dir: str | None = None) -> Manifest:
    """The manifest `cfg` names. `out_dir`: the job's output dir, where a WebDataset job keeps the
    index of its tars' scan (data/webdataset.py), read here when it is valid."""
    webdataset = cfg.format == "webdataset"
    fs, paths = None, []
    for spec in cfg.manifest:
        spec_fs, spec_paths = _list_paths(spec, ".tar" if webdataset else ".parquet")
        if fs is not None and type(spec_fs) is not type(fs):
            raise ConfigError("input.manifest: all manifest locations must be on one filesystem")
        fs = spec_fs
        paths.extend(spec_paths)
    if not paths:
        raise ConfigError(f"input.manifest: no {'tar' if webdataset else 'Parquet'} files in {cfg.manifest}")
    if webdataset:
        from pipeline.data.webdataset import INDEX_FILE, open_webdataset

        check_media_root(cfg)
        return open_webdataset(fs, paths, Path(out_dir) / INDEX_FILE if out_dir else None)
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
    check_media_root(cfg)
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
    _check_types(cfg, schema)


def _check_types(cfg: InputConfig, schema: pa.Schema) -> None:
    """A column of the wrong type would not fail: an int path column opens a file named `1` in every row."""
    # A path column that is all null is fine beside a bytes column (every row has bytes).
    text_cols = {"path_column": bool(cfg.bytes_column), "kind_column": True, "prompt_column": True}
    for key, null_ok in text_cols.items():
        col = getattr(cfg, key)
        t = schema.field(col).type if col else None
        several = key == "prompt_column" and t is not None and _is_list(t) and _is_text(t.value_type)
        if t is not None and not (_is_text(t) or several or null_ok and pa.types.is_null(t)):
            raise ConfigError(f"input.{key}: column {col!r} has type {t}; it must hold strings"
                              + (" or lists of strings (several prompts a row)" if key == "prompt_column" else "")
                              + (" (cast it to string: paths are not decoded from bytes)"
                                 if key == "path_column" and _is_binary(t) else ""))
    if cfg.id_column:
        t = schema.field(cfg.id_column).type
        if pa.types.is_nested(t) or pa.types.is_null(t):
            raise ConfigError(f"input.id_column: column {cfg.id_column!r} has type {t}; "
                              "ids must be scalars (strings or numbers)")
    if cfg.bytes_column:
        t = schema.field(cfg.bytes_column).type
        inner = t.field("bytes").type if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 else t
        if not _is_binary(inner):
            raise ConfigError(f"input.bytes_column: {cfg.bytes_column!r} has type {t}; "
                              "it must be binary or a {bytes: binary, path} struct")


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or _is_view(t, "string")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_view(t, "binary")


def _is_view(t: pa.DataType, kind: str) -> bool:
    test = getattr(pa.types, f"is_{kind}_view", None)  # pyarrow >= 16
    return bool(test and test(t))
