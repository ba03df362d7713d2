"""Prometheus metrics of every fedseq service, defined in one place (names are part of the
interface: docs/results/reliability.md lists them), and the HTTP endpoint that serves them
(``--metrics-port``, ``FEDSEQ_METRICS_PORT``; ``fedseq run`` starts one per service and prints
where)."""

from __future__ import annotations

import contextvars
import json
import logging
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# aggregation server
UPDATES = Counter("fedseq_updates_total", "user updates received, by outcome and refusal reason word",
                  ["outcome", "reason"])
AGGREGATE_SECONDS = Histogram("fedseq_aggregate_seconds", "time of one round's rule and step on the server",
                              buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
UPLOAD_STREAMS = Gauge("fedseq_upload_streams", "upload streams open on the server")
MODEL_VERSION = Gauge("fedseq_model_version", "newest model version (server: written; orchestrator: completed)")
# orchestrator
ROUND_SECONDS = Histogram("fedseq_round_seconds", "wall time of one round, open to summary",
                          buckets=(0.1, 0.3, 1, 3, 10, 30, 100, 300))
ROUNDS = Counter("fedseq_rounds_total", "rounds completed")
ROUND_RETRIES = Counter("fedseq_round_retries_total", "rounds rerun after an aggregator or store failure")
BYTES = Counter("fedseq_bytes_total", "bytes of the communication ledger, by direction and kind", ["direction", "kind"])
WORKERS = Gauge("fedseq_workers", "registered workers, by kind and state", ["kind", "state"])
EXPERIMENT = Gauge("fedseq_experiment_metric", "newest evaluation of the run (HR@10, NDCG@10, ER@K)", ["metric"])
REFUSED = Counter("fedseq_orchestrator_refused_total", "what the orchestrator refused from workers", ["reason"])
EPOCH = Gauge("fedseq_epoch", "epochs completed and evaluated (orchestrator; GetStatus's epoch)")
RUN_STATES = ("waiting", "running", "done", "stopped", "failed")
RUN_STATE = Gauge("fedseq_run_state", "the run's state (orchestrator): 1 for the current one, 0 for the others",
                  ["state"])
# workers
WORKER_USERS = Counter("fedseq_worker_users_trained_total", "user updates computed by this worker")

NAMES = ("fedseq_updates_total", "fedseq_aggregate_seconds", "fedseq_upload_streams", "fedseq_model_version",
         "fedseq_round_seconds", "fedseq_rounds_total", "fedseq_round_retries_total", "fedseq_bytes_total",
         "fedseq_workers", "fedseq_experiment_metric", "fedseq_orchestrator_refused_total",
         "fedseq_worker_users_trained_total", "fedseq_rpc_refused_total", "fedseq_epoch", "fedseq_run_state")


def set_run_state(state: str) -> None:
    """``fedseq_run_state``: 1 for ``state``, 0 for every other state of :data:`RUN_STATES`."""
    for s in dict.fromkeys((*RUN_STATES, state)):
        RUN_STATE.labels(s).set(1 if s == state else 0)


def serve_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Serve this process's metrics on ``http://host:port/metrics`` (None: not at all). Returns the
    bound port (``port=0`` picks a free one)."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound


# ---------------------------------------------------------------------------- structured logs
RUN: contextvars.ContextVar[str] = contextvars.ContextVar("fedseq_run", default="")
ROUND: contextvars.ContextVar[int] = contextvars.ContextVar("fedseq_round", default=-1)
_SERVICE = {"name": ""}


def set_context(service: str | None = None, run: str | None = None, round_id: int | None = None) -> None:
    """What every later log line of this process (run, round: of this thread) is tagged with."""
    if service is not None:
        _SERVICE["name"] = service
    if run is not None:
        RUN.set(run)
    if round_id is not None:
        ROUND.set(round_id)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.service, record.run, record.round = _SERVICE["name"], RUN.get(), ROUND.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, service, run, round, message."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "service": getattr(record, "service", ""),
               "run": getattr(record, "run", ""), "round": getattr(record, "round", -1),
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr as text (``service run/round`` in each line) or JSON lines (``fmt="json"``)."""
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(service)s[%(run)s r%(round)s] "
                                               "%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
