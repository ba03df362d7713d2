"""A sweep's summary: per scenario the final metrics' mean and spread over seeds, the per-epoch
curves and the malicious updates kept; the comparison table (``sweep.md``); and the attack x
defense grids the heat maps draw."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseq.config import build_config

from .sweep_spec import CURVES, KS, METRICS, OLD_SCENARIO_KEYS, Cell, SweepSpec, renamed


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
               "malicious_ratio": c.malicious_ratio, **{m: last[m] for m in METRICS}, "malicious_sent": sent,
               "malicious_kept": kept,
               "bytes_per_update": bpu, "warnings": res.get("summary", {}).get("warnings", []),
               "seconds": sum(e.get("seconds", 0.0) for e in res["epochs"]),
               "planned": build_config(None, {**spec.base, **c.overrides()}, environ={}).epochs,
               "curve": {m: [e[m] for e in epochs] for m in CURVES},
               "epochs": [e["epoch"] for e in epochs]}
        rows.append(row)
        scenarios.setdefault(c.scenario, {"attack": c.attack, "defense": c.defense,
                                          "malicious_ratio": c.malicious_ratio,
                                          "overrides": c.overrides() | {"seed": "*"}, "cells": []})["cells"].append(row)
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


def upgrade_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (a copy) with its scenarios and cell rows under today's keys: a sweep.json
    written before the rename says ``ratio`` for ``malicious_ratio`` (sweep_spec.OLD_SCENARIO_KEYS).
    A summary that gives both in one row is refused (:class:`SweepError`)."""
    scenarios = {name: renamed(s, OLD_SCENARIO_KEYS, f"sweep summary: scenario {name!r}")
                 for name, s in summary.get("scenarios", {}).items()}
    cells = [renamed(r, OLD_SCENARIO_KEYS, f"sweep summary: cell {r.get('cell', '')!r}")
             for r in summary.get("cells", [])]
    return {**summary, "scenarios": scenarios, "cells": cells}


def load_summary(path: Path) -> dict[str, Any]:
    """A sweep's summary from its ``sweep.json`` (this version's or an older one's), under
    today's keys (:func:`upgrade_summary`)."""
    return upgrade_summary(json.loads(Path(path).read_text()))


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



def matrices(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Attack x defense grids of the final ER@10 and HR@10 (means over seeds), one per malicious
    ratio (the no-attack row in each), when the sweep has at least two attacks and two defenses
    and nothing else varies; else none. ``summary`` may be an older sweep.json's (``ratio``)."""
    scen = [s for s in upgrade_summary(summary)["scenarios"].values() if not s.get("unfinished")]
    attacks = sorted({s["attack"] for s in scen}, key=lambda a: (a != "none", a))
    defenses = list(dict.fromkeys(s["defense"] for s in scen))
    if len(attacks) < 2 or len(defenses) < 2:
        return []
    out = []
    for malicious_ratio in sorted({s["malicious_ratio"] for s in scen if s["attack"] != "none"}):
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        for s in scen:
            if s["attack"] != "none" and s["malicious_ratio"] != malicious_ratio:
                continue
            key = (s["attack"], s["defense"])
            if key in cells:  # other keys vary too: not one grid
                return []
            cells[key] = s
        out.append({"attacks": attacks, "defenses": defenses, "cells": cells,
                    "malicious_ratio": malicious_ratio})
    return out

