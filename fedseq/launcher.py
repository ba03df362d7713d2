"""``fedseq run``: a networked federation on one machine. Starts a real Redis server (unless
``--redis-url`` names one), the aggregation server, N client workers, attacker workers when an
attack is configured, and the orchestrator, each as its own process talking gRPC over loopback;
shows progress; prints the results table; and stops everything it started, also on Ctrl-C or
when a service fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from .config import ExperimentConfig
from .redis_server import RedisServer
from .results import format_table
from .rpc import channel
from .v1 import orchestrator_pb2, orchestrator_pb2_grpc


@dataclass(frozen=True)
class LaunchSettings:
    workers: int = 2
    attackers: int = 1
    redis_url: str | None = None
    out_dir: str | None = None
    round_timeout: float = 600.0
    log_dir: str | None = None
    startup_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.attackers < 1:
            raise ValueError("--attackers must be >= 1")


class ServiceFailed(RuntimeError):
    pass


class _Proc:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.port_file = str(log_dir / f"{name}.port")
        self.popen = subprocess.Popen([sys.executable, "-m", "fedseq.cli", "--log-level", "info", *argv,
                                       "--port-file", self.port_file], stdout=self.log, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def port(self, timeout: float) -> int:
        end = time.time() + timeout
        while time.time() < end:
            if os.path.exists(self.port_file):
                return int(Path(self.port_file).read_text())
            self.check()
            time.sleep(0.05)
        raise ServiceFailed(f"{self.name} did not start listening within {timeout:.0f}s; see {self.log_path}")

    def check(self) -> None:
        rc = self.popen.poll()
        if rc is not None and rc != 0:
            raise ServiceFailed(f"{self.name} exited with code {rc}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + t for t in text[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self.log.close()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def update_line(results: dict) -> str:
    """``bytes per user update: ...`` from a results bundle's ledger totals."""
    summ = results.get("summary", {})
    tot = results.get("ledger", {}).get("totals", {})
    cfg = results.get("config", {})
    per = tot.get("bytes_per_update", summ.get("bytes_per_update", 0.0))
    line = (f"bytes per user update: {_fmt_bytes(per)} ({cfg.get('codec', '?')}, "
            f"{tot.get('updates', 0)} updates")
    if cfg.get("compression", "none") != "none":
        line += f"; {_fmt_bytes(tot.get('wire_per_update', 0.0))} after {cfg['compression']}"
    if summ.get("num_parameters"):
        line += f"; raw dense fp32 would be {_fmt_bytes(4 * summ['num_parameters'])}"
    return line + ")"


