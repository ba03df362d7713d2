"""Two Ray nodes on this machine, as tests/test_sweep_ray.py and bench/bench_sweep_ray.py use
them: ``ray start --block`` each in a session of its own (so every process of a node, Ray's
workers included, can be found and killed: a machine lost), one CPU each; and the numbers of a
sweep's cells, which both compare across executors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

TIMINGS = {"seconds", "train_seconds", "compute_seconds", "aggregate_seconds", "eval_seconds"}


def cell_numbers(out: Path) -> dict[str, list[dict[str, object]]]:
    """Every cell's epochs in sweep folder ``out``, less the wall-clock timings."""
    return {p.parent.name: [{k: v for k, v in e.items() if k not in TIMINGS}
                            for e in json.loads(p.read_text())["epochs"]]
            for p in sorted(out.glob("*/results.json"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node(*flags: str, env: dict[str, str], cpus: int = 1) -> subprocess.Popen[str]:
    """``ray start --block`` in a session of its own (every process of the node is in it); it is
    up once :func:`started` returns."""
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray_cli), "start", "--block", "--disable-usage-stats", "--num-cpus", str(cpus),
                             "--object-store-memory", str(80 * 2**20), "--node-ip-address", "127.0.0.1", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)


def started(node: subprocess.Popen[str]) -> None:
    """Wait until ``node`` says it is up (then drain its output in a thread); AssertionError with
    its output when it exits first."""
    seen = []
    assert node.stdout is not None
    for line in node.stdout:
        seen.append(line)
        if "Ray runtime started" in line:
            threading.Thread(target=node.stdout.read, daemon=True).start()
            return
    raise AssertionError("ray start failed:\n" + "".join(seen[-30:]))


def session(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid``: a node's (Ray gives its workers process groups of their own)."""
    out = []
    for q in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(q.pid) == sid:
                out.append(q)
        except OSError:
            pass
    return out


def kill_node(node: subprocess.Popen[str]) -> None:
    """SIGKILL every process of the node: a machine lost."""
    for q in session(node.pid):
        with contextlib.suppress(psutil.Error):
            q.send_signal(signal.SIGKILL)
    node.wait()


@contextlib.contextmanager
def two_nodes(env: dict[str, str], cpus: int = 1) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A head (resource ``head``) and a second node (resource ``second``), ``cpus`` CPUs each, run
    with ``env``; the address and the second node's process. Both are killed on the way out."""
    port = free_port()
    nodes = []
    try:
        nodes.append(ray_node("--head", "--port", str(port), "--include-dashboard=false",
                              "--ray-client-server-port", str(free_port()), "--resources", '{"head": 1}', env=env,
                              cpus=cpus))
        # at once: the second node waits for the head's GCS itself
        nodes.append(ray_node("--address", f"127.0.0.1:{port}", "--resources", '{"second": 1}', env=env, cpus=cpus))
        for n in nodes:
            started(n)
        yield f"127.0.0.1:{port}", nodes[1]
    finally:
        for n in reversed(nodes):
            kill_node(n)
