"""``fedseq report RUN_DIR [RUN_DIR ...]``: print results bundles and their communication ledgers,
and plot bytes per round, one line per run labelled by its codec, so runs with different
encodings compare on one plot; and exposure (ER@K) and accuracy (HR@10) per epoch, one line per
run (``metrics_per_epoch.png`` beside the bytes plot).

For each run: the results table (metrics and bytes per epoch), the ledger totals, and the ledger
broken down per kind, per message, per worker and per round (from ``ledger.jsonl``; see
:mod:`fedseq.ledger` for what each number means). With several runs, a comparison table follows.
A folder without ``results.json`` whose subfolders have one stands for all of those runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import ledger as ledger_mod
from .privacy import privacy_line
from .results import format_table

MAX_ROUND_ROWS = 40  # longer runs print the first and last rounds only (all are in ledger.jsonl)


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    entries: list[dict[str, Any]]  # ledger.jsonl (empty when the bundle has none)
    label: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config", {})

    @property
    def run_id(self) -> str:
        return str(self.results.get("summary", {}).get("run_id") or self.config.get("run_id") or self.path.name)

    @property
    def totals(self) -> dict[str, Any]:
        if self.entries:
            return ledger_mod.totals(self.entries)
        return self.results.get("ledger", {}).get("totals", {})

    @property
    def per_round(self) -> list[dict[str, Any]]:
        if self.entries:
            return ledger_mod.per_round(self.entries)
        return self.results.get("ledger", {}).get("per_round", [])


class ReportError(ValueError):
    pass


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run folders (holding ``results.json``) named by ``paths``; a folder without one stands for
    its subfolders that have one. ReportError naming what is missing."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ReportError("no run folder given")
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_file() and p.name == "results.json":
            p = p.parent
        if (p / "results.json").is_file():
            out.append(p)
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if (d / "results.json").is_file())
            if not subs:
                raise ReportError(f"{p} has no results.json (nor do its subfolders); is it a run folder "
                                  "(fedseq run --out DIR)?")
            out.extend(subs)
        else:
            raise ReportError(f"{p} does not exist")
    return out


def load_run(path: Path) -> Run:
    try:
        results = json.loads((path / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path / 'results.json'}: {e}") from None
    ledger_file = path / "ledger.jsonl"
    try:
        entries = ledger_mod.read_jsonl(ledger_file) if ledger_file.is_file() else []
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {ledger_file}: {e}") from None
    return Run(path, results, entries)


def _labels(runs: Sequence[Run]) -> None:
    """Label each run by its codec (and compression, model deltas); runs that would share a label
    add their id."""
    base = []
    for r in runs:
        comp = r.config.get("compression", "none")
        base.append(f"{r.config.get('codec', '?')}" + (f" + {comp}" if comp and comp != "none" else "")
                    + (" + model delta" if r.config.get("model_delta") else ""))
    for r, b in zip(runs, base, strict=True):
        r.label = b if base.count(b) == 1 else f"{b} ({r.run_id})"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[f"{v:,}" if isinstance(v, int) else (f"{v:,.1f}" if isinstance(v, float) else str(v))
                               for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    return "\n".join(lines)


def format_run(run: Run) -> str:
    """The text report of one run."""
    cfg, summ, t = run.config, run.results.get("summary", {}), run.totals
    out = [f"== {run.run_id}  ({run.path})",
           f"dataset {cfg.get('dataset', '?')}, model {cfg.get('model', '?')}, codec {cfg.get('codec', '?')}, "
           f"compression {cfg.get('compression', 'none')}, rule {cfg.get('defense', cfg.get('aggregation', '?'))}, "
           f"state {summ.get('state', '?')}, rounds {summ.get('rounds', '?')}", ""]
    epochs = run.results.get("epochs", [])
    if epochs:
        out += [format_table(epochs, extra=("bytes_up", "bytes_down")), ""]
    private = privacy_line(summ.get("privacy"))
    if private:
        out += [private, ""]
    if not t:
        out.append("no communication ledger in this bundle")
        return "\n".join(out)
    out.append(f"ledger: {t['entries']:,} entries, {t['bytes']:,} bytes ({human(t['bytes'])}), "
               f"wire {t['wire_bytes']:,} bytes ({human(t['wire_bytes'])})")
    out.append(f"  up {t['bytes_up']:,} ({human(t['bytes_up'])}), down {t['bytes_down']:,} "
               f"({human(t['bytes_down'])}), internal {t['bytes_internal']:,} ({human(t['bytes_internal'])})")
    out.append(f"  bytes per user update: {t['bytes_per_update']:,.1f} ({human(t['bytes_per_update'])}) over "
               f"{t['updates']:,} updates; wire {t['wire_per_update']:,.1f} ({human(t['wire_per_update'])})")
    if not run.entries:
        out.append("  (no ledger.jsonl: per-kind/message/worker breakdowns unavailable)")
    else:
        kinds = ledger_mod.by(run.entries, "kind")
        out += ["", "per kind:", _table(["kind", "entries", "messages", "bytes", "wire_bytes"],
                                        [[k, v["entries"], v["messages"], v["bytes"], v["wire_bytes"]]
                                         for k, v in kinds.items()])]
        whats = ledger_mod.by(run.entries, "what")
        merged: dict[str, dict[str, int]] = {}
        for k, v in whats.items():  # "store.get model:12" -> "store.get model:*"
            key = k.split(":")[0] + ":*" if ":" in k else k
            acc = merged.setdefault(key, {"entries": 0, "up": 0, "down": 0, "internal": 0, "wire_bytes": 0})
            for f in acc:
                acc[f] += v[f]
        out += ["", "per message:", _table(["message", "entries", "up", "down", "internal", "wire_bytes"],
                                           [[k, v["entries"], v["up"], v["down"], v["internal"], v["wire_bytes"]]
                                            for k, v in sorted(merged.items())])]
        workers = ledger_mod.by(run.entries, "worker")
        out += ["", "per worker:", _table(["worker", "entries", "up", "down", "internal", "wire_bytes"],
                                          [[k or "(service plane)", v["entries"], v["up"], v["down"],
                                            v["internal"], v["wire_bytes"]] for k, v in workers.items()])]
    rounds = run.per_round
    if rounds:
        rows = [[r["round"], r["epoch"], r["bytes_up"], r["bytes_down"], r["bytes_internal"], r["wire_up"],
                 r["wire_down"], r["updates"], float(r["bytes_per_update"])] for r in rounds]
        if len(rows) > MAX_ROUND_ROWS:
            half = MAX_ROUND_ROWS // 2
            rows = rows[:half] + [["...", f"{len(rows) - 2 * half} rounds", "", "", "", "", "", "", ""]] + rows[-half:]
        out += ["", "per round (all phases; evaluation traffic counts in the epoch's last round):",
                _table(["round", "epoch", "up", "down", "internal", "wire_up", "wire_down", "updates",
                        "bytes/update"], rows)]
    return "\n".join(out)


def format_comparison(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        t = r.totals
        last: dict[str, Any] = next((e for e in reversed(r.results.get("epochs", [])) if "hr@10" in e), {})
        rows.append([r.label, r.run_id, float(t.get("bytes_per_update", 0.0)), float(t.get("wire_per_update", 0.0)),
                     t.get("bytes_up", 0), t.get("bytes_down", 0), t.get("wire_bytes", 0),
                     f"{last['hr@10']:.4f}" if "hr@10" in last else "-"])
    return "comparison:\n" + _table(["run", "id", "bytes/update", "wire/update", "up", "down", "wire total",
                                     "final HR@10"], rows)


def plot_runs(runs: Sequence[Run], path: str | Path) -> Path:
    """Three panels, one line per run (labelled by codec): bytes workers send per round, bytes they
    receive per round, and bytes per user update per round; log scale. Runs with compression
    add dashed lines of the wire bytes after compression. Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("bytes_up", "wire_up", "upload: bytes workers send per round"),
              ("bytes_down", "wire_down", "download: bytes workers receive per round"),
              ("bytes_per_update", "wire_per_update", "bytes per user update (mean in the round)"))
    for r in runs:
        rows = r.per_round
        xs = [row["round"] for row in rows]
        gz = r.config.get("compression", "none") != "none"
        for ax, (key, wkey, _) in zip(axes, panels, strict=True):
            if key == "bytes_per_update":
                sel = [row for row in rows if row["updates"]]
                px, py = [row["round"] for row in sel], [row[key] for row in sel]
                pw = [row.get(wkey, row[key]) for row in sel]
            else:
                px, py, pw = xs, [row[key] for row in rows], [row[wkey] for row in rows]
            (line,) = ax.plot(px, py, marker="o", markersize=2.5, linewidth=1.4, label=r.label)
            if gz:
                ax.plot(px, pw, linestyle="--", linewidth=1.0, color=line.get_color(),
                        label=f"{r.label}: wire after {r.config.get('compression')}")
    fmt = FuncFormatter(lambda v, _pos: human(v))
    for ax, (_, _, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(fmt)
        lo, hi = ax.get_ylim()
        # label the minor ticks only when the axis spans less than a decade (else they crowd it)
        ax.yaxis.set_minor_formatter(fmt if lo > 0 and hi / lo < 10 else NullFormatter())
        ax.tick_params(axis="y", which="both", labelsize=8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("bytes (serialized messages and store payloads)")
    fig.suptitle("fedseq communication per round (evaluation traffic lands on each epoch's last round; "
                 "the last round of an epoch may have fewer users)", fontsize=10)
    return _save(fig, axes[0], path, bottom=0.08, dpi=110)


def _save(fig, legend_of, path: str | Path, bottom: float, dpi: int) -> Path:
    """One legend below the panels (from ``legend_of``'s lines), then the PNG at ``path``."""
    import matplotlib.pyplot as plt

    handles, labels = legend_of.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return p


def plot_metrics(runs: Sequence[Run], path: str | Path) -> Path:
    """Exposure and accuracy per epoch, one line per run: ER@5/10/20/30 of the target (four
    panels) and HR@10 (the paper's Figure 2 view). Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ("er@5", "er@10", "er@20", "er@30", "hr@10")
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.2))
    for r in runs:
        rows = [e for e in r.results.get("epochs", []) if "hr@10" in e]
        for ax, key in zip(axes, panels, strict=True):
            ax.plot([e["epoch"] for e in rows], [e[key] for e in rows], marker="o", markersize=3, label=r.label)
    for ax, key in zip(axes, panels, strict=True):
        ax.set_title(key.upper() + (" (accuracy)" if key == "hr@10" else " of the target"), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02 if key != "hr@10" else None)
        ax.grid(True, alpha=0.3)
    return _save(fig, axes[0], path, bottom=0.1, dpi=100)


def default_plot_path(runs: Sequence[Run]) -> Path:
    if len(runs) == 1:
        return runs[0].path / "bytes_per_round.png"
    import os

    common = Path(os.path.commonpath([str(r.path.resolve()) for r in runs]))
    return common / "bytes_per_round.png"


def report(run_dirs_or_dir: str | Path | Iterable[str | Path], plot: bool = True, out: str | Path | None = None,
           stream: TextIO | None = None) -> int:
    """Print the report of one or more run folders (and write the plot unless ``plot`` is false).
    Returns the exit code: 0, or 1 with a message on stderr when a folder is missing or unreadable."""
    stream = stream or sys.stdout
    try:
        runs = [load_run(p) for p in find_runs(run_dirs_or_dir)]
    except ReportError as e:
        print(f"fedseq report: {e}", file=sys.stderr)
        return 1
    _labels(runs)
    for r in runs:
        print(format_run(r), file=stream)
        print(file=stream)
    if len(runs) > 1:
        print(format_comparison(runs), file=stream)
        print(file=stream)
    if plot:
        path = plot_runs(runs, out or default_plot_path(runs))
        print(f"plot: {path}", file=stream)
        print(f"plot: {plot_metrics(runs, path.with_name('metrics_per_epoch.png'))}", file=stream)
    return 0
