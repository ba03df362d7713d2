"""The L2 norms of the updates a run aggregates: what to choose a DP or norm clip from.

    python bench/bench_update_norms.py --epochs 2 --set dataset=synthetic:num_clusters=5

Runs the experiment in process (the mission's settings by default: the QUICKSTART flags on the
mission's data, DV-FSR at ratio 0.005) with ``dp-fixed:clip=1e9,noise=0`` as the rule: nothing is
clipped and nothing added, and the rule's clipping step sees every round's updates, benign and
malicious; it prints the percentiles of their norms. docs/results/dp.md quotes a run of this
command (2 epochs: 14 rounds of 64 updates). Benchmarks measure; they do not gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server.aggregation.dp as dp  # noqa: E402
from cli.flags import QUICKSTART  # noqa: E402
from cli.sim import run_inprocess  # noqa: E402
from cli.sweep_spec import MISSION_DATA, MISSION_RATIO  # noqa: E402
from fedseq.config import build_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key of the run")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = build_config(None, {**QUICKSTART, "dataset": MISSION_DATA, "attack": "dv-fsr", "malicious_ratio": MISSION_RATIO,
                              "threads": 1, "epochs": args.epochs, **overrides,
                              "defense": "dp-fixed", "defense_opts": {"clip": "1e9", "noise": "0"}}, environ={})
    rounds: list[np.ndarray] = []
    clip_norms = dp.clip_norms

    def recording(updates, bound):  # the rule's own clipping step, noting the norms it computed
        out = clip_norms(updates, bound)
        rounds.append(out[1].cpu().numpy().copy())
        return out

    dp.clip_norms = recording
    try:
        res = run_inprocess(cfg, None, progress=lambda _line: None)
    finally:
        dp.clip_norms = clip_norms
    norms = np.concatenate(rounds)
    p10, p50, p90, p99 = np.percentile(norms, [10, 50, 90, 99])
    print(f"{cfg.dataset}, {cfg.epochs} epochs: {len(rounds)} rounds of up to {max(map(len, rounds))} updates")
    print(f"update norms: 10th {p10:.4f}, median {p50:.4f}, 90th {p90:.4f}, 99th {p99:.4f}, largest {norms.max():.4f}")
    print(f"final HR@10 {res['epochs'][-1]['hr@10']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
