"""A worker as a service: its settings and ``build(settings, population)``, which ``fedseq
serve-client`` / ``serve-attacker``, ``fedseq run`` and compose (through those commands) and the
tests all call. The Worker contract (client/worker.py) is the same for every kind; the
*population* is the plug-in: benign users here (:func:`client.service.benign_population`), the
adversary's malicious clients in attacker/ (:func:`attacker.service.malicious_population_hosted`).

A built worker serves the Worker RPCs at once, registers with the orchestrator (retrying until
it answers), builds its population from the run config and the shard in the orchestrator's
authenticated reply, and re-registers as a heartbeat."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedseq.config import ExperimentConfig
from fedseq.device import resolve as resolve_device
from fedseq.rpc import LOOPBACK, Service
from fedseq.tls import Identity
from fedseq.v1 import worker_pb2, worker_pb2_grpc

from .service import benign_population
from .worker import (
    Hosted,
    ModelSource,
    WorkerServicer,
    config_from_reply,
    new_worker_id,
    register_loop,
    shard_from_reply,
)

log = logging.getLogger(__name__)

Population = Callable[[ExperimentConfig, "tuple[int, int] | None"], Hosted]  # (run config, shard) -> hosted users


@dataclass(frozen=True)
class WorkerSettings:
    """orchestrator: host:port to register with. advertise: the host peers use to reach this
    worker. aggregator: where to upload (None: the address in the orchestrator's reply).
    store_url: read models from this Redis with read-only worker credentials (None: through the
    aggregator's GetModel)."""

    orchestrator: str
    kind: str = "client"
    port: int = 0
    host: str = LOOPBACK
    advertise_host: str = "127.0.0.1"
    identity: Identity | None = None  # mutual TLS with a ``worker`` certificate; None: insecure
    worker_id: str | None = None
    aggregator: str | None = None
    store_url: str | None = None
    threads: int = 0  # torch threads (0: leave as is)
    device: str | None = None  # auto | cpu | cuda | cuda:N for this worker's compute (None: the run config's)
    heartbeat: float = 10.0
    register_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.orchestrator:
            raise ValueError("a worker needs the orchestrator's address")
        if self.kind not in ("client", "attacker"):
            raise ValueError(f"unknown worker kind {self.kind!r}; kinds: client, attacker")
        if self.device is not None:
            resolve_device(self.device)  # fail fast: a malformed name, or a GPU this process cannot use


@dataclass(eq=False)
class Worker:
    settings: WorkerSettings
    servicer: WorkerServicer
    service: Service
    stop_event: threading.Event = field(default_factory=threading.Event)
    attached: threading.Event = field(default_factory=threading.Event)
    failure: list[BaseException] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.settings.advertise_host}:{self.service.port}"

    def wait_attached(self, timeout: float = 60.0) -> Worker:
        """Block until the worker holds its run's population (raises on a registration failure)."""
        if not self.attached.wait(timeout) or self.failure:
            raise ConnectionError(f"worker {self.servicer.worker_id} did not attach: "
                                  f"{self.failure[0] if self.failure else 'timeout'}")
        return self

    def stop(self, grace: float = 0.0) -> None:
        self.stop_event.set()
        self.service.stop(grace)


def build(settings: WorkerSettings, population: Population | None = None,
          servicer_class: Callable[..., WorkerServicer] = WorkerServicer) -> Worker:
    """A started worker of ``settings.kind`` hosting ``population(run config, shard)`` (default:
    the benign users of :func:`client.service.benign_population`)."""
    population = population or benign_population
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = str(resolve_device(settings.device or "auto"))  # reported at registration; the run's config may say cpu
    # under TLS a worker is its certificate: its id defaults to the certificate's name (the roster's key)
    worker_id = settings.worker_id or (settings.identity.name if settings.identity else new_worker_id(settings.kind))
    servicer = servicer_class(worker_id, device, settings.identity)
    service = Service([(worker_pb2_grpc.add_WorkerServicer_to_server, servicer,
                        worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name)], port=settings.port,
                      host=settings.host, identity=settings.identity).start()
    worker = Worker(settings, servicer, service)

    def on_config(reply) -> None:
        cfg = config_from_reply(reply)
        if settings.device is not None:  # this worker's own device wins over the run's
            cfg = dataclasses.replace(cfg, device=settings.device)
        hosted = population(cfg, shard_from_reply(reply))
        aggregator = settings.aggregator or reply.aggregator
        servicer.attach(reply.run_id, hosted, ModelSource(reply.run_id, settings.store_url, aggregator,
                                                          cfg.compression, cfg.model_delta, settings.identity),
                        aggregator)
        worker.attached.set()

    def reg() -> None:
        try:
            register_loop(settings.orchestrator, servicer.worker_id, worker.address, device, settings.kind, on_config,
                          worker.stop_event, settings.identity, timeout=settings.register_timeout,
                          heartbeat=settings.heartbeat)
        except BaseException as e:  # noqa: BLE001 - reported by the caller (the process exits non-zero)
            worker.failure.append(e)
            log.error("worker failed: %s", e)
            worker.stop_event.set()
            worker.attached.set()

    threading.Thread(target=reg, daemon=True, name="register").start()
    return worker
