"""A worker as a service: its settings and ``build(settings, population)``, which ``fedseq
serve-client`` / ``serve-attacker``, ``fedseq run`` and compose (through those commands) and the
tests all call. The Worker contract (client/worker.py) is the same for every kind; the
*population* is the plug-in: benign users here (:func:`client.service.benign_population`), the
adversary's malicious clients in attacker/ (:func:`attacker.service.malicious_population_hosted`).

A built worker listens on no port: it dials the orchestrator and keeps one stream open
(client/worker.py ``connect_loop``, retrying until the orchestrator answers and reconnecting when
the stream breaks), builds its population from the run config and the shard in the
orchestrator's authenticated welcome, and answers the tasks that come down the stream."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedseq.config import ExperimentConfig
from fedseq.device import resolve as resolve_device
from fedseq.tls import Identity

from .service import benign_population
from .worker import (
    HealthFile,
    Hosted,
    ModelSource,
    WorkerTasks,
    config_from_reply,
    connect_loop,
    new_worker_id,
    shard_from_reply,
)

log = logging.getLogger(__name__)

Population = Callable[[ExperimentConfig, "tuple[int, int] | None"], Hosted]  # (run config, shard) -> hosted users


@dataclass(frozen=True)
class WorkerSettings:
    """orchestrator: host:port to connect to (the worker dials out; it listens on no port).
    aggregator: where to upload (None: the address in the orchestrator's welcome). store_url:
    read models from this Redis with read-only worker credentials (None: through the
    aggregator's GetModel). health_file: where to write the worker's health for a container
    probe (``python -m fedseq.healthcheck --file``)."""

    orchestrator: str
    kind: str = "client"
    identity: Identity | None = None  # mutual TLS with a ``worker`` certificate; None: insecure
    worker_id: str | None = None
    aggregator: str | None = None
    store_url: str | None = None
    threads: int = 0  # torch threads (0: leave as is)
    device: str | None = None  # auto | cpu | cuda | cuda:N for this worker's compute (None: the run config's)
    heartbeat: float = 5.0  # until the orchestrator's welcome says its period
    register_timeout: float = 300.0  # seconds without a welcome before the worker gives up
    health_file: str | None = None

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
    tasks: WorkerTasks
    stop_event: threading.Event = field(default_factory=threading.Event)
    attached: threading.Event = field(default_factory=threading.Event)
    failure: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def wait_attached(self, timeout: float = 60.0) -> Worker:
        """Block until the worker holds its run's population (raises on a registration failure)."""
        if not self.attached.wait(timeout) or self.failure:
            raise ConnectionError(f"worker {self.tasks.worker_id} did not attach: "
                                  f"{self.failure[0] if self.failure else 'timeout'}")
        return self

    def stop(self, grace: float = 0.0) -> None:
        """Close the stream and stop (``grace`` seconds for it to go)."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(max(grace, 2.0))


def build(settings: WorkerSettings, population: Population | None = None,
          tasks_class: Callable[..., WorkerTasks] = WorkerTasks) -> Worker:
    """A started worker of ``settings.kind`` hosting ``population(run config, shard)`` (default:
    the benign users of :func:`client.service.benign_population`)."""
    population = population or benign_population
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = str(resolve_device(settings.device or "auto"))  # reported at registration; the run's config may say cpu
    # under TLS a worker is its certificate: its id defaults to the certificate's name (the roster's key)
    worker_id = settings.worker_id or (settings.identity.name if settings.identity else new_worker_id(settings.kind))
    tasks = tasks_class(worker_id, device, settings.identity)
    worker = Worker(settings, tasks)

    def on_config(welcome) -> None:
        cfg = config_from_reply(welcome)
        if settings.device is not None:  # this worker's own device wins over the run's
            cfg = dataclasses.replace(cfg, device=settings.device)
        hosted = population(cfg, shard_from_reply(welcome))
        aggregator = settings.aggregator or welcome.aggregator
        tasks.attach(welcome.run_id, hosted, ModelSource(welcome.run_id, settings.store_url, aggregator,
                                                         cfg.compression, cfg.model_delta, settings.identity),
                     aggregator)
        worker.attached.set()

    def connect() -> None:
        try:
            connect_loop(settings.orchestrator, tasks, settings.kind, on_config, worker.stop_event, settings.identity,
                         timeout=settings.register_timeout, health=HealthFile(settings.health_file),
                         heartbeat=settings.heartbeat)
        except BaseException as e:  # noqa: BLE001 - reported by the caller (the process exits non-zero)
            worker.failure.append(e)
            log.error("worker failed: %s", e)
            worker.stop_event.set()
            worker.attached.set()

    worker.thread = threading.Thread(target=connect, daemon=True, name="connect")
    worker.thread.start()
    return worker
