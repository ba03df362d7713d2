"""Speed benchmark: one training epoch and one evaluation pass of Steam SASRec (or any dataset),
in process and through the services.

    python bench/bench_epoch.py --data-root ../shared/data                 # in-process, 3 epochs
    python bench/bench_epoch.py --data-root ../shared/data --services      # also via `fedseq run`

Reports medians over epochs, the peak resident memory of the in-process runner, and for the
services the per-round breakdown (worker compute, encode, upload; server decode, aggregate,
store) from the run's round records. Benchmarks measure; they do not gate.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedseq.config import build_config  # noqa: E402
from fedseq.engine import epoch_rounds  # noqa: E402
from fedseq.experiment import setup  # noqa: E402
from fedseq.metrics import Evaluator  # noqa: E402
from fedseq.training import compute_updates  # noqa: E402
from server.aggregation import make_rule, server_step  # noqa: E402


def inprocess(cfg, epochs: int) -> dict:
    torch.set_num_threads(cfg.threads)
    s = setup(cfg)
    params = s.initial_params()
    rule = make_rule(cfg.defense, dict(cfg.defense_opts))
    ds = s.dataset
    train_t, eval_t = [], {}
    rk = 0
    for e in range(epochs):
        t0 = time.perf_counter()
        for users in epoch_rounds(cfg, s.benign_users, e):
            ub = compute_updates(s.model, params, [ds.train[u] for u in users], users, cfg.seed, rk, cfg.local())
            params = server_step(params, rule(ub.updates, torch.as_tensor(ub.num_samples, dtype=torch.float32)).vector,
                                 cfg.lr_at(e))
            rk += 1
        train_t.append(time.perf_counter() - t0)
    for name, ecfg in (("standard", s.eval_config()),):
        ev = Evaluator(s.model, ds.train, ds.test, s.benign_users, s.targets, ecfg)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ev(params)
            times.append(time.perf_counter() - t0)
        eval_t[name] = times
    from dataclasses import replace

    ev = Evaluator(s.model, ds.train, ds.test, s.benign_users, s.targets,
                   replace(s.eval_config(), dropout=True, mask_token_query=True))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ev(params)
        times.append(time.perf_counter() - t0)
    eval_t["reference-compat"] = times
    return {"train_epoch_s": train_t, "eval_s": eval_t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def services(args, epochs: int, extra: tuple[str, ...] = ()) -> dict:
    """``fedseq run`` for ``epochs`` epochs (``extra``: more flags, e.g. ``--insecure``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cli.main", "run", "--dataset", args.dataset, "--model", args.model,
               "--epochs", str(epochs), "--workers", str(args.workers), "--codec", args.codec, "--out", tmp,
               "--eval-every", str(epochs), "--threads", str(args.threads), *extra]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        res = json.loads(Path(tmp, "results.json").read_text())
        rounds = [json.loads(x) for x in Path(tmp, "rounds.jsonl").read_text().splitlines()]
    keys = ("model", "compute", "encode", "upload")
    breakdown = {f"worker_{k}": sum(r["worker_timings"].get(k, 0.0) for r in rounds) / epochs for k in keys}
    for k in ("decode", "aggregate", "step", "store"):
        breakdown[f"server_{k}"] = sum(r["server_timings"].get(k, 0.0) for r in rounds) / epochs
    return {"train_epoch_s": [e["train_seconds"] for e in res["epochs"]], "wall_s": wall,
            "breakdown_per_epoch_s": breakdown, "bytes_up_per_epoch": res["summary"]["bytes_up"] / epochs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="steam")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--services", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--codec", default="sparse-fp32")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    cfg = build_config(None, {"dataset": args.dataset, "data_root": args.data_root, "model": args.model,
                              "threads": args.threads, "codec": args.codec})
    out = {"machine": f"{Path('/proc/cpuinfo').read_text().count('processor')} CPUs, torch {torch.__version__}",
           "inprocess": inprocess(cfg, args.epochs)}
    ip = out["inprocess"]
    print(f"in-process: train epoch median {statistics.median(ip['train_epoch_s']):.2f}s "
          f"({', '.join(f'{t:.2f}' for t in ip['train_epoch_s'])}), peak RSS {ip['peak_rss_mb']:.0f} MB")
    for k, v in ip["eval_s"].items():
        print(f"  eval pass ({k}): median {statistics.median(v):.2f}s")
    if args.services:
        sv = services(args, args.epochs)
        out["services"] = sv
        ratio = statistics.median(sv["train_epoch_s"]) / statistics.median(ip["train_epoch_s"])
        print(f"services ({args.workers} workers, {args.codec}): train epoch median "
              f"{statistics.median(sv['train_epoch_s']):.2f}s = {ratio:.2f}x in-process; "
              f"{sv['bytes_up_per_epoch'] / 1e6:.1f} MB up per epoch")
        for k, v in sv["breakdown_per_epoch_s"].items():
            print(f"  {k}: {v:.2f}s per epoch")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
