"""The container-facing edges of the ``fedseq`` command: the console script handles SIGTERM from
its first line (cli/entry.py), and ``python -m fedseq.healthcheck`` reports a service's gRPC health,
over mutual TLS when it has certificates. Real processes, real gRPC servers on port 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedseq.healthcheck import check, check_file
from fedseq.rpc import Service
from fedseq.tls import Identity, make_certs

ROOT = Path(__file__).resolve().parents[1]


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (bit 15 of SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FEDSEQ_PARENT_PID", None)
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_sigterm_while_importing_stops_the_command_at_once():
    # a worker with nowhere to register: it would wait for its orchestrator forever
    p = _spawn("-m", "cli.entry", "serve-client", "--insecure", "--orchestrator", "127.0.0.1:9", "--port", "0")
    t0 = time.monotonic()
    while not _catches_sigterm(p.pid):  # cli.entry installs its handler before importing torch
        assert p.poll() is None and time.monotonic() - t0 < 30, p.communicate()
        time.sleep(0.005)
    handled = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, err[-2000:])
    assert "while starting" in err
    assert time.monotonic() - handled < 5, "the signal waited for torch to load"


def test_without_the_entry_point_the_signal_kills_the_process():
    """The control: plain ``python -m cli.main`` dies of SIGTERM's default action during the
    import (as PID 1 in a container it would ignore the signal instead)."""
    p = _spawn("-m", "cli.main", "serve-client", "--insecure", "--orchestrator", "127.0.0.1:9")
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_sigterm_after_start_shuts_the_service_down_gracefully(tmp_path):
    """A worker (which listens on no port) keeps its health file while it retries an orchestrator
    that is not there, and a SIGTERM ends it at once with status 0."""
    health = tmp_path / "health.json"
    p = _spawn("-m", "cli.entry", "serve-client", "--insecure", "--orchestrator", "127.0.0.1:9",
               "--health-file", str(health))
    t0 = time.monotonic()
    while not health.exists():
        assert p.poll() is None and time.monotonic() - t0 < 120, p.communicate()
        time.sleep(0.05)
    alive, why = check_file(str(health), max_age=30)
    ready, why_not = check_file(str(health), max_age=30, ready=True)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert alive and why.endswith("alive")  # its loop runs...
    assert not ready and "not connected" in why_not  # ...but it has no orchestrator
    assert p.returncode == 0  # the graceful shutdown, not the early exit


def test_health_file_ages_and_readiness(tmp_path):
    import json

    path = tmp_path / "h.json"
    assert not check_file(str(path))[0]  # no file: unhealthy
    path.write_text(json.dumps({"time": time.time() - 100, "connected": True, "ready": True}))
    ok, why = check_file(str(path), max_age=60)
    assert not ok and "more than 60s" in why  # a stale file: the worker's loop is stuck or gone
    path.write_text(json.dumps({"time": time.time(), "connected": True, "ready": False}))
    assert check_file(str(path)) == (True, f"{path}: connected")
    assert check_file(str(path), ready=True) == (False, f"{path}: connected, still loading its users")
    path.write_text("{not json")
    assert not check_file(str(path))[0]


def test_console_script_is_the_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'fedseq = "cli.entry:script"' in text


def _service(identity=None) -> Service:
    return Service([], port=0, identity=identity).start()


def test_healthcheck_plaintext():
    svc = _service()
    try:
        ok, why = check(str(svc.port))
        assert ok, why
        assert "SERVING" in why
    finally:
        svc.stop(0)
    ok, why = check(str(svc.port), timeout=1)
    assert not ok and "UNAVAILABLE" in why
    assert check("0") == (True, "no fixed port: nothing to check")


def test_healthcheck_over_mtls_with_the_services_own_certificate(tmp_path):
    make_certs(tmp_path)
    svc = _service(Identity.load(tmp_path, "server"))
    try:
        ok, why = check(str(svc.port), tls_dir=str(tmp_path), tls_name="server")
        assert ok, why
        # a plaintext check cannot talk to a TLS-only server
        assert not check(str(svc.port), timeout=2)[0]
        # a certificate of another CA is refused
        other = tmp_path / "other"
        make_certs(other)
        ok, why = check(str(svc.port), tls_dir=str(other), tls_name="server", timeout=2)
        assert not ok, why
        ok, why = check(str(svc.port), tls_dir=str(tmp_path / "missing"), tls_name="server")
        assert not ok and "not found" in why
        assert not check(str(svc.port), tls_dir=str(tmp_path), tls_name=None)[0]
    finally:
        svc.stop(0)


def test_healthcheck_command_exit_codes(tmp_path):
    svc = _service()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSEQ_PORT": str(svc.port)}
        env.pop("FEDSEQ_TLS_DIR", None)
        r = subprocess.run([sys.executable, "-m", "fedseq.healthcheck"], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedseq.healthcheck"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert "| torch" not in r.stderr, "the health check must stay cheap (no torch)"
    finally:
        svc.stop(0)
    r = subprocess.run([sys.executable, "-m", "fedseq.healthcheck", "--timeout", "1"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "unhealthy" in r.stderr


# A script run as ``python -c``: the exit handler first, then a late atexit handler, a logging
# handler with a buffered record, unflushed stdout, and an object whose finalizer only the module
# teardown would run. ARM is the status given to fastexit.arm, or None for an unarmed process.
_EXIT_SCRIPT = """
import sys
from cli import fastexit
fastexit.install()
import atexit, logging
out = sys.argv[1]
class Torn:
    def __del__(self, open=open, path=out + ".teardown"):  # builtins may be gone by then
        open(path, "w").close()
