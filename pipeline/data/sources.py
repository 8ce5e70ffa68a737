"""Where a row's media bytes come from: a path (absolute, under media_root, or a URI) or a bytes column.

Returns a seekable binary file object; nothing here decodes. A path that resolves outside
`media_root` is refused before it is opened, and so is a local path that is not a regular file
(a FIFO or a device would block the reader or never end).
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
from typing import BinaryIO

import pyarrow.fs as pafs

from pipeline.config import InputConfig
from pipeline.data.filesystems import from_uri
from pipeline.errors import ConfigError

# A FIFO swapped in between the stat and the open must not block the open (POSIX only; reads of
# a regular file ignore the flag).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_SPECIAL = {"d": "a directory", "p": "a FIFO", "s": "a socket", "c": "a character device",
            "b": "a block device"}


class SourceError(Exception):
    """A row whose media cannot be opened; the message starts with the cause."""


def check_media_root(cfg: InputConfig) -> None:
    """A media_root that is not a directory would make every row a `missing file` error (and the
    corrected rerun a different job): refuse it before any work."""
    if not cfg.media_root:
        return
    try:
        fs, root = _fs_and_path(cfg.media_root)
        info = fs.get_file_info(root)
    except SourceError as e:
        raise ConfigError(f"input.media_root: {e}") from None
    except (OSError, ValueError) as e:  # pyarrow's network errors are OSErrors; a NUL byte a ValueError
        raise ConfigError(f"input.media_root: cannot read {cfg.media_root}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input.media_root: not found: {cfg.media_root}")
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"input.media_root: not a directory: {cfg.media_root}")


ROW_ERROR = "__error__"  # a manifest column saying why a row has no media (data/webdataset.py)


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
        if row.get(ROW_ERROR):  # what the manifest itself found wrong with the row (e.g. a cut tar member)
            raise SourceError(row[ROW_ERROR])
        path = row.get(self.cfg.path_column) if self.cfg.path_column else None
        if not path:
            raise SourceError("missing media: the row has neither bytes nor a path")
        path = str(path)
        if "\0" in path:  # every OS call would refuse it with a less telling message
            raise SourceError(f"invalid path (NUL byte): {path!r}")
        fs, resolved = self._resolve(path)
        if isinstance(fs, pafs.LocalFileSystem):
            return _open_local(resolved, path)
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


def _open_local(resolved: str, shown: str) -> BinaryIO:
    """Open a regular file only: checked before the open (which has side effects on devices) and
    again on the open descriptor (the path may have been swapped in between)."""
    try:
        _require_regular(os.stat(resolved).st_mode, shown)
        fd = os.open(resolved, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(f"missing file: {shown}") from None
    except OSError as e:
        raise SourceError(f"unreadable file: {shown}: {e.strerror or e}") from None
    try:
        _require_regular(os.fstat(fd).st_mode, shown)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, shown: str) -> None:
    if not stat.S_ISREG(mode):
        what = _SPECIAL.get(stat.filemode(mode)[0], "a special file")
        raise SourceError(f"not a regular file: {shown} ({what})")


def _fs_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        try:
            return from_uri(location)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
            raise SourceError(f"unsupported URI: {location}: {e}") from None
    return pafs.LocalFileSystem(), location
