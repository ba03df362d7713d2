"""``fedseq sweep``: attacks x defenses x malicious ratios x seeds (x models, codecs), each cell a
whole run through the real services (``fedseq run``) or in one process (``--engine inprocess``),
then one table with the mean and spread over seeds and plots.

    fedseq sweep mission                                   # the main job (make run): clean, DV-FSR, DV-FSR + mixed-RFA
    fedseq sweep rules --seeds 0-4                         # every rule, clean and under DV-FSR (docs/results/rules-sweep.md)
    fedseq sweep --attacks none,dv-fsr --defenses fedavg,mixed-rfa --ratios 0.005,0.01 --seeds 0-2 --jobs 2
    fedseq sweep --spec sweep.toml                         # the same keys from a file

Each cell runs as its own process (``fedseq run`` / ``fedseq sim``) with its results bundle in
``<out>/<cell>/``; a sweep that was interrupted resumes where it stopped (finished cells are
kept; unfinished ones run again from the start). ``--jobs`` cells run at once, each with
``cores // jobs`` cores: an in-process cell computes its benign updates in that many 1-thread
processes (``fedseq sim --procs``) and the rest with one thread, so its numbers are the 1-thread
run's bit for bit; a services cell gives each of its busy processes a share as torch threads. Results: ``<out>/sweep.md`` (the table), ``<out>/sweep.json``
(every cell and scenario), and PNG plots: exposure and accuracy over epochs (one line per
scenario, mean over seeds with its spread), exposure against the malicious ratio (per defense, when
several ratios), accuracy against exposure, and (services) bytes per round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedseq.config import ConfigError, ExperimentConfig, build_config
from fedseq.engine import adv_train_on
from server.aggregation import RuleConfigError, parse_rule_spec

from .flags import QUICKSTART

ENGINES = ("services", "inprocess")
CONFIG_KEYS = set(ExperimentConfig.__dataclass_fields__)
PROCESSES_PER_SERVICES_CELL = 3  # busy processes of one `fedseq run` cell (two client workers, the server)
KS = (5, 10, 20, 30)
METRICS = ("hr@10", "ndcg@10", *(f"er@{k}" for k in KS))
CURVES = ("hr@10", "er@5", "er@10")  # per-epoch curves kept per scenario (Figure 2 plots ER@5)
# scenario keys that are not experiment keys: display name, the axes, and reference numbers
SCENARIO_KEYS = {"name", "attack", "defense", "ratio", "paper"}

# The main job: the embedded synthetic generator, clean, under DV-FSR and under DV-FSR with
# mixed-RFA, through the services. 0.5% malicious clients (2 of 400): at 0.1% (one attacker) the
# attack's effect swings with the seed (ER@10 after 8 epochs 0.02-0.37 over seeds 0-4); at 1% (4)
# it saturates and overwhelms mixed-RFA's mean part (ER@10 0.96 / 0.86 with the defense, seeds 0-1).
# 5 interest clusters instead of the generator's 10: two attackers copy two users' histories, and
# with 10 clusters whether those cover the users' interests is luck (seed 4: ER@10 0.09); with 5
# both effects are clear on every seed 0-4 (docs/results/mission.md).
MISSION_RATIO = 0.005
MISSION_DATA = "synthetic:num_clusters=5"
PRESETS: dict[str, dict[str, Any]] = {
    "mission": {
        "title": "The mission: DV-FSR against no defense and mixed-RFA (synthetic data, services)",
        "base": {**QUICKSTART, "dataset": MISSION_DATA},
        "scenarios": [
            {"name": "clean", "attack": "none", "defense": "fedavg"},
            {"name": "dv-fsr", "attack": "dv-fsr", "defense": "fedavg", "ratio": MISSION_RATIO},
            {"name": "dv-fsr + mixed-rfa", "attack": "dv-fsr", "defense": "mixed-rfa", "ratio": MISSION_RATIO},
        ],
        "seeds": [0],
        "engine": "services",
    },
    "rules": {
        "title": "Every aggregation rule: clean accuracy and DV-FSR exposure (synthetic default, in process)",
        "base": dict(QUICKSTART),
        "attacks": ["none", "dv-fsr"],
        "defenses": ["fedavg", "rfa", "mixed-rfa", "median", "trimmed-mean:beta=0.1", "krum:m=8",
                     "norm-clip:bound=1.0", "foolsgold", "fltrust"],
        "ratios": [0.005],  # 2 malicious clients of 400
        "seeds": [0, 1, 2, 3, 4],
        "engine": "inprocess",
    },
}


# Every attack against every defense (dense and item-wise sparse), one heat map per ratio. On
# the mission's data by default; the Steam matrix of docs/results is this preset with
# --set dataset=steam --set epochs=30 --set clients_per_round=256 --set lr=0.001
# --set num_negatives=1000 --ratios 0.001,0.01 --seeds 0-2.
PRESETS["matrix"] = {
    "title": "Every attack against every defense (heat maps per malicious ratio)",
    "base": {**QUICKSTART, "dataset": MISSION_DATA},
    "attacks": ["none", "dv-fsr", "c-fsr", "s-fsr", "eb", "a-ra", "ra", "alie", "min-max", "pieck", "fedrecattack",
                "spattack"],
    "defenses": ["fedavg", "mixed-rfa", "rfa", "median", "trimmed-mean:beta=0.1", "krum:m=8", "bulyan", "flame",
                 "dnc", "foolsgold", "sparse:median", "sparse:trimmed-mean", "sparse:krum", "pieck-reg"],
    "ratios": [MISSION_RATIO],
    "seeds": [0, 1, 2],
    "engine": "inprocess",
}


class SweepError(ValueError):
    """A sweep specification that cannot run (message says which key and why)."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep."""

    attack: str
    defense: str  # rule name, with options as "name:k=v,k=v"
    ratio: float
    seed: int
    model: str | None = None
    codec: str | None = None
    name: str = ""  # a scenario's display name (presets); empty: built from the fields
    keys: tuple[tuple[str, Any], ...] = ()  # further experiment keys of the scenario (sorted), e.g. compat
    same_as: str = ""  # the folder of another cell whose run this one is, to the last bit (see SweepSpec.cells)

    @property
    def scenario(self) -> str:
        """What the cell measures, without its seed (the rows of the table)."""
        if self.name:
            return self.name
        parts = [f"attack {self.attack}" + (f" {self.ratio:g}" if self.attack != "none" else ""),
                 f"defense {self.defense}"]
        parts += [f"model {self.model}"] if self.model else []
        parts += [f"codec {self.codec}"] if self.codec else []
        parts += [f"{k} {v}" for k, v in self.keys]
        return ", ".join(parts)

    @property
    def folder(self) -> str:
        """The cell's folder name: from what it runs (not its display name), so two sweeps that
        share a cells folder (``fedseq reproduce``) run a shared cell once; a cell that is the
        same run as another (``same_as``) has that cell's folder."""
        if self.same_as:
            return self.same_as
        bits = [self.attack, f"r{self.ratio:g}" if self.attack != "none" else "", self.defense.replace(":", "-"),
                self.model or "", self.codec or ""]
        for k, v in self.keys:
            text = ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
            bit = f"{k.replace('_', '')}-{text}"
            bits.append(bit if len(bit) <= 32 else f"{k.replace('_', '')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}")
        bits.append(f"seed{self.seed}")
        name = "_".join(b for b in bits if b).replace("=", "").replace("!", "no")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name)  # also a valid run id

    def overrides(self) -> dict[str, Any]:
        """The experiment keys this cell sets on top of the sweep's base."""
        try:  # "name:k=v,k=v", and a wrapping rule's inner shorthand ("sparse:median")
            rule, opts = parse_rule_spec(self.defense)
        except RuleConfigError as e:
            raise ConfigError(str(e)) from None
        out: dict[str, Any] = {"attack": self.attack, "defense": rule, "seed": self.seed,
                               "defense_opts": [f"{k}={v}" for k, v in opts.items()]}
        if self.attack != "none":
            out["malicious_ratio"] = self.ratio
        if self.model:
            out["model"] = self.model
        if self.codec:
            out["codec"] = self.codec
        out.update(self.keys)
        return out


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"0-4"``, ``"0,3,7"`` or a list -> seeds."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise SweepError(f"seeds: {part!r} is not a seed or a range like 0-4") from None
    if not out:
        raise SweepError("seeds: none given")
    return out


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(";" if ":" in value else ",") if v.strip()]
    return [str(v) for v in value]


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs: the base experiment keys and the axes (or explicit scenarios)."""

    base: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = ("none", "dv-fsr")
    defenses: tuple[str, ...] = ("fedavg",)
    ratios: tuple[float, ...] = (MISSION_RATIO,)
    seeds: tuple[int, ...] = (0,)
    models: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()
    scenarios: tuple[dict[str, Any], ...] = ()  # explicit cells (name, attack, defense, ratio) instead of the product
    engine: str = "services"
    title: str = "fedseq sweep"

    def cells(self) -> list[Cell]:
        if self.engine not in ENGINES:
            raise SweepError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        out: list[Cell] = []
        combos: list[tuple[str, str, float, str, tuple[tuple[str, Any], ...]]] = []
        if self.scenarios:
            for sc in self.scenarios:
                extra = {k: v for k, v in sc.items() if k not in SCENARIO_KEYS}
                unknown = sorted(set(extra) - CONFIG_KEYS)
                if unknown:
                    raise SweepError(f"scenario {sc.get('name', sc)!r}: unknown key(s) {unknown}; a scenario holds "
                                     f"{sorted(SCENARIO_KEYS)} and experiment keys")
                combos.append((sc.get("attack", "none"), sc.get("defense", "fedavg"), float(sc.get("ratio", 0.0)),
                               sc.get("name", ""), tuple(sorted(extra.items()))))
        else:
            for a in self.attacks:
                for d in self.defenses:
                    for r in (self.ratios if a != "none" else (0.0,)):
                        combos.append((a, d, float(r), "", ()))
        for a, d, r, name, keys in combos:
            for m in self.models or (None,):
                for c in self.codecs or (None,):
                    for s in self.seeds:
                        out.append(Cell(a, d, r, s, m, c, name, keys))
        unique = list({(cell.folder, cell.scenario): cell for cell in out}.values())  # in order
        for i, cell in enumerate(unique):  # validate every cell's config before anything runs
            try:
                cfg = build_config(None, {**self.base, **cell.overrides()}, environ={})
            except ConfigError as e:
                raise SweepError(f"cell {cell.folder}: {e}") from None
            if cfg.adv_train and not adv_train_on(cfg):
                # adv_train under the compat switch advtrain_noop (the public code's no-op) plans no
                # adversarial round: the run is the same cell without the defense, bit for bit
                # (tests/test_sweep.py), so it shares that cell's folder and runs once
                unique[i] = replace(cell, same_as=replace(cell, defense="fedavg").folder)
        return unique


def spec_from(args: argparse.Namespace) -> SweepSpec:
    """The sweep of ``fedseq sweep``: a preset or ``--spec FILE`` (JSON or TOML), then the flags."""
    data: dict[str, Any] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise SweepError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
        data = json.loads(json.dumps(PRESETS[args.preset]))
    if args.spec:
        p = Path(args.spec)
        try:
            text = p.read_text()
            data.update(tomllib.loads(text) if p.suffix == ".toml" else json.loads(text))
        except (OSError, ValueError) as e:
            raise SweepError(f"cannot read sweep spec {p}: {e}") from None
    for key in ("attacks", "defenses", "models", "codecs"):
        if getattr(args, key):
            data[key] = _list(getattr(args, key))
            data.pop("scenarios", None)
    if args.ratios:
        try:
            data["ratios"] = [float(x) for x in args.ratios.split(",")]
        except ValueError:
            raise SweepError(f"--ratios: {args.ratios!r} is not a comma list of numbers") from None
        for s in data.get("scenarios", []):  # a preset's scenarios take the (first) ratio given
            if s.get("attack", "none") != "none":
                s["ratio"] = data["ratios"][0]
    if args.seeds:
        data["seeds"] = parse_seeds(args.seeds)
    if args.engine:
        data["engine"] = args.engine
    base = dict(data.get("base") or dict(QUICKSTART))
    for k, v in (args.set or []):
        base[k] = v
    known = {f for f in SweepSpec.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {unknown}; keys: {sorted(known)}")
    return SweepSpec(base=base, attacks=tuple(_list(data.get("attacks", ["none", "dv-fsr"]))),
                     defenses=tuple(_list(data.get("defenses", ["fedavg"]))),
                     ratios=tuple(float(r) for r in data.get("ratios", [MISSION_RATIO])),
                     seeds=tuple(parse_seeds(data.get("seeds", [0]))), models=tuple(_list(data.get("models"))),
                     codecs=tuple(_list(data.get("codecs"))), scenarios=tuple(data.get("scenarios", [])),
                     engine=str(data.get("engine", "services")), title=str(data.get("title", "fedseq sweep")))


# ---------------------------------------------------------------------------- running
def cell_done(folder: Path, epochs: int) -> bool:
    """A finished cell: its results bundle has every epoch, the last one evaluated."""
    try:
        res = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return False
    rows = res.get("epochs", [])
    state = res.get("summary", {}).get("state", "done")
    return len(rows) == epochs and "hr@10" in rows[-1] and state == "done"


def cell_command(spec: SweepSpec, cell: Cell, folder: Path, threads: int) -> list[str]:
    """The ``fedseq run`` / ``fedseq sim`` command line of ``cell`` (config file + output folder)."""
    # an in-process cell with several cores computes its benign updates in that many 1-thread
    # processes (fedseq/compute_pool.py) and does the rest with one thread: every number is then
    # the 1-thread run's, whatever --cores and --jobs are
    cores = {"procs": threads, "threads": 1} if spec.engine != "services" and threads > 1 else {"threads": threads}
    cfg = build_config(None, {**spec.base, **cell.overrides(), **cores,
                              "run_id": f"sweep-{cell.folder}"[:100]}, environ={})
    (folder / "config.json").write_text(cfg.to_json())
    sub = "run" if spec.engine == "services" else "sim"
    return [sys.executable, "-m", "cli.main", sub, "--config", str(folder / "config.json"), "--out", str(folder)]


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


def run_sweep(spec: SweepSpec, out: Path, jobs: int = 1, cores: int | None = None,
              say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
              cells_root: Path | None = None, max_cells: int | None = None) -> dict[str, Any]:
    """Run every unfinished cell of ``spec`` (``jobs`` at once; at most ``max_cells`` of them) into
    ``cells_root`` (default ``out``) and summarise all into ``out``."""
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
    failed: list[str] = []

    def one(c: Cell) -> None:
        folder = root / c.folder
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished cell starts over: its Redis and partial results are gone
        folder.mkdir(parents=True)
        t0 = time.time()
        cmd = cell_command(spec, c, folder, threads)
        # the cell's config file is the whole experiment: FEDSEQ_<KEY> variables would override it
        env = {k: v for k, v in os.environ.items() if not (k.startswith("FEDSEQ_") and k[7:].lower() in CONFIG_KEYS)}
        with open(folder / "cell.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "FEDSEQ_LOG_LEVEL": "warning"},
                                check=False).returncode
        dt = time.time() - t0
        if rc != 0 or not cell_done(folder, epochs[c]):
            failed.append(c.folder)
            say(prog.line(f"{c.folder}: FAILED (exit {rc}; see {folder / 'cell.log'})", dt, jobs))
            return
        last = json.loads((folder / "results.json").read_text())["epochs"][-1]
        say(prog.line(f"{c.folder}: HR@10 {last['hr@10']:.4f} ER@10 {last['er@10']:.4f} in {dt:.0f}s", dt, jobs))

    with futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    summary = summarise(spec, cells, root)
    summary["failed"] = failed
    (out / "sweep.md").write_text(format_markdown(spec, summary))
    summary["plots"] = [str(p) for p in plot_sweep(summary, out)]
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------- summarising
def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (math.nan, 0.0)


def summarise(spec: SweepSpec, cells: Sequence[Cell], out: Path) -> dict[str, Any]:
    """Per scenario: final metrics' mean and std over seeds, per-epoch curves, malicious updates
    kept/sent, bytes per update (services); and the raw per-cell finals. A cell still running (or
    stopped) counts with its last evaluated epoch, and its scenario says so (``unfinished``)."""
    scenarios: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for c in cells:
        try:
            res = json.loads((out / c.folder / "results.json").read_text())
        except (OSError, ValueError):
            continue
        epochs = [e for e in res.get("epochs", []) if "hr@10" in e]
        if not epochs:
            continue
        last = epochs[-1]
        sent = sum(e.get("malicious_updates", 0) for e in res["epochs"])
        kept = sum(e.get("malicious_kept", e.get("malicious_updates", 0)) for e in res["epochs"])
        bpu = res.get("summary", {}).get("bytes_per_update")
        row = {"cell": c.folder, "scenario": c.scenario, "seed": c.seed, "attack": c.attack, "defense": c.defense,
               "ratio": c.ratio, **{m: last[m] for m in METRICS}, "malicious_sent": sent, "malicious_kept": kept,
               "bytes_per_update": bpu, "warnings": res.get("summary", {}).get("warnings", []),
               "seconds": sum(e.get("seconds", 0.0) for e in res["epochs"]),
               "planned": build_config(None, {**spec.base, **c.overrides()}, environ={}).epochs,
               "curve": {m: [e[m] for e in epochs] for m in CURVES},
               "epochs": [e["epoch"] for e in epochs]}
        rows.append(row)
        scenarios.setdefault(c.scenario, {"attack": c.attack, "defense": c.defense, "ratio": c.ratio,
                                          "overrides": c.overrides() | {"seed": "*"},
                                          "cells": []})["cells"].append(row)
    for s in scenarios.values():
        cs = s["cells"]
        s["seeds"] = sorted(r["seed"] for r in cs)
        for m in METRICS:
            s[m] = _mean_std([r[m] for r in cs])
        s["malicious_sent"] = sum(r["malicious_sent"] for r in cs)
        s["malicious_kept"] = sum(r["malicious_kept"] for r in cs)
        bpu = [r["bytes_per_update"] for r in cs if r["bytes_per_update"]]
        s["bytes_per_update"] = statistics.mean(bpu) if bpu else None
        n = min(len(r["curve"]["er@10"]) for r in cs)
        s["epochs"] = cs[0]["epochs"][:n]
        s["curve"] = {m: [_mean_std([r["curve"][m][i] for r in cs]) for i in range(n)] for m in CURVES}
        s["seconds"] = _mean_std([r["seconds"] for r in cs])
        done, planned = min(r["epochs"][-1] for r in cs), max(r["planned"] for r in cs)
        s["unfinished"] = f"at epoch {done} of {planned}" if done < planned else ""
        s["cells"] = [r["cell"] for r in cs]
    paper = {sc["name"]: sc["paper"] for sc in spec.scenarios if sc.get("name") and sc.get("paper")}
    for name, ref in paper.items():
        if name in scenarios:
            scenarios[name]["paper"] = ref
    return {"title": spec.title, "engine": spec.engine, "base": spec.base, "scenarios": scenarios,
            "cells_root": str(out), "cells": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}


def format_table(summary: dict[str, Any]) -> str:
    """The comparison table: one row per scenario, mean ± std over its seeds."""
    head = ["scenario", "seeds", "HR@10", "NDCG@10", *(f"ER@{k}" for k in KS), "malicious kept / sent",
            "bytes/update"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary["scenarios"].items():
        def ms(m: str, s: dict[str, Any] = s) -> str:
            mean, std = s[m]
            return f"{mean:.4f} ± {std:.4f}" if len(s["seeds"]) > 1 else f"{mean:.4f}"

        kept = f"{s['malicious_kept']} / {s['malicious_sent']}" if s["malicious_sent"] else "-"
        bpu = f"{s['bytes_per_update']:,.0f}" if s["bytes_per_update"] else "-"
        seeds = ",".join(map(str, s["seeds"]))
        if s.get("unfinished"):
            name = f"{name} (unfinished: {s['unfinished']})"
        lines.append("| " + " | ".join([name, seeds, ms("hr@10"), ms("ndcg@10"), *(ms(f"er@{k}") for k in KS), kept, bpu])
                     + " |")
    return "\n".join(lines)


def format_markdown(spec: SweepSpec, summary: dict[str, Any]) -> str:
    base = ", ".join(f"{k}={v}" for k, v in sorted(spec.base.items()))
    out = [f"# {spec.title}", "",
           f"Engine: {spec.engine}. Base: {base}. Final epoch; mean ± std over the seeds listed.", "",
           format_table(summary), ""]
    warnings = sorted({w for c in summary["cells"] for w in c["warnings"]})
    if warnings:
        out += ["Warnings:", *(f"- {w}" for w in warnings), ""]
    return "\n".join(out)


def plot_sweep(summary: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of the sweep into ``out`` (see the module docstring); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    scen = summary["scenarios"]
    if not scen:
        return paths
    style = _styles(scen)
    many = len(scen) > 6  # bands would hide each other: lines only
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for name, s in scen.items():
        color, dash, marker = style[name]
        for ax, m in zip(axes, ("er@10", "hr@10"), strict=True):
            mean = [v[0] for v in s["curve"][m]]
            std = [v[1] for v in s["curve"][m]]
            ax.plot(s["epochs"], mean, marker=marker, markersize=3, linestyle=dash, color=color, label=name)
            if len(s["seeds"]) > 1 and not many:
                ax.fill_between(s["epochs"], [a - b for a, b in zip(mean, std, strict=True)],
                                [a + b for a, b in zip(mean, std, strict=True)], color=color, alpha=0.15)
    axes[0].set_title("exposure of the target: ER@10 per epoch")
    axes[1].set_title("accuracy: HR@10 per epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    seeds = sorted({s for v in scen.values() for s in v["seeds"]})
    fig.suptitle(f"{summary['title']}\n(mean over seeds {seeds}" + ("; band: ± std)" if not many else
                 "; dashed: no attack)"), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(labels) // 4), 1, 1))
    paths.append(out / "epochs.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.4, 5.2))
    for name, s in scen.items():
        color, _, marker = style[name]
        (x, xs), (y, ys) = s["er@10"], s["hr@10"]
        ax.errorbar([x], [y], xerr=[xs], yerr=[ys], fmt=marker if s["attack"] != "none" else "s", capsize=3,
                    color=color, mfc=color if s["attack"] != "none" else "white", label=name)
    ax.set_xlabel("exposure ER@10 (final epoch)")
    ax.set_ylabel("accuracy HR@10 (final epoch)")
    ax.set_title("accuracy against exposure (mean ± std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_exposure.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    ratios = sorted({s["ratio"] for s in scen.values() if s["attack"] != "none"})
    if len(ratios) > 1:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        by: dict[str, list[tuple[float, float, float]]] = {}
        for s in scen.values():
            if s["attack"] != "none":
                by.setdefault(f"{s['attack']} vs {s['defense']}", []).append((s["ratio"], *s["er@10"]))
        for label, pts in sorted(by.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=label)
        ax.set_xscale("log")
        ax.set_xlabel("malicious ratio")
        ax.set_ylabel("ER@10 (final epoch)")
        ax.set_title("exposure against the malicious ratio, per defense", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "exposure_vs_ratio.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    grids = matrices(summary)
    for grid in grids:
        name = "matrix.png" if len(grids) == 1 else f"matrix_r{grid['ratio']:g}.png"
        paths.append(plot_matrix(grid, summary["title"], out / name))

    if summary["engine"] == "services":
        from fedseq.report import load_run, plot_runs

        runs = []
        for name, s in scen.items():
            run = load_run(Path(summary.get("cells_root", out)) / s["cells"][0])
            run.label = name
            runs.append(run)
        paths.append(plot_runs(runs, out / "bytes_per_round.png"))
    return paths


def matrices(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Attack x defense grids of the final ER@10 and HR@10 (means over seeds), one per malicious
    ratio (the no-attack row in each), when the sweep has at least two attacks and two defenses
    and nothing else varies; else none."""
    scen = [s for s in summary["scenarios"].values() if not s.get("unfinished")]
    attacks = sorted({s["attack"] for s in scen}, key=lambda a: (a != "none", a))
    defenses = list(dict.fromkeys(s["defense"] for s in scen))
    if len(attacks) < 2 or len(defenses) < 2:
        return []
    out = []
    for ratio in sorted({s["ratio"] for s in scen if s["attack"] != "none"}):
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        for s in scen:
            if s["attack"] != "none" and s["ratio"] != ratio:
                continue
            key = (s["attack"], s["defense"])
            if key in cells:  # other keys vary too: not one grid
                return []
            cells[key] = s
        out.append({"attacks": attacks, "defenses": defenses, "cells": cells, "ratio": ratio})
    return out


