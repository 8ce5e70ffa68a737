"""Where a row's media bytes come from: a path (absolute, under media_root, or a URI) or a bytes column.

Returns a seekable binary file object; nothing here decodes. A path that resolves outside
`media_root` is refused before it is opened.
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import BinaryIO

import pyarrow.fs as pafs

from pipeline.config import InputConfig


class SourceError(Exception):
    """A row whose media cannot be opened; the message starts with the cause."""


class MediaSource:
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        self.root_fs, self.root = None, None
        if cfg.media_root:
            self.root_fs, self.root = _fs_and_path(cfg.media_root)
            if isinstance(self.root_fs, pafs.LocalFileSystem):
                self.root = os.path.realpath(self.root)

    def open(self, row: dict) -> BinaryIO:
        data = row.get(self.cfg.bytes_column) if self.cfg.bytes_column else None
        if isinstance(data, dict):  # HF datasets' {bytes, path} struct
            data = data.get("bytes") or None
        if data is not None:
            return io.BytesIO(data)
        path = row.get(self.cfg.path_column) if self.cfg.path_column else None
        if not path:
            raise SourceError("missing media: the row has neither bytes nor a path")
        fs, resolved = self._resolve(str(path))
        try:
            return fs.open_input_file(resolved)
        except FileNotFoundError:
            raise SourceError(f"missing file: {path}") from None
        except OSError as e:
            kind = "missing file" if "not found" in str(e).lower() or "no such file" in str(e).lower() else "unreadable file"
            raise SourceError(f"{kind}: {path}: {e}") from None

    def _resolve(self, path: str) -> tuple[pafs.FileSystem, str]:
        if self.root is None:
            return _fs_and_path(path)
        if "://" in path or os.path.isabs(path):
            fs, resolved = _fs_and_path(path)
            if type(fs) is not type(self.root_fs):
                raise SourceError(f"path escapes media_root: {path}")
        else:
            fs = self.root_fs
            resolved = posixpath.join(self.root, path)
        if isinstance(fs, pafs.LocalFileSystem):
            resolved = os.path.realpath(resolved)  # follows symlinks, so a link out is caught too
            inside = os.path.commonpath([resolved, self.root]) == self.root
        else:
            resolved = posixpath.normpath(resolved)
            inside = resolved == self.root or resolved.startswith(self.root.rstrip("/") + "/")
        if not inside:
            raise SourceError(f"path escapes media_root: {path}")
        return fs, resolved


def _fs_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
            raise SourceError(f"unsupported URI: {location}: {e}") from None
    return pafs.LocalFileSystem(), location
