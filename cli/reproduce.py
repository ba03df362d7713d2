"""``fedseq reproduce SUITE``: the DV-FSR paper's tables and figure as predefined sweeps, with a
page that puts the paper's number beside fedseq's.

    fedseq reproduce table4 --quick               # a first look: 3 epochs, seed 0, the paper's cells only
    fedseq reproduce table4                       # the paper's settings: Steam, 30 epochs, seeds 0-2, variants
    fedseq reproduce figure2 --max-cells 2        # two more cells, then the page (resume later)
    fedseq reproduce table1 --render-only         # the page from the cells already run
    fedseq reproduce table3 --dataset ml-1m       # any supported data set (its page goes to the run folder)
    fedseq reproduce table4 --targets popular     # a harder target than the paper's zero-interaction item

Suites (Yin et al., "Poisoning Attacks and Defenses to Federated Sequential Recommendation"
(DV-FSR), AAAI 2025): ``table1`` (clean accuracy and the attacks, both models), ``table3`` (SASRec
against BERT4Rec under DV-FSR), ``table4`` (no defense, adv_train and mixed-RFA at 0.05/0.1/0.2%),
``table5`` (the ablations C-FSR and S-FSR across ratios), ``figure2`` (DV-FSR's ER@5 over epochs at
six ratios). Each is a ``fedseq sweep`` (in-process engine: every run equals the services' run,
tests/test_engine_equal.py) whose cells live in one folder per data set, so a cell that two suites
share (SASRec, DV-FSR at 0.1%) runs once. Every paper cell runs with the reference-compatibility
switches (``--compat reference``: the public code's protocol and quirks) and, as variants beside it,
with ``--compat off`` (fedseq's textbook default) and with the full-ranking protocol, so a reader
sees which effects are the method and which are the protocol.

Results: ``<out>/cells/<cell>/`` (each run's bundle), ``<out>/<suite>/`` (sweep.md, sweep.json,
plots) and the page: ``docs/results/<suite>.md`` (+ plots in ``docs/results/<suite>/``) for the
paper's settings on Steam, ``<out>/<suite>/<suite>.md`` otherwise. A suite stopped part-way resumes:
finished cells are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedseq.config import ConfigError
from fedseq.data import TARGET_PRESETS

from .sweep import KS, CellRunner, SweepSpec, format_table, parse_seeds, plot_sweep, run_sweep, subprocess_cell
from .sweep_ray import Executor, add_executor_flags, executor
from .tracking import SweepTracking, add_track_flag, open_tracker, sweep_tracking

ROOT = Path.cwd()  # run from the repository root: runs/ and docs/results/ are relative to it

# The paper's settings (Yin et al., AAAI 2025, experimental settings, and its public code): Steam, 30 epochs, 256 users per round, lr 0.001 x 0.5 every
# 5 epochs, the sum ("common"), the sampled protocol with 1,000 negatives.
PAPER_BASE: dict[str, Any] = {"dataset": "steam", "epochs": 30, "clients_per_round": 256, "lr": 0.001,
                              "lr_decay": 0.5, "lr_decay_every": 5, "num_negatives": 1000}
QUICK_EPOCHS = 3
REFERENCE = "reference"
# mixed-RFA's output is mean-scale: with the paper's literal step at lr 0.001 the model does not
# train (HR@10 0.008 after 10 epochs, docs/results/defenses.md), while the paper's Table 4 shows it
# moving; so its cells take the round engine's step (lr x the round's updates) and every other
# reference switch.
REFERENCE_ENGINE_STEP = "reference,!literal_step"
VARIANTS = {  # name -> (label suffix, keys over the paper cell's)
    "reference": ("", {}),
    "off": (" [compat off]", {"compat": "off"}),
    "full": (" [full ranking]", {"protocol": "full"}),
}
METRIC_NAMES = {"hr@10": "HR@10", "ndcg@10": "NDCG@10", **{f"er@{k}": f"ER@{k}" for k in KS}}


def _paper(values: str, metrics: str = "er") -> dict[str, float]:
    """``"0.9169 0.9997 1 1"`` -> ER@5..30 (``metrics="er"``) or HR@10, NDCG@10, ER@5..30 (``"all"``)."""
    keys = [f"er@{k}" for k in KS] if metrics == "er" else ["hr@10", "ndcg@10", *(f"er@{k}" for k in KS)]
    nums = [float(x) for x in values.split()]
    if len(nums) != len(keys):
        raise ValueError(f"{values!r}: {len(keys)} numbers expected")
    return dict(zip(keys, nums, strict=True))


def _cell(name: str, model: str, attack: str = "none", malicious_ratio: float = 0.0, defense: str = "fedavg",
          paper: dict[str, float] | None = None, ml1m: dict[str, float] | None = None, compat: str = REFERENCE,
          **keys: Any) -> dict[str, Any]:
    """A paper cell; ``paper``: its Steam numbers, ``ml1m``: its ML-1M numbers (the paper's tables)."""
    out: dict[str, Any] = {"name": name, "model": model, "attack": attack, "defense": defense, "compat": compat,
                           **keys}
    if attack != "none":
        out["malicious_ratio"] = malicious_ratio
    refs = {k: v for k, v in (("steam", paper), ("ml-1m", ml1m)) if v}
    if refs:
        out["paper"] = refs
    return out


SUITES: dict[str, dict[str, Any]] = {
    "table1": {
        "title": "Table 1: clean accuracy and the attacks (Steam)",
        "intro": "Table 1's Steam rows: each model clean, under the data-poisoning baseline RA (Kapoor et al. "
                 "2017), the model-poisoning baselines EB (PipAttack's explicit boosting, Zhang et al. 2022) and "
                 "A-ra (Rong et al. 2022), and DV-FSR, at the paper's malicious ratios (SASRec 0.1%, BERT4Rec "
                 "1%) and DV-FSR's smaller ones (0.05%, 0.2%). Target: the least popular item (1358 on Steam, "
                 "no training interaction).",
        "scenarios": [
            _cell("SASRec clean", "sasrec", paper=_paper("0.3141 0.1546 0 0 0 0", "all"), ml1m=_paper("0.1061 0.0505 0 0 0 0", "all")),
            _cell("SASRec RA 0.1%", "sasrec", "ra", 0.001, paper=_paper("0.3307 0.1732 0 0 0 0", "all"), ml1m=_paper("0.1061 0.0508 0 0 0 0", "all")),
            _cell("SASRec EB 0.1%", "sasrec", "eb", 0.001, paper=_paper("0.3109 0.1591 0 0.0003 0.0144 0.1148", "all"), ml1m=_paper("0.1038 0.0499 0.0023 0.0161 0.1068 0.2916", "all")),
            _cell("SASRec A-ra 0.1%", "sasrec", "a-ra", 0.001,
                  paper=_paper("0.3131 0.1590 0 0.0003 0.0160 0.1156", "all"), ml1m=_paper("0.1050 0.0499 0.0028 0.1062 0.1111 0.3031", "all")),
            _cell("SASRec DV-FSR 0.1%", "sasrec", "dv-fsr", 0.001,
                  paper=_paper("0.2944 0.1411 0.9169 0.9997 1 1", "all"), ml1m=_paper("0.0929 0.0372 0.9890 0.9981 1 1", "all")),
            _cell("SASRec DV-FSR 0.05%", "sasrec", "dv-fsr", 0.0005,
                  paper=_paper("0.3131 0.1623 0.0011 0.0117 0.2950 0.8311", "all"), ml1m=_paper("0.0969 0.0421 0.9701 0.9851 1 1", "all")),
            _cell("BERT4Rec clean", "bert4rec", paper=_paper("0.3293 0.1697 0 0 0 0", "all"), ml1m=_paper("0.1174 0.0564 0 0 0 0", "all")),
            _cell("BERT4Rec RA 1%", "bert4rec", "ra", 0.01, paper=_paper("0.3339 0.1737 0 0 0 0", "all"), ml1m=_paper("0.1184 0.0567 0 0 0 0", "all")),
            _cell("BERT4Rec EB 1%", "bert4rec", "eb", 0.01, paper=_paper("0.3304 0.1700 0 0 0.0037 0.1423", "all"), ml1m=_paper("0.1172 0.0571 0.0018 0.0086 0.0526 0.1879", "all")),
            _cell("BERT4Rec A-ra 1%", "bert4rec", "a-ra", 0.01,
                  paper=_paper("0.3312 0.1705 0 0 0.0035 0.1335", "all"), ml1m=_paper("0.1189 0.0577 0.0012 0.0084 0.0553 0.1930", "all")),
            _cell("BERT4Rec DV-FSR 1%", "bert4rec", "dv-fsr", 0.01,
                  paper=_paper("0.3128 0.1417 0.9324 0.9892 1 1", "all"), ml1m=_paper("0.1058 0.0422 0.9531 0.9872 1 1", "all")),
            _cell("BERT4Rec DV-FSR 0.2%", "bert4rec", "dv-fsr", 0.002,
                  paper=_paper("0.3304 0.1699 0.0059 0.1492 0.9379 1", "all"), ml1m=_paper("0.1132 0.0554 0.1152 0.4518 0.9767 1", "all")),
        ],
    },
    "table3": {
        "title": "Table 3: SASRec against BERT4Rec under DV-FSR (Steam)",
        "intro": "DV-FSR at 0.1% malicious clients on each model; the paper's text adds that BERT4Rec needs 0.5% "
                 "or 1% (its 1% row is Table 1's).",
        "scenarios": [
            _cell("SASRec DV-FSR 0.1%", "sasrec", "dv-fsr", 0.001, paper=_paper("0.9169 0.9997 1 1"),
                  ml1m=_paper("0.9890 0.9981 1 1")),
            _cell("BERT4Rec DV-FSR 0.1%", "bert4rec", "dv-fsr", 0.001, paper=_paper("0 0.0003 0.0059 0.2190"),
                  ml1m=_paper("0.0007 0.0046 0.0396 0.1262")),
            _cell("BERT4Rec DV-FSR 0.5%", "bert4rec", "dv-fsr", 0.005),
            _cell("BERT4Rec DV-FSR 1%", "bert4rec", "dv-fsr", 0.01, paper=_paper("0.9324 0.9892 1 1"),
                  ml1m=_paper("0.9531 0.9872 1 1")),
        ],
    },
    "table4": {
        "title": "Table 4: DV-FSR under no defense, adv_train and mixed-RFA (Steam, SASRec)",
        "intro": "mixed-RFA (Eq. 10, lambda 0.3) and adv_train (Yue et al. 2022) against the sum at 0.05%, 0.1% "
                 "and 0.2% malicious clients. mixed-RFA's cells take the round engine's step (its mean-scale "
                 f"output x the round's updates; compat `{REFERENCE_ENGINE_STEP}`): with the paper's literal step "
                 "at lr 0.001 the model does not train and exposure stays 0 trivially. Under `--compat "
                 "reference` adv_train applies no update, as the public code's (`advtrain_noop`): the run is the "
                 "no-defense run to the last bit, so those rows are the no-defense cells (run once, shared); the "
                 "`[compat off]` variant is the real adversarial training (several times "
                 "slower per epoch).",
        "scenarios": [
            *(c for r, pct, (none, adv, mrfa), (m_none, m_adv, m_mrfa) in (
                (0.0005, "0.05%", ("0.0011 0.0117 0.2950 0.8311", "0 0.0080 0.2241 0.7445", "0 0 0 0.0005"),
                 ("0.9701 0.9851 1 1", "0.9698 0.9838 1 1", "0 0 0 0")),
                (0.001, "0.1%", ("0.9169 0.9997 1 1", "0.9217 0.9992 1 1", "0.0578 0.4391 0.9739 0.9995"),
                 ("0.9890 0.9981 1 1", "0.9834 0.9950 1 1", "0.3935 0.8457 0.9997 1")),
                (0.002, "0.2%", ("1 1 1 1", "1 1 1 1", "0.9526 1 1 1"), ("1 1 1 1", "1 1 1 1", "1 1 1 1")))
              for c in (
                _cell(f"SASRec DV-FSR {pct}", "sasrec", "dv-fsr", r, paper=_paper(none), ml1m=_paper(m_none)),
                _cell(f"SASRec DV-FSR {pct} + adv_train", "sasrec", "dv-fsr", r, "adv-train", paper=_paper(adv),
                      ml1m=_paper(m_adv)),
                _cell(f"SASRec DV-FSR {pct} + mixed-RFA", "sasrec", "dv-fsr", r, "mixed-rfa", paper=_paper(mrfa),
                      ml1m=_paper(m_mrfa), compat=REFERENCE_ENGINE_STEP),
            )),
        ],
    },
    "table5": {
        "title": "Table 5: the ablations C-FSR and S-FSR across ratios (Steam)",
        "intro": "C-FSR drops the explicit view (item substitution), S-FSR the implicit view (L_con). The paper's "
                 "rows: SASRec at 0.05%, BERT4Rec at 0.2%; fedseq adds SASRec at 0.1% and 0.2% (the issue: "
                 "across ratios).",
        "scenarios": [
            *(_cell(f"SASRec {a} {pct}", "sasrec", a.lower(), r, paper=_paper(p[0]) if p else None,
                    ml1m=_paper(p[1]) if p else None)
              for r, pct, rows in ((0.0005, "0.05%", {"C-FSR": ("0 0 0 0", "0 0 0 0"),
                                                      "S-FSR": ("0 0.0013 0.0184 0.1010", "0.7661 0.9396 1 1"),
                                                      "DV-FSR": ("0.0011 0.0117 0.2950 0.8311", "0.9701 0.9851 1 1")}),
                                   (0.001, "0.1%", {}), (0.002, "0.2%", {}))
              for a in ("C-FSR", "S-FSR", "DV-FSR") for p in [rows.get(a)]),
            *(_cell(f"BERT4Rec {a} 0.2%", "bert4rec", a.lower(), 0.002, paper=_paper(p), ml1m=_paper(m))
              for a, p, m in (("C-FSR", "0 0 0 0.0003", "0 0 0 0"),
                              ("S-FSR", "0.0037 0.1276 0.9233 0.9997", "0.0978 0.4081 0.9644 1"),
                              ("DV-FSR", "0.0059 0.1492 0.9379 1", "0.1152 0.4518 0.9767 1")))
        ],
    },
    "figure2": {
        "title": "Figure 2: DV-FSR's ER@5 over epochs at six malicious ratios (Steam, SASRec)",
        "intro": "The paper plots ER@5 per epoch for 1%, 0.5%, 0.4%, 0.3%, 0.2% and 0.1% malicious clients (its "
                 "text: the higher the ratio, the sooner the attack peaks, and it stays there). The paper gives "
                 "no numbers for the curves, so the page shows the plot and the epoch at which each ratio first "
                 "reaches ER@5 >= 0.9.",
        "scenarios": [_cell(f"SASRec DV-FSR {pct}", "sasrec", "dv-fsr", r)
                      for r, pct in ((0.01, "1%"), (0.005, "0.5%"), (0.004, "0.4%"), (0.003, "0.3%"),
                                     (0.002, "0.2%"), (0.001, "0.1%"))],
        "figure": "er@5",
    },
}
SUITE_NAMES = tuple(SUITES)


def suite_spec(suite: str, seeds: list[int], quick: bool = False, dataset: str | None = None,
               data_root: str | None = None, target_preset: str | None = None,
               variants: tuple[str, ...] = ("reference", "off", "full"), only: list[str] | None = None,
               epochs: int | None = None) -> SweepSpec:
    """The sweep of ``suite``: its paper cells (and their ``variants``) on the paper's base,
    narrowed by ``only`` (scenario names, or a substring of them)."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ConfigError(f"variants: {bad or 'none'}; choose from {', '.join(VARIANTS)}")
    base = dict(PAPER_BASE)
    if dataset:
        base["dataset"] = dataset
    if data_root:
        base["data_root"] = data_root
    if target_preset:
        if target_preset not in TARGET_PRESETS:
            raise ConfigError(f"--targets {target_preset!r}: presets are {', '.join(TARGET_PRESETS)}")
        base["target_preset"] = target_preset
    if quick:
        base["epochs"] = QUICK_EPOCHS
    if epochs:
        base["epochs"] = epochs
    names = {sc["name"] for sc in SUITES[suite]["scenarios"]}
    scenarios = []
    for sc in SUITES[suite]["scenarios"]:  # --only: a scenario's exact name, else a part of names
        if only and not any(o == sc["name"] if o in names else o.lower() in sc["name"].lower() for o in only):
            continue
        for v in ("reference",) if quick else variants:
            suffix, keys = VARIANTS[v]
            cell = {**sc, **keys, "name": sc["name"] + suffix}
            ref = sc.get("paper", {}).get(base["dataset"])  # the paper's numbers for this data set, if any
            cell.pop("paper", None)
            if ref and v == "reference":
                cell["paper"] = ref
            scenarios.append(cell)
    if not scenarios:
        raise ConfigError(f"--only {only}: no scenario of {suite} matches; scenarios: "
                          + "; ".join(s["name"] for s in SUITES[suite]["scenarios"]))
    title = SUITES[suite]["title"]
    if base["dataset"] != "steam":
        title = title.replace("(Steam", f"({base['dataset']}")
    return SweepSpec(base=base, scenarios=tuple(scenarios), seeds=tuple(seeds), engine="inprocess", title=title)


# ---------------------------------------------------------------------------- the page
def _fmt(mean_std: tuple[float, float], n: int) -> str:
    mean, std = mean_std
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def comparison_table(summary: dict[str, Any], scenarios: list[dict[str, Any]]) -> list[str]:
    """Per paper cell: fedseq (mean ± std over seeds), the paper's number and the difference."""
    keys = [m for m in METRIC_NAMES if any(m in sc.get("paper", {}) for sc in scenarios)] or list(METRIC_NAMES)
    lines = ["| scenario | seeds | " + " | ".join(f"{METRIC_NAMES[m]}: fedseq (paper, diff)" for m in keys) +
             " | minutes per run |", "|---|---|" + "---|" * len(keys) + "---|"]
    for sc in scenarios:
        got = summary["scenarios"].get(sc["name"])
        paper = sc.get("paper", {})
        if not got:
            lines.append(f"| {sc['name']} | not run | " + " | ".join(
                f"({paper[m]:.4f})" if m in paper else "" for m in keys) + " | |")
            continue
        n = len(got["seeds"])
        cols = []
        for m in keys:
            text = _fmt(got[m], n)
            if m in paper:
                text += f" ({paper[m]:.4f}, {got[m][0] - paper[m]:+.4f})"
            cols.append(text)
        seeds = ",".join(map(str, got["seeds"]))
        name = sc["name"] + (f" (unfinished: {got['unfinished']})" if got.get("unfinished") else "")
        lines.append(f"| {name} | {seeds} | " + " | ".join(cols) + f" | {got['seconds'][0] / 60:.1f} |")
    return lines


def variants_table(summary: dict[str, Any], scenarios: list[dict[str, Any]]) -> list[str]:
    """Each paper cell beside its variants: HR@10, ER@5 and ER@10 (mean over seeds)."""
    labels = [(v, suffix) for v, (suffix, _) in VARIANTS.items()]
    lines = ["| scenario | " + " | ".join(f"{v}: HR@10 / ER@5 / ER@10" for v, _ in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for sc in scenarios:
        cols = []
        for _, suffix in labels:
            got = summary["scenarios"].get(sc["name"] + suffix)
            cols.append(" / ".join(f"{got[m][0]:.4f}" for m in ("hr@10", "er@5", "er@10")) if got else "not run")
        lines.append(f"| {sc['name']} | " + " | ".join(cols) + " |")
    return lines


def first_epoch_at(curve: list[tuple[float, float]], epochs: list[int], level: float) -> str:
    for e, (mean, _) in zip(epochs, curve, strict=False):
        if mean >= level:
            return str(e)
    return f"not within {epochs[-1]}" if epochs else "-"


def plot_figure2(summary: dict[str, Any], scenarios: list[dict[str, Any]], path: Path, metric: str = "er@5") -> Path:
    """The paper's Figure 2 layout: ER@5 per epoch, one line per malicious ratio (a scenario's
    ``malicious_ratio``; ``ratio``, its old name, is read too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for sc in scenarios:
        got = summary["scenarios"].get(sc["name"])
        if not got:
            continue
        mean = [v[0] for v in got["curve"][metric]]
        label = f"{sc.get('malicious_ratio', sc.get('ratio', 0.0)) * 100:g}%" + (f" ({got['unfinished']})" if got.get("unfinished") else "")
        ax.plot(got["epochs"], mean, marker="o", markersize=3, label=label)
        if len(got["seeds"]) > 1:
            std = [v[1] for v in got["curve"][metric]]
            ax.fill_between(got["epochs"], [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    seeds = sorted({s for v in summary["scenarios"].values() for s in v["seeds"]})
    ax.set_title(f"Changes in {METRIC_NAMES[metric]} under DV-FSR (Steam, SASRec; seeds {seeds})", fontsize=10)
    ax.legend(title="malicious clients", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(suite: str, spec: SweepSpec, summary: dict[str, Any], page: Path, plots: list[Path],
           command: str, note: str = "") -> Path:
    """The suite's page: the comparison, the variants, the config of every cell, run times, plots."""
    info = SUITES[suite]
    paper_cells = [s for s in spec.scenarios if any(s["name"] == sc["name"] for sc in info["scenarios"])]
    seeds = ",".join(map(str, spec.seeds))
    base = ", ".join(f"{k}={v}" for k, v in sorted(spec.base.items()))
    lines = [f"# {spec.title}", "", info["intro"], "",
             f"Command: `{command}` (page written at commit {_commit()}). Engine: in process (equal to the "
             f"services). Seeds asked: {seeds}; each row lists the seeds that ran. Base: {base}. Final epoch; "
             "mean ± std over the seeds run; the paper's number and fedseq's minus the paper's in brackets.", "",
             *([note, ""] if note else []), *comparison_table(summary, paper_cells), ""]
    if any(s["name"].endswith(VARIANTS["off"][0]) or s["name"].endswith(VARIANTS["full"][0]) for s in spec.scenarios):
        lines += ["## The same cells without the reference switches, and with full ranking", "",
                  "`reference`: the public code's protocol and quirks (`--compat reference`); `off`: fedseq's "
                  "textbook default (`--compat off`); `full`: the reference switches with every item ranked "
                  "(`--protocol full`) instead of 1,000 sampled negatives.", "",
                  *variants_table(summary, paper_cells), ""]
    if info.get("figure"):
        lines += [f"## First epoch with mean {METRIC_NAMES[info['figure']]} >= 0.9", "",
                  "| scenario | epoch |", "|---|---|"]
        for sc in paper_cells:
            got = summary["scenarios"].get(sc["name"])
            lines.append(f"| {sc['name']} | " + (first_epoch_at(got["curve"][info["figure"]], got["epochs"], 0.9)
                                                 if got else "not run") + " |")
        lines.append("")
    if info.get("notes"):
        lines += ["## Notes", "", info["notes"].strip(), ""]
    lines += ["## Every cell", "", "All metrics (final epoch):", "", format_table(summary), "",
              "| scenario | experiment keys over the base | cells |", "|---|---|---|"]
    for name, got in summary["scenarios"].items():
        keys = ", ".join(f"{k}={v}" for k, v in sorted(got["overrides"].items()) if k != "seed" and v not in ([], ""))
        lines.append(f"| {name} | {keys} | {', '.join(got['cells'])} |")
    missing = [s["name"] for s in spec.scenarios if s["name"] not in summary["scenarios"]]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): " + "; ".join(missing) + ". `" + command +
                  "` runs them (finished cells are kept)."]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{p.stem}]({os.path.relpath(p, page.parent)})" for p in plots)]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    return page


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("suite", choices=SUITE_NAMES)
    ap.add_argument("--quick", action="store_true",
                    help=f"a first look: {QUICK_EPOCHS} epochs, seed 0, the paper cells only (no variants)")
    ap.add_argument("--seeds", help="seeds (default 0-2; --quick: 0)")
    ap.add_argument("--dataset", help="steam (default) | ml-1m | a sequence/ratings file")
    ap.add_argument("--data-root", help="folder with steam/ and ml-1m/")
    ap.add_argument("--targets", choices=TARGET_PRESETS,
                    help="target preset (default least-popular, the paper's zero-interaction item)")
    ap.add_argument("--variants", default="reference,off,full",
                    help="comma list of reference (the paper cell), off (--compat off), full (full ranking)")
    ap.add_argument("--only", action="append",
                    help="a scenario's name, or a part of names (repeatable): --only '0.2%%'")
    ap.add_argument("--epochs", type=int, help="override the paper's 30 epochs")
    ap.add_argument("--max-cells", type=int, help="run at most this many unfinished cells, then write the page")
    ap.add_argument("--jobs", type=int, help="cells at once (default 1; --executor ray: as many as the cluster's CPUs hold)")
    ap.add_argument("--cores", type=int, help="cores to use (default all)")
    ap.add_argument("--out", help="run folder (default runs/reproduce/<dataset>[-<targets>][-quick])")
    ap.add_argument("--page", help="where to write the page (default docs/results/<suite>.md for the paper's "
                                   "settings on Steam, else <out>/<suite>/<suite>.md)")
    ap.add_argument("--render-only", action="store_true", help="write the page from the cells already run")
    ap.add_argument("--note", default="", help="a paragraph for the page (how and where its cells ran)")
    add_track_flag(ap)  # the suite a parent run, each cell a child; --render-only logs the page to the parent
    add_executor_flags(ap)  # --executor ray: the cells on a Ray cluster (cli/sweep_ray.py)


