"""The aggregation server as a service: its settings and ``build(settings)``, which the
``fedseq serve-server`` command, ``fedseq run`` (through that command), compose (likewise) and the
tests all call, so there is one way to wire it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedseq.fairshare import default_limit
from fedseq.rpc import LOOPBACK, Service
from fedseq.store import RedisStore, patient
from fedseq.tls import Identity
from fedseq.v1 import aggregator_pb2, aggregator_pb2_grpc

from .intake import CONTROL_THREADS, StreamLimits
from .service import ACCEPTED_CODECS, AggregatorServicer


@dataclass(frozen=True)
class ServerSettings:
    """store_url: the Redis the server writes model versions to (role ``server`` credentials).
    accept_codecs: the codecs it accepts updates in (a run asking for another is refused at StartRun).
    limits: concurrent upload streams, per certificate, and the byte rate below which one is cut.
    max_calls_per_identity: calls one certificate may have in flight, whatever the method
    (fedseq/fairshare.py; None: FEDSEQ_MAX_CALLS_PER_IDENTITY, else 8). The thread pool holds
    ``limits.max_streams`` + this + ``CONTROL_THREADS`` (32 by default): all upload slots taken and
    one identity's whole share of other calls still leave the control reserve to the orchestrator."""

    store_url: str
    port: int = 50051
    host: str = LOOPBACK
    identity: Identity | None = None  # mutual TLS with a ``server`` certificate; None: insecure
    max_update_bytes: int = 64 << 20
    accept_codecs: tuple[str, ...] = ACCEPTED_CODECS
    limits: StreamLimits = field(default_factory=StreamLimits)
    max_calls_per_identity: int | None = None

    def __post_init__(self) -> None:
        if self.max_update_bytes < 1:
            raise ValueError("max_update_bytes must be >= 1")
        if self.max_calls_per_identity is not None and self.max_calls_per_identity < 1:
            raise ValueError(f"max_calls_per_identity must be >= 1, got {self.max_calls_per_identity}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


@dataclass(frozen=True, eq=False)
class Server:
    settings: ServerSettings
    servicer: AggregatorServicer
    service: Service

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}" if self.service.host in ("0.0.0.0", "127.0.0.1") \
            else f"{self.service.host}:{self.service.port}"

    def stop(self, grace: float = 0.0) -> None:
        self.service.stop(grace)


def build(settings: ServerSettings, servicer_class: Callable[..., AggregatorServicer] = AggregatorServicer) -> Server:
    """A started aggregation server (gRPC ``Aggregator`` plus health and reflection)."""
    url = settings.store_url
    share = default_limit() if settings.max_calls_per_identity is None else settings.max_calls_per_identity
    servicer = servicer_class(lambda run_id: RedisStore.from_url(url, run_id, **patient()), settings.max_update_bytes,
                              settings.accept_codecs, settings.limits)
    service = Service([(aggregator_pb2_grpc.add_AggregatorServicer_to_server, servicer,
                        aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name)], port=settings.port,
                      host=settings.host, identity=settings.identity, max_calls_per_identity=share,
                      workers=settings.limits.max_streams + share + CONTROL_THREADS).start()
    return Server(settings, servicer, service)
