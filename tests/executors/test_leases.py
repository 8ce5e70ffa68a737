"""Leases: exclusive, renewable, taken over when stale, and one winner when several race."""

from __future__ import annotations

import json
import multiprocessing
import time

from pipeline.executors.leases import Leases


def _holder(leases: Leases, shard: int) -> dict | None:
    """The owner in the newest lease file of `shard`, read off disk; None when there is none or it expired."""
    files = sorted(leases.dir.glob(f"shard-{shard:05d}.gen-*.json"))  # zero-padded: name order = generation
    if not files:
        return None
    lease = json.loads(files[-1].read_text())
    return lease["owner"] if lease["expires"] > time.time() else None


def test_exclusive_until_released(tmp_path):
    a, b = Leases(tmp_path, 60), Leases(tmp_path, 60)
    assert a.acquire(0) and a.acquire(0), "re-acquiring one's own lease is fine"
    assert not b.acquire(0)
    assert a.owns(0) and not b.owns(0) and _holder(b, 0)["id"] == a.owner["id"]
    assert b.acquire(1), "other shards are free"
    a.release(0)
    assert b.acquire(0) and b.owns(0)


def test_expired_lease_is_taken_over_and_the_old_holder_notices(tmp_path):
    a, b = Leases(tmp_path, 0.2), Leases(tmp_path, 60)
    assert a.acquire(3)
    assert not b.acquire(3)
    time.sleep(0.3)
    assert b.acquire(3)
    assert not a.owns(3) and not a.renew(3), "a paused holder must stop once taken over"
    a.release(3)  # releasing a lease one no longer holds leaves the new holder alone
    assert b.owns(3)


def test_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    a = Leases(tmp_path, 3600, owner={**Leases(tmp_path, 1).owner, "pid": dead.pid})
    assert a.acquire(0)
    assert Leases(tmp_path, 60).acquire(0)


def test_heartbeat_keeps_a_lease_alive(tmp_path):
    with Leases(tmp_path, 0.4) as a:
        assert a.acquire(0)
        time.sleep(1.0)
        assert not Leases(tmp_path, 60).acquire(0)
    assert not list((tmp_path / "_leases").glob("shard-*")), "leaves nothing behind on exit"


def _race(args) -> bool:
    root, i = args
    return Leases(root, 60, owner={"host": "elsewhere", "pid": i, "id": f"racer{i}"}).acquire(0)


def test_one_winner_when_many_take_over_a_stale_lease(tmp_path):
    (tmp_path / "_leases").mkdir()
    stale = {"owner": {"host": "elsewhere", "pid": 1, "id": "old"}, "expires": time.time() - 1}
    (tmp_path / "_leases" / "shard-00000.gen-000004.json").write_text(json.dumps(stale))
    with multiprocessing.get_context("fork").Pool(8) as pool:
        wins = pool.map(_race, [(tmp_path, i) for i in range(32)])
    assert sum(wins) == 1
    files = list((tmp_path / "_leases").glob("shard-00000.gen-*.json"))
    assert [f.name for f in files] == ["shard-00000.gen-000005.json"]
