"""The worker's stream session: :func:`connect_loop` dials the orchestrator and keeps one
``Orchestrator.Connect`` stream open (reconnecting when it breaks), sends the hello and the
heartbeats, hands the run config to the worker when it is welcomed, and answers the tasks that come
down the stream (:func:`run_task`, on a small pool) on the same stream. :class:`HealthFile` says
how the loop is doing to a container probe."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from fedseq.config import ExperimentConfig
from fedseq.rpc import channel
from fedseq.tls import Identity
from fedseq.v1 import orchestrator_pb2 as orch_pb
from fedseq.v1 import orchestrator_pb2_grpc as orch_grpc
from fedseq.v1 import worker_pb2

from .hosted import Hosted, TaskError

log = logging.getLogger(__name__)

REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION)
TASK_THREADS = 4  # tasks run at once (a Describe is answered while a Train computes)


class Tasks(Protocol):
    """What the session needs of the worker's tasks (client/worker.py ``WorkerTasks``)."""

    worker_id: str
    device: str
    hosted: Hosted | None

    def Describe(self, request: Any) -> Any: ...
    def Train(self, request: Any) -> Any: ...
    def Evaluate(self, request: Any) -> Any: ...


class HealthFile:
    """The worker's health for a container probe (``python -m fedseq.healthcheck --file PATH``):
    a small JSON file, rewritten every second or two by the connect loop, whether it is connected
    or retrying: ``time`` (its age says the loop is alive), ``connected`` (its stream is up) and
    ``ready`` (connected and holding its users). Written atomically (a rename)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, worker: str, connected: bool, ready: bool) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"time": time.time(), "worker": worker, "connected": connected, "ready": ready}, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a full or read-only disk must not stop the worker; the probe will say it
            log.warning("could not write the health file %s: %s", self.path, e)


def run_task(tasks: Tasks, task: worker_pb2.Task) -> worker_pb2.TaskResult:
    """``task`` carried out by ``tasks``: its reply, or the error it ended with."""
    kind = task.WhichOneof("request")
    handler = {"describe": tasks.Describe, "train": tasks.Train, "evaluate": tasks.Evaluate}.get(kind or "")
    if handler is None:
        return worker_pb2.TaskResult(task_id=task.task_id, error=worker_pb2.TaskError(
            code="UNIMPLEMENTED", details=f"unknown task {kind!r}"))
    try:
        reply = handler(getattr(task, kind))
        return worker_pb2.TaskResult(task_id=task.task_id, **{kind: reply})
    except TaskError as e:
        return worker_pb2.TaskResult(task_id=task.task_id, error=worker_pb2.TaskError(code=e.code.name,
                                                                                      details=e.details[:2000]))
    except Exception as e:  # noqa: BLE001 - a failed task is reported, the worker goes on
        log.exception("%s task %d failed", kind, task.task_id)
        return worker_pb2.TaskResult(task_id=task.task_id, error=worker_pb2.TaskError(
            code="INTERNAL", details=f"{type(e).__name__}: {e}"[:2000]))


@dataclass
class _Connection:
    """What the connect loop knows across its streams."""

    attached: tuple[str, int, int] | None = None  # (run, shard index, shard count) the population is built for
    attaching: tuple[str, int, int] | None = None
    connected: bool = False
    last_ok: float = field(default_factory=time.time)  # when the last stream was welcomed (or the loop began)
    error: str = ""
    failure: BaseException | None = None


class _Refused(Exception):
    """The orchestrator refused this worker for good (a contract error or a wrong identity)."""


def connect_loop(orchestrator: str, tasks: Tasks, kind: str, on_config, stop: threading.Event,
                 identity: Identity | None = None, timeout: float = 300.0, health: HealthFile | None = None,
                 heartbeat: float = 5.0) -> None:
    """Keep one ``Orchestrator.Connect`` stream to ``orchestrator`` open until ``stop``: send the
    hello, hand the run config and the orchestrator's shard to ``on_config(welcome)`` once (again
    when the run or the shard changes), answer the tasks that come down the stream, and send a
    heartbeat every ``heartbeat`` seconds (the welcome's period once connected). A stream that
    breaks, or is silent for three heartbeats, is opened again (a restarted orchestrator, a
    network cut) and the worker keeps its users. A refusal (wrong role or identity, a contract
    error) ends the loop with ConnectionError; an orchestrator that cannot be reached, or has no
    shard free, is retried until ``timeout`` seconds have passed without a welcome."""
    stub = orch_grpc.OrchestratorStub(channel(orchestrator, identity=identity, peer="orchestrator"))
    pool = ThreadPoolExecutor(max_workers=TASK_THREADS, thread_name_prefix="task")
    state = _Connection()
    beat = threading.Event()
    threading.Thread(target=_keep_health, args=(health or HealthFile(None), tasks, state, stop, beat), daemon=True,
                     name="health").start()
    try:
        while not stop.is_set():
            try:
                _Session(stub, tasks, kind, on_config, stop, state, pool, heartbeat).run()
            except _Refused as e:
                raise ConnectionError(f"orchestrator {orchestrator} refused this worker: {e}") from None
            state.connected = False
            if stop.is_set():
                break
            if time.time() - state.last_ok > timeout:
                raise ConnectionError(f"orchestrator {orchestrator}: no welcome for {timeout:.0f}s ({state.error})")
            stop.wait(1.0)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        beat.set()


def _keep_health(health: HealthFile, tasks: Tasks, state: _Connection, stop: threading.Event,
                 beat: threading.Event) -> None:
    """Rewrite the health file every second until ``stop`` (or ``beat``: the loop ended)."""
    while not stop.is_set():
        health.write(tasks.worker_id, state.connected, state.connected and tasks.hosted is not None)
        beat.wait(1.0)
    health.write(tasks.worker_id, False, False)


class _Session:
    """One stream, from the hello until it ends: the messages up (the hello, results, and a
    heartbeat whenever nothing else went up for a period), the messages down (the welcome, tasks),
    and a watch that cancels the call on ``stop`` or when the stream is silent for three periods."""

    def __init__(self, stub, tasks: Tasks, kind: str, on_config, stop: threading.Event, state: _Connection,
                 pool: ThreadPoolExecutor, heartbeat: float) -> None:
        self.stub, self.tasks, self.kind, self.on_config = stub, tasks, kind, on_config
        self.stop, self.state, self.pool, self.heartbeat = stop, state, pool, heartbeat
        self.out: queue.Queue = queue.Queue()
        self.ended = threading.Event()
        self.period = heartbeat  # the orchestrator's, once welcomed
        self.heard = time.monotonic()  # when the last message came down
        self.welcomed = False
        self.call: Any = None

    def run(self) -> None:
        """The session, until its stream ends (_Refused: refused before any welcome; a failure
        of ``on_config`` is raised)."""
        state = self.state
        held = state.attached[1:] if state.attached else (0, 0)
        self.out.put(orch_pb.WorkerMessage(hello=orch_pb.RegisterRequest(
            worker_id=self.tasks.worker_id, device=self.tasks.device, kind=self.kind, held_index=held[0],
            held_count=held[1])))
        self.call = self.stub.Connect(self._outgoing())
        threading.Thread(target=self._watch, daemon=True, name="connect-watch").start()
        try:
            for msg in self.call:
                self._receive(msg)
        except grpc.RpcError as e:
            state.error = f"{e.code().name}: {e.details()}"
            if not self.welcomed and e.code() in REFUSALS:
                raise _Refused(f"{e.code().name}: {e.details()}") from None
            if not self.stop.is_set():
                log.warning("stream to the orchestrator ended: %s %s; reconnecting", e.code().name, e.details())
        finally:
            self.ended.set()
            self.out.put(None)
            if self.welcomed:
                state.last_ok = time.time()
        if state.failure is not None:
            raise state.failure

    def _outgoing(self):
        """The messages up: queued ones, a heartbeat after each quiet period, until None."""
        while True:
            try:
                msg = self.out.get(timeout=self.period)
            except queue.Empty:
                if self.ended.is_set():
                    return
                msg = orch_pb.WorkerMessage(heartbeat=orch_pb.Heartbeat(sent_unix=time.time()))
            if msg is None:
                return
            yield msg

    def _watch(self) -> None:
        """A silent stream (half-open behind NAT) or a stop ends the call. It waits on ``stop``, so
        a stop cancels the call at once (waiting on ``ended`` instead, a stop waited for the next
        check: up to a second, paid by every worker's shutdown)."""
        while not self.ended.is_set():
            if self.stop.wait(min(1.0, self.period)) or time.monotonic() - self.heard > 3 * self.period:
                if not self.ended.is_set():
                    self.call.cancel()
                return

    def _receive(self, msg) -> None:
        self.heard = time.monotonic()
        body = msg.WhichOneof("body")
        if body == "welcome":
            self._welcome(msg.welcome)
        elif body == "task" and self.welcomed:
            self.pool.submit(self._answer, msg.task)

    def _welcome(self, w) -> None:
        state = self.state
        self.welcomed = True
        self.period = w.heartbeat_seconds or self.heartbeat
        key = (w.run_id, w.shard_index, w.shard_count)
        if state.attached != key and state.attaching != key:
            # the population is built on a thread of its own (seconds on a real data set): the
            # stream goes on meanwhile and a Describe says "not ready"
            state.attaching = key
            threading.Thread(target=self._attach, args=(w, key), daemon=True, name="attach").start()
        state.connected = True
        state.last_ok = time.time()
        log.info("connected to the orchestrator (run %s, shard %s/%s)", w.run_id, w.shard_index, w.shard_count)

    def _answer(self, task) -> None:
        result = run_task(self.tasks, task)
        if not self.ended.is_set():
            self.out.put(orch_pb.WorkerMessage(result=result))

    def _attach(self, welcome, key: tuple[str, int, int]) -> None:
        state = self.state
        try:
            self.on_config(welcome)
            state.attached = key
        except BaseException as e:  # noqa: BLE001 - ends the loop (the process exits non-zero)
            state.failure = e
            self.call.cancel()
        finally:
            state.attaching = None


def new_worker_id(kind: str) -> str:
    return f"{kind}-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def config_from_reply(reply) -> ExperimentConfig:
    return ExperimentConfig.from_dict(json.loads(reply.config_json))


def shard_from_reply(reply) -> tuple[int, int] | None:
    """The shard the orchestrator assigned (``None``: the whole population of the worker's kind)."""
    return (int(reply.shard_index), int(reply.shard_count)) if reply.shard_count > 0 else None
