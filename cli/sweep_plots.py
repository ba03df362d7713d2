"""A sweep's PNG plots: exposure and accuracy over epochs (one line per scenario, mean over seeds
with its spread), accuracy against exposure, exposure against the malicious ratio (per defense,
when several ratios), the attack x defense heat maps (one per ratio), and (services) bytes per
round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .sweep_summary import matrices, upgrade_summary

METRIC_LABELS = {"er@10": "exposure ER@10", "hr@10": "accuracy HR@10"}
AXES = {"attack", "defense", "defense_opts", "malicious_ratio", "seed"}
Style = tuple[Any, str, str]  # (color, line style, marker)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(summary: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of the sweep into ``out`` (see the module docstring); returns their paths.
    ``summary`` may be an older sweep.json's (``ratio`` for ``malicious_ratio``)."""
    paths: list[Path] = []
    summary = upgrade_summary(summary)
    scen = summary["scenarios"]
    if not scen:
        return paths
    style = _styles(scen)
    paths.append(_plot_epochs(summary, style, out / "epochs.png"))
    paths.append(_plot_accuracy_vs_exposure(scen, style, out / "accuracy_vs_exposure.png"))
    malicious_ratios = sorted({s["malicious_ratio"] for s in scen.values() if s["attack"] != "none"})
    if len(malicious_ratios) > 1:  # the file names of the plots stay short, as they were
        paths.append(_plot_exposure_vs_malicious_ratio(scen, out / "exposure_vs_ratio.png"))
    grids = matrices(summary)
    for grid in grids:
        name = "matrix.png" if len(grids) == 1 else f"matrix_r{grid['malicious_ratio']:g}.png"
        paths.append(plot_matrix(grid, summary["title"], out / name))
    if summary["engine"] == "services":
        paths.append(_plot_bytes_per_round(summary, out))
    return paths


def _plot_epochs(summary: dict[str, Any], style: dict[str, Style], path: Path) -> Path:
    """ER@10 and HR@10 per epoch side by side: a line per scenario (dashed: no attack), its
    band the spread over seeds while there are few scenarios."""
    plt = _pyplot()
    scen = summary["scenarios"]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_accuracy_vs_exposure(scen: dict[str, dict[str, Any]], style: dict[str, Style], path: Path) -> Path:
    """Final HR@10 against final ER@10, a point per scenario with its spread (hollow squares: no
    attack)."""
    plt = _pyplot()
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_exposure_vs_malicious_ratio(scen: dict[str, dict[str, Any]], path: Path) -> Path:
    """Final ER@10 against the malicious ratio (log scale), a line per attack and defense."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    by: dict[str, list[tuple[float, float, float]]] = {}
    for s in scen.values():
        if s["attack"] != "none":
            by.setdefault(f"{s['attack']} vs {s['defense']}", []).append((s["malicious_ratio"], *s["er@10"]))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_bytes_per_round(summary: dict[str, Any], out: Path) -> Path:
    """Bytes per round of the first seed's run of each scenario (fedseq report's plot)."""
    from fedseq.report import load_run, plot_runs

    runs = []
    for name, s in summary["scenarios"].items():
        run = load_run(Path(summary.get("cells_root", out)) / s["cells"][0])
        run.label = name
        runs.append(run)
    return plot_runs(runs, out / "bytes_per_round.png")


def plot_matrix(grid: dict[str, Any], title: str, path: Path) -> Path:
    """Two heat maps side by side, attacks (rows) x defenses (columns): ER@10 and HR@10, each cell
    the mean over the seeds and, with several, its standard deviation."""
    plt = _pyplot()
    import numpy as np

    A, D = grid["attacks"], grid["defenses"]
    seeds = max((len(s.get("seeds", ())) for s in grid["cells"].values()), default=1)
    row = 0.6 if seeds > 1 else 0.45
    if len(D) > 8:  # a wide grid: the two maps one above the other
        fig, axes = plt.subplots(2, 1, figsize=(2.5 + 0.8 * len(D), 2 * (1.8 + row * len(A))))
    else:
        fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * len(D) * 2, 1.6 + row * len(A)))
    for ax, metric, cmap in zip(axes, ("er@10", "hr@10"), ("Reds", "Greens"), strict=True):
        values, spread = np.full((len(A), len(D)), np.nan), np.zeros((len(A), len(D)))
        for (a, d), s in grid["cells"].items():
            values[A.index(a), D.index(d)], spread[A.index(a), D.index(d)] = s[metric]
        im = ax.imshow(values, cmap=cmap, vmin=0, vmax=1 if metric == "er@10" else max(0.01, np.nanmax(values)),
                       aspect="auto")
        for i in range(len(A)):
            for j in range(len(D)):
                if not np.isnan(values[i, j]):  # mean, and with several seeds its standard deviation
                    text = f"{values[i, j]:.2f}" + (f"\n±{spread[i, j]:.2f}" if seeds > 1 else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=6 if seeds > 1 else 7,
                            color="white" if values[i, j] > 0.6 * (im.norm.vmax or 1) else "black")
        ax.set_xticks(range(len(D)), D, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(A)), A, fontsize=7)
        over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
        ax.set_title(f"{METRIC_LABELS[metric]} (final epoch, {over})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{title}\nattacks (rows) x defenses (columns); malicious ratio {grid['malicious_ratio']:g}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the two-line title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def _styles(scen: dict[str, dict[str, Any]]) -> dict[str, Style]:
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
    ratios = sorted({s["malicious_ratio"] for s in scen.values()})  # the malicious ratios
    lines = sorted({(other(s), s["attack"], s["defense"]) for s in scen.values()})
    if len(lines) <= 20:  # a color per (other keys, attack, defense), a marker per ratio
        cmap = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"]
        return {name: (cmap(lines.index((other(s), s["attack"], s["defense"])) % cmap.N),
                       "--" if s["attack"] == "none" else "-",
                       markers[ratios.index(s["malicious_ratio"]) % len(markers)])
                for name, s in scen.items()}
    by_other = len(groups) > 1
    n = len(groups) if by_other else len(defenses)
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    out = {}
    for name, s in scen.items():
        color = cmap((groups.index(other(s)) if by_other else defenses.index(s["defense"])) % cmap.N)
        shape = defenses.index(s["defense"]) if by_other else ratios.index(s["malicious_ratio"])
        marker = markers[shape % len(markers)]
        out[name] = (color, "--" if s["attack"] == "none" else "-", marker)
    return out

