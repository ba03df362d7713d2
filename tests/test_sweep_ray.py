"""``fedseq sweep --executor ray`` (cli/sweep_ray.py) on a real Ray cluster of two nodes on this
machine (``ray start --head`` and ``ray start --address``, each its own session of processes, one CPU
and its own resource label): cells run on both nodes, their numbers equal the local executor's bit for
bit, and a sweep whose second node is killed (SIGKILL to every process of it, the raylet and the
cell's process with them) mid-cell still finishes, the lost cell rerun on the head.

Without Ray installed (``pip install 'fedseq[ray]'``) the cluster test skips with that reason; the
flag's own checks run anyway."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.sweep import add_arguments, main
from cli.sweep_ray import RAY_MISSING
from cli.sweep_run import inprocess_cell
from fedseq.config import ConfigError
from tests._ray_cluster import cell_numbers, kill_node, session, two_nodes

TINY = ["--set", "dataset=synthetic:users=30,items=50,max_length=15", "--set", "epochs=2",
        "--set", "clients_per_round=8", "--set", "num_negatives=20", "--set", "lr=0.01",
        "--attacks", "none,dv-fsr", "--malicious-ratios", "0.1", "--engine", "inprocess"]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Two nodes (tests/_ray_cluster.py) that admit only holders of this test's token (Ray's token
    authentication; this process holds it too); the address and the second node's process."""
    for k, v in {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(k, v)  # before Ray is imported: it reads them once
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'fedseq[ray]'")
    with two_nodes(dict(os.environ)) as nodes:
        yield nodes


def _nodes(out: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["node_id"] for p in out.glob("*/executor.json")}


def _kill_mid_cell(node: subprocess.Popen[str], killed: list[str], stop: threading.Event) -> None:
    """Kill the second node once one of its processes runs a cell."""
    while not stop.wait(0.05):
        if any("cli.entry" in (q.info["cmdline"] or []) for q in session(node.pid)):
            kill_node(node)
            killed.append(time.strftime("%X"))
            return


@pytest.mark.slow
def test_a_sweep_spans_both_nodes_equals_the_local_one_and_survives_a_lost_node(cluster, tmp_path):
    # Prepare: the cluster; the local executor's numbers for the same four cells
    address, second = cluster
    local = tmp_path / "local"
    assert main(_args(*TINY, "--seeds", "0,1", "--jobs", "2", "--out", str(local)), runner=inprocess_cell) == 0
    # Execute: two cells on Ray (one per node: each has one CPU); then the sweep with seed 1 added,
    # the second node killed mid-cell
    on_ray = tmp_path / "ray"
    assert main(_args(*TINY, "--seeds", "0", "--executor", "ray", "--address", address, "--out", str(on_ray))) == 0
    first = _nodes(on_ray)
    killed: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_mid_cell, args=(second, killed, stop), daemon=True)
    watcher.start()
    try:
        rc = main(_args(*TINY, "--seeds", "0,1", "--executor", "ray", "--address", address, "--out", str(on_ray)))
    finally:
        stop.set()
        watcher.join()
    # Assert: the first two cells ran on both nodes and were kept; the second node died mid-cell
    # and both seed-1 cells finished on the one left; every number is the local executor's
    assert len(first) == 2 and len(set(first.values())) == 2, first
    assert killed and rc == 0 and second.poll() is not None
    nodes = _nodes(on_ray)
    assert {k: v for k, v in nodes.items() if k in first} == first
    later = {v for k, v in nodes.items() if k not in first}
    assert len(nodes) == 4 and len(later) == 1 and later <= set(first.values())
    assert cell_numbers(on_ray) == cell_numbers(local) and len(cell_numbers(local)) == 4
    assert json.loads((on_ray / "sweep.json").read_text())["failed"] == []


def test_ray_missing_says_how_to_install_it(monkeypatch, tmp_path):
    # Prepare: no importable ray
    monkeypatch.setitem(sys.modules, "ray", None)
    # Execute / Assert: a ConfigError (exit 2) that names the extra; nothing ran
    with pytest.raises(ConfigError, match=r"pip install 'fedseq\[ray\]'") as e:
        main(_args(*TINY, "--seeds", "0", "--executor", "ray", "--out", str(tmp_path / "s")))
    assert str(e.value) == RAY_MISSING and not (tmp_path / "s" / "none_fedavg_seed0").exists()


def test_cell_cores_below_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--cell-cores must be >= 1"):
        main(_args(*TINY, "--seeds", "0", "--executor", "ray", "--cell-cores", "0", "--out", str(tmp_path / "s")))


def test_reproduce_takes_the_executor_too(monkeypatch, tmp_path):
    # Prepare: fedseq reproduce's own parser, no importable ray
    from cli import reproduce

    p = argparse.ArgumentParser()
    reproduce.add_arguments(p)
    args = p.parse_args(["table4", "--quick", "--dataset", "synthetic:users=30,items=50,max_length=15",
                         "--executor", "ray", "--out", str(tmp_path / "r")])
    monkeypatch.setitem(sys.modules, "ray", None)
    # Execute / Assert: the suite goes to the Ray executor, which says what is missing; no cell ran
    with pytest.raises(ConfigError, match=r"pip install 'fedseq\[ray\]'"):
        reproduce.main(args)
    assert not any((tmp_path / "r").glob("cells/*/results.json"))
