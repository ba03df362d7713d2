"""The worker shared by benign client workers (client/) and attacker workers (attacker/): the
same tasks, the same codec and upload path, so nothing on the wire tells them apart. What
differs is the :class:`Hosted` population (client/hosted.py): which users it hosts and how their
updates are computed.

A worker listens on no port. :func:`connect_loop` (client/session.py) dials the orchestrator and
keeps one ``Orchestrator.Connect`` stream open (reconnecting when it breaks); the tasks that come
down it (Describe, Train, Evaluate) are answered by :class:`WorkerTasks`, here, and go back up the
same stream. Models come from :class:`ModelSource` (client/models.py). Updates go to the
aggregation server (``Aggregator.SubmitUpdates``): a Train task computes its users' updates a piece
at a time on a thread of its own while the ones before are uploaded (:class:`_Upload`).

The names the other modules import from here (the population types, ModelSource, the session)
are re-exported."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

import grpc
import numpy as np
import torch

from fedseq import codec, observe
from fedseq import ledger as ledger_mod
from fedseq.metrics import Evaluator, MetricSums, sums_to_proto
from fedseq.rpc import channel, chunks, deadline_left
from fedseq.tls import Identity
from fedseq.training import ITEM_TABLE, UpdateBatch
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, worker_pb2

from .hosted import SPARSE_TABLES, Hosted, ShardSequences, TaskError, encode_update
from .models import ModelSource
from .session import (
    REFUSALS,
    TASK_THREADS,
    HealthFile,
    config_from_reply,
    connect_loop,
    new_worker_id,
    run_task,
    shard_from_reply,
)

__all__ = [
    "REFUSALS", "SPARSE_TABLES", "TASK_THREADS", "UPLOAD_QUEUE", "HealthFile", "Hosted", "ModelSource",
    "ShardSequences", "TaskError", "WorkerTasks", "channel", "config_from_reply", "connect_loop", "deadline_left",
    "encode_update", "new_worker_id", "run_task", "shard_from_reply",
]

log = logging.getLogger(__name__)

UPLOAD_QUEUE = 64  # encoded updates a worker keeps ready for sending (about 25 MB at Steam's 390 KB)
UPLOAD_FLOOR_S = 5.0  # an upload's deadline is the round's, but at least this far off


class WorkerTasks:
    """The worker's side of its tasks (Describe, Train, Evaluate). Uploads go only to the
    aggregator given to :meth:`attach` (from the worker's own configuration or its authenticated
    orchestrator), never to an address in a task; under TLS the aggregator must prove the server
    role."""

    def __init__(self, worker_id: str, device: str = "cpu", identity: Identity | None = None) -> None:
        self.worker_id = worker_id
        self.device = device
        self.identity = identity
        self.hosted: Hosted | None = None
        self.models: ModelSource | None = None
        self.aggregator = ""
        self.run_id = ""
        self._evaluators: dict[tuple, Evaluator] = {}
        self._agg_channels: dict[str, agg_grpc.AggregatorStub] = {}
        self._lock = threading.Lock()
        self._compute = threading.Lock()  # the model object is shared by training and evaluation
        self.stats = {"train_calls": 0, "users_trained": 0, "eval_calls": 0}

    def attach(self, run_id: str, hosted: Hosted, models: ModelSource, aggregator: str) -> None:
        with self._lock:
            self.run_id, self.hosted, self.models, self.aggregator = run_id, hosted, models, aggregator
            self._evaluators.clear()

    def Describe(self, request):
        h = self.hosted
        return worker_pb2.DescribeReply(worker_id=self.worker_id, users=[] if h is None else h.users.tolist(),
                                        device=self.device, threads=torch.get_num_threads(),
                                        ready=h is not None, run_id=self.run_id)

    def _need(self, run_id: str) -> Hosted:
        if self.hosted is None:
            raise TaskError(grpc.StatusCode.UNAVAILABLE, "worker is not ready (no run attached yet)")
        if run_id != self.run_id:
            raise TaskError(grpc.StatusCode.FAILED_PRECONDITION, f"unknown run {run_id!r} (attached: {self.run_id!r})")
        return self.hosted

    def _aggregator(self, compression: str) -> agg_grpc.AggregatorStub:
        with self._lock:
            key = f"{compression}|{self.aggregator}"
            if key not in self._agg_channels:
                self._agg_channels[key] = agg_grpc.AggregatorStub(
                    channel(self.aggregator, compression, self.identity, peer="server"))
            return self._agg_channels[key]

    def Train(self, request):
        hosted = self._need(request.run_id)
        observe.set_context(run=self.run_id, round_id=request.round_id)
        assert self.models is not None
        codec_name = _accepted_codec(request)
        t0 = time.perf_counter()
        tensors, counts = self.models.fetch(request.model_version)
        model_bytes = sum(c.bytes for c in counts if c.kind == "model_download")
        params = hosted.setup.layout.flatten(tensors)
        t1 = time.perf_counter()
        local = [a for a in request.assignments if a.user_id in hosted.sequences]
        statuses = [common_pb2.UpdateStatus(user_id=a.user_id, accepted=False, reason="user not hosted by this worker")
                    for a in request.assignments if a.user_id not in hosted.sequences]
        if not local:
            return worker_pb2.TrainReply(statuses=statuses, model_bytes_read=model_bytes, ledger=counts)
        call = _Upload(request, hosted, codec_name, local, counts, started=t1)
        reply = self._send(call, _piece_function(hosted, request.adversarial), params)
        t3 = time.perf_counter()
        counts.append(ledger_mod.count(reply, kind="control", direction="down", link="worker-aggregator",
                                       what="Aggregator.SubmitUpdates reply", compression=call.compression))
        statuses.extend(reply.statuses)
        # compute and encode: seconds spent on them; upload: the part of the upload that followed the
        # last encoded update (the rest overlapped the computation)
        return worker_pb2.TrainReply(statuses=statuses, bytes_sent=call.sent, model_bytes_read=model_bytes,
                                     timings={"model": t1 - t0, "compute": call.took["compute"],
                                              "encode": call.took["encode"], "upload": t3 - call.done_at},
                                     ledger=counts)

    def _send(self, call: _Upload, pieces: Pieces, params: torch.Tensor) -> agg_pb.SubmitReply:
        """The round's updates computed (:meth:`_produce`, a thread of its own) and streamed to the
        aggregator as they come: its reply. TaskError when the upload fails; a failed computation
        is raised once the updates computed before it are sent (the round goes on without the rest)."""
        request = call.request
        producer = threading.Thread(target=self._produce, args=(call, pieces, params), name=f"train-{request.round_id}",
                                    daemon=True)
        producer.start()
        try:
            # wait_for_ready: a restarting aggregator is waited for (within the round's deadline)
            reply = self._aggregator(call.compression).SubmitUpdates(
                call.messages(), timeout=deadline_left(request.deadline_unix, floor=UPLOAD_FLOOR_S), wait_for_ready=True)
        except grpc.RpcError as e:  # the aggregator refused or could not be reached (or proved no server role)
            log.warning("upload of round %d to %s failed: %s %s", request.round_id, self.aggregator, e.code().name,
                        e.details())
            raise TaskError(grpc.StatusCode.UNAVAILABLE,
                            f"upload to the aggregator {self.aggregator} failed: {e.code().name}: {e.details()}") from None
        finally:
            call.stop.set()
            producer.join()
        if call.failure:  # the updates computed before the failure were sent; the round goes on without the rest
            raise call.failure[0]
        return reply

    def _produce(self, call: _Upload, pieces: Pieces, params: torch.Tensor) -> None:
        """Compute the users' updates a piece at a time and hand each user's encoded upload to
        ``call`` (a thread of its own: gRPC sends the ones before meanwhile)."""
        try:
            with self._compute:
                users = [a.user_id for a in call.local]
                it = iter(pieces(params, users, call.request.round_id))
                while True:
                    tc = time.perf_counter()
                    ub = next(it, None)
                    call.took["compute"] += time.perf_counter() - tc
                    if ub is None:
                        break
                    for i in range(len(ub.users)):
                        if not call.put(call.encode(ub, i)):
                            return
                    observe.WORKER_USERS.inc(len(ub.users))
                self.stats["train_calls"] += 1
                self.stats["users_trained"] += len(call.local)
        except BaseException as e:  # noqa: BLE001 - re-raised by Train
            call.failure.append(e)
        finally:
            call.done_at = time.perf_counter()
            call.put(None)

    def Evaluate(self, request):
        hosted = self._need(request.run_id)
        assert self.models is not None
        t0 = time.perf_counter()
        asked = np.asarray(request.users, dtype=np.int64)
        ok = np.isin(asked, hosted.evaluate_users)  # no Python set of every evaluable user per call
        users = asked[ok].tolist()
        unknown = asked[~ok].tolist()
        if unknown:
            raise TaskError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{len(unknown)} users are not evaluable here (e.g. {unknown[:5]})")
        tensors, counts = self.models.fetch(request.model_version)
        model_bytes = sum(c.bytes for c in counts if c.kind == "model_download")
        params = hosted.setup.layout.flatten(tensors)
        s = hosted.setup
        base = s.eval_config()  # the run's, on this worker's device (its --device wins over the run's)
        cfg = dataclasses.replace(base, protocol=request.protocol or base.protocol)
        targets = tuple(request.targets) or s.targets
        key = (tuple(users), cfg, targets)
        with self._compute:
            ev = self._evaluators.get(key)
            if ev is None:
                ds = s.dataset
                ev = Evaluator(s.model, [ds.train[u] for u in users], [ds.test[u] for u in users], users, targets, cfg)
                self._evaluators[key] = ev
            sums = ev(params) if users else MetricSums()
            self.stats["eval_calls"] += 1
        return worker_pb2.EvaluateReply(sums=sums_to_proto(sums), seconds=time.perf_counter() - t0,
                                        model_bytes_read=model_bytes, ledger=counts)


def _accepted_codec(request) -> str:
    """The round's update codec (the request's wire field ``encoding``), refused before any work
    when the aggregator does not accept it (it would only be rejected there)."""
    codec_name = request.encoding or "dense-fp32"
    accepted = list(request.accepted_encodings)
    if codec_name not in accepted:
        raise TaskError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"encoding refused: round {request.round_id} asks for updates encoded {codec_name!r} but "
                        f"the aggregator accepts only {accepted or 'nothing (accepted_encodings is empty)'}; "
                        "nothing was uploaded")
    return codec_name


# how a round's updates are computed, as pieces: (params, users, round_id) -> UpdateBatches
Pieces = Callable[[torch.Tensor, list[int], int], Iterable[UpdateBatch]]


def _piece_function(hosted: Hosted, adversarial: bool) -> Pieces:
    """How the round's updates are computed, as pieces (params, users, round_id) -> UpdateBatches."""
    if adversarial:
        if hosted.compute_adversarial is None:
            raise TaskError(grpc.StatusCode.FAILED_PRECONDITION, "this worker does no adversarial training")
        return _OnePiece(hosted.compute_adversarial)
    return hosted.compute_pieces or _OnePiece(hosted.compute)


