"""A whole federation in this process for the ledger and codec tests: aggregator, orchestrator
and workers, each a real gRPC server on its own port, with a real Redis (the caller's URL).
The aggregator and worker servicers can be subclasses that record what they see."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from client.service import benign_population
from fedseq.config import ExperimentConfig
from fedseq.rpc import Service, channel
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2_grpc
from fedseq.worker import ModelSource, WorkerServicer
from orchestrator.service import Orchestrator, OrchestratorSettings
from server.service import AggregatorServicer


class CountingAggregator(AggregatorServicer):
    """Counts, independently of the ledger, the serialized bytes of every update it receives:
    ``(round, user) -> bytes`` summed over the update's UpdateChunk messages."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.update_bytes: dict[tuple[int, int], int] = defaultdict(int)
        self.submit_calls = 0
        self._count_lock = threading.Lock()

    def SubmitUpdates(self, request_iterator, context):
        def counted():
            key = None
            for chunk in request_iterator:
                if chunk.HasField("header"):
                    key = (chunk.header.round_id, chunk.header.user_id)
                with self._count_lock:
                    self.update_bytes[key] += len(chunk.SerializeToString())
                yield chunk

        with self._count_lock:
            self.submit_calls += 1
        return super().SubmitUpdates(counted(), context)


class RecordingWorker(WorkerServicer):
    """Records the serialized size of every Train request it gets and reply it sends."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.train_sizes: list[tuple[int, int, int]] = []  # (round, request bytes, reply bytes)

    def Train(self, request, context):
        reply = super().Train(request, context)
        self.train_sizes.append((request.round_id, len(request.SerializeToString()), len(reply.SerializeToString())))
        return reply


class Federation:
    """``workers`` sharded workers are added at once; more (unsharded) with :meth:`add_worker`. The
    run starts once ``min_workers`` (default: ``workers``, at least 1) are ready."""

    def __init__(self, redis_url: str, cfg: ExperimentConfig, workers: int = 2, out_dir: str | Path | None = None,
                 aggregator: Callable[..., AggregatorServicer] = CountingAggregator, serve_models: bool = False,
                 min_workers: int | None = None, **agg_kw) -> None:
        self.redis_url, self.cfg = redis_url, cfg
        self.agg = aggregator(lambda run_id: RedisStore.from_url(redis_url, run_id), **agg_kw)
        self.agg_svc = Service([(agg_grpc.add_AggregatorServicer_to_server, self.agg, "fedseq.v1.Aggregator")],
                               port=0, host="127.0.0.1").start()
        settings = OrchestratorSettings(aggregator=f"127.0.0.1:{self.agg_svc.port}", store_url=redis_url,
                                        min_workers=min_workers or max(workers, 1), round_timeout=60, worker_wait=60,
                                        out_dir=str(out_dir) if out_dir else None, serve_models=serve_models)
        self.orch = Orchestrator(cfg, settings)
        self.orch_svc = Service([(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, self.orch,
                                  "fedseq.v1.Orchestrator")], port=0, host="127.0.0.1").start()
        self.orch_stub = orchestrator_pb2_grpc.OrchestratorStub(channel(f"127.0.0.1:{self.orch_svc.port}"))
        self.services: list[Service] = []
        self.workers: list[RecordingWorker] = []
        for i in range(workers):
            self.add_worker(f"w{i}", (i, workers))

    def add_worker(self, name: str, shard: tuple[int, int] | None = None) -> RecordingWorker:
        w = RecordingWorker(name)
        svc = Service([(worker_pb2_grpc.add_WorkerServicer_to_server, w, "fedseq.v1.Worker")], port=0,
                      host="127.0.0.1").start()
        reply = self.orch_stub.Register(orchestrator_pb2.RegisterRequest(
            worker_id=name, address=f"127.0.0.1:{svc.port}", device="cpu"))
        cfg = ExperimentConfig.from_dict(json.loads(reply.config_json))
        w.attach(reply.run_id, benign_population(cfg, shard),
                 ModelSource(reply.run_id, reply.store_url, reply.aggregator, cfg.compression, cfg.model_delta))
        self.services.append(svc)
        self.workers.append(w)
        return w

    def run(self, timeout: float = 120) -> Orchestrator:
        self.orch.start()
        self.orch.join(timeout)
        return self.orch

    def close(self) -> None:
        self.orch.stop()
        self.orch.join(30)
        for svc in self.services:
            svc.stop(0)
        self.orch_svc.stop(0)
        self.agg_svc.stop(0)
