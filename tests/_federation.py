"""A whole federation in this process for the service, ledger, codec and adversary tests:
aggregator, orchestrator and workers, each a real gRPC server on its own loopback port, with a
real Redis (the caller's URL), and with ``tls_dir`` mutual TLS on every channel (one certificate
per service, as ``fedseq run`` makes them). Every service is made by its folder's ``build``, as
the ``fedseq serve-*`` commands make them; the aggregator servicer and the worker tasks can be subclasses
that record what they see."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

from attacker import app as attacker_app
from cli.plugins import prepare
from client import app as client_app
from client.worker import WorkerTasks
from fedseq import roster as roster_mod
from fedseq.config import ExperimentConfig
from fedseq.rpc import channel
from fedseq.tls import Identity, make_certs
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2
from orchestrator import app as orchestrator_app
from orchestrator.service import Orchestrator
from server import app as server_app
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


class RecordingWorker(WorkerTasks):
    """Records the serialized size of every Train task it gets and result it sends, as its
    stream carries them (the task id, below 128 in these runs, takes one byte)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.train_sizes: list[tuple[int, int, int]] = []  # (round, task message bytes, result message bytes)

    def Train(self, request):
        reply = super().Train(request)
        task = orchestrator_pb2.OrchestratorMessage(task=worker_pb2.Task(task_id=1, train=request))
        result = orchestrator_pb2.WorkerMessage(result=worker_pb2.TaskResult(task_id=1, train=reply))
        self.train_sizes.append((request.round_id, task.ByteSize(), result.ByteSize()))
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
                 worker_classes: tuple[Callable[..., WorkerTasks], ...] = (),
                 roster: roster_mod.Roster | None = None, **agg_kw) -> None:
        # one URL for every role, or {"server": ..., "orchestrator": ..., "worker": ...} (Redis ACL users)
        urls = dict.fromkeys(("server", "orchestrator", "worker"), redis_url) if isinstance(redis_url, str) \
            else dict(redis_url)
        self.redis_url, self.cfg, self.serve_models = urls["worker"], cfg, serve_models
        self.tls_dir = Path(tls_dir) if tls_dir else None
        if self.tls_dir:
            make_certs(self.tls_dir, {"server": "server", "orchestrator": "orchestrator", "operator": "operator"})
        self.server = server_app.build(server_app.ServerSettings(urls["server"], port=0, identity=self.identity("server"),
                                                                 **agg_kw), servicer_class=aggregator)
        self.agg, self.agg_svc = self.server.servicer, self.server.service
        self.aggregator = self.server.address
        if self.tls_dir and roster is None:  # the workers w0.. this federation adds, one shard each
            roster = roster_mod.make(workers, 0, client_names=[f"w{i}" for i in range(workers)])
        settings = orchestrator_app.OrchestratorSettings(
            aggregator=self.aggregator, store_url=urls["orchestrator"], min_workers=min_workers or max(workers, 1),
            round_timeout=60, worker_wait=60, out_dir=str(out_dir) if out_dir else None,
            client_shards=0 if roster is not None else workers, identity=self.identity("orchestrator"), port=0,
            roster=roster)
        self.orch_app = orchestrator_app.build(cfg, settings, prepare(cfg).setup)
        self.orch, self.orch_svc = self.orch_app.servicer, self.orch_app.service
        self.orchestrator = self.orch_app.address
        self.orch_stub = orchestrator_pb2_grpc.OrchestratorStub(
            channel(self.orchestrator, identity=self.identity("operator"), peer="orchestrator"))
        self.handles: list[client_app.Worker] = []
        self.workers: list[WorkerTasks] = []
        for i in range(workers):
            self.add_worker(f"w{i}", tasks=worker_classes[i] if i < len(worker_classes) else RecordingWorker)

    def identity(self, name: str, role: str | None = None) -> Identity | None:
        """The TLS identity ``name`` (made on first use with ``role``), or None without TLS."""
        if self.tls_dir is None:
            return None
        if not (self.tls_dir / f"{name}.pem").exists():
            make_certs(self.tls_dir, {name: role or "worker"})
        return Identity.load(self.tls_dir, name)

    def add_worker(self, name: str, kind: str = "client",
                   tasks: Callable[..., WorkerTasks] = RecordingWorker) -> WorkerTasks:
        """A worker built as ``fedseq serve-client``/``serve-attacker`` builds one; it registers and
        the orchestrator names its shard. Returns once it holds its population."""
        settings = client_app.WorkerSettings(self.orchestrator, kind=kind, identity=self.identity(name, "worker"),
                                             worker_id=name, store_url=None if self.serve_models else self.redis_url)
        build = client_app.build if kind == "client" else attacker_app.build
        handle = build(settings, tasks_class=tasks).wait_attached(60)
        self.handles.append(handle)
        self.workers.append(handle.tasks)
        return handle.tasks

    def run(self, timeout: float = 120) -> Orchestrator:
        self.orch.start()
        self.orch.join(timeout)
        return self.orch

    def close(self) -> None:
        self.orch.stop()
        self.orch.join(30)
        for h in self.handles:
            h.stop(0)
        self.orch_svc.stop(0)
        self.agg_svc.stop(0)
