"""Executors: run a ScheduledBatch on one process, or on every expert-parallel rank.

LocalExecutor is the plain ModelRunner. EPExecutor is rank 0 of --ep-size N: it spawned the other
ranks' worker processes (moeserve/parallel/worker.py), sends each step to them, runs its own part,
and gathers what they sampled. A watchdog notices a dead worker within ~0.2 s and marks the
executor failed, so the engine stops and the server turns unhealthy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from moeserve.engine.batch import ScheduledBatch, ScheduledSeq, StepOutput
from moeserve.errors import MoEServeError
from moeserve.parallel import messages
from moeserve.parallel.expert_parallel import CommStats
from moeserve.parallel.groups import Groups, destroy_groups, init_groups
from moeserve.parallel.rank import RankRunner, RankSpec, Shutdown, StepMessage, build_rank, for_sampling, slim
from moeserve.parallel.worker import spawn_workers
from moeserve.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)


class ExpertParallelError(MoEServeError):
    """A rank failed to start, died, or a collective failed."""


class LocalExecutor:
    """--ep-size 1: the model runner in this process."""

    failure: BaseException | None = None

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.model = runner.model

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        return self.runner.execute(batch)

    def expert_totals(self) -> list:
        return self.model.expert_totals.tolist()

    def shutdown(self) -> None:
        pass

    def kill_workers(self) -> None:
        pass


class EPExecutor:
    def __init__(self, specs: list[RankSpec], local_ranks: int, num_threads: int) -> None:
        """specs[r] for every rank r; ranks 1..local_ranks-1 are spawned here, the others are
        started by `moeserve serve --node-rank K` on their nodes. Workers get their spec from
        rank 0 once the process groups exist."""
        self.spec = specs[0]
        self.mode = self.spec.mode
        self._timeout = timedelta(seconds=self.spec.rendezvous.timeout_s)
        self.world_size = len(specs)
        self.failure: BaseException | None = None
        self.on_failure: Callable[[], None] | None = None    # wakes the engine loop
        self._closing = threading.Event()
        self.procs = spawn_workers([spec.rendezvous for spec in specs[1:local_ranks]], num_threads)
        self._watchdog = threading.Thread(target=self._watch, name="moeserve-ep-watchdog", daemon=True)
        self._watchdog.start()
        try:
            self.groups: Groups = init_groups(self.spec.rendezvous)
            dist.broadcast_object_list([specs], src=0, group=self.groups.control)   # workers start by broadcast
            self.rank: RankRunner = build_rank(self.spec, self.groups)
            reports = [None] * self.world_size
            # loading may take long: the reports come on the control group (the watchdog covers deaths)
            dist.gather_object(self.rank.report(), reports, dst=0, group=self.groups.control)
        except BaseException as exc:
            self._closing.set()
            self.kill_workers()
            destroy_groups()
            if isinstance(exc, RuntimeError):     # gloo / NCCL: a rank died or never came
                raise ExpertParallelError(f"expert-parallel start-up failed: {exc}") from exc
            raise
        failed = [r for r in reports if r.error is not None]
        if failed:
            self.failure = ExpertParallelError("a rank failed to start")
            self.shutdown()
            raise ExpertParallelError("; ".join(f"rank {r.rank}: {r.error}" for r in failed))
        self.reports = reports
        for r in reports:
            log.info("EP rank %d: experts [%d, %d), %d parameters = %d shared + %d expert (%.1f MiB)",
                     r.rank, r.experts.start, r.experts.stop, r.params, r.shared_params, r.expert_params,
                     r.param_bytes / 2**20)
        self.model = self.rank.model
        self.runner = self.rank.runner

    # ---- steps ----
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        self._check()
        with self._failing_on_error():
            if self.mode == "allreduce":
                self._send_all(StepMessage([slim(s) for s in batch.seqs]))
                return self.runner.execute(batch)
            per_rank = self._split(batch.seqs)
            self._send_each([StepMessage([for_sampling(s) for s in seqs]) for seqs in per_rank[1:]])
            gathered = self._gather(self.rank.run_own(per_rank[0]))
        by_seq = {out.seq_id: out for outs in gathered for out in outs}
        return StepOutput(outputs=[by_seq[s.seq_id] for s in batch.seqs if s.sample])

    def expert_totals(self) -> list:
        """[moe_layers][2][experts] routed / dropped totals of every rank's experts."""
        own = self.rank.expert_totals()
        if self.mode == "allreduce":
            return own          # rank 0 routed every token
        return _elementwise_sum([totals for _, totals, _ in self._query(own)])

    def comm_stats(self) -> list[CommStats]:
        """Every rank's MoE collective time and bytes so far (benchmarks)."""
        return [stats for _, _, stats in self._query(None)]

    def _query(self, own_totals: list | None) -> list[tuple]:
        """Between steps: every rank replies with (_, its expert totals if asked, its CommStats)."""
        self._check()
        with self._failing_on_error():
            self._send_all(StepMessage(None, want_totals=own_totals is not None))
            return self._gather(([], own_totals, self.rank.ep.stats))

    def _split(self, seqs: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
        """Each sequence goes to the rank whose KV partition holds its blocks."""
        per_rank: list[list[ScheduledSeq]] = [[] for _ in range(self.world_size)]
        blocks_per_rank = self.spec.num_kv_blocks
        for seq in seqs:
            per_rank[seq.block_table[0] // blocks_per_rank].append(seq)
        return per_rank

    def _send_all(self, message: object) -> None:
        self._send_each([message] * (self.world_size - 1))

    def _send_each(self, per_worker: list) -> None:
        """per_worker[i] goes to rank i + 1."""
        messages.send(self.groups.control, dict(enumerate(per_worker, start=1)), self._timeout)

    def _gather(self, mine: object) -> list:
        gathered = [None] * self.world_size
        dist.gather_object(mine, gathered, dst=0, group=self.groups.reply)
        return gathered

    @contextlib.contextmanager
    def _failing_on_error(self):
        """A collective that failed leaves the ranks out of step: nothing may be sent after it."""
        try:
            yield
        except BaseException as exc:
            if self.failure is None:
                self.failure = ExpertParallelError(f"expert-parallel step failed: {type(exc).__name__}: {exc}")
            raise

    # ---- failure and shutdown ----
    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _watch(self) -> None:
        while not self._closing.wait(0.2):
            dead = [p for p in self.procs if p.exitcode is not None]
            if dead:
                self.failure = ExpertParallelError(
                    f"expert-parallel worker {dead[0].name} (pid {dead[0].pid}) exited with code {dead[0].exitcode}")
                log.error("%s", self.failure)
                if self.on_failure is not None:
                    self.on_failure()
                return

    def shutdown(self) -> None:
        """Ends the workers: politely when they are healthy, by force otherwise."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self.failure is None:
            try:
                self._send_all(Shutdown())
            except (RuntimeError, ValueError) as exc:
                log.warning("could not tell the workers to stop: %s", exc)
        for proc in self.procs:
            proc.join(timeout=10 if self.failure is None else 0.5)
        self.kill_workers()
        destroy_groups()

    def kill_workers(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def _elementwise_sum(nested: list) -> list:
    if isinstance(nested[0], list):
        return [_elementwise_sum(list(parts)) for parts in zip(*nested)]
    return sum(nested)
