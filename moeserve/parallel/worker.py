"""Entry point of a spawned expert-parallel worker process (ranks 1..N-1 on this node)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import multiprocessing
import threading
import time

import torch
import torch.distributed as dist

from moeserve.parallel.groups import Rendezvous, destroy_groups, init_groups
from moeserve.parallel.rank import RankReport, RankSpec, build_rank, serve_steps
from moeserve.worker.host_allocator import tune_host_allocator

log = logging.getLogger(__name__)


def worker_main(rdv: Rendezvous, num_threads: int, parent_pid: int = 0) -> int:
    """Joins the rendezvous, receives its RankSpec from rank 0, builds its rank and serves steps.
    Returns 0 after rank 0's Shutdown; any failure exits the process non-zero."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s rank{rdv.rank}: %(message)s")
    if parent_pid:
        _exit_with_parent(parent_pid)
    torch.set_num_threads(num_threads)
    groups = init_groups(rdv)
    specs: list = [None]
    dist.broadcast_object_list(specs, src=0, group=groups.control)
    spec: RankSpec = specs[0][rdv.rank]
    rank = None
    try:
        rank = build_rank(spec, groups)
        tune_host_allocator()      # after the weights (see worker/host_allocator.py)
        report = rank.report()
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which names it in its error
        log.exception("rank %d failed to start", rdv.rank)
        report = RankReport(rdv.rank, range(0), error=f"{type(exc).__name__}: {exc}")
    dist.gather_object(report, None, dst=0, group=groups.control)
    if rank is None:
        os._exit(1)
    try:
        serve_steps(rank, groups)
    except Exception as exc:  # noqa: BLE001 - a peer died or a collective timed out: exit non-zero
        log.error("rank %d stops: %s: %s", rdv.rank, type(exc).__name__, exc)
        os._exit(1)
    destroy_groups()
    return 0


def spawn_workers(rendezvous: list[Rendezvous], num_threads: int) -> list[multiprocessing.Process]:
    """One spawned process per rendezvous, each killed with this process."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(rdv, num_threads, os.getpid()),
                         name=f"moeserve-ep-rank{rdv.rank}", daemon=True) for rdv in rendezvous]
    for proc in procs:
        proc.start()
    return procs


def _exit_with_parent(parent_pid: int) -> None:
    """No orphans: the kernel kills this worker when its parent dies (Linux), and a thread checks too."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker_node(rendezvous: list[Rendezvous], num_threads: int) -> int:
    """`moeserve serve --node-rank K` (K > 0): this node's ranks, no HTTP. The first runs in this
    process, the others in spawned children; returns once rank 0 shuts them down."""
    children = spawn_workers(rendezvous[1:], num_threads)
    try:
        code = worker_main(rendezvous[0], num_threads)
    finally:
        for proc in children:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return code or max((proc.exitcode or 0 for proc in children), default=0)
