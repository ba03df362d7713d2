"""The worker shared by benign client workers (client/) and attacker workers (attacker/): the
same tasks, the same encoding and upload path, so nothing on the wire tells them apart. What
differs is the :class:`Hosted` population: which users it hosts and how their updates are
computed.

A worker listens on no port. :func:`connect_loop` dials the orchestrator and keeps one
``Orchestrator.Connect`` stream open (reconnecting when it breaks); the tasks that come down it
(Describe, Train, Evaluate) are answered by :class:`WorkerTasks` and go back up the same stream.
Updates go to the aggregation server (``Aggregator.SubmitUpdates``), as before."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from fedseq import codec, observe
from fedseq import ledger as ledger_mod
from fedseq.config import ExperimentConfig
from fedseq.delta import PatchError, apply_patch
from fedseq.experiment import Setup
from fedseq.metrics import Evaluator, MetricSums, sums_to_proto
from fedseq.rpc import CONTROL_TIMEOUT, channel, chunks, deadline_left
from fedseq.store import CachedModelReader, RedisStore, model_from_bytes, model_to_bytes, patient
from fedseq.tls import Identity
from fedseq.training import ITEM_TABLE, UpdateBatch
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, worker_pb2
from fedseq.v1 import orchestrator_pb2 as orch_pb
from fedseq.v1 import orchestrator_pb2_grpc as orch_grpc

log = logging.getLogger(__name__)

SPARSE_TABLES = codec.SPARSE_TABLES  # row-sparse candidates for sparse encodings
UPLOAD_QUEUE = 64  # encoded updates a worker keeps ready for sending (about 25 MB at Steam's 390 KB)


class ShardSequences(Mapping[int, np.ndarray]):
    """The training sequences of the users a worker hosts, by user id, without a dict entry per
    user: a sorted id array and the data set's ``train`` (a tuple or a :class:`Ragged`) it indexes
    (``train[u]`` for user ``u``; benign ids are data set indices)."""

    def __init__(self, users: np.ndarray, train: Sequence[np.ndarray]) -> None:
        self.users = np.unique(np.asarray(users, dtype=np.int64))
        self.train = train

    def __contains__(self, u: object) -> bool:
        if not isinstance(u, (int, np.integer)) or not len(self.users):
            return False
        i = int(np.searchsorted(self.users, int(u)))
        return i < len(self.users) and int(self.users[i]) == int(u)

    def __getitem__(self, u: int) -> np.ndarray:
        if u not in self:
            raise KeyError(u)
        return self.train[int(u)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.users.tolist())

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Hosted:
    """A worker's population: user ids, their data, and how their updates are computed."""

    setup: Setup
    users: np.ndarray
    sequences: Mapping[int, np.ndarray]
    compute: Callable[[torch.Tensor, list[int], int], UpdateBatch]  # (params, users, round_id)
    evaluate_users: np.ndarray  # users this worker may evaluate (benign hosted users)
    # adversarial-training updates (params, users, round_id); None: this worker does not do them
    compute_adversarial: Callable[[torch.Tensor, list[int], int], UpdateBatch] | None = None
    # ``compute`` a piece at a time (fedseq.training.iter_updates): each piece's updates are sent
    # while the next is computed, and the worker never holds the whole [K, D] matrix. None: one
    # piece, ``compute``'s
    compute_pieces: Callable[[torch.Tensor, list[int], int], Iterable[UpdateBatch]] | None = None


def encode_update(tensors: dict[str, torch.Tensor], encoding: str) -> bytes:
    """One user's update as a checked pack() container (sparse encodings only on embedding tables)."""
    return codec.pack(codec.encode_state(tensors, encoding, sparse_ok=lambda n: n in SPARSE_TABLES))


