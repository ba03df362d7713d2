"""The orchestrator as a service: ``build(cfg, settings)``, which ``fedseq serve-orchestrator``,
``fedseq run`` and compose (through that command) and the tests all call. The run loop starts
with :meth:`OrchestratorApp.start` (after the caller has added what it needs, e.g. workers)."""

from __future__ import annotations

from dataclasses import dataclass

from fedseq.config import ExperimentConfig
from fedseq.experiment import Setup
from fedseq.rpc import Service
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc

from .service import Orchestrator
from .settings import OrchestratorSettings

__all__ = ["OrchestratorApp", "OrchestratorSettings", "build"]

# the pool bounds the worker streams itself (one per identity, ``worker_limit`` in all): a stream is
# not a call in flight of the fair share, which would let at most 8 insecure workers share a host
CONNECT = "/fedseq.v1.Orchestrator/Connect"


@dataclass(frozen=True, eq=False)
class OrchestratorApp:
    settings: OrchestratorSettings
    servicer: Orchestrator
    service: Service

    @property
    def address(self) -> str:
        host = self.service.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '127.0.0.1') else host}:{self.service.port}"

    def start(self) -> OrchestratorApp:
        """Start the run loop (it waits for ``min_workers`` workers first)."""
        self.servicer.start()
        return self

    def stop(self, grace: float = 0.0, join: float = 30.0) -> None:
        self.servicer.stop()
        self.servicer.join(join)
        self.service.stop(grace)


def build(cfg: ExperimentConfig, settings: OrchestratorSettings, prepared: Setup | None = None) -> OrchestratorApp:
    """A serving orchestrator for run ``cfg`` (workers may register at once; the run loop is not
    started yet)."""
    orch = Orchestrator(cfg, settings, prepared)
    service = Service([(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, orch,
                        orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name)],
                      port=settings.port, host=settings.host, identity=settings.identity,
                      # a thread per worker stream, and 24 for the rest (operator calls, health checks)
                      workers=24 + settings.worker_limit(),
                      self_bounded=frozenset({CONNECT})).start()
    return OrchestratorApp(settings, orch, service)
