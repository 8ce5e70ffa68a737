"""Output dir: chunk files, shard markers, and the job state read back from them alone.

Commit protocol: a chunk covers a row range fixed by the plan, is written to `_tmp/`, fsynced and
renamed into `captions/`. A chunk file that exists is committed; one that does not, is not. So a
kill -9 at any instant loses at most the chunk being written and never leaves a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.config import fingerprint_view
from pipeline.errors import ConfigError

JOB_FILE = "_job.json"
TMP_STALE_S = 3600.0
_CHUNK_RE = re.compile(r"shard-(\d{5,})-chunk-(\d{5,})\.parquet$")

RESULT_FIELDS = [
    pa.field("row_index", pa.int64()),
    pa.field("caption", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("n_prompt_tokens", pa.int32()),
    pa.field("n_output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("frames", pa.int32()),
    pa.field("prompt", pa.string()),
    pa.field("model", pa.string()),
]
RESULT_NAMES = {f.name for f in RESULT_FIELDS}


def passthrough_name(name: str) -> str:
    """An input column that shares a result column's name is kept under `input_<name>`."""
    return f"input_{name}" if name in RESULT_NAMES else name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.captions = self.root / "captions"
        self.stats = self.root / "_stats"
        self.tmp = self.root / "_tmp"

    # -- job identity -------------------------------------------------------------------------
    def read_job(self) -> dict | None:
        path = self.root / JOB_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def check_compatible(self, job: dict, mode: str) -> None:
        """Refuse, before any work, to resume into a dir that holds a different job."""
        if mode == "overwrite" or not self.root.exists():
            return
        old = self.read_job()
        if old is None:
            if any(self.root.iterdir()):
                raise ConfigError(f"output.dir {self.root} is not empty and has no {JOB_FILE}: "
                                  "not a llava-batch output; choose another dir")
            return
        if old["manifest"]["fingerprint"] != job["manifest"]["fingerprint"]:
            raise ConfigError(f"output.dir {self.root} was written for a different manifest; "
                              'set output.mode = "overwrite" or choose another dir')
        before, now = fingerprint_view(old["config"]), fingerprint_view(job["config"])
        for section, keys in now.items():
            for key, value in keys.items():
                if before[section][key] != value:
                    raise ConfigError(
                        f"output.dir {self.root} holds a job with {section}.{key} = {before[section][key]!r}, "
                        f'this job has {value!r}; set output.mode = "overwrite" or choose another dir')

    def start(self, job: dict, mode: str) -> None:
        if mode == "overwrite":
            for path in (self.captions, self.stats, self.tmp, self.root / "_leases"):
                shutil.rmtree(path, ignore_errors=True)
        for path in (self.captions, self.stats, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()
        self._atomic_write(self.root / JOB_FILE, lambda p: p.write_text(json.dumps(job, indent=2)))

    def _sweep_tmp(self, older_than_s: float = TMP_STALE_S) -> None:
        """Delete temp files a killed run left behind. A live writer's temp file is milliseconds
        old (write, fsync, rename), so only files far older than any write are touched."""
        cutoff = time.time() - older_than_s
        for path in self.tmp.iterdir():
            with contextlib.suppress(OSError):  # another run may sweep the same file
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    # -- commits ------------------------------------------------------------------------------
    def _atomic_write(self, final: Path, write) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{final.name}.{uuid.uuid4().hex}"
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def chunk_path(self, shard: int, chunk: int) -> Path:
        return self.captions / f"shard-{shard:05d}-chunk-{chunk:05d}.parquet"

    def commit_chunk(self, shard: int, chunk: int, table: pa.Table, meta: dict) -> None:
        table = table.replace_schema_metadata({"llava_batch": json.dumps(meta)})
        self._atomic_write(self.chunk_path(shard, chunk), lambda p: pq.write_table(table, p))

    def committed_chunks(self) -> set[tuple[int, int]]:
        if not self.captions.is_dir():
            return set()
        found = (_CHUNK_RE.search(p.name) for p in self.captions.iterdir())
        return {(int(m.group(1)), int(m.group(2))) for m in found if m}

    def shard_path(self, shard: int) -> Path:
        return self.stats / f"shard-{shard:05d}.json"

    def shard_done(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def commit_shard(self, shard: int, stats: dict) -> None:
        self.write_json(self.shard_path(shard), stats)

    def write_json(self, path: Path, obj: dict) -> None:
        self._atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))

    def failed_path(self, shard: int) -> Path:
        """Beside the stats marker, not instead of it: a rerun retries a failed shard."""
        return self.stats / f"shard-{shard:05d}.failed.json"

    def failed_shards(self) -> list[int]:
        if not self.stats.is_dir():
            return []
        return sorted(int(p.name[6:-12]) for p in self.stats.glob("shard-*.failed.json"))

    def chunk_files(self, shard: int) -> list[Path]:
        return sorted(self.captions.glob(f"shard-{shard:05d}-chunk-*.parquet"))


def error_kind(message: str | None) -> str:
    """Messages read `<cause>: <detail>`; the cause is what stats count by."""
    return (message or "").split(":", 1)[0].strip() or "unknown"


def shard_stats(out: OutputDir, shard: int, rows: int) -> dict:
    """Stats of a shard computed from its chunk files, so resumed shards count every run's work."""
    ok, errors, prompt_tokens, output_tokens, seconds = 0, Counter(), 0, 0, 0.0
    for path in out.chunk_files(shard):
        pf = pq.ParquetFile(path)
        meta = json.loads(pf.schema_arrow.metadata[b"llava_batch"])
        seconds += meta.get("seconds", 0.0)
        t = pf.read(columns=["status", "error", "n_prompt_tokens", "n_output_tokens"]).to_pydict()
        for status, err, n_in, n_out in zip(t["status"], t["error"], t["n_prompt_tokens"], t["n_output_tokens"],
                                            strict=True):
            if status == "ok":
                ok += 1
                prompt_tokens += n_in or 0
                output_tokens += n_out or 0
            else:
                errors[error_kind(err)] += 1
    return {"shard": shard, "rows": rows, "ok": ok, "errors": sum(errors.values()),
            "errors_by_kind": dict(errors), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "seconds": round(seconds, 3)}


def read_status(root: str | os.PathLike) -> dict:
    out = OutputDir(root)
    job = out.read_job()
    if job is None:
        raise ConfigError(f"{root} is not a llava-batch output dir (no {JOB_FILE})")
    counts = Counter()
    if out.captions.is_dir() and out.committed_chunks():
        table = ds.dataset(out.captions, format="parquet").to_table(columns=["status"])
        counts.update(table.column("status").to_pylist())
    n_shards = job["plan"]["shards"]
    done = sum(out.shard_done(s) for s in range(n_shards))
    failed = [s for s in out.failed_shards() if not out.shard_done(s)]
    return {"rows": job["manifest"]["num_rows"], "done": counts["ok"] + counts["error"], "ok": counts["ok"],
            "errors": counts["error"], "shards": n_shards, "shards_complete": done, "shards_failed": failed}