class _OnePiece:
    """A computation of the whole round's updates, as its one piece."""

    def __init__(self, compute: Callable[[torch.Tensor, list[int], int], UpdateBatch]) -> None:
        self.compute = compute

    def __call__(self, params: torch.Tensor, users: list[int], round_id: int) -> tuple[UpdateBatch]:
        return (self.compute(params, users, round_id),)


class _Upload:
    """One Train task's uploads on their way: each user's update encoded into its UpdateChunk
    messages (:meth:`encode`, counted for the ledger) and handed through a bounded queue
    (:meth:`put`) to the gRPC request stream (:meth:`messages`), so that the upload overlaps the
    computation. ``stop`` ends both sides when the call is over."""

    def __init__(self, request, hosted: Hosted, codec_name: str, local: list, counts: list, started: float) -> None:
        self.request, self.codec_name, self.local, self.counts = request, codec_name, local, counts
        self.compression = hosted.setup.cfg.compression  # the run's gRPC compression, of the uploads
        layout = hosted.setup.layout
        # the bytes of encode_update(layout.unflatten(update), codec_name), from the flat update and the
        # item rows its user touched (when the computation names them), without per-tensor copies
        self.flat = codec.FlatCodec.of(layout.names, layout.shapes, codec_name, frozenset(SPARSE_TABLES))
        self.tokens = {a.user_id: a.token for a in local}
        self.took = {"compute": 0.0, "encode": 0.0}
        self.sent = 0
        self.done_at = started
        self.out: queue.Queue = queue.Queue(maxsize=UPLOAD_QUEUE)
        self.stop = threading.Event()
        self.failure: list[BaseException] = []

    def encode(self, ub: UpdateBatch, i: int) -> list:
        """User ``i`` of ``ub`` as its UpdateChunk messages (counted in the ledger as sent)."""
        te = time.perf_counter()
        u = int(ub.users[i])
        rows = None if ub.item_rows is None else {ITEM_TABLE: ub.item_rows[i]}
        data = self.flat.encode(ub.updates[i], rows)
        self.took["encode"] += time.perf_counter() - te
        r = self.request
        header = agg_pb.UpdateHeader(run_id=r.run_id, round_id=r.round_id, user_id=u, token=self.tokens[u],
                                     num_samples=int(ub.num_samples[i]), total_bytes=len(data),
                                     encoding=self.codec_name, loss=float(ub.losses[i]))
        msgs = [agg_pb.UpdateChunk(header=header, data=piece) if j == 0 else agg_pb.UpdateChunk(data=piece)
                for j, piece in enumerate(chunks(data))]
        c = ledger_mod.count(msgs, kind="update", direction="up", link="worker-aggregator",
                             what="Aggregator.SubmitUpdates", compression=self.compression, user=u)
        self.counts.append(c)
        self.sent += c.bytes
        return msgs

    def put(self, item) -> bool:
        """Queue ``item`` (a user's messages, or None: the end); False once the call is over."""
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def messages(self):
        """The request stream: every queued message, until the end (or the call is over)."""
        while True:
            try:
                msgs = self.out.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():  # the call ended without us (a failed upload): no thread left waiting
                    return
                continue
            if msgs is None:  # the end, or a failed computation (Train raises its error)
                return
            yield from msgs
