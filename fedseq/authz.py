"""Who may call what: one policy table for every fedseq RPC, checked in one place per service (a
gRPC server interceptor), by the role of the caller's verified certificate (:mod:`fedseq.tls`).

A call whose peer has no fedseq role, or a role the method does not allow, is refused before the
servicer sees it (``UNAUTHENTICATED`` / ``PERMISSION_DENIED``, with a reason) and counted in
:class:`Refusals` (and the Prometheus counter ``fedseq_rpc_refused_total``). Peers without a
certificate of the run's CA never get this far: the TLS handshake refuses them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping

import grpc
from prometheus_client import Counter as PromCounter

from .tls import ROLES, peer_name, peer_role

log = logging.getLogger(__name__)

ANY_ROLE: frozenset[str] = frozenset(ROLES)
ORCHESTRATOR = frozenset({"orchestrator"})
WORKER = frozenset({"worker"})
OPERATOR = frozenset({"operator"})

# method -> roles allowed to call it. Every RPC of protos/fedseq/v1 is listed (a test checks);
# a method missing here is refused to everyone.
POLICY: Mapping[str, frozenset[str]] = {
    # round and run control only from the orchestrator; uploads only from workers
    "/fedseq.v1.Aggregator/StartRun": ORCHESTRATOR,
    "/fedseq.v1.Aggregator/OpenRound": ORCHESTRATOR,
    "/fedseq.v1.Aggregator/CloseRound": ORCHESTRATOR,
    "/fedseq.v1.Aggregator/SubmitUpdates": WORKER,
    "/fedseq.v1.Aggregator/GetModel": frozenset({"worker", "orchestrator"}),
    # workers connect (their tasks come down that stream: nothing calls a worker); the operator
    # (a person, `fedseq run`) watches and stops the run
    "/fedseq.v1.Orchestrator/Connect": WORKER,
    "/fedseq.v1.Orchestrator/GetStatus": OPERATOR,
    "/fedseq.v1.Orchestrator/Stop": OPERATOR,
    # standard services: any holder of a run certificate (health checks, grpcurl)
    "/grpc.health.v1.Health/Check": ANY_ROLE,
    "/grpc.health.v1.Health/Watch": ANY_ROLE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY_ROLE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY_ROLE,
}

REFUSED_METRIC = PromCounter("fedseq_rpc_refused_total",
                             "RPCs refused by the role policy, or beyond the caller's fair share (RESOURCE_EXHAUSTED)",
                             ["method", "role", "code"])


class Refusals:
    """Refused calls of one service, by (method, caller role or 'none', status code name): the role
    policy's (UNAUTHENTICATED, PERMISSION_DENIED) and the fair share's (RESOURCE_EXHAUSTED,
    :mod:`fedseq.fairshare`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def add(self, method: str, role: str | None, code: grpc.StatusCode) -> None:
        key = (method, role or "none", code.name)
        with self._lock:
            self.counts[key] += 1
        REFUSED_METRIC.labels(*key).inc()

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self.counts)


def check(method: str, context: grpc.ServicerContext, policy: Mapping[str, frozenset[str]],
          refusals: Refusals) -> None:
    """Abort the call unless its peer's role may call ``method``."""
    role = peer_role(context)
    allowed = policy.get(method, frozenset())
    if role is None:
        refusals.add(method, None, grpc.StatusCode.UNAUTHENTICATED)
        log.warning("refused %s: the peer %s holds no fedseq role certificate", method, context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      f"{method} needs a certificate with a fedseq role ({', '.join(sorted(allowed)) or 'none'})")
    if role not in allowed:
        refusals.add(method, role, grpc.StatusCode.PERMISSION_DENIED)
        log.warning("refused %s for %s (role %s, %s)", method, peer_name(context), role, context.peer())
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"role {role!r} may not call {method}" + (f" (allowed: {', '.join(sorted(allowed))})"
                                                                  if allowed else " (no role may)"))


class RoleInterceptor(grpc.ServerInterceptor):
    """Checks :data:`POLICY` (or ``policy``) on every call before the servicer runs."""

    def __init__(self, policy: Mapping[str, frozenset[str]] = POLICY, refusals: Refusals | None = None) -> None:
        self.policy = policy
        self.refusals = refusals or Refusals()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def guard(behavior: Callable, streaming_response: bool) -> Callable:
            if streaming_response:
                def stream_guarded(request, context):
                    check(method, context, self.policy, self.refusals)
                    yield from behavior(request, context)

                return stream_guarded

            def guarded(request, context):
                check(method, context, self.policy, self.refusals)
                return behavior(request, context)

            return guarded

        return wrap_handler(handler, guard)


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """``handler`` with each of its behaviours replaced by ``wrap(behavior, streaming_response)``:
    how a server interceptor puts its check around every kind of call (unary or streaming)."""
    fields = {}
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, name)
        if behavior is not None:
            fields[name] = wrap(behavior, name.endswith("_stream"))
    return handler._replace(**fields)  # type: ignore[attr-defined]
