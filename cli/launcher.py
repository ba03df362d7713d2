"""``fedseq run``: a networked federation on one machine. Starts a real Redis server (unless
``--redis-url`` names one), the aggregation server, N client workers, attacker workers when an
attack is configured, and the orchestrator, each as its own process talking gRPC over loopback;
shows progress; prints the results table; and stops everything it started, also on Ctrl-C or
when a service fails.

Every channel is mutual TLS (``fedseq certs`` material in ``<out>/tls``: one certificate per
process, each with one role; the launcher itself holds the operator's) and the Redis it starts has
a user per role (the workers' is read-only on model versions). ``--insecure`` turns both off."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from fedseq import roster as roster_mod
from fedseq.config import ExperimentConfig
from fedseq.privacy import privacy_line
from fedseq.redis_server import RedisServer
from fedseq.results import format_table
from fedseq.rpc import channel
from fedseq.tls import Identity, make_certs
from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.settings import OPERATOR_STOP

from .services import EXIT_INTERRUPTED
from .zygote import Forked, Zygote, ZygoteGone


@dataclass(frozen=True)
class LaunchSettings:
    workers: int = 2
    attackers: int = 1
    redis_url: str | None = None
    out_dir: str | None = None
    round_timeout: float = 600.0
    log_dir: str | None = None
    startup_timeout: float = 120.0
    insecure: bool = False  # no TLS, no Redis users: any local process can drive or read the run

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.attackers < 1:
            raise ValueError("--attackers must be >= 1")


class ServiceFailed(RuntimeError):
    pass


MAX_RESTARTS = 3  # per process, for processes killed by a signal


class _Proc:
    """One service process of the run. ``restartable``: the launcher restarts it (on the port it
    had, so its peers find it again) when a signal kills it, up to :data:`MAX_RESTARTS` times."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str], zygote: Zygote,
                 timeout: float) -> None:
        self.name, self.zygote, self.timeout = name, zygote, timeout
        self.argv, self.env = argv, env
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.port_file = str(log_dir / f"{name}.port")
        self.pid_file = log_dir / f"{name}.pid"
        self.restarts = 0
        self.bound: int | None = None
        self.popen = self._spawn(argv)

    def _spawn(self, argv: list[str]) -> Forked:
        """Fork the service from the zygote (its own session and log); its pid goes to ``<name>.pid``."""
        try:
            proc = self.zygote.spawn(self.name, ["--log-level", "info", *argv, "--port-file", self.port_file,
                                                 "--metrics-port", "0"], self.env, self.log_path, self.timeout)
        except ZygoteGone as e:
            raise ServiceFailed(f"{self.name} could not be started: {e}") from e
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc

    def metrics_url(self) -> str:
        """Where this process serves its Prometheus metrics ('' until it said)."""
        try:
            return f"http://127.0.0.1:{int(Path(self.port_file + '.metrics').read_text())}/metrics"
        except (OSError, ValueError):
            return ""

    def wait_started(self, timeout: float) -> None:
        """Wait until the process serves its metrics (a worker listens on no other port)."""
        end = time.time() + timeout
        while time.time() < end and not self.metrics_url():
            self.check()
            time.sleep(0.05)
        if not self.metrics_url():
            raise ServiceFailed(f"{self.name} did not start within {timeout:.0f}s; see {self.log_path}")

    def port(self, timeout: float) -> int:
        end = time.time() + timeout
        while time.time() < end:
            if os.path.exists(self.port_file):
                self.bound = int(Path(self.port_file).read_text())
                return self.bound
            self.check()
            time.sleep(0.05)
        raise ServiceFailed(f"{self.name} did not start listening within {timeout:.0f}s; see {self.log_path}")

    def check(self) -> None:
        rc = self.popen.poll()
        if rc is not None and rc != 0:
            raise ServiceFailed(f"{self.name} exited with code {rc}:\n{self.tail()}")

    def supervise(self) -> str | None:
        """Restart the process if a signal killed it (same port); ServiceFailed if it exited with an
        error or was killed too often. Returns what happened, for the progress display."""
        rc = self.popen.poll()
        if rc is None:
            return None
        # killed by a signal, or signalled mid-run (the orchestrator's EXIT_INTERRUPTED): restartable
        restartable = rc < 0 or rc == EXIT_INTERRUPTED
        if (rc > 0 and not restartable) or (restartable and self.restarts >= MAX_RESTARTS):
            raise ServiceFailed(f"{self.name} exited with code {rc}"
                                f"{f' after {self.restarts} restarts' if self.restarts else ''}:\n{self.tail()}")
        if rc == 0:
            return None
        self.restarts += 1
        argv = list(self.argv)
        if self.bound is not None and "--port" in argv:
            argv[argv.index("--port") + 1] = str(self.bound)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port_file)
        how = f"was killed by signal {-rc}" if rc < 0 else f"was interrupted (exit {rc})"
        self.log.write(f"\n# fedseq run: {self.name} {how}; restart {self.restarts}\n".encode())
        self.log.flush()
        self.popen = self._spawn(argv)
        return f"{self.name} {how}; restarted ({self.restarts}/{MAX_RESTARTS})"

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + t for t in text[-lines:])

    def terminate(self) -> None:
        """SIGTERM the process (its session): it shuts down gracefully."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the process and wait ``grace`` seconds for it, then kill it."""
        self.terminate()
        if self.popen.poll() is None:
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.log.close()


