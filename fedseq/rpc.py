"""gRPC plumbing shared by every service: server construction with the standard health and
reflection services, mutual TLS and the role policy (fedseq/tls.py, fedseq/authz.py), the
per-identity fair share of the thread pool (fedseq/fairshare.py), channel options, chunking,
deadlines, and SIGTERM-driven shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .authz import POLICY, Refusals, RoleInterceptor
from .fairshare import FairShare, FairShareInterceptor, default_limit
from .tls import Identity, channel_options

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # 1 MiB per streamed message: far below gRPC's 4 MB default limit
MAX_MESSAGE_BYTES = 8 << 20  # accepted message size (a chunk plus headers, with margin)
CONTROL_TIMEOUT = 30.0  # seconds, for control-plane calls (open/close round, register, describe)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # servers accept the clients' 30 s keepalive pings on idle channels (default minimum: 5 min,
    # after which a server answers GOAWAY too_many_pings)
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    # a restarted peer is found again within about a second (gRPC's default backoff grows to 120 s,
    # during which every call on the channel fails at once)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# servers only: refuse a port another process already listens on (gRPC's default SO_REUSEPORT let
# two servers share one port and split its new connections between them)
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
LOOPBACK = "127.0.0.1"


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Split ``data`` into pieces of at most ``size`` bytes (one empty piece for empty data)."""
    if not data:
        yield b""
        return
    if len(data) <= size:  # one piece: the bytes themselves, no copy (the usual update fits one chunk)
        yield data if isinstance(data, bytes) else bytes(data)
        return
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


class Service:
    """A running gRPC server with health checking and reflection.

    ``services``: ``(add_fn, servicer, full_service_name)`` triples. ``port=0`` binds a free port;
    :attr:`port` tells which. ``host`` defaults to loopback: listening on other interfaces is a
    deliberate setting (``--host``/``FEDSEQ_HOST``). With ``identity`` the server speaks mutual TLS
    only and checks every call against the role policy (:attr:`refusals` counts what it refused);
    without, it is plaintext and open to any peer (``--insecure``).

    Every call of every service here (health and reflection too) counts against its caller's fair
    share (:mod:`fedseq.fairshare`): at most ``max_calls_per_identity`` in flight per certificate
    common name (per host without TLS), beyond that ``RESOURCE_EXHAUSTED``, counted in
    :attr:`refusals`. None: ``FEDSEQ_MAX_CALLS_PER_IDENTITY``, else
    :data:`fedseq.fairshare.DEFAULT_MAX_CALLS` (8, a third of the default 24 threads). It must be
    below ``workers``: one identity never holds the whole pool. ``self_bounded`` methods (full
    names) are left out of the fair share: their servicer bounds them itself (the orchestrator's
    worker streams, one per identity).
    """

    def __init__(self, services: Sequence[tuple], port: int = 0, host: str = LOOPBACK, workers: int = 24,
                 compression: grpc.Compression | None = None, identity: Identity | None = None,
                 policy=POLICY, max_calls_per_identity: int | None = None,
                 self_bounded: frozenset[str] = frozenset()) -> None:
        self.refusals = Refusals()
        cap = default_limit() if max_calls_per_identity is None else max_calls_per_identity
        if not 1 <= cap < workers:
            raise ValueError(f"max calls per identity must be in 1..{workers - 1} (below the {workers} threads of "
                             f"the service, so that one identity never holds them all), got {cap}")
        self.fair_share = FairShare(cap)
        self.workers = workers  # the thread pool's size
        # the role check first: a call its role may not make is refused without taking a slot
        interceptors: list[grpc.ServerInterceptor] = [RoleInterceptor(policy, self.refusals)] \
            if identity is not None else []
        interceptors.append(FairShareInterceptor(self.fair_share, self.refusals, exempt=self_bounded))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS,
                                  compression=compression, interceptors=interceptors)
        names = []
        for add, servicer, name in services:
            add(servicer, self.server)
            names.append(name)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if identity is not None:
                self.port = self.server.add_secure_port(address, identity.server_credentials())
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not listen on {address}: the port is in use or the address is not local")
        self.host = host
        self.secure = identity is not None
        self._names = names[:-2]
        self._stopped = threading.Event()

    def start(self) -> Service:
        self.server.start()
        for n in self._names:
            self.health.set(n, health_pb2.HealthCheckResponse.SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)

    def wait(self) -> None:
        self.server.wait_for_termination()


def channel(address: str, compression: str = "none", identity: Identity | None = None,
            peer: str | None = None) -> grpc.Channel:
    """A channel to ``address``; ``compression="gzip"`` compresses every request sent on it.

    With ``identity`` the channel is mutual TLS: it presents ``identity``'s certificate and accepts
    only a server holding a certificate of role ``peer`` from the same CA (README "Security
    model"); without, it is plaintext (``--insecure``)."""
    comp = grpc_compression(compression)
    if identity is None:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS, compression=comp)
    if peer is None:
        raise ValueError("a TLS channel needs the role of the peer it dials")
    return grpc.secure_channel(address, identity.channel_credentials(), options=GRPC_OPTIONS + channel_options(peer),
                               compression=comp)


def grpc_compression(name: str) -> grpc.Compression | None:
    """``"none"`` -> None (no compression), ``"gzip"`` -> ``grpc.Compression.Gzip``."""
    if name in ("", "none"):
        return None
    if name == "gzip":
        return grpc.Compression.Gzip
    raise ValueError(f"unknown compression {name!r}; known: none, gzip")


def wait_for_signal(until: threading.Event | None = None) -> bool:
    """Block until SIGTERM/SIGINT or ``until`` is set. Returns True when the process was orphaned
    instead (its ``fedseq run`` launcher, FEDSEQ_PARENT_PID, is gone)."""
    done = until or threading.Event()

    def handler(signum, _frame):
        log.info("signal %s: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    parent = os.environ.get("FEDSEQ_PARENT_PID")  # set by `fedseq run`: exit with the launcher
    while not done.is_set():
        done.wait(0.5)
        if parent and os.getppid() != int(parent):
            log.warning("launcher (pid %s) is gone: shutting down", parent)
            return True
    return False


def exit_orphaned() -> None:
    """Exit at once, without waiting for handler threads still computing or uploading (their
    peers are gone too)."""
    logging.shutdown()
    os._exit(0)


def serve_until_signal(service: Service, on_stop=None, port_file: str | None = None,
                       until: threading.Event | None = None) -> None:
    """Run ``service`` until SIGTERM/SIGINT (or ``until`` is set), then shut down gracefully
    (``on_stop`` first). ``port_file`` receives the bound port once serving (for launchers)."""
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(str(service.port))
        tmp.replace(port_file)
    orphaned = wait_for_signal(until)
    if on_stop:
        on_stop()
    service.stop(grace=0.5 if orphaned else 5.0)  # orphaned: its peers are going too
    if orphaned:
        exit_orphaned()


def deadline_left(deadline_unix: float, floor: float = 1.0) -> float:
    """Seconds until ``deadline_unix`` (at least ``floor``)."""
    return max(floor, deadline_unix - time.time())


def message_bytes(msgs: Iterable) -> int:
    return sum(m.ByteSize() for m in msgs)
