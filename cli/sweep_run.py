"""Running a sweep: every unfinished cell (``jobs`` at once, ``cores // jobs`` cores each) by a
cell runner, then the summary, the table and the plots.

A cell runner is a callable ``runner(spec, cell, folder, threads) -> exit status`` that runs
``cell`` into its (new, empty) ``folder``: its results bundle there (``results.json``), its log in
``folder/cell.log``. The default, :func:`subprocess_cell`, runs each cell as its own process
(``fedseq run`` for the services engine, ``fedseq sim`` in process) from the config file it
writes; :func:`inprocess_cell` runs the cell's ``fedseq sim`` in this process (no interpreter to
start: tests, quick sweeps). A cell counts as done when its bundle has every epoch
(:func:`cell_done`), whatever the runner says; an interrupted sweep resumes where it stopped."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedseq.config import build_config

from .sweep_plots import plot_sweep
from .sweep_spec import CONFIG_KEYS, Cell, SweepSpec
from .sweep_summary import format_markdown, summarise
from .tracking import TRACK_ENV, SweepTracking

PROCESSES_PER_SERVICES_CELL = 3  # busy processes of one `fedseq run` cell (two client workers, the server)

# runner(spec, cell, folder, threads) -> exit status: runs ``cell`` into ``folder`` (module docstring)
CellRunner = Callable[[SweepSpec, Cell, Path, int], int]


def cell_done(folder: Path, epochs: int) -> bool:
    """A finished cell: its results bundle has every epoch, the last one evaluated."""
    try:
        res = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return False
    rows = res.get("epochs", [])
    state = res.get("summary", {}).get("state", "done")
    return len(rows) == epochs and "hr@10" in rows[-1] and state == "done"


def cell_config(spec: SweepSpec, cell: Cell, folder: Path, threads: int) -> Path:
    """Write ``cell``'s config file (the whole experiment, with ``threads`` cores) into ``folder``;
    returns its path."""
    # an in-process cell with several cores computes its benign updates in that many 1-thread
    # processes (fedseq/compute_pool.py) and does the rest with one thread: every number is then
    # the 1-thread run's, whatever --cores and --jobs are
    cores = {"procs": threads, "threads": 1} if spec.engine != "services" and threads > 1 else {"threads": threads}
    cfg = build_config(None, {**spec.base, **cell.overrides(), **cores,
                              "run_id": f"sweep-{cell.folder}"[:100]}, environ={})
    (folder / "config.json").write_text(cfg.to_json())
    return folder / "config.json"


def cell_command(spec: SweepSpec, cell: Cell, folder: Path, threads: int) -> list[str]:
    """The ``fedseq run`` / ``fedseq sim`` command line of ``cell`` (config file + output folder)."""
    config = cell_config(spec, cell, folder, threads)
    sub = "run" if spec.engine == "services" else "sim"
    return [sys.executable, "-m", "cli.entry", sub, "--config", str(config), "--out", str(folder)]


def subprocess_cell(spec: SweepSpec, cell: Cell, folder: Path, threads: int,
                    preexec_fn: Callable[[], None] | None = None) -> int:
    """The default cell runner: ``cell``'s ``fedseq run`` / ``fedseq sim`` as its own process, its
    output in ``folder/cell.log``; returns the process's exit status. ``preexec_fn`` runs in the
    child before it starts (the Ray executor's: die with the parent, cli/sweep_ray.py)."""
    cmd = cell_command(spec, cell, folder, threads)
    # the cell's config file is the whole experiment: FEDSEQ_<KEY> variables would override it; the
    # sweep's driver logs the cell to MLflow (--track), the cell's process does not
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("FEDSEQ_") and k[7:].lower() in CONFIG_KEYS) and k != TRACK_ENV}
    with open(folder / "cell.log", "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "FEDSEQ_LOG_LEVEL": "warning"},
                              check=False, preexec_fn=preexec_fn).returncode


_INPROCESS = threading.Lock()  # one in-process cell at a time: torch's thread count is the process's


def inprocess_cell(spec: SweepSpec, cell: Cell, folder: Path, threads: int) -> int:
    """A cell runner without a process: ``fedseq sim`` of ``cell``'s config file in this process
    (``cli.sim.run_inprocess``; the in-process engine whatever ``spec.engine`` says), its progress
    and any error in ``folder/cell.log``; 0 when it ran, 1 when it raised. Its results bundle is
    the one the default runner's ``fedseq sim`` writes. Cells run one at a time (``jobs`` only
    queue), and this process's torch thread count is restored after each."""
    import traceback

    import torch

    from cli.sim import run_inprocess

    config = cell_config(replace(spec, engine="inprocess"), cell, folder, threads)
    with _INPROCESS, open(folder / "cell.log", "w") as log:
        def progress(line: str) -> None:
            if not line.startswith("~"):  # in-place progress: a terminal's only
                print(line, file=log, flush=True)

        torch_threads = torch.get_num_threads()
        try:
            run_inprocess(build_config(str(config), {}, environ={}), folder, progress=progress)
        except Exception:
            traceback.print_exc(file=log)
            return 1
        finally:
            torch.set_num_threads(torch_threads)
    return 0


