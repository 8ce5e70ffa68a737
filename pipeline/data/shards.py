"""The plan: fixed row ranges (shards) and their commit units (chunks), the same on every run over
the same manifest, whatever its format."""

from __future__ import annotations

from dataclasses import dataclass


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


def plan_shards(num_rows: int, rows_per_shard: int) -> list[Shard]:
    return [Shard(i, s, min(s + rows_per_shard, num_rows)) for i, s in enumerate(range(0, num_rows, rows_per_shard))]
