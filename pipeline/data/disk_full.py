"""A full output disk as one line naming the dir and its free space (exit 1, not a bad job)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from pipeline.errors import LlavaBatchError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(LlavaBatchError):
    """No space left on the output filesystem. Not a bad job (exit 1): what is committed stays
    committed, so rerunning once space is freed resumes exactly once."""


def disk_full_report(report: str) -> str | None:
    """The message of a DiskFullError that a worker reported as text ("...DiskFullError: <msg>")."""
    _, found, message = report.partition(f"{DiskFullError.__name__}: ")
    return message if found else None


def disk_full(root: Path, e: OSError, doing: str) -> DiskFullError | None:
    """The error for a write under `root` that found the disk full; None when `e` is not that."""
    if e.errno not in _NO_SPACE:
        return None
    return DiskFullError(f"output.dir {root}: no space left on device ({_free_space(root)} "
                         f"free) while {doing}; free some space and rerun the same command to resume")


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"