def plot_matrix(grid: dict[str, Any], title: str, path: Path) -> Path:
    """Two heat maps side by side, attacks (rows) x defenses (columns): ER@10 and HR@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    A, D = grid["attacks"], grid["defenses"]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * len(D) * 2, 1.6 + 0.45 * len(A)))
    for ax, metric, cmap in zip(axes, ("er@10", "hr@10"), ("Reds", "Greens"), strict=True):
        values = np.full((len(A), len(D)), np.nan)
        for (a, d), s in grid["cells"].items():
            values[A.index(a), D.index(d)] = s[metric][0]
        im = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if metric == "er@10" else max(0.01, np.nanmax(values)),
                       aspect="auto")
        for i in range(len(A)):
            for j in range(len(D)):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] > 0.6 * (im.norm.vmax or 1) else "black")
        ax.set_xticks(range(len(D)), D, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(A)), A, fontsize=7)
        ax.set_title(f"{METRIC_LABELS[metric]} (final epoch, mean over seeds)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{title}\nattacks (rows) x defenses (columns); malicious ratio {grid['ratio']:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METRIC_LABELS = {"er@10": "exposure ER@10", "hr@10": "accuracy HR@10"}


AXES = {"attack", "defense", "defense_opts", "malicious_ratio", "seed"}


def _styles(scen: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, str, str]]:
    """(color, line style, marker) per scenario, so a plot of many scenarios stays readable:
    dashed without an attack; a color per (other experiment keys such as the model or the compat
    switches, attack, defense) and a marker per ratio while there are at most 20 such lines; past
    that, when the scenarios differ in other keys, color by those and marker by defense, else
    color by defense and marker by ratio."""
    import matplotlib

    markers = "osD^v<>p*h"
    if len(scen) <= 6:  # a few scenarios: one color each
        cmap = matplotlib.colormaps["tab10"]
        return {n: (cmap(i % cmap.N), "--" if s["attack"] == "none" else "-", "o") for i, (n, s) in enumerate(scen.items())}

    def other(s: dict[str, Any]) -> str:
        keys = s.get("overrides", {})
        return json.dumps({k: v for k, v in sorted(keys.items()) if k not in AXES}, default=str)

    groups = sorted({other(s) for s in scen.values()})
    defenses = sorted({s["defense"] for s in scen.values()})
    ratios = sorted({s["ratio"] for s in scen.values()})
    lines = sorted({(other(s), s["attack"], s["defense"]) for s in scen.values()})
    if len(lines) <= 20:  # a color per (other keys, attack, defense), a marker per ratio
        cmap = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"]
        return {name: (cmap(lines.index((other(s), s["attack"], s["defense"])) % cmap.N),
                       "--" if s["attack"] == "none" else "-", markers[ratios.index(s["ratio"]) % len(markers)])
                for name, s in scen.items()}
    by_other = len(groups) > 1
    n = len(groups) if by_other else len(defenses)
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    out = {}
    for name, s in scen.items():
        color = cmap((groups.index(other(s)) if by_other else defenses.index(s["defense"])) % cmap.N)
        marker = markers[(defenses.index(s["defense"]) if by_other else ratios.index(s["ratio"])) % len(markers)]
        out[name] = (color, "--" if s["attack"] == "none" else "-", marker)
    return out


# ---------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help=f"a predefined sweep: {', '.join(PRESETS)}")
    p.add_argument("--spec", help="sweep spec file (JSON or TOML): base, attacks, defenses, ratios, seeds, models, "
                                  "codecs, engine, scenarios, title")
    p.add_argument("--attacks", help="comma list, e.g. none,dv-fsr")
    p.add_argument("--defenses", help="comma list of rules; options after a colon, ';' between rules then: "
                                      "'fedavg;krum:m=8'")
    p.add_argument("--ratios", help="comma list of malicious ratios, e.g. 0.005,0.01")
    p.add_argument("--seeds", help="seeds: 0-4 or 0,3,7")
    p.add_argument("--models", help="comma list: sasrec,bert4rec")
    p.add_argument("--codecs", help="comma list of update encodings (services engine)")
    p.add_argument("--engine", choices=ENGINES, help="services (fedseq run per cell; default) or inprocess")
    p.add_argument("--set", action="append", type=lambda s: tuple(s.split("=", 1)), metavar="KEY=VALUE",
                   help="a base experiment key for every cell, e.g. --set epochs=4 --set dataset=steam")
    p.add_argument("--jobs", type=int, default=1, help="cells at once (each gets cores // jobs cores: compute processes in process, threads in services)")
    p.add_argument("--cores", type=int, help="cores to use (default: all of this machine's)")
    p.add_argument("--out", help="sweep folder (default runs/sweep-<preset>); an interrupted sweep resumes there")


def main(args: argparse.Namespace) -> int:
    try:
        spec = spec_from(args)
        cells = spec.cells()
    except SweepError as e:
        raise ConfigError(str(e)) from None
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    out = Path(args.out or f"runs/sweep-{args.preset or 'custom'}")
    summary = run_sweep(spec, out, args.jobs, args.cores)
    print(format_markdown(spec, summary))
    for p in summary.get("plots", []):
        print(f"plot: {p}")
    print(f"results: {out / 'sweep.md'}, {out / 'sweep.json'} ({len(cells)} cells)")
    if summary["failed"]:
        print(f"fedseq sweep: {len(summary['failed'])} cell(s) failed: {', '.join(summary['failed'])} "
              f"(run the same command again to retry them)", file=sys.stderr)
        return 1
    return 0
