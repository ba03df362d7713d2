"""The orchestrator (gRPC ``fedseq.v1.Orchestrator``): the RPC handlers of one run. Workers
register (orchestrator/workers.py decides their users); an operator asks for the status or stops
the run; the run itself is orchestrator/run.py, the round engine's plan carried out over the
network (schedule, assignment, rounds on the aggregation server, evaluation, results, ledger,
resume after a crash)."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from fedseq.config import ExperimentConfig
from fedseq.experiment import Setup, client_weights, setup
from fedseq.store import RedisStore, patient
from fedseq.tls import peer_name
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from .run import EVAL_ATTEMPTS, ROUND_RETRIES, RunLoop, check_eval_sums
from .settings import OrchestratorSettings
from .workers import Refused, WorkerInfo, WorkerPool, assign

__all__ = ["EVAL_ATTEMPTS", "ROUND_RETRIES", "Orchestrator", "OrchestratorSettings", "Refused", "WorkerInfo",
           "WorkerPool", "assign", "check_eval_sums"]

log = logging.getLogger(__name__)


class Orchestrator(orchestrator_pb2_grpc.OrchestratorServicer):
    """Register, GetStatus and Stop over a :class:`WorkerPool` and a :class:`RunLoop`."""

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
        self.pool = WorkerPool(self.setup, self.run_id, settings.shards(), settings.identity, settings.shard_grace,
                               self._stop, roster=settings.roster)
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
    def Register(self, request, context):
        try:
            info = self.pool.admit(request, peer_name(context) if self.settings.identity is not None else "")
        except Refused as e:
            self.pool.count_refusal(f"register: {e.word}")
            log.warning("refused Register of %r from %s: %s", request.worker_id[:64], context.peer(), e.reason)
            context.abort(e.code, e.reason)
        shard = info.shard or (0, 0)
        reply = orchestrator_pb2.RegisterReply(run_id=self.run_id, config_json=self.cfg.to_json(),
                                               aggregator=self.settings.aggregator, shard_index=shard[0],
                                               shard_count=shard[1])
        self.pool.note(info.worker_id, request, "up", "Orchestrator.Register request")
        self.pool.note(info.worker_id, reply, "down", "Orchestrator.Register reply")
        return reply

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
        self.loop.message = f"stop requested: {request.reason}" if request.reason else "stop requested"
        return orchestrator_pb2.StopReply(stopping=True)
