"""Per-identity fair share of a service's gRPC threads: one server interceptor, installed by
:class:`fedseq.rpc.Service` on every service, that counts the calls each caller has in flight and
refuses one beyond :data:`DEFAULT_MAX_CALLS` (or the service's setting) with ``RESOURCE_EXHAUSTED``.

Why: every call, streaming or not, holds one thread of the service's pool while it runs (a
Health.Watch stream under mutual TLS, an upload stream, a GetModel stream), and the pool is small
(24 threads; the aggregation server's is sized in server/app.py). Without a share, one worker
certificate opening 40 Health.Watch streams held every thread and the orchestrator's OpenRound and
CloseRound waited in the queue (rounds of 45 s instead of 1 s). With it, one identity holds at most
``limit`` threads, whatever the method, and the pools are sized to several identities' share plus
a reserve for control calls.

The identity is the verified certificate's common name alone (:func:`fedseq.tls.peer_name`), never
the address: a peer holding one certificate gets one share however many hosts or connections it
calls from. Without TLS (``--insecure``) there is no proof of anything, and the peer's host stands
in. A call is counted from when its handler starts until it returns: a unary or stream-request
handler when it returns or raises, a response stream when its generator ends, fails or is closed
(gRPC drops it when the client cancels; Health.Watch ends itself). A refused call is counted with
the role refusals (:class:`fedseq.authz.Refusals`, ``fedseq_rpc_refused_total{code="RESOURCE_EXHAUSTED"}``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc

from .authz import Refusals, wrap_handler
from .tls import peer_name, peer_role

log = logging.getLogger(__name__)

# Calls one identity may have in flight on one service. A worker needs at most its upload streams
# (server/intake.py StreamLimits.max_per_peer, 4) plus a GetModel and a health check or two; the
# orchestrator a few control calls (OpenRound/CloseRound/StartRun/GetModel on the server,
# Describe/Train/Evaluate on a worker). 8 leaves margin for both and is a third of a default pool.
DEFAULT_MAX_CALLS = 8
ENV = "FEDSEQ_MAX_CALLS_PER_IDENTITY"
_LOG_EVERY = 10.0  # seconds between two refusal warnings for one identity


def default_limit() -> int:
    """``FEDSEQ_MAX_CALLS_PER_IDENTITY`` when set (every service reads it), else :data:`DEFAULT_MAX_CALLS`."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_MAX_CALLS
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{ENV} must be an integer, got {value!r}") from None
    if limit < 1:
        raise ValueError(f"{ENV} must be >= 1, got {limit}")
    return limit


def peer_host(context: grpc.ServicerContext) -> str:
    """The host part of the call's peer address (``ipv4:127.0.0.1:5000`` -> ``ipv4:127.0.0.1``)."""
    return context.peer().rsplit(":", 1)[0]


def identity(context: grpc.ServicerContext) -> str:
    """Who a call counts against: ``cn:<common name>`` of the verified certificate, or, without
    one (``--insecure``), ``host:<peer host>``."""
    name = peer_name(context)
    return f"cn:{name}" if name else f"host:{peer_host(context)}"


class FairShare:
    """In-flight calls per identity, at most ``limit`` each."""

    def __init__(self, limit: int = DEFAULT_MAX_CALLS) -> None:
        if limit < 1:
            raise ValueError(f"max calls per identity must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()

    def acquire(self, who: str) -> int:
        """Take a slot for ``who``: 0 when taken, else the calls ``who`` already has (refused)."""
        with self._lock:
            n = self._calls[who]
            if n >= self.limit:
                return n
            self._calls[who] = n + 1
            return 0

    def release(self, who: str) -> None:
        with self._lock:
            n = self._calls[who] - 1
            if n > 0:
                self._calls[who] = n
            else:
                del self._calls[who]

    def in_flight(self) -> dict[str, int]:
        """Calls in flight by identity (identities with none are left out)."""
        with self._lock:
            return dict(self._calls)


class FairShareInterceptor(grpc.ServerInterceptor):
    """Holds every call of a service to its caller's :class:`FairShare` (see the module docstring)."""

    def __init__(self, share: FairShare, refusals: Refusals | None = None,
                 exempt: frozenset[str] = frozenset()) -> None:
        self.share = share
        self.exempt = exempt  # methods whose servicer bounds them itself
        self.refusals = refusals or Refusals()
        self._warned: dict[str, float] = {}

    def _admit(self, method: str, context: grpc.ServicerContext) -> str:
        who = identity(context)
        held = self.share.acquire(who)
        if held:
            self.refusals.add(method, peer_role(context), grpc.StatusCode.RESOURCE_EXHAUSTED)
            now = time.monotonic()
            if now - self._warned.get(who, -_LOG_EVERY) >= _LOG_EVERY:  # a flood logs one line per 10 s
                self._warned[who] = now
                log.warning("refused %s for %s (%s): %d calls in flight, the limit per identity is %d", method, who,
                            context.peer(), held, self.share.limit)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"fair share: {who} already has {held} calls in flight on this service, the limit per "
                          f"identity (--max-calls-per-identity / {ENV}); retry when one ends")
        return who

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        method = handler_call_details.method

        def wrap(behavior: Callable, streaming_response: bool) -> Callable:
            if streaming_response:
                def stream_counted(request, context):
                    who = self._admit(method, context)
                    try:
                        yield from behavior(request, context)
                    finally:  # ended, failed, or closed by gRPC after a cancellation
                        self.share.release(who)

                return stream_counted

            def counted(request, context):
                who = self._admit(method, context)
                try:
                    return behavior(request, context)
                finally:
                    self.share.release(who)

            return counted

        return wrap_handler(handler, wrap)