class _Redis:
    """The run's own Redis: persistent in ``<out>/redis`` (append-only file, fsync on every write,
    so a restart loses no version), restarted on the same port when something kills it."""

    def __init__(self, out: Path, log_dir: Path, acl: bool) -> None:
        self.server = RedisServer(data_dir=out / "redis", log_file=str(log_dir / "redis.log"), acl=acl,
                                  extra_args=("--appendfsync", "always"))
        self.restarts = 0

    def start(self) -> _Redis:
        self.server.start()
        return self

    def supervise(self) -> str | None:
        proc = self.server.process
        if proc is None or proc.poll() is None:
            return None
        if self.restarts >= MAX_RESTARTS:
            raise ServiceFailed(f"redis-server died {self.restarts + 1} times; see {self.server.log_path}")
        self.restarts += 1
        self.server.start()  # same port, same data folder and users
        return f"redis-server died; restarted from its append-only file ({self.restarts}/{MAX_RESTARTS})"

    def stop(self) -> None:
        self.server.stop()


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


@dataclass(frozen=True)
class _Plan:
    """One launch: its configuration, folders and the environment every service process gets."""

    cfg: ExperimentConfig
    settings: LaunchSettings
    out: Path
    log_dir: Path
    env: dict[str, str]
    operator: Identity | None  # the launcher's own certificate (None with --insecure)
    zygote: Zygote  # forks the service processes (started by launch())

    @property
    def attackers(self) -> int:
        """Attacker workers to start (none without an attack)."""
        return self.settings.attackers if self.cfg.attack != "none" else 0

    def security(self, name: str) -> list[str]:
        """The TLS arguments of the process ``name`` (or ``--insecure``)."""
        return ["--insecure"] if self.settings.insecure else ["--tls-dir", str(self.out / "tls"), "--tls-name", name]

    def start(self, name: str, argv: list[str], store_url: str) -> _Proc:
        # store credentials travel in the environment, not in argv (which `ps` shows to everyone)
        return _Proc(name, argv, self.log_dir, {**self.env, "FEDSEQ_STORE_URL": store_url}, self.zygote,
                     self.settings.startup_timeout)


def launch(cfg: ExperimentConfig, settings: LaunchSettings) -> int:
    """Run ``cfg`` as a networked federation (module docstring); the exit status of ``fedseq run``.

    The launcher itself never imports torch: the zygote does, and the first process it forks is
    ``fedseq check`` on the run's config (data, model, rule, attack, ratio, targets), so a bad
    configuration exits 2 with the check's message before certificates, Redis or any service
    exist, and the folders this call made are removed again."""
    cfg, out = run_folder(cfg, settings)
    log_dir = Path(settings.log_dir or out / "logs")
    env = _service_env(cfg)
    made = _make_dirs(out, log_dir)
    with ExitStack() as stack:
        # the zygote imports the services' libraries (cli/zygote.py)
        zygote = Zygote(env, str(log_dir), log_dir / "zygote.log")
        stack.callback(zygote.close)
        rc = _check(zygote, cfg, env, log_dir, settings.startup_timeout)
        if rc:
            zygote.close()
            for d in made:  # a bad configuration leaves nothing behind
                shutil.rmtree(d, ignore_errors=True)
            return rc
        plan = _plan(cfg, settings, out, log_dir, env, zygote)
        attack = cfg.attack != "none"
        print(f"fedseq run {cfg.run_id}: {cfg.dataset} / {cfg.model}, {cfg.epochs} epochs, {settings.workers} "
              f"client workers{f', {settings.attackers} attacker workers ({cfg.attack})' if attack else ''}, "
              f"rule {cfg.defense}, codec {cfg.codec}", file=sys.stderr)
        procs: list[_Proc] = []

        def cleanup() -> None:
            for p in reversed(procs):  # all at once: each shutdown takes about a second
                p.terminate()
            for p in reversed(procs):
                p.stop()

        stack.callback(cleanup)
        redis, store_urls = _store(stack, plan)
        try:
            orch, orch_addr = _start_services(plan, procs, store_urls)
            print("Prometheus metrics: " + ", ".join(f"{p.name} {p.metrics_url()}" for p in procs), file=sys.stderr)
            status = _follow(orch_addr, procs, orch, plan.operator, redis)
            orch.popen.wait(30)
            orch.check()
        except ServiceFailed as e:
            print(f"fedseq run: {e}", file=sys.stderr)
            _mark_failed(out / "results.json", str(e).splitlines()[0])
            return 1
        except KeyboardInterrupt:
            print("\nfedseq run: interrupted; stopping services (partial results are in "
                  f"{out / 'results.json'})", file=sys.stderr)
            return 130
    return _report(out, log_dir, status)


