"""Bridge between the engine loop and asyncio (the HTTP server's thread).

The engine loop (the main thread under `moeserve serve`, else a thread of its own) owns the
Engine: it drains a command queue (add / abort), runs a step when there is work, and pushes the
step's RequestOutputs to each request's asyncio.Queue through loop.call_soon_threadsafe. A request whose consumer goes away (client disconnect, cancelled
task) is aborted, which frees its KV blocks at the next loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from moeserve.engine.engine import Engine
from moeserve.engine.outputs import RequestOutput
from moeserve.metrics import Metrics, RequestTimeline
from moeserve.request import SamplingParams

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine loop has stopped after an error; no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queue allows."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """An accepted request: iterate it for RequestOutputs; closing it early aborts the request."""

    def __init__(self, bridge: "AsyncEngine", request_id: str, outputs: asyncio.Queue,
                 timeline: RequestTimeline) -> None:
        self._bridge, self.request_id, self._outputs = bridge, request_id, outputs
        self.timeline = timeline
        self.finished = False
        self._finish_reason: str | None = None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._bridge.next_item(self._outputs)
                if isinstance(item, BaseException):
                    raise item
                self._record(item)
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def _record(self, out: RequestOutput) -> None:
        self.timeline.record(sum(len(o.delta_token_ids) for o in out.outputs), time.monotonic())
        if self.timeline.first_scheduled is None:
            self.timeline.first_scheduled = out.first_scheduled_time
        if out.finished and out.outputs and out.outputs[0].finish_reason is not None:
            self._finish_reason = out.outputs[0].finish_reason.value

    def abort(self) -> None:
        """Ends the request (a no-op once finished) and reports its metrics, exactly once."""
        if self.timeline is None:
            return
        if not self.finished:
            self.finished = True
            self._bridge.abort(self.request_id)
            self._finish_reason = "abort"
        if self._bridge.metrics is not None:
            self._bridge.metrics.observe_request(self.timeline, self._finish_reason)
        self.timeline = None


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int | None = None, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        engine.executor.on_failure = self._wake.set
        self._streams: dict[str, _Add] = {}          # engine thread only
        self._pending_adds = 0
        self._done = threading.Event()             # set once the loop has ended
        self._thread: threading.Thread | None = None

    @property
    def is_alive(self) -> bool:
        return self.error is None and self.engine.failure is None and not self._done.is_set()

    def start(self) -> None:
        """Runs the engine loop in a new thread (in-process servers and tests)."""
        self._thread = threading.Thread(target=self.run_loop, name="moeserve-engine", daemon=True)
        self._thread.start()

    def run_loop(self) -> None:
        """Runs the engine loop in the calling thread until stop(). `moeserve serve` runs it in the
        main thread: measured there, decode steps were up to ~30% faster than in a secondary
        thread on the 2-core CPU machine (OpenMP / oneDNN work from a non-main thread)."""
        try:
            self._run()
        finally:
            self._done.set()

    def wait_stopped(self, timeout: float) -> bool:
        """True once the engine loop has ended (within timeout seconds)."""
        return self._done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          sampling: SamplingParams) -> RequestStream:
        """Queues a request; raises ValueError (bad request), QueueFullError or EngineDeadError."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        if self.max_queue is not None and self.engine.scheduler.num_waiting + self._pending_adds >= self.max_queue:
            raise QueueFullError(f"too many requests waiting (--max-queue {self.max_queue}); retry later")
        timeline = RequestTimeline(len(prompt_token_ids))
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._pending_adds += 1
        self._send(_Add(request_id, prompt_token_ids, sampling, outputs, loop))
        try:
            first = await self.next_item(outputs)    # the engine thread's accept / reject
        except BaseException:
            self.abort(request_id)    # cancelled before the answer: the engine may still accept it
            raise
        finally:
            self._pending_adds -= 1
        if isinstance(first, BaseException):
            raise first
        return RequestStream(self, request_id, outputs, timeline)

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    async def next_item(self, outputs: asyncio.Queue):
        """The next item for a request; never waits forever on an engine that has died."""
        if not outputs.empty():           # fast path: no timer, no task
            return outputs.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(outputs.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if not self.is_alive and outputs.empty():
                    return EngineDeadError(f"the engine stopped: {self.error!r}")

    def _send(self, command: object) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- engine thread ----
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.engine.failure is not None:   # an expert-parallel worker died
                    raise self.engine.failure
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                else:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - any failure ends the loop and every request
            log.exception("engine loop failed")
            self.error = exc
            self._fail_all(EngineDeadError(f"engine failure: {type(exc).__name__}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._accept(command)
            else:
                self._streams.pop(command.request_id, None)
                self.engine.abort(command.request_id)

    def _accept(self, add: _Add) -> None:
        try:
            self.engine.add_request(add.request_id, add.prompt_token_ids, add.sampling)
        except ValueError as exc:
            _post(add, exc)
            return
        self._streams[add.request_id] = add
        if not _post(add, None):
            self._drop(add.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop per step, however many of its requests advanced."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            add = self._streams.get(out.request_id)
            if add is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(add.loop, []).append((add.outputs, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:      # that loop has closed: nobody can read these requests
                for _queue, out in items:
                    self._drop(out.request_id)

    def _drop(self, request_id: str) -> None:
        """The request's event loop is gone: nobody can read it, so free it."""
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _fail_all(self, error: BaseException) -> None:
        for add in list(self._streams.values()):
            _post(add, error)
        self._streams.clear()
        while True:   # requests that arrive after the failure get the error too
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                _post(command, error)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue_, out in items:
        queue_.put_nowait(out)


def _post(add: _Add, item: object) -> bool:
    """Hands an item to the request's asyncio queue; False when its event loop has closed."""
    try:
        add.loop.call_soon_threadsafe(add.outputs.put_nowait, item)
        return True
    except RuntimeError:
        return False