@dataclass
class Progress:
    """The overall progress line: cell i of n, elapsed, estimated remaining."""

    total: int
    done: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.time)
    durations: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self, what: str, seconds: float | None = None, jobs: int = 1) -> str:
        with self.lock:
            self.done += 1
            if seconds is not None:
                self.durations.append(seconds)
            elapsed = time.time() - self.started
            left = self.total - self.done
            eta = statistics.mean(self.durations) * left / max(1, jobs) if self.durations else None
            tail = ", all cells done" if not left else f", about {_clock(eta)} left" if eta is not None else ""
            return f"[sweep {self.done}/{self.total}] {what}; elapsed {_clock(elapsed)}{tail}"


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _track(track: SweepTracking | None, folder: Path, cell: Cell, say: Callable[[str], None]) -> None:
    """Log a finished cell to MLflow (``--track``); a failure is said, and the sweep goes on."""
    problem = track.cell(folder, cell.scenario) if track is not None else None
    if problem:
        say(problem)


def run_sweep(spec: SweepSpec, out: Path, jobs: int = 1, cores: int | None = None,
              say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
              cells_root: Path | None = None, max_cells: int | None = None,
              runner: CellRunner = subprocess_cell, plots: bool = True,
              track: SweepTracking | None = None) -> dict[str, Any]:
    """Run every unfinished cell of ``spec`` (``jobs`` at once; at most ``max_cells`` of them) into
    ``cells_root`` (default ``out``) with ``runner`` (default: each its own process) and summarise
    all into ``out``, with its plots unless ``plots`` is False (a caller that draws its own). With
    ``track`` every finished cell, the ones done before included, is logged as a child run (once;
    cli/tracking.py); the caller ends the parent run."""
    cells = spec.cells()
    out.mkdir(parents=True, exist_ok=True)
    root = cells_root or out
    root.mkdir(parents=True, exist_ok=True)
    cores = cores or os.cpu_count() or 1
    # a services cell is several busy processes (server, two client workers, an attacker worker):
    # more torch threads than cores each would oversubscribe the machine (a busy core slows a
    # 2-thread torch process several times over: one thread a process)
    threads = max(1, cores // max(1, jobs) // (PROCESSES_PER_SERVICES_CELL if spec.engine == "services" else 1))
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1, default=list))
    runs: list[Cell] = []  # one run per folder; a cell that is another's run (same_as) runs as that one
    for c in cells:
        if c.folder not in {r.folder for r in runs}:
            runs.append(replace(c, defense="fedavg", same_as="") if c.same_as else c)
    epochs = {c: build_config(None, {**spec.base, **c.overrides()}, environ={}).epochs for c in runs}
    done = [c for c in runs if cell_done(root / c.folder, epochs[c])]
    todo = [c for c in runs if c not in done]
    later = todo[max_cells:] if max_cells is not None else []
    todo = todo[:max_cells] if max_cells is not None else todo
    prog = Progress(len(done) + len(todo))
    say(f"fedseq sweep: {len(runs)} cells ({len(done)} already done in {root}"
        + (f"; {len(later)} left for a later call" if later else "") + f"), engine {spec.engine}, "
        f"{jobs} at once x {threads} " + ("torch thread(s)" if spec.engine == "services" or threads == 1
                                           else "compute processes"))
    for c in done:
        say(prog.line(f"{c.folder}: done before (kept)"))
        _track(track, root / c.folder, c, say)
    failed: list[str] = []

    def one(c: Cell) -> None:
        folder = root / c.folder
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished cell starts over: its Redis and partial results are gone
        folder.mkdir(parents=True)
        t0 = time.time()
        rc = runner(spec, c, folder, threads)
        dt = time.time() - t0
        if rc != 0 or not cell_done(folder, epochs[c]):
            failed.append(c.folder)
            say(prog.line(f"{c.folder}: FAILED (exit {rc}; see {folder / 'cell.log'})", dt, jobs))
            return
        last = json.loads((folder / "results.json").read_text())["epochs"][-1]
        say(prog.line(f"{c.folder}: HR@10 {last['hr@10']:.4f} ER@10 {last['er@10']:.4f} in {dt:.0f}s", dt, jobs))
        _track(track, folder, c, say)

    with futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    summary = summarise(spec, cells, root)
    summary["failed"] = failed
    (out / "sweep.md").write_text(format_markdown(spec, summary))
    summary["plots"] = [str(p) for p in plot_sweep(summary, out)] if plots else []
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    return summary