def run_folder(cfg: ExperimentConfig, settings: LaunchSettings) -> tuple[ExperimentConfig, Path]:
    """``cfg`` with its run id (given, or dataset-model-time) and the run's folder (``--out``, or
    ``runs/<run id>``)."""
    run_id = cfg.run_id or f"{_dataset_base(cfg)}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return replace(cfg, run_id=run_id), Path(settings.out_dir or os.path.join("runs", run_id))


def _dataset_base(cfg: ExperimentConfig) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.dataset.split(":")[0]).name)


def _service_env(cfg: ExperimentConfig) -> dict[str, str]:
    """The environment of the zygote and so of every service (store credentials are added per
    service): machine-local ``FEDSEQ_*`` settings pass through, no other ``FEDSEQ_*`` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_") or k in (
        "FEDSEQ_DATA_ROOT", "FEDSEQ_DATA_CACHE", "FEDSEQ_REDIS_SERVER")}
    env["PYTHONUNBUFFERED"] = "1"
    env["FEDSEQ_PARENT_PID"] = str(os.getpid())  # services exit if this launcher dies without cleanup
    env["OMP_NUM_THREADS"] = str(max(cfg.threads, 1))
    return env


def _check(zygote: Zygote, cfg: ExperimentConfig, env: dict[str, str], log_dir: Path, timeout: float) -> int:
    """``fedseq check`` of ``cfg``, forked from the zygote: what every runner builds first
    (cli/plugins.py ``prepare``). 0 when it passes; else 2 (a bad configuration) or 1, with its
    message written to stderr. Its output is appended to ``check.log`` in the log folder."""
    log, config = log_dir / "check.log", log_dir / f"check-{os.getpid()}.json"
    config.write_text(cfg.to_json())
    try:
        rc = zygote.spawn("check", ["--log-level", "warning", "check", "--config", str(config)], env, log,
                          timeout).wait(timeout)
    except (ZygoteGone, subprocess.TimeoutExpired) as e:
        zlog = log_dir / "zygote.log"
        tail = zlog.read_text(errors="replace").strip()[-2000:] if zlog.exists() else ""
        print(f"fedseq run: the configuration check did not finish: {e}" + (f"\n{tail}" if tail else ""),
              file=sys.stderr)
        return 1
    finally:
        config.unlink(missing_ok=True)
    if rc != 0:
        lines = log.read_text(errors="replace").strip().splitlines()[-20:] if log.exists() else []
        text = "\n".join(lines)  # this check's lines end the log
        print(text or f"fedseq run: the configuration check exited with status {rc}", file=sys.stderr)
    return 0 if rc == 0 else 2 if rc == 2 else 1


def _make_dirs(*dirs: Path) -> list[Path]:
    """Make ``dirs`` (with their parents); the topmost folder each made that did not exist before."""
    made: list[Path] = []
    for d in dirs:
        top = next((p for p in reversed((d, *d.parents)) if not p.exists()), None)
        d.mkdir(parents=True, exist_ok=True)
        if top is not None and not any(top == m or m in top.parents for m in made):
            made.append(top)
    return made


def _plan(cfg: ExperimentConfig, settings: LaunchSettings, out: Path, log_dir: Path, env: dict[str, str],
          zygote: Zygote) -> _Plan:
    """The run's config file and security material (once its check passed)."""
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    attackers = settings.attackers if cfg.attack != "none" else 0
    operator: Identity | None = None
    if settings.insecure:
        print("fedseq run: INSECURE: no TLS and no role checks; any local process can call the services",
              file=sys.stderr)
    else:
        names = {"server": "server", "orchestrator": "orchestrator", "operator": "operator"}
        names.update({f"client-{i}": "worker" for i in range(settings.workers)})
        names.update({f"attacker-{i}": "worker" for i in range(attackers)})
        make_certs(out / "tls", names)
        operator = Identity.load(out / "tls", "operator")
        # the roster is the orchestrator's alone: outside the certificate folder every service reads
        roster_mod.make(settings.workers, attackers).write(out / roster_mod.ROSTER_FILE)
    return _Plan(cfg, settings, out, log_dir, env, operator, zygote)


