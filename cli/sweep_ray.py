"""``fedseq sweep --executor ray``: every cell a Ray task on a cluster, its results bundle sent back.

    fedseq sweep matrix --executor ray                           # a local Ray instance (this machine's cores)
    fedseq sweep --spec s.toml --executor ray --address HOST:6379 --cell-cores 2
    RAY_ADDRESS=HOST:6379 fedseq reproduce table4 --executor ray # Ray's own variable works too

A cell is one Ray task (Moritz et al., "Ray: A Distributed Framework for Emerging AI
Applications", OSDI 2018) that declares ``--cell-cores`` CPUs, and a GPU when the cell's device is
``cuda``/``cuda:N`` (Ray shows the task its one GPU as ``cuda:0``, so give such cells ``cuda``;
``auto`` declares none, and Ray hides the GPUs from a task that declared none). On the node it lands on the task runs the local executor's command for the cell
(``fedseq sim``, or ``fedseq run``: a whole services federation on that node) into a temporary
folder, so a cell's numbers are the local executor's bit for bit, and returns the folder, packed,
through Ray's object store: the driver unpacks it into the sweep's ``--out``, and nodes share no
file system. The driver keeps the sweep: finished cells are skipped on a rerun, the progress line,
``sweep.md``/``sweep.json`` and the plots are the local executor's (cli/sweep_run.py).

A node lost mid-cell: Ray reruns the task elsewhere (``MAX_RETRIES`` times); the cell's process
dies with the Ray worker that started it (``PR_SET_PDEATHSIG``), so a lost or cancelled task leaves
nothing running. Each bundle carries ``executor.json``: the node, host and task it finished on.

Every node needs the same fedseq installed (``pip install 'fedseq[ray]'``; the image:
deploy/Dockerfile built with ``--build-arg LOCK=requirements-ray.lock``), and a data folder at the
same path: a relative ``data_root`` is made absolute on the driver before the cells are sent.
Ray is imported only here, so ``fedseq`` without ``--executor ray`` never loads it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from fedseq.config import ConfigError, build_config

from .sweep_run import CellRunner, subprocess_cell
from .sweep_spec import Cell, SweepSpec

EXECUTORS = ("local", "ray")
MAX_RETRIES = 3  # a cell whose node is lost is rerun on another this many times
RAY_MISSING = "--executor ray needs Ray on this machine: pip install 'fedseq[ray]'"


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    """``--executor``, ``--address``, ``--cell-cores``: on ``fedseq sweep`` and ``fedseq reproduce``."""
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where cells run: local (processes on this machine; default) or ray (tasks on a Ray "
                        "cluster, results sent back here; pip install 'fedseq[ray]')")
    p.add_argument("--address", help="--executor ray: the cluster to join (HOST:PORT, or auto for the one this "
                                     "machine is part of); default RAY_ADDRESS when set, else a new local Ray instance")
    p.add_argument("--cell-cores", dest="cell_cores", type=int, default=1,
                   help="--executor ray: CPUs each cell declares and uses (default 1)")


@dataclass(frozen=True)
class Executor:
    """What runs a sweep's cells: the runner, how many at once, and the cores ``run_sweep`` shares
    among them (each cell gets ``cores // jobs``)."""

    runner: CellRunner
    jobs: int
    cores: int | None


@contextlib.contextmanager
def executor(args: argparse.Namespace, local_runner: CellRunner) -> Iterator[Executor]:
    """The executor the flags name, for the length of the sweep: ``local`` is ``local_runner`` with
    ``--jobs``/``--cores``; ``ray`` joins (or starts) the cluster and leaves it afterwards."""
    if getattr(args, "executor", "local") != "ray":
        yield Executor(local_runner, args.jobs or 1, args.cores)
        return
    if args.cell_cores < 1:
        raise ConfigError("--cell-cores must be >= 1")
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    # "local": a new instance on this machine, even where a `ray start` cluster runs here (that one
    # is --address auto)
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=address, log_to_driver=False, logging_level="warning",
                 num_cpus=args.cores or os.cpu_count() or 1 if address == "local" else None)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "start a local Ray instance" if address == "local" else f"join the Ray cluster at {address}"
        raise ConfigError(f"--executor ray: cannot {where}: {e}") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        jobs = args.jobs or max(1, cpus // args.cell_cores)  # without --jobs: as many as the cluster's CPUs hold
        print(f"fedseq sweep: Ray cluster {ray.get_runtime_context().gcs_address}, {len(ray.nodes())} node(s), "
              f"{cpus} CPUs: {jobs} cell(s) at once x {args.cell_cores} core(s)", file=sys.stderr, flush=True)
        yield Executor(ray_runner(args.cell_cores), jobs, jobs * args.cell_cores)
    finally:
        ray.shutdown()


def ray_runner(cell_cores: int = 1) -> CellRunner:
    """A cell runner that runs each cell as a Ray task (module docstring); Ray must be initialised."""
    import ray

    task = ray.remote(max_retries=MAX_RETRIES)(run_cell_here)

    def runner(spec: SweepSpec, cell: Cell, folder: Path, threads: int) -> int:
        spec = _portable(spec)
        device = build_config(None, {**spec.base, **cell.overrides()}, environ={}).device
        ref = task.options(num_cpus=cell_cores, num_gpus=1 if device.startswith("cuda") else 0,
                           name=f"fedseq-cell:{cell.folder}").remote(spec, cell, threads)
        try:
            rc, packed = ray.get(ref)
        except Exception as e:  # the task failed past its retries, or the cluster is gone
            (folder / "cell.log").write_text(f"--executor ray: the cell's task failed: {e}\n")
            return 1
        _unpack(packed, folder)
        return rc

    return runner


def run_cell_here(spec: SweepSpec, cell: Cell, threads: int) -> tuple[int, bytes]:
    """On the node: the local executor's command for ``cell`` into a temporary folder; returns its
    exit status and the folder packed (with ``executor.json``: where it ran)."""
    import ray

    ctx = ray.get_runtime_context()
    with tempfile.TemporaryDirectory(prefix="fedseq-cell-") as tmp:
        folder = Path(tmp)
        rc = subprocess_cell(spec, cell, folder, threads, preexec_fn=_dies_with_parent)
        where = {"executor": "ray", "node_id": ctx.get_node_id(), "host": socket.gethostname(),
                 "task_id": ctx.get_task_id(), "exit": rc}
        (folder / "executor.json").write_text(json.dumps(where, indent=1) + "\n")
        return rc, _pack(folder)


def _dies_with_parent() -> None:
    """preexec_fn: the cell's process gets SIGKILL when the Ray worker that started it dies (a lost
    node, a cancelled task), so nothing keeps running for a cell Ray reruns elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _portable(spec: SweepSpec) -> SweepSpec:
    """``spec`` with a relative ``data_root`` made absolute here (the driver's meaning of it)."""
    root = spec.base.get("data_root")
    if root and not os.path.isabs(root):
        return replace(spec, base={**spec.base, "data_root": os.path.abspath(root)})
    return spec


def _pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(folder)))
    return buf.getvalue()


def _unpack(packed: bytes, folder: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")  # "data": no absolute paths, links or devices

