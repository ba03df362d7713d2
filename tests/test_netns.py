"""Workers behind NAT (issue 24): every worker dials out, nothing dials a worker.

A real federation of ``fedseq serve-*`` processes split over network namespaces (tests/_netns.py):
Redis, the aggregation server and the orchestrator in a "hub" namespace; two client workers and an
attacker worker, each in its own namespace on its own private subnet behind a router that
masquerades them to the hub's subnet. The hub has no route to a worker and the router drops new
connections from the hub's side, so a run can only work when the workers open every connection
(one stream to the orchestrator, uploads to the server, model reads from Redis). The run must
finish, compute what ``fedseq sim`` computes in-process, and no worker may listen on a TCP port.

Needs root, ``ip netns``, veth pairs and iptables NAT (skipped with the reason otherwise). Slow:
four Python processes that import torch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _netns as netns
import pytest

from cli.sim import run_inprocess
from cli.zygote import Forked, Zygote
from fedseq.config import ExperimentConfig
from fedseq.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
WORKERS = {"client-0": "client", "client-1": "client", "attacker-0": "attacker"}  # certificate name -> kind
# tests/test_engine_equal.py's BASE with one of its FAST cases (an attack and a robust rule), on the CPU
CFG = ExperimentConfig(run_id="netns", dataset="synthetic:users=24,items=40,max_length=20", epochs=1,
                       clients_per_round=8, lr=0.05, num_negatives=20, eval_every=1, threads=1, device="cpu",
                       defense="mixed-rfa", attack="dv-fsr", malicious_ratio=0.1)
METRICS = ("hr@10", "ndcg@10", "er@5", "er@10", "er@20")
RUN_TIMEOUT = 150.0  # seconds for the whole networked run (it takes ~20 s)
PROBE = 7301  # TCP port of the throw-away listeners of the reachability checks


@pytest.fixture
def topology() -> Iterator[netns.Topology]:
    tag = f"fsq{os.getpid()}"
    try:
        ipt = netns.preflight(tag)
    except netns.NetnsUnavailable as e:
        pytest.skip(f"workers-behind-NAT test needs network namespaces: {e}")
    topo = netns.build(tag, ipt, list(WORKERS))
    try:
        yield topo
    finally:
        errors = topo.destroy()
        assert not errors, f"namespaces left behind: {errors}"


def _python(topo: netns.Topology, ns: str, code: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return topo.sh(ns, sys.executable, "-c", code, check=False, timeout=timeout)


@contextlib.contextmanager
def _listener(topo: netns.Topology, ns: str, host: str) -> Iterator[None]:
    """A TCP listener on ``host:PROBE`` inside ``ns`` that answers ``ok`` to whoever connects."""
    code = ("import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(({host!r},{PROBE}))\ns.listen()\nprint('up',flush=True)\ns.settimeout(30)\n"
            "while True:\n c,a=s.accept()\n c.sendall(('ok '+a[0]).encode())\n c.close()\n")
    proc = subprocess.Popen(netns.netns_exec(ns, sys.executable, "-c", code), stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up", "probe listener did not start"
        yield
    finally:
        proc.kill()
        proc.wait(10)


def _dial(host: str, timeout: float = 3) -> str:
    return (f"import socket\ns=socket.create_connection(({host!r},{PROBE}),{timeout})\ns.settimeout(3)\n"
            "print(s.recv(64).decode())")


def test_workers_reach_the_hub_through_nat_and_the_hub_reaches_no_worker(topology):
    topo = topology
    # the hub knows its own subnet only
    routes = topo.sh(topo.hub, "ip", "-4", "route").stdout
    assert netns.SITE_NET not in routes and "default" not in routes, routes
    # Execute / Assert: a worker dials the hub, and the hub sees the router's address, not the worker's
    with _listener(topo, topo.hub, topo.hub_ip):
        for worker, ns in topo.sites.items():
            out = _python(topo, ns, _dial(topo.hub_ip))
            assert out.returncode == 0, f"{worker} cannot reach the hub: {out.stderr[-500:]}"
            assert out.stdout.strip() == f"ok {netns.ROUTER_WAN_IP}", out.stdout
    # ... and nothing on the hub reaches a worker, even one listening on every interface
    for worker, ns in topo.sites.items():
        with _listener(topo, ns, "0.0.0.0"):
            out = _python(topo, topo.hub, _dial(topo.worker_ips[worker]))
            assert out.returncode != 0 and "ok" not in out.stdout, f"the hub reached {worker}: {out.stdout}"
            assert "unreachable" in out.stderr, out.stderr[-500:]
            # not even with a route to the sites: the router drops connections from the hub's side
            topo.sh(topo.hub, "ip", "route", "add", f"{netns.SITE_NET}.0.0/16", "via", netns.ROUTER_WAN_IP)
            try:
                out = _python(topo, topo.hub, _dial(topo.worker_ips[worker], timeout=1))
            finally:
                topo.sh(topo.hub, "ip", "route", "del", f"{netns.SITE_NET}.0.0/16")
            assert out.returncode != 0 and "ok" not in out.stdout, f"the hub reached {worker}: {out.stdout}"
            assert "timed out" in out.stderr, out.stderr[-500:]  # the SYN was dropped, not refused
            # while the router, on the site's side, does reach it (the listener is real)
            out = _python(topo, topo.router, _dial(topo.worker_ips[worker]))
            assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-500:]
    ping = shutil.which("ping")
    if ping:
        out = topo.sh(topo.hub, ping, "-c", "1", "-W", "1", topo.worker_ips["client-0"], check=False)
        assert out.returncode != 0, out.stdout


class _Services:
    """The run's processes (``fedseq ...`` forked by the zygote into namespace NS), one log file each."""

    def __init__(self, topo: netns.Topology, log_dir: Path, zygote: Zygote) -> None:
        self.topo, self.log_dir, self.zygote = topo, log_dir, zygote
        self.procs: dict[str, Forked] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_") or k in (
            "FEDSEQ_DATA_ROOT", "FEDSEQ_DATA_CACHE", "FEDSEQ_REDIS_SERVER")}
        self.env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FEDSEQ_PARENT_PID=str(os.getpid()))

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, ns: str, argv: list[str], store_url: str = "") -> Forked:
        # store credentials in the environment, as `fedseq run` passes them (argv is public)
        env = {**self.env, **({"FEDSEQ_STORE_URL": store_url} if store_url else {})}
        proc = self.zygote.spawn(name, ["--log-level", "info", *argv], env, self.log(name), cwd=str(ROOT),
                                 netns=f"/run/netns/{ns}")
        self.procs[name] = proc
        return proc

    def port(self, name: str, path: Path, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text())
            self.check()
            time.sleep(0.05)
        raise AssertionError(f"{name} wrote no port file within {timeout:.0f} s (logs printed below)")

    def check(self, finished_ok: tuple[str, ...] = ()) -> None:
        """AssertionError (with the logs) when a process ended before its time."""
        for name, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None and not (rc == 0 and name in finished_ok):
                raise AssertionError(f"{name} exited with code {rc} (logs printed below)")

    def tails(self, lines: int = 30) -> str:
        out = []
        for name in self.procs:
            try:
                text = self.log(name).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            out.append(f"----- {name} ({self.log(name)}) -----\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _certs(tmp: Path, fedseq_cli) -> tuple[Path, Path, dict[str, Path]]:
    """``fedseq certs DIR --clients 2 --attackers 1`` (in this process), split as a deployment
    would: the hub's folder (CA, server, orchestrator, operator), the roster apart (the
    orchestrator's only), and one folder per worker site holding the CA and that worker's own
    certificate and key."""
    made = tmp / "certs"
    rc, _out, err = fedseq_cli("certs", made, "--clients", "2", "--attackers", "1")
    assert rc == 0, err[-2000:]
    roster = tmp / "roster.json"
    (made / "roster.json").replace(roster)
    sites = {}
    for worker in WORKERS:
        site = tmp / "sites" / worker
        site.mkdir(parents=True)
        for name in ("ca.pem", f"{worker}.pem", f"{worker}.key"):
            shutil.copy2(made / name, site / name)
        sites[worker] = site
    return made, roster, sites


def test_a_federation_of_workers_behind_nat_runs_and_computes_the_sim_run(topology, tmp_path, fedseq_cli, zygote):
    # Prepare: certificates (one per worker, each site holding only its own), Redis on the hub with per-role users
    topo = topology
    tls, roster, sites = _certs(tmp_path, fedseq_cli)
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CFG.to_dict(), indent=2, sort_keys=True))
    redis = RedisServer(host=topo.hub_ip, acl=True, log_file=logs / "redis.log")
    with netns.entered(topo.hub):  # forked there, and its start-up check connects from there
        redis.start()
    services = _Services(topo, logs, zygote)
    try:
        # Execute: the hub's services listen on the hub's address; the workers dial them from behind NAT
        def tls_flags(name: str, folder: Path) -> list[str]:
            return ["--tls-dir", str(folder), "--tls-name", name]

        hub = topo.hub_ip
        services.start("server", topo.hub, ["serve-server", "--host", hub, "--port", "0", "--port-file",
                                            str(logs / "server.port"), *tls_flags("server", tls)],
                       store_url=redis.url_for("server"))
        aggregator = f"{hub}:{services.port('server', logs / 'server.port')}"
        orch = services.start("orchestrator", topo.hub, [
            "serve-orchestrator", "--config", str(config), "--host", hub, "--port", "0", "--port-file",
            str(logs / "orchestrator.port"), "--aggregator", aggregator, "--min-workers", str(len(WORKERS)),
            "--round-timeout", "60", "--worker-wait", "90", "--out", str(out), "--exit-when-done",
            "--roster", str(roster), *tls_flags("orchestrator", tls)], store_url=redis.url_for("orchestrator"))
        orch_port = services.port("orchestrator", logs / "orchestrator.port")
        orchestrator = f"{hub}:{orch_port}"
        for name, kind in WORKERS.items():
            services.start(name, topo.sites[name], [
                f"serve-{kind}", "--orchestrator", orchestrator, "--aggregator", aggregator, "--threads", "1",
                "--device", "cpu", *tls_flags(name, sites[name])], store_url=redis.url_for("worker"))
        # while the run goes on: no worker listens, each holds a stream to the orchestrator, and the
        # hub sees every worker connection coming from the router (the NAT), none from a worker address
        listening: dict[str, set[tuple[str, int]]] = {name: set() for name in WORKERS}
        streams: dict[str, bool] = dict.fromkeys(WORKERS, False)
        hub_peers: set[str] = set()
        end = time.monotonic() + RUN_TIMEOUT
        while orch.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"the run did not finish within {RUN_TIMEOUT:.0f} s (logs printed below)")
            services.check()
            for name in WORKERS:
                for sock in netns.owned_sockets(services.procs[name].pid):
                    if sock.listening:
                        listening[name].add(sock.local)
                    elif sock.established and sock.remote == (hub, orch_port):
                        streams[name] = True
            for sock in netns.tcp_sockets(orch.pid):
                if sock.established and sock.local == (hub, orch_port) and sock.remote[0] != hub:
                    hub_peers.add(sock.remote[0])
            time.sleep(0.2)
        results_file = out / "results.json"
        assert orch.returncode == 0, f"orchestrator exited with {orch.returncode} (logs printed below)"
        services.check(finished_ok=("orchestrator",))
        results = json.loads(results_file.read_text())
        # the sim's run of the same config, in this process
        sim = run_inprocess(CFG, None, progress=lambda _line: None)
    except BaseException:
        print(services.tails(60))
        with contextlib.suppress(OSError):
            print(f"----- redis ({redis.log_path}) -----\n" + "\n".join(
                Path(str(redis.log_path)).read_text(errors="replace").splitlines()[-20:]))
        raise
    finally:
        services.stop()
        redis.stop()

    # Assert: the run is done and equal to the sim's
    assert results["summary"]["state"] == "done", results["summary"]
    assert len(results["epochs"]) == len(sim["epochs"]) == CFG.epochs
    got, want = results["epochs"][-1], sim["epochs"][-1]
    for k in METRICS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), (k, got[k], want[k])
    for k in ("rounds", "accepted", "rejected", "malicious_updates", "malicious_kept"):
        assert got[k] == want[k], (k, got[k], want[k])
    assert got["malicious_updates"] == 2  # m = floor(24 * 0.1), hosted by the attacker worker behind NAT
    # no worker listened on any TCP port (no --metrics-port is set), and every one dialled out
    assert all(not ports for ports in listening.values()), f"workers listening on TCP: {listening}"
    assert all(streams.values()), f"no stream to the orchestrator seen from: {[n for n, s in streams.items() if not s]}"
    assert hub_peers == {netns.ROUTER_WAN_IP}, \
        f"peers of the orchestrator's port: {hub_peers}; expected only the router {netns.ROUTER_WAN_IP} (the NAT)"