class ModelSource:
    """Model versions by number: from Redis (cached) or, without a store, from the aggregator.

    Only versions this worker does not hold are fetched (a cache hit moves no bytes). With
    ``delta`` (config ``model_delta``), a store reader that holds version ``v - 1`` reads the patch
    to ``v`` (fedseq/delta.py) instead of the whole version, and checks the result against the
    version's sha256 (falling back to the whole version on any mismatch). Every fetch is reported
    as ledger counts: store reads (``worker-store``), or the GetModel request and its chunks
    (``worker-aggregator``, compressed as the run says)."""

    def __init__(self, run_id: str, store_url: str | None, aggregator: str, compression: str = "none",
                 delta: bool = False, identity: Identity | None = None) -> None:
        self.run_id = run_id
        self.compression = compression
        self.delta = delta
        self.patches_applied = 0
        self._reader = CachedModelReader(RedisStore.from_url(store_url, run_id, **patient())) if store_url else None
        self._agg = agg_grpc.AggregatorStub(channel(aggregator, compression, identity, peer="server")) \
            if not store_url else None
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def fetch(self, version: int) -> tuple[dict[str, torch.Tensor], list[common_pb2.ByteCount]]:
        """Tensors of ``version`` and the ledger counts of what was read (empty on a cache hit)."""
        with self._lock:
            if self._reader is not None and self.delta:
                patched = self._from_patch(version)
                if patched is not None:
                    return patched
            if self._reader is not None:
                before = self._reader.stats().get("bytes_fetched", 0)
                tensors = self._reader.get(version)
                n = int(self._reader.stats().get("bytes_fetched", 0) - before)
                counts = [ledger_mod.store_count(n, kind="model_download", direction="down", link="worker-store",
                                                 what=f"store.get model:{version}")] if n else []
                return tensors, counts
            if version in self._cache:
                return self._cache[version], []
            assert self._agg is not None
            req = agg_pb.GetModelRequest(run_id=self.run_id, version=version)
            msgs = list(self._agg.GetModel(req, timeout=CONTROL_TIMEOUT * 4))
            blob = b"".join(c.data for c in msgs)
            tensors, _ = model_from_bytes(blob)
            self._cache = {version: tensors}
            counts = [
                ledger_mod.count(req, kind="control", direction="up", link="worker-aggregator",
                                 what="Aggregator.GetModel request", compression=self.compression),
                ledger_mod.count(msgs, kind="model_download", direction="down", link="worker-aggregator",
                                 what=f"Aggregator.GetModel model:{version}", compression=self.compression),
            ]
            return tensors, counts

    def _from_patch(self, version: int) -> tuple[dict[str, torch.Tensor], list[common_pb2.ByteCount]] | None:
        """``version`` from the cached ``version - 1`` and the stored patch, or None (not cached
        already, no base, no patch, or a result that does not match the version's sha256)."""
        assert self._reader is not None
        if version < 1 or self._reader.cached(version) is not None:
            return None
        base = self._reader.cached(version - 1)
        if base is None:
            return None
        store = self._reader.store
        blob = store.get_patch_bytes(version)
        if blob is None:
            return None
        counts = [ledger_mod.store_count(len(blob), kind="model_download", direction="down", link="worker-store",
                                         what=f"store.get patch:{version}")]
        info = store.model_info(version)
        try:
            tensors = apply_patch(base, blob, version - 1)
            ok = info is not None and hashlib.sha256(model_to_bytes(tensors, info["meta"])).hexdigest() == info["sha256"]
        except PatchError as e:
            log.warning("patch to model version %d does not apply (%s); reading the whole version", version, e)
            ok = False
        if not ok:
            tensors, more = self._full(version)
            return tensors, counts + more
        self._reader.put(version, tensors)
        self.patches_applied += 1
        return dict(tensors), counts

    def _full(self, version: int) -> tuple[dict[str, torch.Tensor], list[common_pb2.ByteCount]]:
        assert self._reader is not None
        blob = self._reader.store.get_model_bytes(version)
        tensors, _ = model_from_bytes(blob)
        self._reader.put(version, tensors)
        return dict(tensors), [ledger_mod.store_count(len(blob), kind="model_download", direction="down",
                                                      link="worker-store", what=f"store.get model:{version}")]