def _store(stack: ExitStack, plan: _Plan) -> tuple[_Redis | None, dict[str, str]]:
    """The run's Redis (None for the operator's ``--redis-url``) and the store URL of each service kind."""
    if plan.settings.redis_url:
        # the operator's Redis: its credentials go to the server and the orchestrator only; workers
        # read models through the server's GetModel (no store URL), so an attacker worker holds none
        return None, {**dict.fromkeys(("server", "orchestrator"), plan.settings.redis_url), "worker": ""}
    redis = _Redis(plan.out, plan.log_dir, acl=not plan.settings.insecure).start()
    stack.callback(redis.stop)
    return redis, {r: redis.server.url_for(r) for r in ("server", "orchestrator", "worker")}


def _start_services(plan: _Plan, procs: list[_Proc], store_urls: dict[str, str]) -> tuple[_Proc, str]:
    """Start the server, the orchestrator and the workers (each appended to ``procs`` as it starts, so
    a failure stops those already running); the orchestrator and its address once all are up."""
    cfg, settings, out = plan.cfg, plan.settings, plan.out
    server = plan.start("server", ["serve-server", "--port", "0", *plan.security("server")], store_urls["server"])
    procs.append(server)
    agg = f"127.0.0.1:{server.port(settings.startup_timeout)}"
    orch = plan.start("orchestrator", ["serve-orchestrator", "--config", str(out / "config.json"), "--port", "0",
                                       "--aggregator", agg, "--min-workers", str(settings.workers + plan.attackers),
                                       "--round-timeout", str(settings.round_timeout),
                                       "--client-shards", str(settings.workers),
                                       "--attacker-shards", str(plan.attackers),
                                       "--out", str(out), "--exit-when-done", *plan.security("orchestrator"),
                                       *([] if settings.insecure else ["--roster", str(out / roster_mod.ROSTER_FILE)])],
                      store_urls["orchestrator"])
    procs.append(orch)
    orch_addr = f"127.0.0.1:{orch.port(settings.startup_timeout)}"
    kinds = [("client", i) for i in range(settings.workers)] + [("attacker", i) for i in range(plan.attackers)]
    for kind, i in kinds:
        name = f"{kind}-{i}"
        procs.append(plan.start(name, [f"serve-{kind}", "--orchestrator", orch_addr, "--threads", str(cfg.threads),
                                       "--device", cfg.device, "--worker-id", name, *plan.security(name)],
                                store_urls["worker"]))
    for p in procs:  # workers listen on no port: started is when their metrics endpoint is up
        if p is not orch and p is not server:
            p.wait_started(settings.startup_timeout)
    return orch, orch_addr


def _report(out: Path, log_dir: Path, status) -> int:
    """Print the results table of a finished run; 0 if it is done, else 1."""
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
    private = privacy_line(summ.get("privacy"))
    if private:
        print(private)
    return 0


def _mark_failed(path: Path, message: str) -> None:
    """A results bundle whose run failed says so (it would otherwise stay "running")."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    results.setdefault("summary", {}).update(state="failed", message=message)
    path.write_text(json.dumps(results, indent=2))


def _follow(orch_addr: str, procs: list[_Proc], orch: _Proc, operator: Identity | None, redis: _Redis | None = None):
    """Poll the orchestrator and print progress until the run ends. A service or Redis killed by a
    signal is restarted (bounded); one that exits with an error fails the run."""
    stub = orchestrator_pb2_grpc.OrchestratorStub(channel(orch_addr, identity=operator, peer="orchestrator"))
    tty = sys.stderr.isatty()
    last_line = ""
    last_epoch = 0
    status = None
    while True:
        for p in ([redis] if redis is not None else []) + procs:
            event = p.supervise() if (p is not orch or orch.popen.poll() not in (0, None)) else None
            if event:
                sys.stderr.write(("\r" if tty else "") + f"fedseq run: {event}".ljust(110) + "\n")
        try:
            status = stub.GetStatus(orchestrator_pb2.StatusRequest(), timeout=10)
        except grpc.RpcError:
            if orch.popen.poll() == 0:
                break
            time.sleep(0.5)
            continue
        if status.state in ("done", "failed") or (status.state == "stopped"
                                                  and status.message.startswith(OPERATOR_STOP)):
            break
        # "stopped" without the operator's word: a signal (SIGTERM) is ending the orchestrator
        # mid-run; it exits EXIT_INTERRUPTED and supervise() restarts it, which resumes the run
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