def main(args: argparse.Namespace, runner: CellRunner = subprocess_cell) -> int:
    """``fedseq reproduce``: run (or resume) the suite's cells with ``runner`` (default: each its own
    process; cli/sweep_run.py) and write its page."""
    seeds = parse_seeds(args.seeds or ("0" if args.quick else "0-2"))
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    spec = suite_spec(args.suite, seeds, args.quick, args.dataset, args.data_root, args.targets, variants, args.only,
                      args.epochs)
    ds = spec.base["dataset"]
    tag = Path(ds).stem if ("/" in ds or "." in ds) else ds.replace(":", "-")
    out = Path(args.out or ROOT / "runs" / "reproduce" / "-".join(
        [tag, *([args.targets] if args.targets else []), *(["quick"] if args.quick else [])]))
    paper_settings = ds == "steam" and not args.quick and not args.targets and not args.epochs
    page = Path(args.page) if args.page else (ROOT / "docs" / "results" / f"{args.suite}.md" if paper_settings
                                              else out / args.suite / f"{args.suite}.md")
    # the command that runs (or resumes) the page's cells: as typed, less the page-only flags
    typed = sys.argv[2:] if sys.argv[1:2] == ["reproduce"] else [args.suite]
    skip = {"--render-only"}
    flags = [a for i, a in enumerate(typed) if a not in skip and not (a == "--note" or typed[i - 1:i] == ["--note"])]
    command = "fedseq reproduce " + " ".join(shlex.quote(a) for a in flags)
    if args.max_cells is not None and args.max_cells < 0:
        raise ConfigError("--max-cells must be >= 0")
    summary_dir = out / args.suite
    tracker = open_tracker(getattr(args, "track", None))  # before any cell: a bad --track exits 2 now
    with (executor(args, runner) if not args.render_only else contextlib.nullcontext(None)) as ex, \
            sweep_tracking(tracker, summary_dir, asdict(spec), f"{args.suite} ({tag})") as track:
        page, summary = _run_and_render(args, spec, out, summary_dir, page, command, ex, track)
        if track is not None:
            track.finish(summary.get("failed", []), extra=[page])
    runs = sum(len(s["seeds"]) for s in summary["scenarios"].values())
    total = len(spec.cells())
    print(f"wrote {page} ({runs} of {total} runs done)")
    if track is not None:
        print(f"tracked: MLflow run {track.parent} (a child run per cell) in {track.tracker.uri}")
    if summary.get("failed"):
        print(f"fedseq reproduce: {len(summary['failed'])} run(s) failed: {', '.join(summary['failed'])}",
              file=sys.stderr)
        return 1
    return 0


