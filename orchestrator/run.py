"""The orchestrator's run loop, top to bottom: wait for workers, bind the aggregation server to
the run (new, or resumed from the store head), then for every round of the round engine's plan
(fedseq/engine.py): open it on the server with one-time tokens, ask the workers that host its
users to train them, close it, record it; after the last round of an epoch, evaluate (when the
engine says so) and write the results. A round whose server or store fails is rerun from the
store head; the communication ledger is committed round by round.

Round ids are global: round r trains on model version r and produces version r + 1, so the store
head *is* the number of completed rounds and a restarted orchestrator continues from it."""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedseq import ledger as ledger_mod
from fedseq import observe
from fedseq.config import ExperimentConfig
from fedseq.engine import RoundPlan, malicious_kept, plan_run, privacy_summary
from fedseq.experiment import Setup, all_clients
from fedseq.ledger import Ledger
from fedseq.metrics import KS, MetricSums, sums_from_proto
from fedseq.results import write_results
from fedseq.rpc import CONTROL_TIMEOUT, channel, grpc_compression
from fedseq.runloop import RoundFailed, RoundTally, run_rounds
from fedseq.store import RedisStore, StoreError
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, worker_pb2

from .settings import OrchestratorSettings
from .workers import WorkerPool, assign

log = logging.getLogger(__name__)

EVAL_ATTEMPTS = 3  # evaluation passes over the users whose worker failed




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



