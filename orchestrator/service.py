"""The orchestrator (gRPC ``fedseq.v1.Orchestrator``): schedules the rounds and epochs of one
run, assigns each round's users to the registered workers that host them, opens and closes the
round on the aggregation server, applies the learning-rate schedule, runs federated evaluation,
records metrics and bytes, and resumes a run from the store after a crash.

Round ids are global: round r trains on model version r and produces version r + 1, so the store
head *is* the number of completed rounds and a restarted orchestrator continues from it.

Nothing a worker says about itself is trusted beyond its own updates (DESIGN.md, "Trust model"):
the orchestrator decides which users each worker hosts (shards of its configuration), refuses a
worker id that a live worker holds, never hands out store credentials, tells workers where to
upload only through its authenticated Register reply, and checks every evaluation reply against the
users it asked for before adding it to the epoch's metrics.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedseq import ledger as ledger_mod
from fedseq import observe
from fedseq.config import ExperimentConfig
from fedseq.engine import RoundPlan, eval_due, last_of_epoch, malicious_kept, plan_run
from fedseq.experiment import WORKER_KINDS, Setup, all_clients, setup, worker_users
from fedseq.ledger import Ledger
from fedseq.metrics import KS, MetricSums, sums_from_proto
from fedseq.results import write_results
from fedseq.rpc import CONTROL_TIMEOUT, LOOPBACK, channel, grpc_compression
from fedseq.store import RedisStore, StoreError, patient
from fedseq.tls import Identity, peer_name
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrchestratorSettings:
    aggregator: str  # host:port
    store_url: str  # redis://... (the run state lives there; never handed to workers)
    min_workers: int = 1
    round_timeout: float = 600.0  # seconds a round waits for its workers before closing
    worker_wait: float = 300.0  # seconds to wait for min_workers at the start
    out_dir: str | None = None
    # shards of each worker kind's users, one per worker (0: every worker of the kind may host all
    # of them, and each round's users are spread over the live ones, as `compose --scale` wants)
    client_shards: int = 0
    attacker_shards: int = 0
    identity: Identity | None = None  # mutual TLS for the calls to the server and the workers
    shard_grace: float = 30.0  # seconds a lost worker's shard waits for a worker before rounds go on
    port: int = 50050  # where the Orchestrator service listens (0: any free port)
    host: str = LOOPBACK

    def __post_init__(self) -> None:
        if self.min_workers < 1:
            raise ValueError("min_workers must be >= 1")
        if self.round_timeout <= 0 or self.worker_wait <= 0:
            raise ValueError("round_timeout and worker_wait must be > 0")
        if self.client_shards < 0 or self.attacker_shards < 0:
            raise ValueError("client_shards and attacker_shards must be >= 0")


@dataclass
class WorkerInfo:
    worker_id: str
    address: str
    device: str
    stub: Any
    users: frozenset[int] = frozenset()  # decided by the orchestrator (kind and shard), not claimed
    ready: bool = False
    alive: bool = True
    registered_at: float = field(default_factory=time.time)
    kind: str = "client"
    shard: tuple[int, int] | None = None
    peer: str = ""  # the common name of its certificate ('' without TLS)


EVAL_ATTEMPTS = 3  # evaluation passes over the users whose worker failed
ROUND_RETRIES = 8  # reruns of a round whose aggregator or store failed (backoff 1, 2, 4, ... 15 s)


class Refused(Exception):
    """A Register call the orchestrator refuses: (status code, reason)."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def check_eval_sums(sums: MetricSums, asked: int, ks: set[int]) -> str | None:
    """Why an evaluation reply for ``asked`` users cannot be true (None: plausible). Every metric
    is a sum of per-user values in [0, 1], so each must be finite and within [0, users]."""
    if sums.users != asked:
        return f"reports {sums.users} users for the {asked} it was asked to evaluate"
    if set(sums.er) != ks:
        return f"reports ER@K for K in {sorted(sums.er)}, expected {sorted(ks)}"
    for name, v in [("hr@10", sums.hr10), ("ndcg@10", sums.ndcg10), *((f"er@{k}", x) for k, x in sums.er.items())]:
        if not math.isfinite(v) or v < 0 or v > asked + 1e-6 * max(1, asked):
            return f"{name} sum {v!r} is outside [0, {asked}]"
    return None