keep = Torn()
atexit.register(lambda: open(out + ".atexit", "w").close())
logging.basicConfig(filename=out + ".log", level=logging.INFO)
logging.info("logged before the exit")
sys.stdout.write("unflushed")
arm = {arm}
sys.exit(fastexit.arm(arm) if arm is not None else 5)
"""


@pytest.mark.parametrize("arm", [3, None])
def test_an_armed_exit_runs_the_handlers_flushes_and_skips_only_the_teardown(tmp_path, arm):
    # Execute
    p = _spawn("-c", _EXIT_SCRIPT.format(arm=arm), str(tmp_path / "p"))
    out, err = p.communicate(timeout=60)
    # Assert: the armed status (else the script's own), the later atexit handler ran, the log record
    # and stdout were flushed; the teardown (the finalizer) ran only where the exit was not armed
    assert p.returncode == (3 if arm is not None else 5), err
    assert out == "unflushed" and (tmp_path / "p.atexit").exists()
    assert "logged before the exit" in (tmp_path / "p.log").read_text()
    assert (tmp_path / "p.teardown").exists() == (arm is None)



def test_the_launcher_builds_and_checks_a_run_without_importing_torch():
    """``fedseq run``'s own process stays torch-free (its zygote imports torch for the services):
    the parser, the run config with every option checked, and the launcher module."""
    # Prepare
    code = ("import sys\nfrom cli.main import parser\nfrom cli.flags import experiment_config\n"
            "import cli.launcher\n"
            "a = parser().parse_args(['run', '--attack', 'dv-fsr', '--codec', 'int8-row', "
            "'--defense', 'ldp:clip=1,noise=0.1', '--device', 'cpu'])\n"
            "cfg = experiment_config(a, quickstart=True)\n"
            "print(cfg.codec, cfg.ldp, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])\n")
    # Execute
    proc = _spawn("-c", code)
    out, err = proc.communicate(timeout=60)
    # Assert
    assert proc.returncode == 0, err
    assert out.split() == ["int8-row", "True", "[]"], out


def test_check_builds_the_run_and_says_what_it_built(fedseq_cli):
    # Execute (bad configurations: tests/test_e2e.py)
    rc, out, err = fedseq_cli("check", "--attack", "dv-fsr", "--epochs", "1")
    # Assert
    assert rc == 0, err
    assert "fedseq check: ok: synthetic (400 users, 300 items) / sasrec, rule fedavg, attack dv-fsr" in out, out
    assert "malicious clients" in out, out