class TaskError(Exception):
    """A task the worker refuses or cannot do: a gRPC status code and the reason (sent back as the
    task's :class:`TaskError` result)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


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
        encoding = _accepted_encoding(request)
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
        call = _Upload(request, hosted, encoding, local, counts, started=t1)
        pieces = _piece_function(hosted, request.adversarial)
        producer = threading.Thread(target=self._produce, args=(call, pieces, params), name=f"train-{request.round_id}",
                                    daemon=True)
        producer.start()
        try:
            # wait_for_ready: a restarting aggregator is waited for (within the round's deadline)
            reply = self._aggregator(call.compression).SubmitUpdates(
                call.messages(), timeout=deadline_left(request.deadline_unix, floor=5.0), wait_for_ready=True)
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

    def _produce(self, call: _Upload, pieces, params: torch.Tensor) -> None:
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


def _accepted_encoding(request) -> str:
    """The round's update encoding, refused before any work when the aggregator does not accept it
    (it would only be rejected there)."""
    encoding = request.encoding or "dense-fp32"
    accepted = list(request.accepted_encodings)
    if encoding not in accepted:
        raise TaskError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"encoding refused: round {request.round_id} asks for updates encoded {encoding!r} but "
                        f"the aggregator accepts only {accepted or 'nothing (accepted_encodings is empty)'}; "
                        "nothing was uploaded")
    return encoding


def _piece_function(hosted: Hosted, adversarial: bool) -> Callable[[torch.Tensor, list[int], int], Iterable[UpdateBatch]]:
    """How the round's updates are computed, as pieces (params, users, round_id) -> UpdateBatches."""
    if adversarial:
        if hosted.compute_adversarial is None:
            raise TaskError(grpc.StatusCode.FAILED_PRECONDITION, "this worker does no adversarial training")
        compute_adv = hosted.compute_adversarial
        return lambda p, u, r: (compute_adv(p, u, r),)
    compute = hosted.compute
    return hosted.compute_pieces or (lambda p, u, r: (compute(p, u, r),))


class _Upload:
    """One Train task's uploads on their way: each user's update encoded into its UpdateChunk
    messages (:meth:`encode`, counted for the ledger) and handed through a bounded queue
    (:meth:`put`) to the gRPC request stream (:meth:`messages`), so that the upload overlaps the
    computation. ``stop`` ends both sides when the call is over."""

    def __init__(self, request, hosted: Hosted, encoding: str, local: list, counts: list, started: float) -> None:
        self.request, self.encoding, self.local, self.counts = request, encoding, local, counts
        self.compression = hosted.setup.cfg.compression  # the run's gRPC compression, of the uploads
        layout = hosted.setup.layout
        # the bytes of encode_update(layout.unflatten(update), encoding), from the flat update and the
        # item rows its user touched (when the computation names them), without per-tensor copies
        self.flat = codec.FlatCodec.of(layout.names, layout.shapes, encoding, frozenset(SPARSE_TABLES))
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
                                     encoding=self.encoding, loss=float(ub.losses[i]))
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


REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION)
TASK_THREADS = 4  # tasks run at once (a Describe is answered while a Train computes)


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
        import json

        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"time": time.time(), "worker": worker, "connected": connected, "ready": ready}, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a full or read-only disk must not stop the worker; the probe will say it
            log.warning("could not write the health file %s: %s", self.path, e)


def run_task(tasks: WorkerTasks, task: worker_pb2.Task) -> worker_pb2.TaskResult:
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


