"""A whole federation in this process for the service, ledger, codec and adversary tests:
aggregator, orchestrator and workers, each a real gRPC server on its own loopback port, with a
real Redis (the caller's URL), and with ``tls_dir`` mutual TLS on every channel (one certificate
per service, as ``fedseq run`` makes them). The aggregator and worker servicers can be subclasses
that record what they see."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

from client.service import benign_population
from fedseq.config import ExperimentConfig
from fedseq.rpc import Service, channel
from fedseq.store import RedisStore
from fedseq.tls import Identity, make_certs
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2_grpc
from fedseq.worker import ModelSource, WorkerServicer, shard_from_reply
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
    """``workers`` workers, each given one of ``workers`` shards by the orchestrator, are added at
    once; with ``workers=0`` the run is unsharded and :meth:`add_worker` adds workers that may host
    every user. The run starts once ``min_workers`` (default: ``workers``, at least 1) are ready.
    ``serve_models``: workers get models through the aggregator's GetModel instead of the store.
    ``tls_dir``: make a CA and certificates there and run everything with mutual TLS."""

    def __init__(self, redis_url: str | Mapping[str, str], cfg: ExperimentConfig, workers: int = 2,
                 out_dir: str | Path | None = None,
                 aggregator: Callable[..., AggregatorServicer] = CountingAggregator, serve_models: bool = False,
                 min_workers: int | None = None, tls_dir: str | Path | None = None,
                 worker_classes: tuple[Callable[..., WorkerServicer], ...] = (), **agg_kw) -> None:
        # one URL for every role, or {"server": ..., "orchestrator": ..., "worker": ...} (Redis ACL users)
        urls = dict.fromkeys(("server", "orchestrator", "worker"), redis_url) if isinstance(redis_url, str) \
            else dict(redis_url)
        self.redis_url, self.cfg, self.serve_models = urls["worker"], cfg, serve_models
        self.tls_dir = Path(tls_dir) if tls_dir else None
        if self.tls_dir:
            make_certs(self.tls_dir, {"server": "server", "orchestrator": "orchestrator", "operator": "operator"})
        self.agg = aggregator(lambda run_id: RedisStore.from_url(urls["server"], run_id), **agg_kw)
        self.agg_svc = Service([(agg_grpc.add_AggregatorServicer_to_server, self.agg, "fedseq.v1.Aggregator")],
                               port=0, identity=self.identity("server")).start()
        self.aggregator = f"127.0.0.1:{self.agg_svc.port}"
        settings = OrchestratorSettings(aggregator=self.aggregator, store_url=urls["orchestrator"],
                                        min_workers=min_workers or max(workers, 1), round_timeout=60, worker_wait=60,
                                        out_dir=str(out_dir) if out_dir else None, client_shards=workers,
                                        identity=self.identity("orchestrator"))
        self.orch = Orchestrator(cfg, settings)
        self.orch_svc = Service([(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, self.orch,
                                  "fedseq.v1.Orchestrator")], port=0, identity=self.identity("orchestrator")).start()
        self.orchestrator = f"127.0.0.1:{self.orch_svc.port}"
        self.orch_stub = orchestrator_pb2_grpc.OrchestratorStub(
            channel(self.orchestrator, identity=self.identity("operator"), peer="orchestrator"))
        self.services: list[Service] = []
        self.workers: list[WorkerServicer] = []
        for i in range(workers):
            self.add_worker(f"w{i}", servicer=worker_classes[i] if i < len(worker_classes) else RecordingWorker)

    def identity(self, name: str, role: str | None = None) -> Identity | None:
        """The TLS identity ``name`` (made on first use with ``role``), or None without TLS."""
        if self.tls_dir is None:
            return None
        if not (self.tls_dir / f"{name}.pem").exists():
            make_certs(self.tls_dir, {name: role or "worker"})
        return Identity.load(self.tls_dir, name)

    def add_worker(self, name: str, kind: str = "client",
                   servicer: Callable[..., WorkerServicer] = RecordingWorker) -> WorkerServicer:
        """A worker registered as the worker processes do: the orchestrator names its shard."""
        ident = self.identity(name, "worker")
        w = servicer(name, identity=ident)
        svc = Service([(worker_pb2_grpc.add_WorkerServicer_to_server, w, "fedseq.v1.Worker")], port=0,
                      identity=ident).start()
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel(self.orchestrator, identity=ident, peer="orchestrator"))
        reply = stub.Register(orchestrator_pb2.RegisterRequest(
            worker_id=name, address=f"127.0.0.1:{svc.port}", device="cpu", kind=kind))
        cfg = ExperimentConfig.from_dict(json.loads(reply.config_json))
        store = None if self.serve_models else self.redis_url
        w.attach(reply.run_id, benign_population(cfg, shard_from_reply(reply)),
                 ModelSource(reply.run_id, store, reply.aggregator, cfg.compression, cfg.model_delta, ident),
                 reply.aggregator)
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
