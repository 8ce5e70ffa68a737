"""Helpers for the scale-out tests: a manifest big enough to kill a worker mid-shard, reference
captions from a plain single-process run, and finding worker processes to kill."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.testing.demo import write_image
from pipeline.testing.jobs import job_sections, write_job, write_manifest


def make_manifest(root: Path, n_rows: int, n_images: int = 12) -> Path:
    """`n_rows` rows over a few distinct images (decoding is not what these tests are about)."""
    images = [str(write_image(root / "media" / f"{i}.png", seed=200 + i, size=(60 + 4 * i, 64)))
              for i in range(n_images)]
    return write_manifest(root / "m.parquet", {"id": [f"r{i}" for i in range(n_rows)],
                                               "path": [images[i % n_images] for i in range(n_rows)]},
                          row_group_size=16)


def make_job(root: Path, name: str, model: Path, manifest: Path, **overrides) -> tuple[Path, Path]:
    out = root / name
    sections = {"output": {"rows_per_shard": 12, "chunk_rows": 3}, "generation": {"max_batch_size": 3}}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return write_job(root / f"{name}.toml", job_sections(model, manifest, out, **sections)), out


def captions(out: Path) -> list[tuple]:
    table = ds.dataset(out / "captions").to_table(columns=["row_index", "id", "caption", "status"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def reference(root: Path, model: Path, manifest: Path) -> list[tuple]:
    job, out = make_job(root, "reference", model, manifest)
    assert main(["run", str(job)]) == 0
    return captions(out)


def run_cli(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def processed(stdout: str) -> int:
    return int(re.search(r"(\d+) captioned this run", stdout).group(1))


def descendants(root_pid: int, needle: str) -> list[int]:
    """Pids below `root_pid` whose command line contains `needle` (Linux /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid:
                frontier.append(child)
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if needle in cmd:
                    found.append(child)
    return found


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    """The first truthy value of `predicate()`, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def n_chunks(out: Path) -> int:
    d = out / "captions"
    return len(list(d.glob("*.parquet"))) if d.is_dir() else 0


def chunk_writers(out: Path) -> list[int]:
    """Pids recorded in the committed chunk files' metadata."""
    pids = []
    for path in (out / "captions").glob("*.parquet"):
        try:
            meta = json.loads(pq.read_schema(path).metadata[b"llava_batch"])
        except (OSError, KeyError):
            continue
        pids.append(meta["pid"])
    return pids
