"""Output dir: chunk files, shard markers, and the job state read back from them alone.

Commit protocol: a chunk covers a row range fixed by the plan, is written to `_tmp/`, fsynced and
renamed into `captions/`. A chunk file that exists is committed; one that does not, is not. So a
kill -9 at any instant loses at most the chunk being written and never leaves a partial one.

Job identity: `_job.json` is created once, by the first run, as a complete file hard-linked into
place (a link fails if the name exists), so of two runs started together on one dir exactly one
writes it and the other compares before any work. Every chunk and stats marker also carries the
job's fingerprint: read back, one with another job's fingerprint (a run racing an overwrite, files
copied in) is not this job's. It is not counted, and a resume recaptions its rows, replacing the
file atomically, so the row range stays exactly once. Files written before fingerprints (none
recorded) count as this job's.

Read back cheaply: a shard with a stats marker is complete and its counts are the marker's, so
`status` and resume planning list `captions/` and `_stats/`, read one small JSON per complete
shard, and open chunks only of the shards still in progress.

One module past ~300 lines on purpose: claiming, committing and reading back are one protocol, and
its rules are checked against each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ADDED_DEFAULTS, fingerprint_view
from pipeline.data.disk_full import DiskFullError, disk_full
from pipeline.errors import ConfigError, LlavaBatchError
from pipeline.logs import log

JOB_FILE = "_job.json"
# An empty manifest's output: no rows, every column, so readers of captions/ see the schema.
EMPTY_FILE = "empty.parquet"
TMP_STALE_S = 3600.0
# Our own short-lived names in the root (the write probe, a _job.json being created): not content.
TRANSIENT_PREFIX = ".llava-batch-"
_CHUNK_RE = re.compile(r"^shard-(\d{5,})-chunk-(\d{5,})\.parquet$")
_STATS_RE = re.compile(r"^shard-(\d{5,})\.json$")

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _names(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries]
    except FileNotFoundError:
        return []


class OutputDir:
    def __init__(self, root: str | os.PathLike, fingerprint: str | None = None):
        """`fingerprint`: the job this process works for. None means the one `_job.json` holds:
        right for `status`, and for a worker whose run claimed or matched `_job.json` before
        starting it."""
        self.root = Path(root)
        self.captions = self.root / "captions"
        self.stats = self.root / "_stats"
        self.tmp = self.root / "_tmp"
        self._fingerprint = fingerprint
        self._warned_foreign = False

    @property
    def fingerprint(self) -> str | None:
        if self._fingerprint is None:
            job = self.read_job()
            self._fingerprint = job.get("fingerprint") if job else None
        return self._fingerprint

    def is_ours(self, meta: dict) -> bool:
        """Whether a chunk's or marker's metadata says this job wrote it (unstamped: an older run's)."""
        stamp = meta.get("fingerprint")
        return stamp is None or stamp == self.fingerprint

    # -- job identity -------------------------------------------------------------------------
    def read_job(self) -> dict | None:
        path = self.root / JOB_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is unreadable ({e}); not a llava-batch job file") from None

    def check_usable(self) -> None:
        """Refuse, before anything heavy, a dir that cannot hold the output: a file where a directory
        must be, or a place where files cannot be created (read-only filesystem, permissions).
        Creating is tried (a probe dir made and removed at once): access() is not the whole answer,
        root passes it where the filesystem still refuses (/sys)."""
        existing = self.root
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is" if existing == self.root else f"cannot be created: {existing} is"
            raise ConfigError(f"output.dir {self.root} {where} not a directory")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f"{TRANSIENT_PREFIX}probe-", dir=existing))
        except OSError as e:
            raise self._os_error(e, f"creating files in {existing}") from None

    def check_compatible(self, job: dict, mode: str) -> None:
        """Refuse, before any work, to resume into a dir that holds a different job. `job` may lack
        its fingerprint (checked before the model dir is read): then config and manifest are compared."""
        if mode == "overwrite" or not self.root.exists():
            return
        old = self.read_job()
        if old is None:
            if any(not name.startswith(TRANSIENT_PREFIX) for name in _names(self.root)):
                raise ConfigError(f"output.dir {self.root} is not empty and has no {JOB_FILE}: "
                                  "not a llava-batch output; choose another dir")
            return
        self._compare(old, job)

    def _compare(self, old: dict, job: dict) -> None:
        """ConfigError naming what differs between the dir's job `old` and `job`."""
        again = 'set output.mode = "overwrite" or choose another dir'
        if old["manifest"]["fingerprint"] != job["manifest"]["fingerprint"]:
            raise ConfigError(f"output.dir {self.root} was written for a different manifest; {again}")
        then, now = fingerprint_view(old["config"]), fingerprint_view(job["config"])
        for section, keys in now.items():
            for key in sorted(keys.keys() | then.get(section, {}).keys()):
                unset = ADDED_DEFAULTS.get((section, key), "(unset)")  # a default is left out of a view
                before, value = then.get(section, {}).get(key, unset), keys.get(key, unset)
                if before != value:
                    raise ConfigError(f"output.dir {self.root} holds a job with {section}.{key} = "
                                      f"{before!r}, this job has {value!r}; {again}")
        if "fingerprint" in job and old.get("fingerprint") != job["fingerprint"]:
            # Settings and manifest match: what is left in the fingerprint is the model's config.json.
            raise ConfigError(f"output.dir {self.root} was written with a different config.json in "
                              f"model.path (job fingerprint {old.get('fingerprint')}, this job "
                              f"{job['fingerprint']}); {again}")

    def start(self, job: dict, mode: str) -> None:
        """Make the dir this job's. In resume mode the first `_job.json` stays: a run whose job differs
        is refused here (ConfigError naming the setting), before any work, even when it raced the
        writer past check_compatible. An overwrite replaces it."""
        self._fingerprint = job.get("fingerprint")
        try:
            if mode == "overwrite":
                for path in (self.captions, self.stats, self.tmp, self.root / "_leases"):
                    shutil.rmtree(path, ignore_errors=True)
                self._atomic_write(self.root / JOB_FILE, lambda p: p.write_text(json.dumps(job, indent=2)))
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                self._claim(job)
            for path in (self.captions, self.stats, self.tmp):
                path.mkdir(parents=True, exist_ok=True)
            self._sweep_tmp()
        except OSError as e:
            raise self._os_error(e, "setting up the output dir") from None

    def _claim(self, job: dict) -> None:
        """Create `_job.json` if no run has; else compare with the one there."""
        final = self.root / JOB_FILE
        tmp = self.root / f"{TRANSIENT_PREFIX}job-{uuid.uuid4().hex}"
        try:
            tmp.write_text(json.dumps(job, indent=2))
            _fsync_file(tmp)
            os.link(tmp, final)  # atomic create-if-absent, and the content is complete once visible
            _fsync_dir(self.root)
        except FileExistsError:
            self._compare(self.read_job(), job)
        finally:
            tmp.unlink(missing_ok=True)

    def _sweep_tmp(self, older_than_s: float = TMP_STALE_S) -> None:
        """Delete temp files a killed run left behind. A live writer's temp file is milliseconds
        old (write, fsync, rename), so only files far older than any write are touched."""
        cutoff = time.time() - older_than_s
        stale = [self.tmp / n for n in _names(self.tmp)]
        stale += [self.root / n for n in _names(self.root) if n.startswith(f"{TRANSIENT_PREFIX}job-")]
        for path in stale:
            with contextlib.suppress(OSError):  # another run may sweep the same file
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    # -- errors -------------------------------------------------------------------------------
    def no_space(self, e: OSError, doing: str) -> DiskFullError | None:
        """The one-line error for a write that found the disk full; None when `e` is not that."""
        return disk_full(self.root, e, doing)

    def _os_error(self, e: OSError, doing: str) -> LlavaBatchError:
        """Before any work, a dir that refuses writes is a bad job (exit 2); a full disk is not."""
        unusable = ConfigError(f"output.dir {self.root}: {doing} failed: {e.strerror or e}")
        return self.no_space(e, doing) or unusable

    # -- commits ------------------------------------------------------------------------------
    def _atomic_write(self, final: Path, write) -> None:
        tmp = self.tmp / f"{final.name}.{uuid.uuid4().hex}"
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            write(tmp)
            _fsync_file(tmp)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a failed write must not keep the space it took
            if (full := self.no_space(e, f"writing {final.name}")) is not None:
                raise full from None
            raise

    def chunk_path(self, shard: int, chunk: int) -> Path:
        return self.captions / f"shard-{shard:05d}-chunk-{chunk:05d}.parquet"

    def commit_chunk(self, shard: int, chunk: int, table: pa.Table, meta: dict) -> None:
        meta = {**meta, "fingerprint": self.fingerprint}
        table = table.replace_schema_metadata({"llava_batch": json.dumps(meta)})
        self._atomic_write(self.chunk_path(shard, chunk), lambda p: pq.write_table(table, p))

    def commit_empty(self, schema: pa.Schema) -> None:
        """An empty manifest's output: one 0-row file with every column, which readers of captions/
        (pandas, pyarrow.dataset, DuckDB's captions/*.parquet) take the schema from. Not a chunk of
        the plan (an empty plan has none), so nothing that counts chunks sees it."""
        table = schema.empty_table().replace_schema_metadata(
            {"llava_batch": json.dumps({"empty": True, "fingerprint": self.fingerprint})})
        self._atomic_write(self.captions / EMPTY_FILE, lambda p: pq.write_table(table, p))

    def all_chunk_files(self) -> Iterator[tuple[int, int, Path]]:
        for name in _names(self.captions):
            if m := _CHUNK_RE.match(name):
                yield int(m.group(1)), int(m.group(2)), self.captions / name

    def chunk_is_ours(self, path: Path, pf: pq.ParquetFile | None = None) -> bool:
        """Whether the chunk at `path` (open as `pf`, else opened here) is this job's."""
        if pf is None:
            with open_chunk(path) as pf:
                return pf is not None and self.chunk_is_ours(path, pf)
        meta = json.loads((pf.schema_arrow.metadata or {}).get(b"llava_batch", b"{}"))
        if not self.is_ours(meta):
            if not self._warned_foreign:
                log.warning(f"{path} was written by another job (fingerprint {meta.get('fingerprint')}, "
                            f"this job {self.fingerprint}): not counted; a resume captions its rows again")
                self._warned_foreign = True
            return False
        return True

    def committed_chunks(self, shard: int | None = None) -> set[tuple[int, int]]:
        """(shard, chunk) of this job's committed chunks, of every shard or of `shard`: by name in
        shards with a stats marker (complete: not opened; the queue removes a foreign marker before
        rerunning its shard), by the fingerprint in the footer in the others."""
        marked = {int(m.group(1)) for n in _names(self.stats) if (m := _STATS_RE.match(n))}
        return {(s, c) for s, c, path in self.all_chunk_files() if shard in (None, s)
                and (s in marked or self.chunk_is_ours(path))}

    def shard_path(self, shard: int) -> Path:
        return self.stats / f"shard-{shard:05d}.json"

    def _read_stats(self, path: Path) -> dict | None:
        """A stats marker of this job, else None. Markers are written atomically, so one that does
        not parse was damaged outside: the shard counts as unfinished and is checked again."""
        try:
            stats = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return stats if isinstance(stats, dict) and self.is_ours(stats) else None

    def shard_done(self, shard: int) -> bool:
        return self._read_stats(self.shard_path(shard)) is not None

    def done_shards(self) -> dict[int, dict]:
        """{shard: its stats} of every shard this job completed: one small file each, no chunk read."""
        found = {}
        for name in _names(self.stats):
            if (m := _STATS_RE.match(name)) and (stats := self._read_stats(self.stats / name)) is not None:
                found[int(m.group(1))] = stats
        return found

    def commit_shard(self, shard: int, stats: dict) -> None:
        self.write_json(self.shard_path(shard), {**stats, "fingerprint": self.fingerprint})

    def write_json(self, path: Path, obj: dict) -> None:
        self._atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))

    def failed_path(self, shard: int) -> Path:
        """Beside the stats marker, not instead of it: a rerun retries a failed shard."""
        return self.stats / f"shard-{shard:05d}.failed.json"

    def failed_shards(self) -> list[int]:
        return sorted(int(n[6:-12]) for n in _names(self.stats) if n.startswith("shard-") and
                      n.endswith(".failed.json"))

    def reset_shard(self, shard: int) -> None:
        """Before a shard is (re)run: its failed marker goes, and a stats marker of another job too,
        so the shard's chunks are checked one by one again (committed_chunks trusts a marker)."""
        self.failed_path(shard).unlink(missing_ok=True)
        path = self.shard_path(shard)
        if path.is_file() and not self.shard_done(shard):
            path.unlink(missing_ok=True)

    def chunk_files(self, shard: int) -> list[Path]:
        return sorted(self.captions.glob(f"shard-{shard:05d}-chunk-*.parquet"))


@contextlib.contextmanager
def open_chunk(path: Path) -> Iterator[pq.ParquetFile | None]:
    """A committed chunk, footer read; None if it is gone (an overwrite removed it)."""
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        pf = None
    except (pa.ArrowInvalid, OSError) as e:
        raise LlavaBatchError(f"{path} is not a readable Parquet file ({e}); "
                              "delete it and rerun to caption its rows again") from None
    try:
        yield pf
    finally:
        if pf is not None:
            pf.close()
