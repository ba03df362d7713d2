"""Container health check: ``python -m fedseq.healthcheck`` asks the fedseq service in this
container for its standard gRPC health status (``grpc.health.v1``) on ``127.0.0.1:$FEDSEQ_PORT``.

Exit 0 when it answers SERVING, 1 otherwise (Docker's and Kubernetes' convention). With
``FEDSEQ_TLS_DIR`` set it speaks mutual TLS with the service's own certificate
(``FEDSEQ_TLS_NAME``; set it explicitly, the check cannot guess it), which every fedseq server accepts for Health/Check.
A port of 0 or none means the service has no fixed port to check, which counts as healthy.

A worker listens on no port (it dials the orchestrator); it writes its health to a file instead
(``--health-file``/``FEDSEQ_HEALTH_FILE``, client/session.py ``HealthFile``). ``--file PATH`` checks
that file: healthy when it was rewritten within ``--max-age`` seconds (the worker's loop is alive,
connected or retrying), and with ``--ready`` also connected to the orchestrator and holding its
users. ``--file`` defaults to FEDSEQ_HEALTH_FILE when that is set.

It imports grpc and the TLS helpers only (no torch), so it is cheap to run every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .tls import Identity, TLSError, channel_options


def check(port: str, host: str = "127.0.0.1", tls_dir: str | None = None, tls_name: str | None = None,
          timeout: float = 4.0) -> tuple[bool, str]:
    """(healthy, reason)."""
    if port in ("", "0"):
        return True, "no fixed port: nothing to check"
    address = f"{host}:{port}"
    if tls_dir:
        if not tls_name:
            return False, "FEDSEQ_TLS_DIR is set but no certificate name (FEDSEQ_TLS_NAME or --name)"
        try:
            ident = Identity.load(tls_dir, tls_name)
        except TLSError as e:
            return False, str(e)
        # the service holds a certificate of the same role as the one it was given: its own
        ch = grpc.secure_channel(address, ident.channel_credentials(), options=channel_options(ident.role))
    else:
        ch = grpc.insecure_channel(address)
    try:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as e:
        return False, f"{address}: {e.code().name}: {e.details()}"
    finally:
        ch.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def check_file(path: str, max_age: float = 60.0, ready: bool = False) -> tuple[bool, str]:
    """(healthy, reason) from a worker's health file."""
    import json
    import time

    try:
        with open(path) as f:
            state = json.load(f)
        age = time.time() - float(state["time"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"{path}: {type(e).__name__}: {e}"
    if age > max_age:
        return False, f"{path}: written {age:.0f}s ago (more than {max_age:.0f}s): the worker's loop is stuck or gone"
    if ready and not state.get("ready"):
        return False, f"{path}: {'connected, still loading its users' if state.get('connected') else 'not connected'}"
    return True, f"{path}: {'ready' if state.get('ready') else 'connected' if state.get('connected') else 'alive'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedseq.healthcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", default=os.environ.get("FEDSEQ_PORT", ""))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--tls-dir", default=os.environ.get("FEDSEQ_TLS_DIR") or None)
    ap.add_argument("--name", default=os.environ.get("FEDSEQ_TLS_NAME") or None,
                    help="certificate name in --tls-dir (FEDSEQ_TLS_NAME)")
    ap.add_argument("--timeout", type=float, default=4.0)
    ap.add_argument("--file", default=os.environ.get("FEDSEQ_HEALTH_FILE") or None,
                    help="a worker's health file (FEDSEQ_HEALTH_FILE) instead of a gRPC health check")
    ap.add_argument("--max-age", type=float, default=60.0, help="with --file: seconds the file may be old")
    ap.add_argument("--ready", action="store_true", help="with --file: also connected and holding its users")
    args = ap.parse_args(argv)
    if args.file:
        ok, why = check_file(args.file, args.max_age, args.ready)
    else:
        ok, why = check(args.port, args.host, args.tls_dir, args.name, args.timeout)
    print(("healthy: " if ok else "unhealthy: ") + why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