def connect_loop(orchestrator: str, tasks: WorkerTasks, kind: str, on_config, stop: threading.Event,
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
    from concurrent.futures import ThreadPoolExecutor

    stub = orch_grpc.OrchestratorStub(channel(orchestrator, identity=identity, peer="orchestrator"))
    health = health or HealthFile(None)
    pool = ThreadPoolExecutor(max_workers=TASK_THREADS, thread_name_prefix="task")
    state = _Connection()
    beat = threading.Event()

    def keep_health() -> None:
        while not stop.is_set():
            health.write(tasks.worker_id, state.connected, state.connected and tasks.hosted is not None)
            beat.wait(1.0)
        health.write(tasks.worker_id, False, False)

    threading.Thread(target=keep_health, daemon=True, name="health").start()
    try:
        while not stop.is_set():
            try:
                _session(stub, tasks, kind, on_config, stop, state, pool, heartbeat)
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


def _session(stub, tasks: WorkerTasks, kind: str, on_config, stop: threading.Event, state: _Connection, pool,
             heartbeat: float) -> None:
    """One stream, from the hello until it ends."""
    out: queue.Queue = queue.Queue()
    attached = state.attached
    held = attached[1:] if attached else (0, 0)
    out.put(orch_pb.WorkerMessage(hello=orch_pb.RegisterRequest(
        worker_id=tasks.worker_id, device=tasks.device, kind=kind, held_index=held[0], held_count=held[1])))
    ended = threading.Event()
    period = [heartbeat]
    heard = [time.monotonic()]

    def outgoing():
        while True:
            try:
                msg = out.get(timeout=period[0])
            except queue.Empty:
                if ended.is_set():
                    return
                msg = orch_pb.WorkerMessage(heartbeat=orch_pb.Heartbeat(sent_unix=time.time()))
            if msg is None:
                return
            yield msg

    call = stub.Connect(outgoing())

    def watch() -> None:  # a silent stream (half-open behind NAT) or a stop ends the call
        while not ended.wait(min(1.0, period[0])):
            if stop.is_set() or time.monotonic() - heard[0] > 3 * period[0]:
                call.cancel()
                return

    def answer(task) -> None:
        result = run_task(tasks, task)
        if not ended.is_set():
            out.put(orch_pb.WorkerMessage(result=result))

    def attach(welcome, key) -> None:
        try:
            on_config(welcome)
            state.attached = key
        except BaseException as e:  # noqa: BLE001 - ends the loop (the process exits non-zero)
            state.failure = e
            call.cancel()
        finally:
            state.attaching = None

    threading.Thread(target=watch, daemon=True, name="connect-watch").start()
    welcomed = False
    try:
        for msg in call:
            heard[0] = time.monotonic()
            body = msg.WhichOneof("body")
            if body == "welcome":
                w = msg.welcome
                welcomed = True
                period[0] = w.heartbeat_seconds or heartbeat
                key = (w.run_id, w.shard_index, w.shard_count)
                if state.attached != key and state.attaching != key:
                    # the population is built on a thread of its own (seconds on a real data set): the
                    # stream goes on meanwhile and a Describe says "not ready"
                    state.attaching = key
                    threading.Thread(target=attach, args=(w, key), daemon=True, name="attach").start()
                state.connected = True
                state.last_ok = time.time()
                log.info("connected to the orchestrator (run %s, shard %s/%s)", w.run_id, w.shard_index,
                         w.shard_count)
            elif body == "task" and welcomed:
                pool.submit(answer, msg.task)
    except grpc.RpcError as e:
        state.error = f"{e.code().name}: {e.details()}"
        if not welcomed and e.code() in REFUSALS:
            raise _Refused(f"{e.code().name}: {e.details()}") from None
        if not stop.is_set():
            log.warning("stream to the orchestrator ended: %s %s; reconnecting", e.code().name, e.details())
    finally:
        ended.set()
        out.put(None)
        if welcomed:
            state.last_ok = time.time()
    if state.failure is not None:
        raise state.failure


def new_worker_id(kind: str) -> str:
    return f"{kind}-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def config_from_reply(reply) -> ExperimentConfig:
    import json

    return ExperimentConfig.from_dict(json.loads(reply.config_json))


def shard_from_reply(reply) -> tuple[int, int] | None:
    """The shard the orchestrator assigned (``None``: the whole population of the worker's kind)."""
    return (int(reply.shard_index), int(reply.shard_count)) if reply.shard_count > 0 else None