def launch(cfg: ExperimentConfig, settings: LaunchSettings) -> int:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.dataset.split(":")[0]).name)
    run_id = cfg.run_id or f"{base}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = replace(cfg, run_id=run_id)
    out = Path(settings.out_dir or os.path.join("runs", run_id))
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(settings.log_dir or out / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_") or k in ("FEDSEQ_DATA_ROOT",
                                                                                       "FEDSEQ_REDIS_SERVER")}
    env["PYTHONUNBUFFERED"] = "1"
    env["FEDSEQ_PARENT_PID"] = str(os.getpid())  # services exit if this launcher dies without cleanup
    env["OMP_NUM_THREADS"] = str(max(cfg.threads, 1))
    attack = cfg.attack != "none"
    n_workers = settings.workers + (settings.attackers if attack else 0)
    print(f"fedseq run {run_id}: {cfg.dataset} / {cfg.model}, {cfg.epochs} epochs, {settings.workers} client "
          f"workers{f', {settings.attackers} attacker workers ({cfg.attack})' if attack else ''}, "
          f"rule {cfg.aggregation}, codec {cfg.codec}", file=sys.stderr)
    procs: list[_Proc] = []
    with ExitStack() as stack:
        def cleanup() -> None:
            for p in reversed(procs):
                p.stop()

        stack.callback(cleanup)
        redis_url = settings.redis_url
        if not redis_url:
            redis = RedisServer(data_dir=None, log_file=str(log_dir / "redis.log")).start()
            stack.callback(redis.stop)
            redis_url = redis.url
        try:
            server = _Proc("server", ["serve-server", "--port", "0", "--store-url", redis_url], log_dir, env)
            procs.append(server)
            agg = f"127.0.0.1:{server.port(settings.startup_timeout)}"
            orch = _Proc("orchestrator", ["serve-orchestrator", "--config", str(out / "config.json"), "--port", "0",
                                          "--aggregator", agg, "--store-url", redis_url, "--min-workers",
                                          str(n_workers), "--round-timeout", str(settings.round_timeout),
                                          "--out", str(out), "--exit-when-done"], log_dir, env)
            procs.append(orch)
            orch_addr = f"127.0.0.1:{orch.port(settings.startup_timeout)}"
            for i in range(settings.workers):
                procs.append(_Proc(f"client-{i}", ["serve-client", "--port", "0", "--orchestrator", orch_addr,
                                                   "--advertise-host", "127.0.0.1", "--shard",
                                                   f"{i}/{settings.workers}", "--threads", str(cfg.threads),
                                                   "--worker-id", f"client-{i}"], log_dir, env))
            if attack:
                for i in range(settings.attackers):
                    procs.append(_Proc(f"attacker-{i}", ["serve-attacker", "--port", "0", "--orchestrator",
                                                         orch_addr, "--advertise-host", "127.0.0.1", "--shard",
                                                         f"{i}/{settings.attackers}", "--threads",
                                                         str(cfg.threads), "--worker-id", f"attacker-{i}"],
                                       log_dir, env))
            status = _follow(orch_addr, procs, orch)
            orch.popen.wait(30)
            orch.check()
        except ServiceFailed as e:
            print(f"fedseq run: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nfedseq run: interrupted; stopping services (partial results are in "
                  f"{out / 'results.json'})", file=sys.stderr)
            return 130
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = json.loads(status.results_json) if status is not None and status.results_json else {}
    state = results.get("summary", {}).get("state", status.state if status is not None else "unknown")
    if state != "done":
        print(f"fedseq run: run ended in state {state}: {status.message if status else ''}", file=sys.stderr)
        return 1
    print(format_table(results["epochs"], extra=("bytes_up", "bytes_down")))
    summ = results.get("summary", {})
    print(f"bytes up {_fmt_bytes(summ.get('bytes_up', 0))}, down {_fmt_bytes(summ.get('bytes_down', 0))}; "
          f"results: {out / 'results.json'} (logs in {log_dir})")
    print(update_line(results))
    return 0


def _follow(orch_addr: str, procs: list[_Proc], orch: _Proc):
    """Poll the orchestrator and print progress until the run ends; fail if any service dies."""
    stub = orchestrator_pb2_grpc.OrchestratorStub(channel(orch_addr))
    tty = sys.stderr.isatty()
    last_line = ""
    last_epoch = 0
    status = None
    while True:
        for p in procs:
            if p is orch:
                continue
            p.check()
        try:
            status = stub.GetStatus(orchestrator_pb2.StatusRequest(), timeout=10)
        except grpc.RpcError:
            if orch.popen.poll() is not None:
                orch.check()
                break
            time.sleep(0.5)
            continue
        if status.state in ("done", "failed", "stopped"):
            break
        line = (f"[{status.state}] epoch {status.epoch}/{status.epochs} round {status.round_id} | "
                f"{status.workers} workers | up {_fmt_bytes(status.bytes_up)} down {_fmt_bytes(status.bytes_down)}"
                f" | {status.message}")
        if status.epoch != last_epoch and status.last_metrics_json:
            m = json.loads(status.last_metrics_json)
            if m:
                sys.stderr.write(("\r" if tty else "") + f"epoch {m['epoch']}: HR@10 {m['hr@10']:.4f} "
                                 f"NDCG@10 {m['ndcg@10']:.4f} ER@5 {m['er@5']:.4f} ER@10 {m['er@10']:.4f} "
                                 f"({m['seconds']:.1f}s)".ljust(110) + "\n")
            last_epoch = status.epoch
        if line != last_line and tty:
            sys.stderr.write("\r" + line[:140].ljust(140))
            sys.stderr.flush()
        last_line = line
        time.sleep(0.5)
    if tty:
        sys.stderr.write("\r" + " " * 140 + "\r")
    if status is None:
        raise ServiceFailed(f"the orchestrator never answered:\n{orch.tail()}")
    if status.state == "failed":
        raise ServiceFailed(f"the run failed: {status.message}\n{orch.tail()}")
    return status