def _run_and_render(args: argparse.Namespace, spec: SweepSpec, out: Path, summary_dir: Path, page: Path,
                    command: str, ex: Executor | None,
                    track: SweepTracking | None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) the suite's cells (unless ``--render-only``), draw its plots, write its page;
    the page and the summary."""
    if ex is None:  # --render-only
        from .sweep import summarise

        summary = summarise(spec, spec.cells(), out / "cells")
        summary_dir.mkdir(parents=True, exist_ok=True)
    else:
        summary = run_sweep(spec, summary_dir, ex.jobs, ex.cores, cells_root=out / "cells",
                            max_cells=args.max_cells, runner=ex.runner, plots=False, track=track)  # its own plots, below
    # the plots show the paper cells; their [compat off] / [full ranking] variants are in the tables
    # (on one axis a variant would sit on its paper cell's line as a second point of the same ratio)
    paper_only = {**summary, "scenarios": {k: v for k, v in summary["scenarios"].items() if not k.endswith("]")}}
    plots = [Path(p) for p in plot_sweep(paper_only, summary_dir)] if paper_only["scenarios"] else []
    if SUITES[args.suite].get("figure") and summary["scenarios"]:
        paper_cells = [s for s in spec.scenarios if not s["name"].endswith("]")]
        plots.insert(0, plot_figure2(summary, paper_cells, summary_dir / f"{args.suite}.png",
                                     SUITES[args.suite]["figure"]))
    summary["plots"] = [str(p) for p in plots]
    (summary_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
    if page.parent != summary_dir:
        dest = page.parent / page.stem
        dest.mkdir(parents=True, exist_ok=True)
        for p in plots:
            shutil.copy(p, dest / p.name)
        plots = [dest / p.name for p in plots]
    render(args.suite, spec, summary, page, plots, command, args.note)
    return page, summary
