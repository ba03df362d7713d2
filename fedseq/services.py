"""``fedseq serve-*``: run one service as a process. Settings come from flags or ``FEDSEQ_*``
environment variables (flags win) and fail fast with a clear message; SIGTERM shuts down
gracefully."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass

import torch

from .config import ConfigError

log = logging.getLogger("fedseq.services")


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


@dataclass(frozen=True)
class ServerSettings:
    port: int
    store_url: str
    max_update_bytes: int
    port_file: str | None
    accept_encodings: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerSettings:
    port: int
    orchestrator: str
    advertise_host: str
    shard: tuple[int, int] | None
    threads: int
    worker_id: str | None
    port_file: str | None


def _advertise_host(value: str | None) -> str:
    if value and value != "auto":
        return value
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def add_parsers(sub, add_experiment_flags) -> None:
    p = sub.add_parser("serve-server", help="aggregation server (gRPC Aggregator)")
    p.add_argument("--port", default=_env("PORT", "50051"))
    p.add_argument("--store-url", default=_env("STORE_URL"), help="redis://host:port/db (FEDSEQ_STORE_URL)")
    p.add_argument("--max-update-bytes", default=_env("MAX_UPDATE_BYTES", str(64 << 20)))
    p.add_argument("--accept-encodings", default=_env("ACCEPT_ENCODINGS"),
                   help="comma list of the update encodings this server accepts (default: all; "
                        "FEDSEQ_ACCEPT_ENCODINGS); a run whose --codec is not listed is refused at StartRun")
    p.add_argument("--port-file", default=_env("PORT_FILE"))
    p.set_defaults(fn=serve_server)

    for name, kind in (("serve-client", "client"), ("serve-attacker", "attacker")):
        p = sub.add_parser(name, help=f"{kind} worker (gRPC Worker)")
        p.add_argument("--port", default=_env("PORT", "0"))
        p.add_argument("--orchestrator", default=_env("ORCHESTRATOR"), help="host:port (FEDSEQ_ORCHESTRATOR)")
        p.add_argument("--advertise-host", default=_env("ADVERTISE_HOST", "auto"),
                       help="address peers use to reach this worker (default: this host's IP)")
        p.add_argument("--shard", default=_env("SHARD"), help="host only users u with u %% n == i ('i/n')")
        p.add_argument("--threads", default=_env("THREADS", "1"))
        p.add_argument("--worker-id", default=_env("WORKER_ID"))
        p.add_argument("--port-file", default=_env("PORT_FILE"))
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
    p.add_argument("--serve-models", action="store_true", help="workers fetch models from the aggregator")
    p.add_argument("--exit-when-done", action="store_true", default=_env("EXIT_WHEN_DONE") == "1")
    p.add_argument("--port-file", default=_env("PORT_FILE"))
    p.set_defaults(fn=serve_orchestrator)


def serve_server(args: argparse.Namespace) -> int:
    from server.service import AggregatorServicer, parse_encodings

    from .rpc import Service, serve_until_signal
    from .store import RedisStore
    from .v1 import aggregator_pb2, aggregator_pb2_grpc

    try:
        accepted = parse_encodings(args.accept_encodings)
    except ValueError as e:
        raise ConfigError(f"--accept-encodings: {e}") from None
    s = ServerSettings(_int(args.port, "--port"), _required(args.store_url, "--store-url", "STORE_URL"),
                       _int(args.max_update_bytes, "--max-update-bytes"), args.port_file, accepted)
    RedisStore.from_url(s.store_url, "probe").head()  # fail fast when the store is unreachable
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(s.store_url, run_id), s.max_update_bytes,
                                  s.accept_encodings)
    svc = Service([(aggregator_pb2_grpc.add_AggregatorServicer_to_server, servicer,
                    aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name)], port=s.port).start()
    log.warning("aggregation server listening on :%d (store %s; accepts %s)", svc.port, s.store_url,
                ",".join(s.accept_encodings))
    serve_until_signal(svc, port_file=s.port_file)
    return 0


def serve_worker(args: argparse.Namespace) -> int:
    from .data import parse_shard
    from .rpc import Service, serve_until_signal
    from .v1 import worker_pb2, worker_pb2_grpc
    from .worker import ModelSource, WorkerServicer, config_from_reply, new_worker_id, register_loop

    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as e:
        raise ConfigError(f"--shard: {e}") from None
    s = WorkerSettings(_int(args.port, "--port"), _required(args.orchestrator, "--orchestrator", "ORCHESTRATOR"),
                       _advertise_host(args.advertise_host), shard, _int(args.threads, "--threads"),
                       args.worker_id, args.port_file)
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    servicer = WorkerServicer(s.worker_id or new_worker_id(args.kind), device)
    svc = Service([(worker_pb2_grpc.add_WorkerServicer_to_server, servicer,
                    worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name)], port=s.port).start()
    address = f"{s.advertise_host}:{svc.port}"

    def on_config(reply) -> None:
        cfg = config_from_reply(reply)
        if args.kind == "client":
            from client.service import benign_population

            hosted = benign_population(cfg, s.shard)
        else:
            from attacker.service import malicious_population_hosted

            hosted = malicious_population_hosted(cfg, s.shard)
        servicer.attach(reply.run_id, hosted, ModelSource(reply.run_id, reply.store_url, reply.aggregator,
                                                          cfg.compression, cfg.model_delta))

    stop = threading.Event()
    failure: list[BaseException] = []

    def reg() -> None:
        try:
            register_loop(s.orchestrator, servicer.worker_id, address, device, on_config, stop)
        except BaseException as e:  # noqa: BLE001 - reported below, the process exits non-zero
            failure.append(e)
            log.error("worker failed: %s", e)
            stop.set()

    threading.Thread(target=reg, daemon=True, name="register").start()
    log.warning("%s worker %s listening on %s", args.kind, servicer.worker_id, address)
    serve_until_signal(svc, on_stop=stop.set, port_file=s.port_file, until=stop)
    if failure:
        print(f"fedseq: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def serve_orchestrator(args: argparse.Namespace) -> int:
    from orchestrator.service import Orchestrator, OrchestratorSettings

    from .cli import experiment_config
    from .rpc import Service, serve_until_signal
    from .v1 import orchestrator_pb2, orchestrator_pb2_grpc

    cfg = experiment_config(args, quickstart=False)
    try:
        settings = OrchestratorSettings(
            aggregator=_required(args.aggregator, "--aggregator", "AGGREGATOR"),
            store_url=_required(args.store_url, "--store-url", "STORE_URL"),
            min_workers=_int(args.min_workers, "--min-workers"), round_timeout=float(args.round_timeout),
            worker_wait=float(args.worker_wait), out_dir=args.out, serve_models=args.serve_models)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    orch = Orchestrator(cfg, settings)
    svc = Service([(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, orch,
                    orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name)],
                  port=_int(args.port, "--port")).start()
    log.warning("orchestrator listening on :%d (run %s)", svc.port, orch.run_id)
    finished = threading.Event()
    orch.start()
    if args.exit_when_done:
        def watch() -> None:
            orch.join()
            finished.set()

        threading.Thread(target=watch, daemon=True).start()
    serve_until_signal(svc, on_stop=orch.stop, port_file=args.port_file, until=finished)
    return 0 if orch.state in ("done", "stopped", "waiting", "running") else 1