def assign(users: np.ndarray, workers: list[WorkerInfo]) -> tuple[dict[str, list[int]], list[int]]:
    """Map each user to one live, ready worker hosting it (spread evenly and deterministically:
    the k-th host of a user, in worker-id order, with k = user id mod the number of hosts).
    Returns (worker_id -> users, users no worker hosts)."""
    hosts = sorted((w for w in workers if w.ready and w.alive), key=lambda w: w.worker_id)
    out: dict[str, list[int]] = {}
    orphans: list[int] = []
    for u in users.tolist():
        cands = [w for w in hosts if u in w.users]
        if not cands:
            orphans.append(u)
            continue
        out.setdefault(cands[u % len(cands)].worker_id, []).append(u)
    return out, orphans


class Orchestrator(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, cfg: ExperimentConfig, settings: OrchestratorSettings, prepared: Setup | None = None) -> None:
        self.cfg = cfg
        self.settings = settings
        self.setup = prepared or setup(cfg)
        self.run_id = cfg.run_id or "run"
        self.store = RedisStore.from_url(settings.store_url, self.run_id, **patient())
        self.workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.state = "waiting"
        self.message = ""
        self.round_id = 0
        self.epochs_done = 0
        self.epochs: list[dict[str, Any]] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.num_parameters = 0
        # the communication ledger (fedseq/ledger.py): entries go to the store's "ledger" stream
        # round by round; these are running sums of it (rebuilt from the stream on resume)
        self._comp = cfg.compression
        self._grpc_comp = grpc_compression(cfg.compression)
        self._epoch_bytes: dict[int, dict[str, int]] = {}  # 1-based epoch -> {"up", "down"}
        self._pending: list[tuple[str, Any]] = []  # (worker, ByteCount) of Register/Describe calls
        self.results: dict[str, Any] | None = None
        self.identity = settings.identity
        self.aggregator = agg_grpc.AggregatorStub(channel(settings.aggregator, identity=self.identity, peer="server"))
        self.clients = all_clients(self.setup)
        self.malicious = self.clients[self.clients >= self.setup.dataset.num_users]
        self.plan = plan_run(cfg, self.clients, self.setup.dataset.num_users)  # every round of the run (engine)
        self.refused: Counter[str] = Counter()  # what this orchestrator refused from workers, by reason
        self.retries = 0  # rounds rerun after an aggregator or store failure
        self._shards = {"client": settings.client_shards, "attacker": settings.attacker_shards}
        self._eval_refused: list[dict[str, Any]] = []  # the last evaluation's refused worker replies
        self._eval_by_worker: dict[str, int] = {}  # the last evaluation's users per worker
        self._lost_since: dict[tuple[str, tuple[int, int]], float] = {}  # unheld shard -> first seen
        self._pool = futures.ThreadPoolExecutor(max_workers=32)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ RPCs
    def Register(self, request, context):
        try:
            info = self._admit(request, peer_name(context) if self.identity is not None else "")
        except Refused as e:
            with self._lock:
                self.refused[f"register: {e.code.name}"] += 1
            observe.REFUSED.labels(f"register: {e.code.name}").inc()
            log.warning("refused Register of %r from %s: %s", request.worker_id[:64], context.peer(), e.reason)
            context.abort(e.code, e.reason)
        shard = info.shard or (0, 0)
        reply = orchestrator_pb2.RegisterReply(run_id=self.run_id, config_json=self.cfg.to_json(),
                                               aggregator=self.settings.aggregator, shard_index=shard[0],
                                               shard_count=shard[1])
        self._note(info.worker_id, request, "up", "Orchestrator.Register request")
        self._note(info.worker_id, reply, "down", "Orchestrator.Register reply")
        return reply

    def _admit(self, request, peer: str) -> WorkerInfo:
        """The registration of a worker: a heartbeat of a known one, or a new one with the users the
        orchestrator gives it (a free shard of its kind). Refused: bad fields, a kind the run does not
        have, a worker id held by another live worker, no free shard."""
        if not request.worker_id or not request.address or len(request.worker_id) > 128 or len(request.address) > 256:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "worker_id (<= 128 chars) and address (<= 256) are required")
        kind = request.kind or "client"
        if kind not in WORKER_KINDS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown worker kind {kind[:32]!r}; kinds: {WORKER_KINDS}")
        if kind == "attacker" and self.setup.num_malicious == 0:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this run has no attack: no users for an attacker worker")
        with self._lock:
            w = self.workers.get(request.worker_id)
            same = w is not None and (w.address, w.kind, w.peer) == (request.address, kind, peer)
            if w is not None and same and w.alive:
                return w  # heartbeat
        if w is not None and not same and w.alive and self._answers(w):
            raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                          f"worker id {request.worker_id!r} is held by a live worker at another address or identity")
        with self._lock:
            if w is not None:
                w.alive = False
            shard = self._free_shard(kind, (int(request.held_index), int(request.held_count)))
            users = frozenset(worker_users(self.setup, kind, shard).tolist())
            stub = worker_pb2_grpc.WorkerStub(channel(request.address, identity=self.identity, peer="worker"))
            info = WorkerInfo(request.worker_id, request.address, request.device[:32], stub, users=users, kind=kind,
                              shard=shard, peer=peer)
            self.workers[request.worker_id] = info
        log.info("%s worker %s registered at %s (shard %s, %d users)", kind, request.worker_id, request.address,
                 "all" if shard is None else f"{shard[0]}/{shard[1]}", len(users))
        return info

    def _free_shard(self, kind: str, hint: tuple[int, int] = (0, 0)) -> tuple[int, int] | None:
        """The shard ``hint`` the worker held before, if no live worker holds it now, else the
        lowest free shard of ``kind`` (None when the kind is unsharded). Raises :class:`Refused`
        when every shard is held. Call with the lock held."""
        n = self._shards[kind]
        if n == 0:
            return None
        held = {w.shard for w in self.workers.values() if w.alive and w.kind == kind}
        if hint[1] == n and 0 <= hint[0] < n and hint not in held:
            return hint
        for i in range(n):
            if (i, n) not in held:
                return (i, n)
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"all {n} {kind} shards are held by live workers; this run takes no more {kind} workers")

    @staticmethod
    def _answers(w: WorkerInfo) -> bool:
        try:
            w.stub.Describe(worker_pb2.DescribeRequest(), timeout=3.0)
            return True
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def _note(self, worker: str, msg: Any, direction: str, what: str) -> None:
        """Count a registration-time message (uncompressed: the worker has no config yet); it goes
        into the ledger with the next round."""
        c = ledger_mod.count(msg, kind="control", direction=direction, link="worker-orchestrator", what=what)
        with self._lock:
            self._pending.append((worker, c))

    def _flush_pending(self, led: Ledger) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for worker, c in pending:
            led.add_count(c, worker=worker, phase="register")

    def GetStatus(self, request, context):
        with self._lock:
            n = sum(1 for w in self.workers.values() if w.alive)
        last: dict[str, Any] = next((e for e in reversed(self.epochs) if "hr@10" in e), {})
        return orchestrator_pb2.RunStatus(
            run_id=self.run_id, state=self.state, epoch=self.epochs_done, epochs=self.cfg.epochs,
            round_id=self.round_id, model_version=self.round_id, workers=n, last_metrics_json=json.dumps(last),
            message=self.message, bytes_up=self.bytes_up, bytes_down=self.bytes_down,
            results_json=json.dumps(self.results) if self.results else "")

    def Stop(self, request, context):
        self._stop.set()
        self.message = f"stop requested: {request.reason}" if request.reason else "stop requested"
        return orchestrator_pb2.StopReply(stopping=True)

    # ------------------------------------------------------------------ run loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_guarded, name="orchestrator-run", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except Exception as e:  # noqa: BLE001 - the run's failure is reported through GetStatus
            log.exception("run failed")
            self.state, self.message = "failed", f"{type(e).__name__}: {e}"

    def _refresh_workers(self) -> list[WorkerInfo]:
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            if w.ready and w.alive:
                continue
            try:
                dreq = worker_pb2.DescribeRequest()
                d = w.stub.Describe(dreq, timeout=5.0)
                self._note(w.worker_id, dreq, "down", "Worker.Describe request")
                self._note(w.worker_id, d, "up", "Worker.Describe reply")
                w.alive = True
                if d.ready and d.run_id == self.run_id:
                    if frozenset(d.users) != w.users:  # it must host exactly what it was given
                        log.warning("worker %s hosts %d users, not the %d of its shard: not used", w.worker_id,
                                    len(d.users), len(w.users))
                        continue
                    w.ready = True
                    log.info("worker %s ready with %d users", w.worker_id, len(d.users))
            except grpc.RpcError:
                w.alive = False
        for kind in WORKER_KINDS:
            observe.WORKERS.labels(kind, "live").set(sum(w.alive and w.ready for w in workers if w.kind == kind))
            observe.WORKERS.labels(kind, "dead").set(sum(not w.alive for w in workers if w.kind == kind))
        return workers

    def _await_lost_shards(self) -> list[WorkerInfo]:
        """The workers for the next round. A shard whose worker died gets ``shard_grace`` seconds,
        counted from when it was first found unheld, for a (restarted) worker to take it again
        before rounds go on without its users; a shard lost for good costs that wait once."""
        while True:
            workers = self._refresh_workers()
            held = {(w.kind, w.shard) for w in workers if w.alive and w.ready and w.shard is not None}
            now = time.time()
            lost = [(k, (i, n)) for k, n in self._shards.items() for i in range(n) if (k, (i, n)) not in held]
            for key in list(self._lost_since):
                if key not in lost:
                    del self._lost_since[key]
            waiting = [key for key in lost if now - self._lost_since.setdefault(key, now) < self.settings.shard_grace]
            if not waiting or self._stop.is_set():
                return workers
            self.message = f"waiting up to {self.settings.shard_grace:.0f}s for a worker to take shard(s) {waiting}"
            time.sleep(0.2)

    def _wait_for_workers(self) -> None:
        deadline = time.time() + self.settings.worker_wait
        while not self._stop.is_set():
            ready = [w for w in self._refresh_workers() if w.ready and w.alive]
            if len(ready) >= self.settings.min_workers:
                return
            if time.time() > deadline:
                raise TimeoutError(f"only {len(ready)} of {self.settings.min_workers} workers became ready within "
                                   f"{self.settings.worker_wait:.0f}s")
            self.message = f"waiting for workers ({len(ready)}/{self.settings.min_workers} ready)"
            time.sleep(0.2)

    def run(self) -> None:
        cfg = self.cfg
        observe.set_context(run=self.run_id)
        self.store.put_config(cfg.to_dict())
        self._wait_for_workers()
        if self._stop.is_set():
            self.state = "stopped"
            return
        start_req, start = self._start_run()
        self.num_parameters = int(start.num_parameters)
        schedule = self.plan
        done = int(start.head_version)
        self._load_ledger()
        led = Ledger(self.run_id, done, schedule[done].epoch + 1 if done < len(schedule) else cfg.epochs, "setup")
        led.add_message(start_req, compression=self._comp, kind="control", direction="internal",
                        link="orchestrator-aggregator", what="Aggregator.StartRun request")
        led.add_message(start, compression=self._comp, kind="control", direction="internal",
                        link="orchestrator-aggregator", what="Aggregator.StartRun reply")
        if start.store_bytes:
            led.add(kind="model_write", direction="internal", link="aggregator-store", what="store.put model:0",
                    bytes=start.store_bytes)
        self._commit(led)
        self._reconcile_rounds(done, schedule)
        self.epochs = self.store.records("epochs")
        if start.resumed:
            log.info("resuming run %s at round %d of %d", self.run_id, done, len(schedule))
            self.message = f"resumed at round {done}"
        self.round_id = done
        self.epochs_done = len(self.epochs)
        self.state = "running"
        # an epoch whose rounds all finished before a crash but whose evaluation did not
        if 0 < done <= len(schedule):
            prev_epoch = schedule[done - 1].epoch
            if last_of_epoch(schedule, done - 1) and len(self.epochs) <= prev_epoch:
                self._end_epoch(prev_epoch, 0.0, {})
        epoch_t0 = time.perf_counter()
        acc: dict[str, float] = {}
        for rid in range(done, len(schedule)):
            if self._stop.is_set():
                self.state = "stopped"
                self._write()
                return
            rp = schedule[rid]
            summary = self._round_retrying(rp)
            acc["rounds"] = acc.get("rounds", 0) + (0 if rp.adversarial else 1)
            for k in ("accepted", "rejected", "missing", "malicious", "malicious_kept"):
                key = "malicious_updates" if k == "malicious" else k  # the in-process runner's key
                acc[key] = acc.get(key, 0) + summary[k]
            if last_of_epoch(schedule, rid):
                self._end_epoch(rp.epoch, time.perf_counter() - epoch_t0, acc)
                epoch_t0, acc = time.perf_counter(), {}
        self.state = "done"
        self._write()

    def _reconcile_rounds(self, head: int, schedule: list[RoundPlan]) -> None:
        """A round the server applied (head past it) whose record a crashed orchestrator never
        wrote gets a record saying so: every round id below the head has exactly one record."""
        have = {int(r["round"]) for r in self.store.records("rounds")}
        for rid in range(head):
            if rid not in have:
                log.warning("round %d was applied but its record was lost in a crash", rid)
                self._record_lost(rid, schedule[rid].epoch, len(schedule[rid].users))

    def _record_lost(self, rid: int, epoch: int, users: int) -> dict[str, Any]:
        """The record of round ``rid``, applied by the server, whose summary never reached us."""
        record = {"round": rid, "epoch": epoch + 1, "users": users, "accepted": 0, "rejected": 0, "missing": 0,
                  "malicious": 0, "malicious_kept": 0, "summary_lost": True}
        self.store.append_record("rounds", record)
        return record

    def _start_run(self):
        """Bind the aggregator to this run (new, or resumed from the store head); (request, reply)."""
        cfg = self.cfg
        start_req = agg_pb.StartRunRequest(run_id=self.run_id, config_json=cfg.to_json(),
                                           num_items=self.setup.dataset.num_items)
        try:
            start = self.aggregator.StartRun(start_req, timeout=CONTROL_TIMEOUT * 4, compression=self._grpc_comp)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(f"the aggregator refused the run: {e.details()}") from None
            raise
        if cfg.codec not in start.accepted_encodings:
            raise ValueError(f"the aggregator does not accept codec {cfg.codec!r} (it accepts "
                             f"{', '.join(start.accepted_encodings)}); pick one of those with --codec")
        return start_req, start

    def _round_retrying(self, rp: RoundPlan) -> dict[str, Any]:
        """:meth:`_round`, retried when the aggregator or the store fails under it (a restarted
        server has lost the open round; Redis may be restarting): wait, bind the server to the run
        again and rerun the round from the store head, up to :data:`ROUND_RETRIES` times. A round
        the server finished before it failed (head already past it) is not run twice."""
        rid = rp.round_id
        delay = 1.0
        for attempt in range(ROUND_RETRIES + 1):
            try:
                return self._round(rp)
            except (grpc.RpcError, StoreError) as e:
                code = e.code() if isinstance(e, grpc.RpcError) else None
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.INVALID_ARGUMENT) or attempt == ROUND_RETRIES or self._stop.is_set():
                    raise
                what = f"{e.code().name} {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                log.warning("round %d failed (%s); retrying in %.0f s (%d/%d)", rid, what, delay, attempt + 1,
                            ROUND_RETRIES)
                self.message = f"round {rid}: aggregator or store failed ({what[:80]}); retrying"
                with self._lock:
                    self.retries += 1
                observe.ROUND_RETRIES.inc()
            self._stop.wait(delay)
            delay = min(delay * 2, 15.0)
            try:
                _, start = self._start_run()
            except (grpc.RpcError, StoreError) as e:
                log.warning("round %d: the aggregator is not back yet: %s", rid, e)
                continue
            head = int(start.head_version)
            if head == rid + 1:  # the server wrote this round's version before it failed
                log.warning("round %d was completed by the server before the failure; its summary is lost", rid)
                self.round_id = rid + 1
                return self._record_lost(rid, rp.epoch, len(rp.users))
            if head != rid:
                raise RuntimeError(f"round {rid}: the store head is {head} after the aggregator came back")
        raise AssertionError("unreachable")

    def _round(self, rp: RoundPlan) -> dict[str, Any]:
        cfg = self.cfg
        rid, epoch, users, lr, adversarial = rp.round_id, rp.epoch, rp.users, rp.lr, rp.adversarial
        observe.set_context(round_id=rid)
        t0 = time.perf_counter()
        workers = self._await_lost_shards()
        plan, orphans = assign(users, workers)
        by_id = {w.worker_id: w for w in workers}
        tokens = {int(u): secrets.token_hex(16) for u in users.tolist()}  # one-time: (run, round, user)
        deadline = time.time() + self.settings.round_timeout
        led = Ledger(self.run_id, rid, epoch + 1, "train")
        ctl: dict[str, Any] = {"compression": self._comp, "kind": "control"}
        open_req = agg_pb.OpenRoundRequest(
            run_id=self.run_id, round_id=rid, model_version=rid, deadline_unix=deadline, lr=lr,
            assignments=[common_pb2.Assignment(user_id=u, token=t) for u, t in tokens.items()])
        opened = self.aggregator.OpenRound(open_req, timeout=CONTROL_TIMEOUT, compression=self._grpc_comp)
        led.add_message(open_req, direction="internal", link="orchestrator-aggregator",
                        what="Aggregator.OpenRound request", **ctl)
        led.add_message(opened, direction="internal", link="orchestrator-aggregator",
                        what="Aggregator.OpenRound reply", **ctl)
        calls = {}
        for wid, us in plan.items():
            req = worker_pb2.TrainRequest(
                run_id=self.run_id, round_id=rid, model_version=rid, deadline_unix=deadline, encoding=cfg.codec, accepted_encodings=list(opened.accepted_encodings),
                assignments=[common_pb2.Assignment(user_id=u, token=tokens[u]) for u in us], adversarial=adversarial)
            calls[wid] = by_id[wid].stub.Train.future(req, timeout=self.settings.round_timeout,
                                                      compression=self._grpc_comp)
            led.add_message(req, worker=wid, direction="down", link="worker-orchestrator",
                            what="Worker.Train request", **ctl)
        timings: dict[str, float] = {}
        failed = []
        refused = []
        for wid, fut in calls.items():
            try:
                rep = fut.result()
                for problem in led.add_counts(rep.ledger, worker=wid):
                    log.warning("round %d: worker %s reported an invalid ledger count: %s", rid, wid, problem)
                led.add_message(rep, worker=wid, direction="up", link="worker-orchestrator",
                                what="Worker.Train reply", **ctl)
                for k, v in rep.timings.items():
                    timings[k] = max(timings.get(k, 0.0), v)
            except grpc.RpcError as e:
                failed.append(wid)
                by_id[wid].alive = e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    and by_id[wid].alive
                log.warning("round %d: worker %s failed: %s %s", rid, wid, e.code().name, e.details())
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # a contract error: retrying cannot help
                    refused.append(f"worker {wid}: {e.details()}")
        if refused:
            raise RuntimeError(f"round {rid}: the Train request was refused ({'; '.join(refused)})")
        t_train = time.perf_counter() - t0
        close_req = agg_pb.CloseRoundRequest(run_id=self.run_id, round_id=rid)
        s = self.aggregator.CloseRound(close_req, timeout=CONTROL_TIMEOUT * 4, compression=self._grpc_comp)
        led.add_message(close_req, direction="internal", link="orchestrator-aggregator",
                        what="Aggregator.CloseRound request", **ctl)
        led.add_message(s, direction="internal", link="orchestrator-aggregator",
                        what="Aggregator.CloseRound reply", **ctl)
        reported = sum(e.bytes for e in led.entries if e.kind == "update")
        if s.bytes_received > reported:  # uploads of a worker whose Train reply never came back
            led.add(kind="update", direction="up", link="worker-aggregator", bytes=s.bytes_received - reported,
                    what="Aggregator.SubmitUpdates (counted by the aggregator; no worker report)")
        if s.store_bytes:
            led.add(kind="model_write", direction="internal", link="aggregator-store",
                    what=f"store.put model:{s.new_version}", bytes=s.store_bytes)
        if s.patch_bytes:
            led.add(kind="model_write", direction="internal", link="aggregator-store",
                    what=f"store.put patch:{s.new_version}", bytes=s.patch_bytes)
        if s.store_bytes_read:
            led.add(kind="model_download", direction="internal", link="aggregator-store",
                    what="store.get (serving GetModel)", bytes=s.store_bytes_read)
        self._flush_pending(led)
        bytes_up, bytes_down = self._commit(led)
        mal = set(self.malicious.tolist())
        in_round = [u for u in users.tolist() if u in mal]
        not_in = {r.user_id for r in s.rejected} | set(s.missing)
        _, n_kept = malicious_kept([u for u in users.tolist() if u not in not_in], list(s.kept_users) if s.kept_reported else None,
                                   mal)
        record = {
            # exact: accepted + rejected + missing == users (orphans, whom no worker hosts, are missing)
            "round": rid, "epoch": epoch + 1, "lr": lr, "users": len(users), "accepted": s.accepted,
            "rejected": len(s.rejected), "missing": len(s.missing), "orphans": len(orphans),
            "failed_workers": failed, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "updates": sum(1 for e in led.entries if e.kind == "update" and e.user >= 0),
            "update_bytes": sum(e.bytes for e in led.entries if e.kind == "update"),
            "bytes_received": s.bytes_received, "store_bytes": s.store_bytes, "seconds": time.perf_counter() - t0,
            "train_seconds": t_train, "worker_timings": timings, "server_timings": dict(s.timings),
            "rule": s.rule, "rule_info": json.loads(s.rule_info_json or "{}"),
            "rejections": [{"user": r.user_id, "reason": r.reason} for r in s.rejected][:20],
            # every upload the server refused since the last round, by reason (also strangers' and forgeries)
            "refused": dict(s.refused), "bytes_refused": s.bytes_refused,
            "refused_sample": [{"user": r.user_id, "reason": r.reason} for r in s.refused_sample],
            "malicious": len(in_round),
            "malicious_kept": n_kept,
        }
        if record["accepted"] + record["rejected"] + record["missing"] != record["users"]:
            log.error("round %d: accounting does not add up: %s", rid, record)
        self.store.append_record("rounds", record)
        self.round_id = rid + 1
        observe.ROUNDS.inc()
        observe.ROUND_SECONDS.observe(record["seconds"])
        observe.MODEL_VERSION.set(self.round_id)
        self.message = (f"epoch {epoch + 1}/{cfg.epochs} round {rid + 1}: {s.accepted} accepted, "
                        f"{len(s.rejected)} rejected, {record['missing']} missing")
        return record

    def _evaluate(self, version: int, led: Ledger) -> MetricSums:
        """Federated evaluation of every benign user on ``version``. Users whose host is gone, and
        those of a worker that fails mid-evaluation, go to the live client workers (each holds the
        benign users' data), up to :data:`EVAL_ATTEMPTS` times, so an epoch evaluates all users
        while one client worker lives. Replies are checked (:func:`check_eval_sums`)."""
        total = MetricSums()
        self._eval_refused, self._eval_by_worker = [], {}
        ctl: dict[str, Any] = {"compression": self._comp, "kind": "control", "link": "worker-orchestrator"}
        todo = self.setup.benign_users
        for attempt in range(EVAL_ATTEMPTS):
            workers = self._refresh_workers()
            plan, orphans = assign(todo, workers)
            spares = sorted(w.worker_id for w in workers if w.ready and w.alive and w.kind == "client")
            for i, u in enumerate(orphans if spares else []):
                plan.setdefault(spares[i % len(spares)], []).append(u)
            by_id = {w.worker_id: w for w in workers}
            futs = []
            for wid, us in plan.items():
                req = worker_pb2.EvaluateRequest(run_id=self.run_id, model_version=version, users=sorted(us))
                futs.append((wid, by_id[wid].stub.Evaluate.future(req, timeout=self.settings.round_timeout,
                                                                  compression=self._grpc_comp)))
                led.add_message(req, worker=wid, direction="down", what="Worker.Evaluate request", **ctl)
            failed: list[int] = [] if spares else list(orphans)
            for wid, f in futs:
                try:
                    rep = f.result()
                except grpc.RpcError as e:
                    by_id[wid].alive = by_id[wid].alive and e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                                                             grpc.StatusCode.DEADLINE_EXCEEDED)
                    log.warning("evaluation: worker %s failed (%s %s); its %d users go to another worker", wid,
                                e.code().name, e.details(), len(plan[wid]))
                    failed += plan[wid]
                    continue
                sums = sums_from_proto(rep.sums)
                problem = check_eval_sums(sums, len(plan[wid]), set(KS))
                if problem is not None:
                    with self._lock:
                        self.refused["evaluation: implausible sums"] += 1
                    observe.REFUSED.labels("evaluation: implausible sums").inc()
                    log.warning("evaluation: refused the sums of worker %s: %s", wid, problem)
                    self._eval_refused.append({"worker": wid, "users": len(plan[wid]), "reason": problem})
                    continue
                self._eval_by_worker[wid] = self._eval_by_worker.get(wid, 0) + sums.users
                total = total + sums
                for problem in led.add_counts(rep.ledger, worker=wid):
                    log.warning("evaluation: worker %s reported an invalid ledger count: %s", wid, problem)
                led.add_message(rep, worker=wid, direction="up", what="Worker.Evaluate reply", **ctl)
            if not failed:
                break
            todo = np.asarray(sorted(failed), dtype=np.int64)
            if attempt + 1 == EVAL_ATTEMPTS or not spares:
                log.warning("evaluation: %d benign users could not be evaluated (no live client worker)", len(todo))
        return total

    # ------------------------------------------------------------------ ledger
    def _commit(self, led: Ledger) -> tuple[int, int]:
        """Store ``led``'s entries (stream "ledger") and add them to the running sums; returns the
        entries' (bytes up, bytes down)."""
        self.store.append_records(ledger_mod.STREAM, led.dicts())
        t = ledger_mod.totals(led.entries)
        for e in led.entries:
            observe.BYTES.labels(e.direction, e.kind).inc(e.bytes)
        acc = self._epoch_bytes.setdefault(led.epoch, {"up": 0, "down": 0})
        acc["up"] += t["bytes_up"]
        acc["down"] += t["bytes_down"]
        self.bytes_up += t["bytes_up"]
        self.bytes_down += t["bytes_down"]
        return t["bytes_up"], t["bytes_down"]

    def _load_ledger(self) -> None:
        """Running sums from the stored ledger (a resumed run continues its accounting)."""
        self._epoch_bytes, self.bytes_up, self.bytes_down = {}, 0, 0
        for e in self.store.records(ledger_mod.STREAM):
            acc = self._epoch_bytes.setdefault(int(e["epoch"]), {"up": 0, "down": 0})
            if e["direction"] in ("up", "down"):
                acc[e["direction"]] += int(e["bytes"])
                if e["direction"] == "up":
                    self.bytes_up += int(e["bytes"])
                else:
                    self.bytes_down += int(e["bytes"])

    def _end_epoch(self, epoch: int, seconds: float, acc: dict[str, float]) -> None:
        cfg = self.cfg
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": cfg.lr_at(epoch), "train_seconds": seconds,
                               "round_id": self.round_id, **acc}
        if eval_due(cfg, epoch):
            t = time.perf_counter()
            led = Ledger(self.run_id, self.round_id - 1, epoch + 1, "eval")
            sums = self._evaluate(self.round_id, led)
            self._commit(led)
            row.update(sums.means())
            row["eval_users"] = sums.users
            for k, v in sums.means().items():
                observe.EXPERIMENT.labels(k).set(v)
            row["eval_workers"] = dict(self._eval_by_worker)  # who vouched for which share of the metrics
            if self._eval_refused:
                row["eval_refused"] = list(self._eval_refused)
            row["eval_seconds"] = time.perf_counter() - t
        row["seconds"] = seconds + row.get("eval_seconds", 0.0)
        eb = self._epoch_bytes.get(epoch + 1, {"up": 0, "down": 0})
        row["bytes_up"], row["bytes_down"] = eb["up"], eb["down"]
        self.epochs = [e for e in self.epochs if e["epoch"] != epoch + 1] + [row]
        self.store.append_record("epochs", row)
        self.epochs_done = epoch + 1
        if "hr@10" in row:
            log.info("epoch %d: HR@10 %.4f NDCG@10 %.4f ER@5 %.4f ER@10 %.4f", epoch + 1, row["hr@10"],
                     row["ndcg@10"], row["er@5"], row["er@10"])
        self._write()

    def _write(self) -> None:
        entries = self.store.records(ledger_mod.STREAM)
        totals = ledger_mod.totals(entries)
        summary = {"runner": "services", "run_id": self.run_id, "state": self.state, "rounds": self.round_id,
                   "bytes_up": totals["bytes_up"], "bytes_down": totals["bytes_down"],
                   "bytes_per_update": totals["bytes_per_update"], "codec": self.cfg.codec,
                   "compression": self.cfg.compression, "num_parameters": self.num_parameters,
                   "targets": list(self.setup.targets), "malicious_clients": int(len(self.malicious)),
                   "transport": "mtls" if self.identity is not None else "insecure",
                   "refused": dict(self.refused), "round_retries": self.retries}
        ledger = {"totals": totals, "per_round": ledger_mod.per_round(entries),
                  "definitions": ledger_mod.DEFINITIONS, "entries_file": "ledger.jsonl"}
        self.results = {"config": self.cfg.to_dict(), "epochs": self.epochs, "summary": summary, "ledger": ledger}
        if self.settings.out_dir:
            write_results(self.settings.out_dir, self.cfg.to_dict(), self.epochs, summary, extra={"ledger": ledger})
            Path(self.settings.out_dir, "rounds.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in self.store.records("rounds")))
            ledger_mod.write_jsonl(Path(self.settings.out_dir, "ledger.jsonl"), entries)
