"""A connected worker, seen from the orchestrator: the worker's one ``Orchestrator.Connect``
stream (protos/fedseq/v1/orchestrator.proto), which the worker opened. Nothing dials a worker;
the orchestrator's calls to it (Describe, Train, Evaluate) are tasks sent down this stream and
answered by results of the same id.

:meth:`WorkerLink.call` returns a :class:`concurrent.futures.Future` of the reply; a failure is
a :class:`TaskFailed`, a ``grpc.RpcError`` with ``code()`` and ``details()`` as a unary call's
error has, so the run loop handles a task like the call it replaces: ``UNAVAILABLE`` when the
stream is gone (a dead worker), ``DEADLINE_EXCEEDED`` when the reply does not come in time, the
worker's own code when it refused the task (``INVALID_ARGUMENT``: a contract error).

Liveness comes from the stream: it ends when the worker goes or hangs up, and both sides send a
heartbeat every ``heartbeat`` seconds (:data:`HEARTBEAT`) while idle; a link that hears nothing
for :data:`SILENCE` heartbeats closes itself (a half-open connection behind NAT). Every task and
result is accounted in the ledger that is recording when the task is sent
(:func:`fedseq.ledger.recording`), else noted for the next round, as the unary calls' channel
interceptor did; heartbeats are summed and handed over with :meth:`WorkerLink.take_heartbeats`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc

from fedseq import ledger as ledger_mod
from fedseq.v1 import common_pb2, worker_pb2
from fedseq.v1 import orchestrator_pb2 as orch_pb

log = logging.getLogger(__name__)

HEARTBEAT = 5.0  # seconds between heartbeats on an idle stream (RegisterReply.heartbeat_seconds)
SILENCE = 3  # heartbeats without a word from the other side before a stream counts as dead
MAX_UNKNOWN_RESULTS = 64  # results for tasks never sent (or timed out) a stream may carry before it is cut
LINK = "worker-orchestrator"
_KINDS = {worker_pb2.DescribeRequest: "describe", worker_pb2.TrainRequest: "train",
          worker_pb2.EvaluateRequest: "evaluate"}


class TaskFailed(grpc.RpcError):
    """A task that ended without its reply: the worker's refusal, a lost stream, a timeout."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def status_code(name: str) -> grpc.StatusCode:
    """The status code named ``name`` (a worker's word: anything unknown is UNKNOWN)."""
    return next((c for c in grpc.StatusCode if c.name == name), grpc.StatusCode.UNKNOWN)


