"""``fedseq serve-*``: run one service as a process. Settings come from flags or ``FEDSEQ_*``
environment variables (flags win) and fail fast with a clear message; SIGTERM shuts down
gracefully.

Every service speaks mutual TLS with the certificate ``--tls-dir DIR --tls-name NAME`` (made by
``fedseq certs DIR``) and listens on loopback unless ``--host`` says otherwise; ``--insecure``
runs without TLS, open to any peer that can reach the port, and says so loudly."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from fedseq.config import ConfigError
from fedseq.rpc import exit_orphaned, serve_until_signal, wait_for_signal
from fedseq.tls import Identity, TLSError
from orchestrator.settings import OPERATOR_STOP

log = logging.getLogger("fedseq.cli")

_TRUE = ("1", "true", "yes", "on")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FEDSEQ_{name}", default)


def _required(value: str | None, flag: str, env: str) -> str:
    if not value:
        raise ConfigError(f"{flag} is required (or set FEDSEQ_{env})")
    return value


def _int(value: str | int | None, what: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None


def _float(value: str | float | None, what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None


def add_security_flags(p, role: str, listens: bool = True) -> None:
    """``--host`` (for a service that ``listens``), ``--tls-dir``, ``--tls-name``, ``--insecure``
    (FEDSEQ_HOST, FEDSEQ_TLS_DIR, FEDSEQ_TLS_NAME, FEDSEQ_INSECURE) for a service whose certificate
    has role ``role``."""
    if listens:
        p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                       help="interface to listen on (default loopback; 0.0.0.0 for all, as in containers)")
    p.add_argument("--tls-dir", default=_env("TLS_DIR"),
                   help="folder made by `fedseq certs`: ca.pem, NAME.pem, NAME.key (FEDSEQ_TLS_DIR)")
    p.add_argument("--tls-name", default=_env("TLS_NAME", role),
                   help=f"this service's certificate name in --tls-dir (default {role!r}; FEDSEQ_TLS_NAME)")
    p.add_argument("--insecure", action="store_true", default=(_env("INSECURE", "") or "").lower() in _TRUE,
                   help="no TLS and no role checks: any peer that reaches the port can call anything "
                        "(FEDSEQ_INSECURE=1); only for a network you trust")
    p.add_argument("--metrics-port", default=_env("METRICS_PORT"),
                   help="serve Prometheus metrics on this port at /metrics (0: any free port; FEDSEQ_METRICS_PORT)")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "127.0.0.1"),
                   help="interface of the metrics endpoint (default loopback: it is plain HTTP without "
                        "authentication, and the orchestrator's shows the run's ER@K; FEDSEQ_METRICS_HOST)")
    p.set_defaults(tls_role=role)


def start_metrics(args: argparse.Namespace) -> None:
    """The Prometheus endpoint, when ``--metrics-port`` is set; its port goes to ``<port-file>.metrics``."""
    from fedseq.observe import serve_metrics

    if args.metrics_port in (None, ""):
        return
    port = serve_metrics(_int(args.metrics_port, "--metrics-port"), args.metrics_host)
    log.warning("%s: Prometheus metrics on http://%s:%s/metrics", args.cmd, args.metrics_host, port)
    if args.port_file:
        Path(args.port_file + ".metrics").write_text(str(port))


def identity_from(args: argparse.Namespace) -> Identity | None:
    """The service's TLS identity, or None with ``--insecure`` (logged loudly). Fails fast when
    neither is given, when the files are missing, or when the certificate has another role."""
    if args.insecure:
        if args.tls_dir:
            raise ConfigError("--insecure and --tls-dir contradict each other; pick one")
        log.warning("INSECURE: %s runs without TLS; any peer that reaches it can call every RPC", args.cmd)
        return None
    if not args.tls_dir:
        raise ConfigError("mutual TLS needs --tls-dir (or FEDSEQ_TLS_DIR; make one with `fedseq certs DIR`); "
                          "pass --insecure (FEDSEQ_INSECURE=1) to run without TLS on a trusted network")
    try:
        ident = Identity.load(args.tls_dir, args.tls_name)
    except TLSError as e:
        raise ConfigError(str(e)) from None
    if ident.role != args.tls_role:
        raise ConfigError(f"certificate {args.tls_name!r} in {args.tls_dir} has role {ident.role!r}; "
                          f"{args.cmd} needs a {args.tls_role!r} certificate")
    return ident


def add_parsers(sub, add_experiment_flags) -> None:
    p = sub.add_parser("serve-server", help="aggregation server (gRPC Aggregator)")
    p.add_argument("--port", default=_env("PORT", "50051"))
    p.add_argument("--store-url", default=_env("STORE_URL"), help="redis://host:port/db (FEDSEQ_STORE_URL)")
    p.add_argument("--max-update-bytes", default=_env("MAX_UPDATE_BYTES", str(64 << 20)))
    _add_accept_codecs(p)
    p.add_argument("--max-upload-streams", default=_env("MAX_UPLOAD_STREAMS", "16"),
                   help="upload streams open at once (FEDSEQ_MAX_UPLOAD_STREAMS); more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-streams-per-peer", default=_env("MAX_STREAMS_PER_PEER", "4"),
                   help="upload streams one peer may hold open (FEDSEQ_MAX_STREAMS_PER_PEER)")
    p.add_argument("--upload-idle-timeout", default=_env("UPLOAD_IDLE_TIMEOUT", "30"),
                   help="seconds of the window in which an upload stream must send --upload-min-bytes, else it is "
                        "cancelled (FEDSEQ_UPLOAD_IDLE_TIMEOUT)")
    p.add_argument("--upload-min-bytes", default=_env("UPLOAD_MIN_BYTES", str(16 << 10)),
                   help="bytes an upload stream must send per --upload-idle-timeout window (FEDSEQ_UPLOAD_MIN_BYTES)")
    p.add_argument("--max-calls-per-identity", default=_env("MAX_CALLS_PER_IDENTITY"),
                   help="calls one certificate (one host with --insecure) may have in flight, any method (default 8; "
                        "FEDSEQ_MAX_CALLS_PER_IDENTITY, which every service reads); more get RESOURCE_EXHAUSTED")
    p.add_argument("--port-file", default=_env("PORT_FILE"))
    add_security_flags(p, "server")
    p.set_defaults(fn=serve_server)

    for name, kind in (("serve-client", "client"), ("serve-attacker", "attacker")):
        p = sub.add_parser(name, help=f"{kind} worker (dials the orchestrator; listens on no port)")
        p.add_argument("--orchestrator", default=_env("ORCHESTRATOR"),
                       help="host:port of the orchestrator, which this worker connects to (FEDSEQ_ORCHESTRATOR)")
        p.add_argument("--aggregator", default=_env("AGGREGATOR"),
                       help="host:port to upload to (FEDSEQ_AGGREGATOR; default: the one the orchestrator names)")
        p.add_argument("--store-url", default=_env("STORE_URL"),
                       help="read models from this Redis (read-only worker credentials; FEDSEQ_STORE_URL); "
                            "default: through the aggregator's GetModel")
        p.add_argument("--threads", default=_env("THREADS", "1"))
        p.add_argument("--device", default=_env("DEVICE"),
                       help="auto | cpu | cuda | cuda:N for this worker's updates and evaluation (FEDSEQ_DEVICE; "
                            "default: the run config's device, auto)")
        p.add_argument("--worker-id", default=_env("WORKER_ID"),
                       help="default: the certificate's name under TLS (FEDSEQ_WORKER_ID)")
        p.add_argument("--health-file", default=_env("HEALTH_FILE"),
                       help="write this worker's health here for a container probe: `python -m fedseq.healthcheck "
                            "--file PATH` (FEDSEQ_HEALTH_FILE)")
        p.add_argument("--port-file", default=_env("PORT_FILE"),
                       help="with --metrics-port: the metrics port goes to PATH.metrics (for launchers)")
        add_security_flags(p, "worker", listens=False)
        p.set_defaults(fn=serve_worker, kind=kind)

    p = sub.add_parser("serve-orchestrator", help="orchestrator (gRPC Orchestrator) that runs one experiment")
    add_experiment_flags(p)
    p.add_argument("--port", default=_env("PORT", "50050"))
    p.add_argument("--aggregator", default=_env("AGGREGATOR"), help="host:port (FEDSEQ_AGGREGATOR)")
    p.add_argument("--store-url", default=_env("STORE_URL"))
    p.add_argument("--min-workers", default=_env("MIN_WORKERS", "1"))
    p.add_argument("--round-timeout", default=_env("ROUND_TIMEOUT", "600"))
    p.add_argument("--worker-wait", default=_env("WORKER_WAIT", "300"))
    p.add_argument("--out", default=_env("OUT"))
    p.add_argument("--client-shards", default=_env("CLIENT_SHARDS", "0"),
                   help="split the benign users into this many shards, one per client worker (FEDSEQ_CLIENT_SHARDS; "
                        "0: every client worker may host every benign user, for `compose --scale`)")
    p.add_argument("--attacker-shards", default=_env("ATTACKER_SHARDS", "0"),
                   help="likewise for the malicious clients and attacker workers (FEDSEQ_ATTACKER_SHARDS)")
    p.add_argument("--shard-grace", default=_env("SHARD_GRACE", "30"),
                   help="seconds rounds wait for a worker to take a lost worker's shard again (FEDSEQ_SHARD_GRACE)")
    p.add_argument("--roster", default=_env("ROSTER"),
                   help="which worker identity (certificate name) is a client or an attacker worker and which shard "
                        "it holds (FEDSEQ_ROSTER; default <tls-dir>/roster.json; made by `fedseq certs DIR --clients N "
                        "--attackers M`); required under mutual TLS")
    p.add_argument("--metrics-experiment", action="store_true",
                   default=(_env("METRICS_EXPERIMENT", "") or "").lower() in _TRUE,
                   help="also export the run's newest HR@10/NDCG@10/ER@K on the (unauthenticated) metrics endpoint "
                        "(FEDSEQ_METRICS_EXPERIMENT=1; off by default: an attacker would like to see ER@K)")
    p.add_argument("--heartbeat", default=_env("HEARTBEAT", "5"),
                   help="seconds between heartbeats on an idle worker stream; three missed end it (FEDSEQ_HEARTBEAT)")
    p.add_argument("--max-workers", default=_env("MAX_WORKERS", "0"),
                   help="live worker streams at most, each a thread (FEDSEQ_MAX_WORKERS; 0: one per rostered "
                        "identity, else 64)")
    p.add_argument("--exit-when-done", action="store_true", default=_env("EXIT_WHEN_DONE") == "1")
    p.add_argument("--port-file", default=_env("PORT_FILE"))
    add_security_flags(p, "orchestrator")
    p.set_defaults(fn=serve_orchestrator)


def _add_accept_codecs(p: argparse.ArgumentParser) -> None:
    """serve-server's ``--accept-codecs`` and its deprecated old name ``--accept-encodings``, and
    their variables, kept apart from the flags so that :func:`_accepted_codecs` tells them apart."""
    from .flags import DeprecatedAlias

    p.add_argument("--accept-codecs",
                   help="comma list of the codecs this server accepts updates in (default: all; "
                        "FEDSEQ_ACCEPT_CODECS); a run whose --codec is not listed is refused at StartRun")
    p.add_argument("--accept-encodings", action=DeprecatedAlias, new="--accept-codecs",
                   help="deprecated: the old name of --accept-codecs (and FEDSEQ_ACCEPT_ENCODINGS of "
                        "FEDSEQ_ACCEPT_CODECS); giving both names different values is an error")
    p.set_defaults(accept_codecs_env=_env("ACCEPT_CODECS"), accept_encodings_env=_env("ACCEPT_ENCODINGS"))


def _accepted_codecs(args: argparse.Namespace) -> tuple[str, ...]:
    """The codecs serve-server accepts: the flags', else the variables' (flags win, and the
    variables are then not read), else all. An old name says on stderr that it is deprecated; the
    old and the new name of a flag or of a variable given different codecs is a ConfigError."""
    from server.service import parse_codecs

    def parsed(name: str, value: str | None) -> tuple[str, ...] | None:
        try:
            return None if value is None else parse_codecs(value)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None

    def one_of(new: str, new_value: str | None, old: str, old_value: str | None) -> tuple[str, ...] | None:
        codecs, old_codecs = parsed(new, new_value), parsed(old, old_value)
        if codecs is not None and old_codecs is not None and set(codecs) != set(old_codecs):
            raise ConfigError(f"{new} {new_value!r} and {old} {old_value!r} disagree ({old} is the deprecated "
                              f"old name of {new}); give only {new}")
        return old_codecs if codecs is None else codecs

    if args.accept_encodings_env is not None:
        print("fedseq serve-server: FEDSEQ_ACCEPT_ENCODINGS is deprecated; use FEDSEQ_ACCEPT_CODECS",
              file=sys.stderr)
    return (one_of("--accept-codecs", args.accept_codecs, "--accept-encodings", args.accept_encodings)
            or one_of("FEDSEQ_ACCEPT_CODECS", args.accept_codecs_env,
                      "FEDSEQ_ACCEPT_ENCODINGS", args.accept_encodings_env)
            or parse_codecs(None))


def serve_server(args: argparse.Namespace) -> int:
    from fedseq.store import RedisStore, redact
    from server.app import ServerSettings, build
    from server.intake import StreamLimits

    accepted = _accepted_codecs(args)
    try:
        limits = StreamLimits(_int(args.max_upload_streams, "--max-upload-streams"),
                              _int(args.max_streams_per_peer, "--max-streams-per-peer"),
                              float(args.upload_idle_timeout), _int(args.upload_min_bytes, "--upload-min-bytes"))
        calls = args.max_calls_per_identity
        settings = ServerSettings(_required(args.store_url, "--store-url", "STORE_URL"), _int(args.port, "--port"),
                                  args.host, identity_from(args), _int(args.max_update_bytes, "--max-update-bytes"),
                                  accepted, limits, None if calls in (None, "") else _int(calls, "--max-calls-per-identity"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    RedisStore.from_url(settings.store_url, "probe").head()  # fail fast when the store is unreachable
    server = build(settings)
    log.warning("aggregation server listening on %s:%d (%s; store %s; accepts %s)", args.host, server.service.port,
                "mTLS" if settings.identity else "INSECURE", redact(settings.store_url),
                ",".join(settings.accept_codecs))
    start_metrics(args)
    serve_until_signal(server.service, port_file=args.port_file)
    return 0


def serve_worker(args: argparse.Namespace) -> int:
    from client.app import WorkerSettings

    try:
        settings = WorkerSettings(
            orchestrator=_required(args.orchestrator, "--orchestrator", "ORCHESTRATOR"), kind=args.kind,
            identity=identity_from(args), worker_id=args.worker_id or None, aggregator=args.aggregator or None,
            store_url=args.store_url or None, threads=_int(args.threads, "--threads"), device=args.device or None,
            health_file=args.health_file or None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if settings.store_url:
        from fedseq.store import RedisStore

        RedisStore.from_url(settings.store_url, "probe").head()  # fail fast when the store is unreachable
    if args.kind == "client":
        from client.app import build as build_client

        worker = build_client(settings)
    else:
        from attacker.app import build as build_attacker

        worker = build_attacker(settings)
    start_metrics(args)
    log.warning("%s worker %s connecting to the orchestrator at %s (it listens on no port)", args.kind,
                worker.tasks.worker_id, settings.orchestrator)
    if wait_for_signal(worker.stop_event):
        exit_orphaned()
    worker.stop(grace=5.0)
    if worker.failure:
        print(f"fedseq: {worker.failure[0]}", file=sys.stderr)
        return 1
    return 0


def _roster(args: argparse.Namespace):
    """The orchestrator's roster: ``--roster``, else ``<tls-dir>/roster.json`` when it exists (None
    without TLS, or when neither exists: the settings then say what is missing)."""
    from fedseq.roster import ROSTER_FILE, RosterError, load

    path = args.roster or (str(Path(args.tls_dir) / ROSTER_FILE) if args.tls_dir and not args.insecure
                           and (Path(args.tls_dir) / ROSTER_FILE).is_file() else None)
    if not path:
        return None
    if args.insecure:
        raise ConfigError("--roster needs mutual TLS (without certificates no worker has an identity to check)")
    try:
        return load(path)
    except RosterError as e:
        raise ConfigError(str(e)) from None


def serve_orchestrator(args: argparse.Namespace) -> int:
    from orchestrator.app import OrchestratorSettings, build

    from .flags import experiment_config
    from .plugins import prepare

    cfg = experiment_config(args, quickstart=False)
    try:
        settings = OrchestratorSettings(
            aggregator=_required(args.aggregator, "--aggregator", "AGGREGATOR"),
            store_url=_required(args.store_url, "--store-url", "STORE_URL"),
            min_workers=_int(args.min_workers, "--min-workers"), round_timeout=float(args.round_timeout),
            worker_wait=float(args.worker_wait), out_dir=args.out,
            client_shards=_int(args.client_shards, "--client-shards"),
            attacker_shards=_int(args.attacker_shards, "--attacker-shards"), identity=identity_from(args),
            shard_grace=float(args.shard_grace), port=_int(args.port, "--port"), host=args.host,
            roster=_roster(args), export_experiment=bool(args.metrics_experiment),
            heartbeat=_float(args.heartbeat, "--heartbeat"), max_workers=_int(args.max_workers, "--max-workers"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.threads:
        import torch  # a service process imports it anyway; the launcher, which takes EXIT_* from here, does not

        torch.set_num_threads(cfg.threads)
    from fedseq.store import RedisStore

    RedisStore.from_url(settings.store_url, "probe").head()  # fail fast when the store is unreachable
    app = build(cfg, settings, prepare(cfg).setup)  # prepare: a bad rule or attack fails here, not mid-run
    orch = app.servicer
    log.warning("orchestrator listening on %s:%d (%s; run %s)", args.host, app.service.port,
                "mTLS" if settings.identity else "INSECURE", orch.run_id)
    finished = threading.Event()
    start_metrics(args)
    app.start()
    if args.exit_when_done:
        def watch() -> None:
            orch.join()
            finished.set()

        threading.Thread(target=watch, daemon=True).start()

    def stop() -> None:
        # the run stops after its current round, if that ends within STOP_GRACE seconds (inside a
        # container's termination grace); else it exits mid-round, which a restart reruns from the
        # store head (README "Fault tolerance")
        orch.stop()
        orch.join(STOP_GRACE)
        orch.pool.close_all("the orchestrator is shutting down")  # the workers' streams end now, not after the grace

    serve_until_signal(app.service, on_stop=stop, port_file=args.port_file, until=finished)
    return orchestrator_exit(orch.state, stopped_by_operator=orch.loop.message.startswith(OPERATOR_STOP))


STOP_GRACE = 10.0  # seconds a SIGTERM waits for the round in flight (compose grants 20 s in all, k8s 60 s)
EXIT_STOPPED = 4  # the operator stopped the run (Orchestrator.Stop): not a failure to retry
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: signalled mid-run; a restart resumes the run from the store


def orchestrator_exit(state: str, stopped_by_operator: bool = False) -> int:
    """The orchestrator's exit status: 0 only for a run that is done, so that a supervisor
    (compose ``restart: on-failure``, a Kubernetes Job) restarts one that is not. 1: the run
    failed; 4 (:data:`EXIT_STOPPED`): the operator stopped it; 75 (:data:`EXIT_INTERRUPTED`): a
    signal (SIGTERM of a drain or ``compose stop``) ended it mid-run, and a restart resumes it."""
    if state == "done":
        return 0
    if state == "failed":
        return 1
    if state == "stopped" and stopped_by_operator:
        return EXIT_STOPPED
    return EXIT_INTERRUPTED
