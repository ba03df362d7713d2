"""Clean accuracy and DV-FSR exposure under every aggregation rule, in process.

    python bench/rules_sweep.py                       # synthetic default (fedseq sim's quickstart)
    python bench/rules_sweep.py --dataset steam --data-root ../shared/data --epochs 10 --compat reference

Rules whose aggregate is on the mean scale (everything but fedavg's sum and foolsgold with
reduce=sum) get the learning rate multiplied by the clients per round, so every rule takes steps
of comparable size (with the paper's sum lr they barely train). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys

from cli.flags import QUICKSTART
from cli.sim import run_inprocess
from fedseq.config import build_config

RULES = [("fedavg", {}), ("rfa", {}), ("mixed-rfa", {}), ("median", {}), ("trimmed-mean", {"beta": "0.1"}),
         ("krum", {"m": "8"}), ("norm-clip", {"bound": "1.0"}), ("foolsgold", {}), ("fltrust", {})]
SUM_SCALE = {"fedavg", "norm-clip"}  # norm-clip wraps fedavg (sum) by default


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--compat", default="off")
    ap.add_argument("--ratio", type=float, default=0.001)
    args = ap.parse_args()
    base = dict(QUICKSTART) if args.dataset is None else {"dataset": args.dataset, "data_root": args.data_root}
    if args.epochs:
        base["epochs"] = args.epochs
    base["compat"] = args.compat
    print("| rule | options | lr | clean HR@10 | clean NDCG@10 | DV-FSR HR@10 | DV-FSR ER@5 | DV-FSR ER@10 | "
          "malicious kept / sent |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rule, opts in RULES:
        cfg0 = build_config(None, {**base, "defense": rule, "defense_opts": opts})
        lr = cfg0.lr if rule in SUM_SCALE else cfg0.lr * cfg0.clients_per_round
        row = []
        for attack in ("none", "dv-fsr"):
            cfg = build_config(None, {**base, "defense": rule, "defense_opts": opts, "lr": lr,
                                      "attack": attack, "malicious_ratio": args.ratio})
            res = run_inprocess(cfg, None, progress=lambda _line: None)
            last = res["epochs"][-1]
            sent = sum(e.get("malicious_updates", 0) for e in res["epochs"])
            kept = sum(e.get("malicious_kept", e.get("malicious_updates", 0)) for e in res["epochs"])
            row.append((last, kept, sent))
        (clean, _, _), (att, kept, sent) = row
        print(f"| {rule} | {','.join(f'{k}={v}' for k, v in opts.items())} | {lr:g} | {clean['hr@10']:.4f} | "
              f"{clean['ndcg@10']:.4f} | {att['hr@10']:.4f} | {att['er@5']:.4f} | {att['er@10']:.4f} | "
              f"{kept} / {sent} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