def latest_by(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """``records`` with one per value of ``key``, the last one written, in the order of first
    appearance. The store's appends are exactly once (fedseq/store.py); this reads runs stored
    before that, whose streams may hold a record twice (a retried append whose reply Redis lost)."""
    last = {r[key]: r for r in records}
    return [last[k] for k in dict.fromkeys(r[key] for r in records)]


def _log_progress(line: str) -> None:
    log.info("%s", line.lstrip("~"))


def _tally(record: dict[str, Any]) -> RoundTally:
    """A round record's counts, as the run loop sums them into the epoch's row."""
    return RoundTally({"accepted": record["accepted"], "rejected": record["rejected"], "missing": record["missing"],
                       "malicious_updates": record["malicious"], "malicious_kept": record["malicious_kept"]})


@dataclass
class _Trained:
    """A round between its Train tasks and its close: the assignment, the round's ledger, and
    what the workers answered."""

    plan: dict[str, list[int]]
    orphans: int
    led: Ledger
    t0: float
    t_train: float = 0.0
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    reported_updates: list[tuple[str, Any]] = field(default_factory=list)  # (worker, its own count of an upload)
    ledger_refused: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class RunLoop:
    """One run: its state (``state``, ``message``, ``round_id``, ``epochs``, bytes, ``results``)
    and the loop that advances it. The Orchestrator servicer reads the state and starts, stops
    and joins the loop."""

    def __init__(self, cfg: ExperimentConfig, settings: OrchestratorSettings, setup: Setup, store: RedisStore,
                 pool: WorkerPool, stop: threading.Event) -> None:
        self.cfg, self.settings, self.setup, self.store, self.pool = cfg, settings, setup, store, pool
        self.run_id = cfg.run_id or "run"
        self._stop = stop
        self._lock = threading.Lock()
        self.state = "waiting"
        self.message = ""
        self.round_id = 0
        self.epochs_done = 0
        self.epochs: list[dict[str, Any]] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.num_parameters = 0
        self.results: dict[str, Any] | None = None
        self.retries = 0  # rounds rerun after an aggregator or store failure
        self.warnings: list[str] = []  # what the run warned about (stall_warning)
        self._rule_scale = "sum"  # the rule's output scale, as the server's last round summary said
        # the communication ledger (fedseq/ledger.py): entries go to the store's "ledger" stream
        # round by round; these are running sums of it (rebuilt from the stream on resume)
        self._comp = cfg.compression
        self._grpc_comp = grpc_compression(cfg.compression)
        self._epoch_bytes: dict[int, dict[str, int]] = {}  # 1-based epoch -> {"up", "down"}
        self.identity = settings.identity
        # the orchestrator-server calls of a round are accounted by the channel itself (fedseq/ledger.py)
        counter = ledger_mod.CallCounter(link="orchestrator-aggregator", request_direction="internal",
                                         reply_direction="internal", compression=cfg.compression)
        self.aggregator = agg_grpc.AggregatorStub(
            ledger_mod.counted(channel(settings.aggregator, identity=self.identity, peer="server"), counter))
        self.clients = all_clients(setup)
        self.malicious = self.clients[self.clients >= setup.dataset.num_users]
        self.plan = plan_run(cfg, self.clients, setup.dataset.num_users)  # every round of the run (engine)
        self.privacy = privacy_summary(setup.privacy, self.plan, len(self.clients))  # None without a DP rule
        self._eval_refused: list[dict[str, Any]] = []  # the last evaluation's refused worker replies
        self._eval_by_worker: dict[str, int] = {}  # the last evaluation's users per worker
        self._thread: threading.Thread | None = None
        self._report_bounds = ledger_mod.ReportBounds()

    @property
    def state(self) -> str:
        """waiting, running, done, stopped or failed (GetStatus; ``fedseq_run_state``)."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        observe.set_run_state(value)

    def _say(self, message: str) -> None:
        self.message = message

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

    def run(self) -> None:
        """Wait for the workers, then walk the plan with the round engine's loop
        (fedseq/runloop.py ``run_rounds``), this class being its :class:`Federation`."""
        observe.set_context(run=self.run_id)
        self.store.put_config(self.cfg.to_dict())
        self.pool.wait_for(self.settings.min_workers, self.settings.worker_wait, self._say)
        if self._stop.is_set():
            self.state = "stopped"
            return
        outcome = run_rounds(self.cfg, self.plan, self, progress=_log_progress, stop=self._stop)
        self.state = outcome.state
        self.warnings = outcome.warnings
        self._write()

    # ------------------------------------------------------------ the Federation (fedseq/runloop.py)
    def resume(self) -> tuple[int, list[dict[str, Any]]]:
        """Bind the aggregator to the run (new, or resumed from the store head); the rounds done
        and the epoch rows recorded."""
        cfg, schedule = self.cfg, self.plan
        start_req, start = self._start_run()
        self.num_parameters = int(start.num_parameters)
        # a worker reports at most a whole fp32 model version per read (plus the safetensors header)
        self._report_bounds = ledger_mod.ReportBounds(max_model_bytes=4 * self.num_parameters + (1 << 20))
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
        self.epochs = latest_by(self.store.records("epochs"), "epoch")
        if start.resumed:
            log.info("resuming run %s at round %d of %d", self.run_id, done, len(schedule))
            self.message = f"resumed at round {done}"
        self.round_id = done
        self.epochs_done = len(self.epochs)
        observe.EPOCH.set(self.epochs_done)
        self.state = "running"
        return done, self.epochs

    @contextmanager
    def _transport(self) -> Iterator[None]:
        """Turn a failure of the aggregator or the store under a round into :class:`RoundFailed`
        (the loop reruns the round); a refusal (permission, authentication, invalid argument)
        stays what it is and ends the run."""
        try:
            yield
        except (grpc.RpcError, StoreError) as e:
            code = e.code() if isinstance(e, grpc.RpcError) else None
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.INVALID_ARGUMENT):
                raise
            what = f"{e.code().name} {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            self.message = f"round {self.round_id}: aggregator or store failed ({what[:80]}); retrying"
            with self._lock:
                self.retries += 1
            observe.ROUND_RETRIES.inc()
            raise RoundFailed(f"aggregator or store failed: {what}", e) from e

    def recover(self, rp: RoundPlan) -> RoundTally | None:
        """After a failed round: bind the server to the run again. A round the server finished
        before it failed (head already past it) is not run twice (None: rerun it)."""
        rid = rp.round_id
        try:
            _, start = self._start_run()
        except (grpc.RpcError, StoreError) as e:
            raise RoundFailed(f"the aggregator is not back yet: {e}", e) from e
        head = int(start.head_version)
        if head == rid + 1:  # the server wrote this round's version before it failed
            log.warning("round %d was completed by the server before the failure; its reply was lost", rid)
            self.round_id = rid + 1
            return _tally(self._record_applied(rp))
        if head != rid:
            raise RuntimeError(f"round {rid}: the store head is {head} after the aggregator came back")
        return None

    def rule_name(self) -> str:
        return self.cfg.defense

    def rule_scale(self) -> str:
        return self._rule_scale

    def _reconcile_rounds(self, head: int, schedule: list[RoundPlan]) -> None:
        """A round the server applied (head past it) whose record a crashed orchestrator never
        wrote gets a record saying so: every round id below the head has exactly one record."""
        have = {int(r["round"]) for r in self.store.records("rounds")}
        for rid in range(head):
            if rid not in have:
                log.warning("round %d was applied but its record was lost in a crash", rid)
                self._record_applied(schedule[rid])

    def _record_applied(self, rp: RoundPlan) -> dict[str, Any]:
        """The record of round ``rp``, applied by the server, whose reply never reached us: its
        counts from the summary the server stored with the version (fedseq/store.py
        ``round_summary``); what only the workers' answers said (failures, timings, the ledger) is
        gone with them. Without a stored summary (retention dropped it) the counts are lost too."""
        rid, users = rp.round_id, rp.users.tolist()
        raw = self.store.round_summary(rid + 1)
        if raw is None:
            record: dict[str, Any] = {"round": rid, "epoch": rp.epoch + 1, "users": len(users), "accepted": 0,
                                      "rejected": 0, "missing": 0, "malicious": 0, "malicious_kept": 0,
                                      "summary_lost": True}
        else:
            record = {"round": rid, "epoch": rp.epoch + 1, "lr": rp.lr, "users": len(users),
                      **self._summary_fields(users, agg_pb.RoundSummary.FromString(raw)), "summary_recovered": True}
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

    def train(self, rp: RoundPlan) -> _Trained:
        """Open round ``rp`` on the server with one-time tokens and the orchestrator's weights, send
        one Train task to each worker hosting its users, and collect their answers."""
        rid = rp.round_id
        observe.set_context(round_id=rid)
        t0 = time.perf_counter()
        workers = self.pool.await_lost_shards(self._say)
        plan, orphans = assign(rp.users, workers)
        by_id = {w.worker_id: w for w in workers}
        tokens = {int(u): secrets.token_hex(16) for u in rp.users.tolist()}  # one-time: (run, round, user)
        weights = self.setup.weights  # the orchestrator's, never the upload's (fedseq/experiment.py client_weights)
        assert weights is not None
        deadline = time.time() + self.settings.round_timeout
        led = Ledger(self.run_id, rid, rp.epoch + 1, "train")  # the channels account the calls made while it records
        open_req = agg_pb.OpenRoundRequest(
            run_id=self.run_id, round_id=rid, model_version=rid, deadline_unix=deadline, lr=rp.lr,
            assignments=[common_pb2.Assignment(user_id=u, token=t, weight=int(weights[u])) for u, t in tokens.items()])
        calls = {}
        with self._transport(), ledger_mod.recording(led):
            opened = self.aggregator.OpenRound(open_req, timeout=CONTROL_TIMEOUT, compression=self._grpc_comp)
            for wid, us in plan.items():
                req = worker_pb2.TrainRequest(
                    run_id=self.run_id, round_id=rid, model_version=rid, deadline_unix=deadline,
                    encoding=self.cfg.codec, accepted_encodings=list(opened.accepted_encodings),
                    adversarial=rp.adversarial,
                    assignments=[common_pb2.Assignment(user_id=u, token=tokens[u], weight=int(weights[u])) for u in us])
                calls[wid] = by_id[wid].link.call(req, timeout=self.settings.round_timeout)
        trained = _Trained(plan, len(orphans), led, t0)
        for wid, fut in calls.items():
            self._collect(rid, wid, fut, by_id[wid], trained)
        # The code a worker answers with is its word: one worker (an attacker's, say) refusing its
        # task costs only its own users this round; the run fails only when every worker refused
        # (a contract error of the run itself, e.g. an encoding no worker can send)
        if trained.refused and len(trained.refused) == len(calls):
            raise RuntimeError(f"round {rid}: the Train request was refused ({'; '.join(trained.refused)})")
        trained.t_train = time.perf_counter() - t0
        return trained

    def _collect(self, rid: int, wid: str, fut: Any, worker: Any, trained: _Trained) -> None:
        """Worker ``wid``'s answer to its Train task: its reported ledger counts (checked) and
        timings (bounded), or its failure."""
        try:
            rep = fut.result()
        except grpc.RpcError as e:
            trained.failed.append(wid)
            worker.alive = e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                and worker.alive
            log.warning("round %d: worker %s failed: %s %s", rid, wid, e.code().name, e.details())
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # a contract error: retrying cannot help
                trained.refused.append(f"worker {wid}: {e.details()[:200]}")
            return
        trained.reported_updates += [(wid, c) for c in rep.ledger[: 4 * len(trained.plan[wid]) + 16]
                                     if c.kind == "update"]
        for problem in trained.led.add_reported((c for c in rep.ledger if c.kind != "update"), self._report_bounds,
                                                worker=wid):
            trained.ledger_refused.append(f"{wid}: {problem}")
        # a worker's timings are its word: bounded to the round's time, kept apart as reported
        for k, v in list(rep.timings.items())[:8]:
            if math.isfinite(v) and 0 <= v <= self.settings.round_timeout:
                trained.timings[k[:32]] = max(trained.timings.get(k[:32], 0.0), v)

    def aggregate(self, rp: RoundPlan, trained: _Trained) -> RoundTally:
        """Close round ``rp`` on the server (it aggregates and writes the next version), account
        the round's bytes and write its record."""
        rid, led = rp.round_id, trained.led
        close_req = agg_pb.CloseRoundRequest(run_id=self.run_id, round_id=rid)
        with self._transport():
            with ledger_mod.recording(led):
                s = self.aggregator.CloseRound(close_req, timeout=CONTROL_TIMEOUT * 4, compression=self._grpc_comp)
            # update uploads as the aggregator measured them, user by user (a worker's count of its own
            # uploads is never the figure: README "Security model")
            worker_of = {u: wid for wid, us in trained.plan.items() for u in us}
            trained.ledger_refused += led.add_measured_updates(dict(s.user_bytes), worker_of,
                                                               trained.reported_updates, self._comp)
            if trained.ledger_refused:
                log.warning("round %d: %d worker ledger report(s) refused, e.g. %s", rid,
                            len(trained.ledger_refused), trained.ledger_refused[0])
            for n, what, kind in ((s.store_bytes, f"store.put model:{s.new_version}", "model_write"),
                                  (s.patch_bytes, f"store.put patch:{s.new_version}", "model_write"),
                                  (s.store_bytes_read, "store.get (serving GetModel)", "model_download")):
                if n:
                    led.add(kind=kind, direction="internal", link="aggregator-store", what=what, bytes=n)
            self.pool.flush_notes(led)
            bytes_up, bytes_down = self._commit(led)
            record = self._round_record(rp, trained, s, bytes_up, bytes_down)
            self.store.append_record("rounds", record)
        self.round_id = rid + 1
        observe.ROUNDS.inc()
        observe.ROUND_SECONDS.observe(record["seconds"])
        observe.MODEL_VERSION.set(self.round_id)
        self.message = (f"epoch {rp.epoch + 1}/{self.cfg.epochs} round {rid + 1}: {s.accepted} accepted, "
                        f"{len(s.rejected)} rejected, {record['missing']} missing")
        return _tally(record)

    def _round_record(self, rp: RoundPlan, trained: _Trained, s: Any, bytes_up: int, bytes_down: int
                      ) -> dict[str, Any]:
        """Round ``rp``'s record from the server's summary ``s`` and what the workers said."""
        users, led = rp.users.tolist(), trained.led
        record = {
            "round": rp.round_id, "epoch": rp.epoch + 1, "lr": rp.lr, "users": len(users),
            **self._summary_fields(users, s), "orphans": trained.orphans, "failed_workers": trained.failed, "train_refused": trained.refused[:5], "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            # workers whose stream ended since the previous round (a death between rounds fails no call)
            "lost_workers": self.pool.take_lost(),
            "updates": sum(1 for e in led.entries if e.kind == "update" and e.user >= 0),
            "update_bytes": sum(e.bytes for e in led.entries if e.kind == "update"),
            "store_bytes": s.store_bytes,
            "seconds": time.perf_counter() - trained.t0, "train_seconds": trained.t_train,
            "worker_timings": trained.timings, "worker_timings_source": "reported",
            "ledger_refused": len(trained.ledger_refused), "ledger_refused_sample": trained.ledger_refused[:5],
        }
        self._rule_scale = record["defense_info"].get("scale", self._rule_scale)
        if record["accepted"] + record["rejected"] + record["missing"] != record["users"]:
            log.error("round %d: accounting does not add up: %s", rp.round_id, record)
        return record

    def _summary_fields(self, users: list[int], s: Any) -> dict[str, Any]:
        """What the server's summary ``s`` of a round of ``users`` says, as round-record fields."""
        mal = set(self.malicious.tolist())
        not_in = {r.user_id for r in s.rejected} | set(s.missing)
        _, n_kept = malicious_kept([u for u in users if u not in not_in],
                                   list(s.kept_users) if s.kept_reported else None, mal)
        return {
            # exact: accepted + rejected + missing == users (orphans, whom no worker hosts, are missing)
            "accepted": s.accepted, "rejected": len(s.rejected), "missing": len(s.missing),
            "bytes_received": s.bytes_received, "server_timings": dict(s.timings),
            "defense": s.defense, "defense_info": json.loads(s.defense_info_json or "{}"),
            "rejections": [{"user": r.user_id, "reason": r.reason} for r in s.rejected][:20],
            # every upload the server refused since the last round, by reason (also strangers' and forgeries)
            "refused": dict(s.refused), "bytes_refused": s.bytes_refused,
            "refused_sample": [{"user": r.user_id, "reason": r.reason} for r in s.refused_sample],
            "malicious": sum(1 for u in users if u in mal),
            "malicious_kept": n_kept,
        }

    def _evaluate(self, version: int, led: Ledger) -> MetricSums:
        """Federated evaluation of every benign user (or the ``eval_users`` sample) on ``version``. Users whose host is gone, and
        those of a worker that fails mid-evaluation, go to the live client workers (each holds the
        benign users' data), up to :data:`EVAL_ATTEMPTS` times, so an epoch evaluates all users
        while one client worker lives. Replies are checked (:func:`check_eval_sums`)."""
        total = MetricSums()
        self._eval_refused, self._eval_by_worker = [], {}
        todo = self.setup.eval_users  # every benign user unless cfg.eval_users samples them
        for attempt in range(EVAL_ATTEMPTS):
            workers = self.pool.refresh()
            plan, orphans = assign(todo, workers)
            spares = sorted(w.worker_id for w in workers if w.ready and w.alive and w.kind == "client")
            for i, u in enumerate(orphans if spares else []):
                plan.setdefault(spares[i % len(spares)], []).append(u)
            by_id = {w.worker_id: w for w in workers}
            futs = []
            with ledger_mod.recording(led):  # the worker channels account requests and replies
                for wid, us in plan.items():
                    req = worker_pb2.EvaluateRequest(run_id=self.run_id, model_version=version, users=sorted(us))
                    futs.append((wid, by_id[wid].link.call(req, timeout=self.settings.round_timeout)))
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
                    self.pool.count_refusal("evaluation: implausible sums")
                    log.warning("evaluation: refused the sums of worker %s: %s", wid, problem)
                    self._eval_refused.append({"worker": wid, "users": len(plan[wid]), "reason": problem})
                    continue
                self._eval_by_worker[wid] = self._eval_by_worker.get(wid, 0) + sums.users
                total = total + sums
                for problem in led.add_reported(rep.ledger, self._report_bounds, worker=wid):
                    log.warning("evaluation: refused a ledger count worker %s reported: %s", wid, problem)
            if not failed:
                break
            todo = np.asarray(sorted(failed), dtype=np.int64)
            if attempt + 1 == EVAL_ATTEMPTS or not spares:
                log.warning("evaluation: %d benign users could not be evaluated (no live client worker)", len(todo))
        return total

    def _commit(self, led: Ledger) -> tuple[int, int]:
        """Store ``led``'s entries (stream "ledger") and add them to the running sums; returns the
        entries' (bytes up, bytes down)."""
        led.settle()  # replies of counted calls are recorded on gRPC's threads
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

    def evaluate(self, epoch: int, version: int) -> dict[str, Any]:
        """The benign users' metrics on ``version`` (federated: :meth:`_evaluate`), with who
        vouched for which share and which replies were refused."""
        led = Ledger(self.run_id, version - 1, epoch + 1, "eval")
        sums = self._evaluate(version, led)
        self._commit(led)
        if sums.users == 0 and len(self.setup.eval_users):
            # metrics of no one would read as zeros (or as NaN): the run has none to report
            raise RuntimeError(f"epoch {epoch + 1}: no benign user could be evaluated (every evaluation reply "
                               f"failed or was refused: {self._eval_refused[:2]}); the run has no metrics")
        row: dict[str, Any] = {**sums.means(), "eval_users": sums.users}
        if self.settings.export_experiment:  # off by default: the metrics endpoint is unauthenticated
            for k, v in sums.means().items():
                observe.EXPERIMENT.labels(k).set(v)
        row["eval_workers"] = dict(self._eval_by_worker)  # who vouched for which share of the metrics
        if self._eval_refused:
            row["eval_refused"] = list(self._eval_refused)
        return row

    def record_epoch(self, row: dict[str, Any]) -> None:
        """Store the epoch's row (with its bytes from the ledger) and write the results."""
        epoch = int(row["epoch"])
        if "warning" in row:
            self.warnings.append(row["warning"])
        eb = self._epoch_bytes.get(epoch, {"up": 0, "down": 0})
        row["bytes_up"], row["bytes_down"] = eb["up"], eb["down"]
        self.epochs = [e for e in self.epochs if e["epoch"] != epoch] + [row]
        self.store.append_record("epochs", row)
        self.epochs_done = epoch
        observe.EPOCH.set(epoch)
        if "hr@10" in row:
            log.info("epoch %d: HR@10 %.4f NDCG@10 %.4f ER@5 %.4f ER@10 %.4f", epoch, row["hr@10"],
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
                   "refused": dict(self.pool.refused), "round_retries": self.retries}
        if self.warnings:
            summary["warnings"] = list(self.warnings)
        if self.privacy is not None:
            summary["privacy"] = self.privacy
        ledger = {"totals": totals, "per_round": ledger_mod.per_round(entries),
                  "definitions": ledger_mod.DEFINITIONS, "entries_file": "ledger.jsonl"}
        self.results = {"config": self.cfg.to_dict(), "epochs": self.epochs, "summary": summary, "ledger": ledger}
        if self.settings.out_dir:
            write_results(self.settings.out_dir, self.cfg.to_dict(), self.epochs, summary, extra={"ledger": ledger})
            Path(self.settings.out_dir, "rounds.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in latest_by(self.store.records("rounds"), "round")))
            ledger_mod.write_jsonl(Path(self.settings.out_dir, "ledger.jsonl"), entries)

