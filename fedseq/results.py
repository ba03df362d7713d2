"""The results bundle shared by every runner: ``results.json`` (a ``config`` object and an
``epochs`` list with at least epoch, hr@10, ndcg@10, er@5/10/20/30 and seconds) and a summary
table for the terminal."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRIC_KEYS = ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30")


def write_results(out_dir: str | Path, config: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]],
                  summary: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``results.json`` atomically (temp file + rename) and return its path. ``extra``: more
    top-level sections (e.g. ``ledger``: the communication ledger's totals and per-round series)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    body = {**dict(extra or {}), "config": dict(config), "epochs": list(epochs), "summary": dict(summary or {})}
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def format_table(epochs: Sequence[Mapping[str, Any]], extra: Sequence[str] = ()) -> str:
    """A fixed-width table of the evaluated epochs."""
    cols = ["epoch", *METRIC_KEYS, "seconds", *extra]
    rows = [cols]
    for e in epochs:
        if "hr@10" not in e:
            continue
        row = []
        for c in cols:
            v = e.get(c, "")
            row.append(f"{v:.4f}" if isinstance(v, float) and c != "seconds" else
                       (f"{v:.1f}" if isinstance(v, float) else str(v)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
