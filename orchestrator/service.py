"""The orchestrator (gRPC ``fedseq.v1.Orchestrator``): the RPC handlers of one run. Workers
connect, each with one stream it opens (orchestrator/link.py carries tasks down it;
orchestrator/workers.py decides their users); an operator asks for the status or stops
the run; the run itself is orchestrator/run.py, the round engine's plan carried out over the
network (schedule, assignment, rounds on the aggregation server, evaluation, results, ledger,
resume after a crash)."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter
from typing import Any

import grpc

from fedseq import fairshare
from fedseq.config import ExperimentConfig
from fedseq.experiment import Setup, client_weights, setup
from fedseq.runloop import ROUND_RETRIES
from fedseq.store import RedisStore, patient
from fedseq.tls import peer_name
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from .link import WorkerLink
from .run import EVAL_ATTEMPTS, RunLoop, check_eval_sums
from .settings import OPERATOR_STOP, OrchestratorSettings
from .workers import Refused, WorkerInfo, WorkerPool, assign

__all__ = ["EVAL_ATTEMPTS", "ROUND_RETRIES", "Orchestrator", "OrchestratorSettings", "Refused", "WorkerInfo",
           "WorkerPool", "assign", "check_eval_sums"]

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0  # seconds a new stream has to send its hello
STREAMS_PER_IDENTITY = 2  # open worker streams of one certificate identity: its live one and a reconnect


class Orchestrator(orchestrator_pb2_grpc.OrchestratorServicer):
    """Connect, GetStatus and Stop over a :class:`WorkerPool` and a :class:`RunLoop`."""

    def __init__(self, cfg: ExperimentConfig, settings: OrchestratorSettings, prepared: Setup | None = None) -> None:
        self.cfg = cfg
        self.settings = settings
        self.setup = prepared or setup(cfg)
        if self.setup.weights is None:
            if self.setup.num_malicious:
                raise ValueError("the orchestrator decides every client's aggregation weight and needs the malicious "
                                 "clients' too: build it with cli.plugins.prepare(cfg).setup")
            self.setup.weights = client_weights(self.setup)
        self.run_id = cfg.run_id or "run"
        self.store = RedisStore.from_url(settings.store_url, self.run_id, **patient())
        self._stop = threading.Event()
        self._streams: Counter[str] = Counter()  # open Connect streams by caller identity
        self._streams_lock = threading.Lock()
        self.pool = WorkerPool(self.setup, self.run_id, settings.shards(), settings.identity, settings.shard_grace,
                               self._stop, roster=settings.roster, max_workers=settings.worker_limit())
        self.loop = RunLoop(cfg, settings, self.setup, self.store, self.pool, self._stop)

    # the run's state, as the operator and the tests read it
    @property
    def state(self) -> str:
        return self.loop.state

    @property
    def message(self) -> str:
        return self.loop.message

    @property
    def round_id(self) -> int:
        return self.loop.round_id

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self.loop.epochs

    @property
    def results(self) -> dict[str, Any] | None:
        return self.loop.results

    @property
    def plan(self):
        return self.loop.plan

    @property
    def refused(self):
        return self.pool.refused

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return self.pool.workers

    def start(self) -> None:
        self.loop.start()

    def join(self, timeout: float | None = None) -> None:
        self.loop.join(timeout)

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ RPCs
    def Connect(self, request_iterator, context):
        """A worker's stream (protos/fedseq/v1/orchestrator.proto): its hello, our welcome or the
        refusal, then tasks down and results up (orchestrator/link.py) until either side ends it.

        Each stream holds one of the service's threads, and ``Connect`` is not in the fair share
        (orchestrator/app.py), so the streams are bounded here: :data:`STREAMS_PER_IDENTITY` per
        certificate identity (its live stream and a reconnect that replaces it; per host, up to
        the worker limit, without TLS), a hello first, within :data:`HELLO_TIMEOUT`."""
        who = fairshare.identity(context)
        limit = STREAMS_PER_IDENTITY if self.settings.identity is not None else self.pool.max_workers
        with self._streams_lock:
            held = self._streams[who]
            if held < limit:
                self._streams[who] = held + 1
        if held >= limit:
            self.pool.count_refusal("register: streams")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{who} already has {held} worker streams open here (at most {limit}); retry when one ends")
        try:
            yield from self._connect(request_iterator, context)
        finally:
            with self._streams_lock:
                self._streams[who] -= 1
                if self._streams[who] <= 0:
                    del self._streams[who]

    def _connect(self, request_iterator, context):
        inbox: queue.Queue = queue.Queue(maxsize=1)
        link_box: list[WorkerLink] = []

        def read() -> None:  # the worker's messages, on a thread of their own
            try:
                for msg in request_iterator:
                    if not link_box:
                        inbox.put(msg)  # the hello
                        if not link_box_ready.wait(HELLO_TIMEOUT + 5) or not link_box:
                            return
                        continue
                    link_box[0].received(msg)
                    if link_box[0].closed:
                        return
            except Exception as e:  # noqa: BLE001 - the stream broke (cancelled, reset): the worker is gone
                why = f"stream broke: {type(e).__name__}"
            else:
                why = "the worker ended its stream"
            if link_box:
                link_box[0].close(why)
            else:
                try:
                    inbox.put_nowait(None)
                except queue.Full:
                    pass

        link_box_ready = threading.Event()
        threading.Thread(target=read, daemon=True, name="connect-read").start()
        try:
            first = inbox.get(timeout=HELLO_TIMEOUT)
        except queue.Empty:
            first = None
        if first is None or first.WhichOneof("body") != "hello":
            self.pool.count_refusal("register: hello")
            link_box_ready.set()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a worker's stream starts with its hello, within {HELLO_TIMEOUT:.0f} s")
        hello = first.hello
        compression = self.cfg.compression
        if compression == "gzip":
            context.set_compression(grpc.Compression.Gzip)
        link = WorkerLink(hello.worker_id[:128], peer_name(context) if self.settings.identity is not None else "",
                          heartbeat=self.settings.heartbeat, compression=compression, fallback=self.pool.note_count)
        try:
            info = self.pool.admit(hello, link.peer, link, address=context.peer())
        except Refused as e:
            self.pool.count_refusal(f"register: {e.word}")
            log.warning("refused the stream of %r from %s: %s", hello.worker_id[:64], context.peer(), e.reason)
            link_box_ready.set()
            context.abort(e.code, e.reason)
        link_box.append(link)
        link_box_ready.set()
        context.add_callback(lambda: link.close("the stream closed"))
        shard = info.shard or (0, 0)
        welcome = orchestrator_pb2.RegisterReply(run_id=self.run_id, config_json=self.cfg.to_json(),
                                                 aggregator=self.settings.aggregator, shard_index=shard[0],
                                                 shard_count=shard[1], heartbeat_seconds=self.settings.heartbeat)
        reply = orchestrator_pb2.OrchestratorMessage(welcome=welcome)
        self.pool.note(info.worker_id, first, "up", "Orchestrator.Connect hello")
        self.pool.note(info.worker_id, reply, "down", "Orchestrator.Connect welcome")
        try:
            yield reply
            yield from link.outgoing()
        finally:
            link.close(link.reason or "the stream closed")
            self.pool.gone(info)

    def GetStatus(self, request, context):
        loop, n = self.loop, self.pool.live()
        last: dict[str, Any] = next((e for e in reversed(loop.epochs) if "hr@10" in e), {})
        return orchestrator_pb2.RunStatus(
            run_id=self.run_id, state=loop.state, epoch=loop.epochs_done, epochs=self.cfg.epochs,
            round_id=loop.round_id, model_version=loop.round_id, workers=n, last_metrics_json=json.dumps(last),
            message=loop.message, bytes_up=loop.bytes_up, bytes_down=loop.bytes_down,
            results_json=json.dumps(loop.results) if loop.results else "")

    def Stop(self, request, context):
        self._stop.set()
        self.loop.message = f"{OPERATOR_STOP}: {request.reason}" if request.reason else OPERATOR_STOP
        return orchestrator_pb2.StopReply(stopping=True)