class WorkerLink:
    """The task side of one worker's stream. The servicer feeds it what the worker sends
    (:meth:`received`) and sends what :meth:`outgoing` yields; :meth:`close` ends both."""

    def __init__(self, worker: str, peer: str = "", heartbeat: float = HEARTBEAT, compression: str = "none",
                 fallback: Callable[[str, Any], None] | None = None) -> None:
        self.worker, self.peer, self.heartbeat = worker, peer, heartbeat
        self.compression = compression  # of the orchestrator's messages (the worker's are sent uncompressed)
        self.fallback = fallback  # counts of tasks sent while no ledger records
        self._out: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Future, str, Any]] = {}  # task id -> (future, kind, ledger)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.reason = ""
        self.heard = time.monotonic()  # when the worker last sent anything
        self._beats = {"up": [0, 0], "down": [0, 0]}  # direction -> [messages, bytes] since the last take
        self._unknown = 0  # results for tasks this link never sent (or that timed out)

    # -------------------------------------------------------------- the run loop's side
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def call(self, request: Any, timeout: float) -> Future:
        """Send ``request`` (a Describe, Train or Evaluate request) as a task; the future holds
        the reply, or fails with :class:`TaskFailed` (UNAVAILABLE once the stream is gone,
        DEADLINE_EXCEEDED after ``timeout`` seconds)."""
        kind = _KINDS[type(request)]
        fut: Future = Future()
        if self.closed:
            fut.set_exception(TaskFailed(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker}: {self.reason}"))
            return fut
        tid = next(self._ids)
        msg = orch_pb.OrchestratorMessage(task=worker_pb2.Task(task_id=tid, **{kind: request}))
        led = ledger_mod.current()
        self._count(led, msg, "down", f"Orchestrator.Connect {kind} task", self.compression)
        if led is not None:
            led._call_started()
        with self._lock:
            self._pending[tid] = (fut, kind, led)
        fut.add_done_callback(lambda _f: self._settled(led))
        timer = threading.Timer(timeout, self._expire, args=(tid, timeout))
        timer.daemon = True
        timer.start()
        fut.add_done_callback(lambda _f: timer.cancel())
        self._out.put(msg)
        if self.closed:  # closed between the check and the put: nobody will send it
            self._fail(tid, grpc.StatusCode.UNAVAILABLE, f"worker {self.worker}: {self.reason}")
        return fut

    def describe(self, timeout: float) -> worker_pb2.DescribeReply:
        return self.call(worker_pb2.DescribeRequest(), timeout).result()

    def take_heartbeats(self) -> list[common_pb2.ByteCount]:
        """The heartbeats sent and heard since the last take, one count per direction."""
        with self._lock:
            beats, self._beats = self._beats, {"up": [0, 0], "down": [0, 0]}
        return [common_pb2.ByteCount(kind="control", what="Orchestrator.Connect heartbeat", direction=d,
                                     user_id=-1, bytes=b, wire_bytes=b, messages=n, link=LINK)
                for d, (n, b) in beats.items() if n]

    # -------------------------------------------------------------- the stream's side
    def received(self, msg: orch_pb.WorkerMessage) -> None:
        """What the worker sent after its hello: a result or a heartbeat."""
        self.heard = time.monotonic()
        body = msg.WhichOneof("body")
        if body == "heartbeat":
            with self._lock:
                self._beats["up"][0] += 1
                self._beats["up"][1] += msg.ByteSize()
            return
        if body != "result":
            self.close(f"protocol error: a {body or 'empty'} message after the hello")
            return
        r = msg.result
        with self._lock:
            entry = self._pending.pop(r.task_id, None)
        if entry is None:  # a result nobody asked for (or for a task that timed out): dropped
            self._unknown += 1
            if self._unknown > MAX_UNKNOWN_RESULTS:
                self.close(f"protocol error: more than {MAX_UNKNOWN_RESULTS} results for tasks never sent")
            elif self._unknown <= 3:
                log.warning("worker %s: a result for unknown task %d dropped", self.worker, r.task_id)
            return
        fut, kind, led = entry
        self._count(led, msg, "up", f"Orchestrator.Connect {kind} result", "none")
        which = r.WhichOneof("reply")
        if which == kind:
            fut.set_result(getattr(r, kind))
        elif which == "error":
            fut.set_exception(TaskFailed(status_code(r.error.code), r.error.details[:2000]))
        else:
            fut.set_exception(TaskFailed(grpc.StatusCode.INTERNAL, f"a {which or 'empty'} result to a {kind} task"))

    def outgoing(self) -> Iterator[orch_pb.OrchestratorMessage]:
        """The orchestrator's messages, with a heartbeat whenever the stream has been idle for
        ``heartbeat`` seconds; ends when the link closes (or the worker falls silent)."""
        while not self.closed:
            try:
                msg = self._out.get(timeout=self.heartbeat)
            except queue.Empty:
                if time.monotonic() - self.heard > SILENCE * self.heartbeat:
                    self.close(f"no word from the worker for {SILENCE * self.heartbeat:.0f} s")
                    break
                msg = orch_pb.OrchestratorMessage(heartbeat=orch_pb.Heartbeat(sent_unix=time.time()))
                with self._lock:
                    self._beats["down"][0] += 1
                    self._beats["down"][1] += msg.ByteSize()
            if msg is None:
                break
            yield msg

    def close(self, reason: str) -> None:
        """End the link: every task still waiting fails UNAVAILABLE."""
        with self._lock:
            if self._closed.is_set():
                return
            self.reason = reason
            self._closed.set()
            pending, self._pending = self._pending, {}
        self._out.put(None)
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(TaskFailed(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker}: {reason}"))

    # -------------------------------------------------------------- helpers
    def _expire(self, tid: int, timeout: float) -> None:
        self._fail(tid, grpc.StatusCode.DEADLINE_EXCEEDED, f"worker {self.worker}: no result within {timeout:.0f} s")

    def _fail(self, tid: int, code: grpc.StatusCode, details: str) -> None:
        with self._lock:
            entry = self._pending.pop(tid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(TaskFailed(code, details))

    @staticmethod
    def _settled(led) -> None:
        if led is not None:
            led._call_ended()

    def _count(self, led, msg: Any, direction: str, what: str, compression: str) -> None:
        if led is not None:
            led.add_message(msg, compression=compression, worker=self.worker, kind="control", direction=direction,
                            link=LINK, what=what)
        elif self.fallback is not None:
            self.fallback(self.worker, ledger_mod.count(msg, kind="control", direction=direction, link=LINK,
                                                        what=what, compression=compression))
