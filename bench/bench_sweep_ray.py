"""The Ray executor against the local one (docs/results/scale.md, "Sweeps on Ray"): the same sweep
of in-process cells with ``--jobs 2`` on this machine, and with ``--executor ray`` on two Ray nodes
started here (tests/_ray_cluster.py: one CPU each, token authentication), each as its own
``fedseq sweep`` process; wall times side by side, the overhead per cell, and whether every
cell's numbers are equal.

    .venv/bin/python bench/bench_sweep_ray.py                      # 12 cells: 3 attacks x 2 rules x 2 seeds
    .venv/bin/python bench/bench_sweep_ray.py --set epochs=2 --out runs/bench-ray

The overhead per cell is (Ray's wall - the local wall) / (cells / 2): both run two cells at a time.
The cluster's start is timed apart (it is paid once per cluster, not per sweep)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests._ray_cluster import cell_numbers, two_nodes  # noqa: E402

GRID = ["--attacks", "none,dv-fsr,eb", "--defenses", "fedavg,median", "--malicious-ratios", "0.01",
        "--seeds", "0,1", "--engine", "inprocess"]


def sweep(args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.entry", "sweep", *args], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every cell (default: fedseq sim's defaults)")
    ap.add_argument("--out", default="runs/bench-sweep-ray")
    a = ap.parse_args()
    out = ROOT / a.out
    shutil.rmtree(out, ignore_errors=True)
    grid = [*GRID, *(x for kv in a.set for x in ("--set", kv))]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    local = sweep([*grid, "--jobs", "2", "--out", str(out / "local")], env)
    t = time.perf_counter()
    with two_nodes(env) as (address, _second):
        start = time.perf_counter() - t
        on_ray = sweep([*grid, "--executor", "ray", "--address", address, "--out", str(out / "ray")], env)
    cells = len(cell_numbers(out / "local"))
    nodes = {json.loads(p.read_text())["node_id"] for p in (out / "ray").glob("*/executor.json")}
    result = {"cells": cells, "local_jobs2_s": round(local, 1), "ray_two_nodes_s": round(on_ray, 1),
              "ray_cluster_start_s": round(start, 1), "ratio": round(on_ray / local, 3),
              "overhead_per_cell_s": round((on_ray - local) / (cells / 2), 2), "ray_nodes_used": len(nodes),
              "equal_numbers": cell_numbers(out / "local") == cell_numbers(out / "ray"), "grid": grid}
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
