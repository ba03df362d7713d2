"""The zygote that forks the services of `fedseq run` (cli/zygote.py): each child is a real
process with the exit status, signals, environment and log of an exec'd one; the zygote never
holds a child's secret (it passes the environment pipe on unread); children leave with it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from _procmem import memory_holds

from cli.zygote import Zygote

SECRET = "zygote-test-s3cret-4f1d"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _wait(pred, timeout: float = 30) -> None:
    end = time.time() + timeout
    while not pred():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def _server(zygote: Zygote, tmp: Path, redis_url: str, name: str = "server"):
    port_file = tmp / f"{name}.port"
    proc = zygote.spawn(name, ["serve-server", "--insecure", "--port", "0", "--port-file", str(port_file)],
                        _env(FEDSEQ_STORE_URL=redis_url, FEDSEQ_ZYGOTE_TEST=SECRET), tmp / f"{name}.log")
    _wait(lambda: port_file.exists() or proc.poll() is not None)
    assert proc.poll() is None, (tmp / f"{name}.log").read_text()
    return proc


def test_a_child_has_its_own_environment_and_the_zygote_never_holds_it(zygote, tmp_path, redis_url):
    # Execute
    proc = _server(zygote, tmp_path, redis_url)
    try:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        # Assert: the secret is in the child's memory (the scan sees it), never in the zygote's
        assert memory_holds(proc.pid, SECRET.encode())
        assert not memory_holds(zygote.proc.pid, SECRET.encode())
        assert SECRET.encode() not in environ  # /proc shows the zygote's start environment, not the child's
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "server"
        assert os.getsid(proc.pid) == proc.pid  # its own session: the launcher signals its group
        assert "INSECURE" in (tmp_path / "server.log").read_text()  # its stderr went to its log
    finally:
        proc.kill()
    assert proc.wait(10) == -signal.SIGKILL


def test_exit_statuses_are_reported_as_subprocess_reports_them(zygote, tmp_path, redis_url):
    # Prepare: a configuration error (exit 2), a clean SIGTERM shutdown (0)
    bad = zygote.spawn("bad", ["serve-server", "--port", "0"], _env(), tmp_path / "bad.log")
    proc = _server(zygote, tmp_path, redis_url)
    # Execute
    proc.terminate()
    # Assert
    assert bad.wait(30) == 2, (tmp_path / "bad.log").read_text()
    assert (tmp_path / "bad.log").read_text() == "fedseq: configuration error: --store-url is required (or set FEDSEQ_STORE_URL)\n"
    assert proc.wait(30) == 0


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_children_leave_with_their_zygote(tmp_path, redis_url):
    # Prepare: a zygote of this test's own, and a running service forked by it
    zygote = Zygote(_env(), "test", tmp_path / "zygote.log")
    proc = _server(zygote, tmp_path, redis_url)
    pid = proc.pid
    # Execute: the launcher's end goes away (as when the launcher is killed)
    zygote.close()
    # Assert: the zygote is gone, and its child shuts down on its own
    assert zygote.proc.poll() is not None
    _wait(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 15)


def test_a_spawn_after_the_zygote_is_gone_is_a_clear_error(tmp_path):
    from cli.zygote import ZygoteGone

    zygote = Zygote(_env(), "test", tmp_path / "zygote.log")
    zygote.proc.kill()
    zygote.proc.wait()
    with pytest.raises(ZygoteGone):
        zygote.spawn("x", ["--help"], _env(), tmp_path / "x.log", timeout=10)
    zygote.close()


def test_a_child_enters_the_network_namespace_it_is_given_before_it_runs(zygote, tmp_path):
    """``spawn(netns=PATH)``: the child setns()es into PATH first (tests/test_netns.py runs a whole
    federation that way); a namespace it cannot enter ends it with the reason, running nothing."""
    # Prepare: its own namespace is a namespace file it can enter without privileges beyond its own
    own = f"/proc/{os.getpid()}/ns/net"
    # Execute
    ok = zygote.spawn("ns-ok", ["data", "synthetic:users=10,items=40,max_length=20"], _env(), tmp_path / "ok.log", netns=own)
    bad = zygote.spawn("ns-bad", ["data", "synthetic:users=10,items=40,max_length=20"], _env(), tmp_path / "bad.log",
                       netns=str(tmp_path / "no-such-namespace"))
    # Assert
    assert ok.wait(30) == 0, (tmp_path / "ok.log").read_text()
    assert bad.wait(30) != 0
    log = (tmp_path / "bad.log").read_text()
    assert "no-such-namespace" in log and "users" not in log, log
