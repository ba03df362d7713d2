"""``fedseq sweep``: attacks x defenses x malicious ratios x seeds (x models, codecs), each cell a
whole run through the real services (``fedseq run``) or in one process (``--engine inprocess``),
then one table with the mean and spread over seeds and plots.

    fedseq sweep mission                                   # the main job (make run): clean, DV-FSR, DV-FSR + mixed-RFA
    fedseq sweep rules --seeds 0-4                         # every rule, clean and under DV-FSR (docs/results/rules-sweep.md)
    fedseq sweep --attacks none,dv-fsr --defenses fedavg,mixed-rfa --malicious-ratios 0.005,0.01 --seeds 0-2 --jobs 2
    fedseq sweep --spec sweep.toml                         # the same keys from a file
    fedseq sweep matrix --executor ray --address HOST:6379 # every cell a task on a Ray cluster (cli/sweep_ray.py)

Each cell runs as its own process (``fedseq run`` / ``fedseq sim``) with its results bundle in
``<out>/<cell>/``; a sweep that was interrupted resumes where it stopped (finished cells are
kept; unfinished ones run again from the start). ``--jobs`` cells run at once, each with
``cores // jobs`` cores: an in-process cell computes its benign updates in that many 1-thread
processes (``fedseq sim --procs``) and the rest with one thread, so its numbers are the 1-thread
run's bit for bit; a services cell gives each of its busy processes a share as torch threads. Results: ``<out>/sweep.md`` (the table), ``<out>/sweep.json``
(every cell and scenario), and PNG plots: exposure and accuracy over epochs (one line per
scenario, mean over seeds with its spread), exposure against the malicious ratio (per defense, when
several ratios), accuracy against exposure, and (services) bytes per round.

This module is the command (flags and ``main``) and the sweep's public names; the work is in
``sweep_spec.py`` (presets, the spec, its cells), ``sweep_run.py`` (running the cells: the
injectable cell runner, resuming, progress), ``sweep_ray.py`` (the Ray executor), ``sweep_summary.py`` (mean and spread over seeds,
the table) and ``sweep_plots.py`` (the PNG plots).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from fedseq.config import ConfigError

from .flags import DeprecatedAlias
from .sweep_plots import plot_matrix, plot_sweep
from .sweep_ray import add_executor_flags, executor
from .sweep_run import (
    PROCESSES_PER_SERVICES_CELL,
    CellRunner,
    Progress,
    cell_command,
    cell_config,
    cell_done,
    inprocess_cell,
    run_sweep,
    subprocess_cell,
)
from .sweep_spec import (
    CONFIG_KEYS,
    CURVES,
    ENGINES,
    KS,
    METRICS,
    MISSION_DATA,
    MISSION_RATIO,
    PRESETS,
    SCENARIO_KEYS,
    Cell,
    SweepError,
    SweepSpec,
    parse_seeds,
    spec_from,
)
from .sweep_summary import format_markdown, format_table, load_summary, matrices, summarise, upgrade_summary
from .tracking import add_track_flag, open_tracker, sweep_tracking

__all__ = [
    "CONFIG_KEYS", "CURVES", "ENGINES", "KS", "METRICS", "MISSION_DATA", "MISSION_RATIO", "PRESETS",
    "PROCESSES_PER_SERVICES_CELL", "SCENARIO_KEYS", "Cell", "CellRunner", "Progress", "SweepError", "SweepSpec",
    "add_arguments", "cell_command", "cell_config", "cell_done", "format_markdown", "format_table",
    "inprocess_cell", "load_summary", "main", "matrices", "parse_seeds", "plot_matrix", "plot_sweep", "run_sweep",
    "spec_from", "subprocess_cell", "summarise", "upgrade_summary",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help=f"a predefined sweep: {', '.join(PRESETS)}")
    p.add_argument("--spec", help="sweep spec file (JSON or TOML): base, attacks, defenses, malicious_ratios, seeds, "
                                  "models, codecs, engine, scenarios, title")
    p.add_argument("--attacks", help="comma list, e.g. none,dv-fsr")
    p.add_argument("--defenses", help="comma list of rules; options after a colon, ';' between rules then: "
                                      "'fedavg;krum:m=8'")
    p.add_argument("--malicious-ratios", dest="malicious_ratios",
                   help="comma list of malicious ratios (the run's --malicious-ratio), e.g. 0.005,0.01")
    p.add_argument("--ratios", dest="malicious_ratios", action=DeprecatedAlias, new="--malicious-ratios",
                   help="deprecated: the old name of --malicious-ratios")
    p.add_argument("--seeds", help="seeds: 0-4 or 0,3,7")
    p.add_argument("--models", help="comma list: sasrec,bert4rec")
    p.add_argument("--codecs", help="comma list of update codecs (the run's --codec; services engine)")
    p.add_argument("--engine", choices=ENGINES, help="services (fedseq run per cell; default) or inprocess")
    p.add_argument("--set", action="append", type=lambda s: tuple(s.split("=", 1)), metavar="KEY=VALUE",
                   help="a base experiment key for every cell, e.g. --set epochs=4 --set dataset=steam")
    p.add_argument("--jobs", type=int, help="cells at once (default 1; --executor ray: as many as the cluster's CPUs "
                                          "hold); each gets cores // jobs cores: compute processes in process, "
                                          "threads in services")
    p.add_argument("--cores", type=int, help="cores to use (default: all of this machine's)")
    p.add_argument("--out", help="sweep folder (default runs/sweep-<preset>); an interrupted sweep resumes there")
    add_track_flag(p)
    add_executor_flags(p)


def main(args: argparse.Namespace, runner: CellRunner = subprocess_cell) -> int:
    """``fedseq sweep``: run (or resume) the sweep's cells with ``runner`` (default: each its own
    process; cli/sweep_run.py), print its table."""
    try:
        spec = spec_from(args)
        cells = spec.cells()
    except SweepError as e:
        raise ConfigError(str(e)) from None
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    tracker = open_tracker(getattr(args, "track", None))  # before any cell: a bad --track exits 2 now
    out = Path(args.out or f"runs/sweep-{args.preset or 'custom'}")
    with executor(args, runner) as ex, sweep_tracking(tracker, out, asdict(spec), out.name) as track:
        summary = run_sweep(spec, out, ex.jobs, ex.cores, runner=ex.runner, track=track)
        if track is not None:
            track.finish(summary["failed"])
    print(format_markdown(spec, summary))
    for p in summary.get("plots", []):
        print(f"plot: {p}")
    print(f"results: {out / 'sweep.md'}, {out / 'sweep.json'} ({len(cells)} cells)")
    if track is not None:
        print(f"tracked: MLflow run {track.parent} (a child run per cell) in {track.tracker.uri}")
    if summary["failed"]:
        print(f"fedseq sweep: {len(summary['failed'])} cell(s) failed: {', '.join(summary['failed'])} "
              f"(run the same command again to retry them)", file=sys.stderr)
        return 1
    return 0
