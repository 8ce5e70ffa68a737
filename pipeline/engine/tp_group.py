"""A tensor parallel group on one host: rank 0 is the worker's own process, ranks 1..n-1 are
processes it starts (`python -m pipeline.engine.tp_group`), each on its own device of the group.

The collective backend comes from devices.py (hccl on Ascend, nccl on CUDA, gloo on the CPU); the
rendezvous is a TCPStore that rank 0 opens on run.master_port, or on a free port when another group
holds that one. A follower dies with its rank 0: a watchdog ends it when its parent is gone, and a
lost rank fails rank 0's next collective (tp_steps.RankLost), which ends the worker, so the pool
replaces the whole group and the shard resumes from its last chunk.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from pipeline import devices
from pipeline.engine import tp_steps
from pipeline.errors import ConfigError
from pipeline.logs import log
from pipeline.model.tensor_parallel import Placement

HOST = "127.0.0.1"


class Group:
    """Rank 0's handle on its followers. A process leads one group at a time (torch.distributed has
    one default group): starting another closes the one before."""

    current: Group | None = None

    def __init__(self, procs: list[subprocess.Popen], device: torch.device):
        self.procs, self.device = procs, device
        Group.current = self
        atexit.register(self.close)

    def close(self) -> None:
        if Group.current is self:
            Group.current = None
        if dist.is_initialized() and all(proc.poll() is None for proc in self.procs):
            try:
                tp_steps.Leader(self.device, torch.float32, 0).stop()
            except BaseException:  # noqa: BLE001 - a follower already gone: nothing to stop
                pass
        if dist.is_initialized():
            dist.destroy_process_group()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def start(group_devices: list[str], model_path: str, dtype: torch.dtype, master_port: int,
          timeout_s: float) -> tuple[Placement, Group]:
    """Start ranks 1..n-1 on group_devices[1:], join them as rank 0 on group_devices[0]."""
    if Group.current is not None:
        Group.current.close()
    world = len(group_devices)
    device = devices.resolve_device(group_devices[0])
    store, port = _store(master_port, world, timeout_s)
    threads = max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else None
    procs = [_spawn(rank, world, port, spec, model_path, dtype, threads, timeout_s)
             for rank, spec in enumerate(group_devices) if rank]
    if threads:
        torch.set_num_threads(threads)
    _init(store, 0, world, device, timeout_s)
    log.info(f"tensor parallel group of {world} on {', '.join(group_devices)} ({dist.get_backend()}, port {port})")
    return Placement(0, world), Group(procs, device)


def _store(port: int, world: int, timeout_s: float) -> tuple[dist.TCPStore, int]:
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(HOST, port, world, is_master=True, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError):  # another group holds run.master_port: any free one will do
        store = dist.TCPStore(HOST, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
    return store, store.port


def _spawn(rank: int, world: int, port: int, spec: str, model_path: str, dtype: torch.dtype, threads: int | None,
           timeout_s: float) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [sys.executable, "-m", "pipeline.engine.tp_group", "--rank", str(rank), "--world", str(world),
            "--port", str(port), "--device", spec, "--model", model_path, "--dtype", str(dtype).split(".")[1],
            "--timeout-s", str(timeout_s), "--parent", str(os.getpid())]
    return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL)


def _init(store, rank: int, world: int, device: torch.device, timeout_s: float) -> None:
    backend = devices.collective_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _watch_parent(parent: int) -> None:
    """End this rank when rank 0's process is gone (kill -9 gives no chance to say so)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def follower(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port", "--parent"):
        p.add_argument(name, type=int, required=True)
    for name in ("--device", "--model", "--dtype"):
        p.add_argument(name, required=True)
    p.add_argument("--timeout-s", type=float, required=True)
    a = p.parse_args(argv)
    _watch_parent(a.parent)
    from pipeline.config import ModelConfig
    from pipeline.engine.cache_plan import CachePlan
    from pipeline.engine.runner import allocate_cache
    from pipeline.model import decoder, loader
    from pipeline.model.tensor_parallel import load_shard

    device, dtype = devices.resolve_device(a.device), getattr(torch, a.dtype)
    store = dist.TCPStore(HOST, a.port, a.world, is_master=False, timeout=datetime.timedelta(seconds=a.timeout_s))
    _init(store, a.rank, a.world, device, a.timeout_s)
    info = loader.inspect_model(ModelConfig(path=a.model))
    model = load_shard(loader.MODEL_CLASSES[info.family], info, device, dtype, Placement(a.rank, a.world))
    lm = decoder.language_model(model)
    slots, slot_length = tp_steps.receive_plan(device)
    plan = CachePlan(slots, 0, slot_length, 0, 0, 0, None, "rank 0")
    cache = allocate_cache(lm, plan, device, dtype)
    with torch.inference_mode():
        tp_steps.follow(lm, cache, device, dtype, model.config.text_config.hidden_size, _kill_hook(a.rank))
    return 0


def _kill_hook(rank: int):
    """Test hook: LLAVA_BATCH_TP_KILL = "RANK:STEPS:MARKER" SIGKILLs that rank after that many steps,
    once (the first to get there creates MARKER), as a node losing one device would."""
    spec = os.environ.get("LLAVA_BATCH_TP_KILL", "")
    if not spec or int(spec.split(":")[0]) != rank:
        return None
    _, steps, marker = spec.split(":", 2)
    count = [0]

    def on_step() -> None:
        count[0] += 1
        if count[0] >= int(steps):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def check_group(group: list[str], text_config) -> None:
    from pipeline.model.tensor_parallel import check_divides

    kinds = {spec.split(":")[0] for spec in group}
    if len(kinds) != 1:
        raise ConfigError(f"a tensor parallel group must be one kind of device, got {group}")
    check_divides(text_config, len(group))


if __name__ == "__main__":
    from pipeline import logs

    logs.setup()
    try:
        code = follower(sys.argv[1:])
    except Exception as e:  # noqa: BLE001 - said on stderr; rank 0 sees the group broken
        log.error(f"tensor parallel rank: {type(e).__name__}: {e}")
        code = 1
    sys.exit(code)
