"""Content-hash dedup inside a shard (generation.dedup): rows whose media bytes hash the same and
whose prompt is the same are generated once; the others take the first one's result and name its
row in `dedup_of`. When every row asks the same prompts (no prompt column) a duplicate is not even
decoded: an earlier row of the shard with its bytes will answer it.

Why inside a shard, and only among the rows this run processes: a shard's rows go through one
worker in order, so the first occurrence is always ahead of its duplicates and nothing is shared
between workers, nodes or runs. Exactly-once is then untouched: a duplicate whose first occurrence
sits in another shard, or in a chunk committed by an earlier run, is simply generated itself (with
greedy decoding, to the same caption).
"""

from __future__ import annotations

import hashlib
import threading
from typing import BinaryIO

BLOCK = 1 << 20


def content_hash(f: BinaryIO) -> str:
    """sha256 of the whole stream, which is left at offset 0 for the decoder."""
    digest = hashlib.sha256()
    while block := f.read(BLOCK):
        digest.update(block)
    f.seek(0)
    return digest.hexdigest()


class Reuse:
    """Which row first had each key, what it came to, and who waits for it."""

    def __init__(self):
        self.first: dict[tuple, int] = {}
        self.results: dict[tuple, object] = {}
        self.waiting: dict[tuple, list] = {}
        self.reused = 0
        self.hashed: dict[tuple, int] = {}  # (sha, kind hint) -> the lowest row hashed so far
        self.skipped = 0  # decodes saved
        self.lock = threading.Lock()  # hashes come in from the decode threads

    def hashed_before(self, media: tuple, row: int) -> bool:
        """Whether a lower row with these bytes was hashed already: its result will answer this row,
        which need not be decoded. (Decode threads finish out of order; only a lower row counts.)"""
        with self.lock:
            first = self.hashed.setdefault(media, row)
            self.hashed[media] = min(first, row)
            skip = first < row
            self.skipped += skip
            return skip

    def first_row(self, key: tuple, row_index: int) -> int | None:
        """None when this row is the first with `key` (it will be generated), else that first row."""
        if key in self.first:
            self.reused += 1
            return self.first[key]
        self.first[key] = row_index
        return None

    def wait(self, key: tuple, item) -> object | None:
        """The first row's outcome when it is in, else None (the item waits for `finished`)."""
        if key in self.results:
            return self.results[key]
        self.waiting.setdefault(key, []).append(item)
        return None

    def finished(self, key: tuple, outcome) -> list:
        """Record the first row's outcome; returns the items that waited for it."""
        self.results[key] = outcome
        return self.waiting.pop(key, [])
