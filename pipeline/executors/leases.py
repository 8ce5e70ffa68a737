"""Shard leases on the output filesystem: which run may work on a shard right now.

A lease is a generation of files `OUT/_leases/shard-SSSSS.gen-GGGGGG.json`, each holding
{owner: {host, pid, id}, expires}. The highest generation is the lease. Acquiring creates
generation g+1 with os.link (atomic create-if-absent, content complete before it is visible), and
is only tried when generation g is stale: expired, or its owner a dead pid on this host. Two
takers of one stale lease race on one name, so exactly one wins; no rename-then-reread dance.

A heartbeat thread renews held leases. A holder that paused past its expiry may find a newer
generation on its next check and stops; whatever it committed meanwhile is harmless because a
chunk's rows are fixed by the plan, so both writers' chunk files hold the same rows.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

_GEN_RE = re.compile(r"\.gen-(\d+)\.json$")


def new_owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Leases:
    """Leases held by one owner (one `run` process: the local parent or the Ray driver)."""

    def __init__(self, out_root: str | os.PathLike, timeout_s: float, owner: dict | None = None):
        self.dir = Path(out_root) / "_leases"
        self.timeout_s = timeout_s
        self.owner = owner or new_owner()
        self.held: set[int] = set()
        self._taking: set[int] = set()  # acquire() under way: released too if the run stops mid-way
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- files --------------------------------------------------------------------------------
    def _gens(self, shard: int) -> list[tuple[int, Path]]:
        prefix = f"shard-{shard:05d}.gen-"
        found = []
        for p in self.dir.glob(prefix + "*.json"):
            m = _GEN_RE.search(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _path(self, shard: int, gen: int) -> Path:
        return self.dir / f"shard-{shard:05d}.gen-{gen:06d}.json"

    def _top(self, shard: int) -> tuple[int, dict | None]:
        """(generation, content) of the current lease; (-1, None) when there is none."""
        for _ in range(10):
            gens = self._gens(shard)
            if not gens:
                return -1, None
            gen, path = gens[-1]
            try:
                return gen, json.loads(path.read_text())
            except FileNotFoundError:
                continue  # released under us: look again rather than trust an older generation
            except json.JSONDecodeError:
                return gen, {"owner": {}, "expires": 0}  # unreadable: treat as stale
        return -1, None

    def _stale(self, lease: dict) -> bool:
        owner = lease.get("owner", {})
        if lease.get("expires", 0) < time.time():
            return True
        # A kill -9'd run on this host need not block a rerun until expiry.
        return owner.get("host") == self.owner["host"] and not _pid_alive(owner.get("pid", -1))

    def _write(self, path: Path, link: bool) -> None:
        body = json.dumps({"owner": self.owner, "expires": time.time() + self.timeout_s})
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        tmp.write_text(body)
        try:
            if link:
                os.link(tmp, path)  # raises FileExistsError if another taker won this generation
            else:
                os.replace(tmp, path)
                return
        finally:
            tmp.unlink(missing_ok=True)

    # -- protocol -----------------------------------------------------------------------------
    def owns(self, shard: int) -> bool:
        _, lease = self._top(shard)
        return bool(lease) and lease.get("owner", {}).get("id") == self.owner["id"]

    def acquire(self, shard: int) -> bool:
        # An interrupt (SIGINT / SIGTERM on the thread that drives) can land between creating our
        # generation and recording it as held; release_all() then still finds it.
        with self._lock:
            self._taking.add(shard)
        taken = self._acquire(shard)  # on an exception the shard stays in _taking, for release_all
        with self._lock:
            self._taking.discard(shard)
        return taken

    def _acquire(self, shard: int) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        gen, lease = self._top(shard)
        if lease is not None:
            if lease.get("owner", {}).get("id") == self.owner["id"]:
                return True
            if not self._stale(lease):
                return False
        mine = self._path(shard, gen + 1)
        try:
            self._write(mine, link=True)
        except FileExistsError:
            return False
        if self._gens(shard)[-1:] != [(gen + 1, mine)]:  # we acted on a stale view: someone is ahead
            mine.unlink(missing_ok=True)
            return False
        with self._lock:
            self.held.add(shard)
        for old, path in self._gens(shard):
            if old <= gen:
                path.unlink(missing_ok=True)
        return True

    def renew(self, shard: int) -> bool:
        gen, lease = self._top(shard)
        if not lease or lease.get("owner", {}).get("id") != self.owner["id"]:
            with self._lock:
                self.held.discard(shard)
            return False
        self._write(self._path(shard, gen), link=False)
        return True

    def release(self, shard: int) -> None:
        with self._lock:
            self.held.discard(shard)
        gen, lease = self._top(shard)
        if lease and lease.get("owner", {}).get("id") == self.owner["id"]:
            for _, path in self._gens(shard):
                path.unlink(missing_ok=True)

    # -- heartbeat ----------------------------------------------------------------------------
    def __enter__(self) -> Leases:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.release_all()

    def release_all(self) -> None:
        """Release every lease this owner holds or is taking (release checks the owner first)."""
        with self._lock:
            shards = self.held | self._taking
        for shard in shards:
            self.release(shard)

    def _beat(self) -> None:
        # Renew well before expiry so one slow filesystem call does not lose a lease.
        while not self._stop.wait(self.timeout_s / 4):
            with self._lock:
                shards = list(self.held)
            for shard in shards:
                try:
                    self.renew(shard)
                except OSError:
                    pass  # next beat retries; expiry leaves three more chances
