"""Time every registered aggregation rule on one random round of K updates of D parameters.

    python bench/bench_aggregation.py --k 256 --d 433536 --repeats 5 --threads 1,2 --out table.md

Defaults: K = 256 (the paper's round size B), D = 433,536 (one dense Steam SASRec update,
1,734,144 bytes), 5 timed repeats after one warm-up, torch thread counts 1 and 2. The thread
counts are interleaved inside each repeat (A/B on the same noisy machine); the table reports the
median and the min..max of the repeats, in milliseconds. The round: Gaussian updates with 3
identical "sybil" rows, sample counts 1..50; ``norm-clip`` uses the median update norm as bound
(about half clipped); ``fltrust`` gets the mean of 8 rows as its root update; ``sparse`` an item
table of 64-wide rows over the first 3/4 of the vector (:func:`bench_layout`), which every Gaussian
update touches in full (for a Steam-shaped sparse round see ``bench/bench_sparse.py``); seeded rules
(``flame``, ``dnc``) are bound to round 0. ``--out`` writes the
markdown table to a file (otherwise it is only printed). Benchmarks measure; they do not gate.

Why the rules' chunked passes run in NumPy on the CPU (server/aggregation/base.py
``use_numpy_path``): ``--torch-path`` runs those passes as torch ops instead, and ``--busy N``
keeps N other processes spinning meanwhile (a server whose other cores are busy):

    python bench/bench_aggregation.py --rules rfa --repeats 3 --busy 1 [--torch-path]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedseq.params import Layout  # noqa: E402
from server.aggregation import RULES, AggregationRule, RoundContext, make_rule  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=256, help="updates per round (default 256)")
    p.add_argument("--d", type=int, default=433_536, help="parameters per update (default 433536)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per rule and thread count")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated rule names (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--torch-path", action="store_true",
                   help="run the chunked passes as torch ops (server/aggregation/base.py use_numpy_path: False)")
    p.add_argument("--busy", type=int, default=0, help="processes kept spinning while the rules run (default 0)")
    args = p.parse_args(argv)
    if args.k < 1 or args.d < 1 or args.repeats < 1:
        p.error("--k, --d and --repeats must be >= 1")
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not args.thread_counts or min(args.thread_counts) < 1:
        p.error("--threads needs at least one count >= 1")
    args.rule_names = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in args.rule_names if r not in RULES]
    if unknown:
        p.error(f"unknown rules {unknown}; known: {sorted(RULES)}")
    return args


def make_round(k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(k, d, generator=g)
    if k >= 6:
        updates[-3:] = updates[-1] * 3  # a small cluster of identical sybil updates
    weights = torch.randint(1, 51, (k,), generator=g).float()
    return updates, weights


def bench_layout(d: int) -> Layout:
    """An item table of 64-wide rows over about the first 3/4 of the vector (Steam SASRec: 5,137 x 64
    of 433,536), for the rules that need a layout (``sparse``; the dense Gaussian round touches
    every row of every update, its worst case)."""
    width = min(64, d)
    rows = max(1, min(5137, (3 * d // 4) // width))
    rest = d - rows * width
    return Layout(("item_emb.weight", "rest"), ((rows, width), (rest,))) if rest else \
        Layout(("item_emb.weight",), ((rows, width),))


def build_rules(names: list[str], updates: torch.Tensor) -> dict[str, tuple[str, AggregationRule]]:
    norms = torch.linalg.vector_norm(updates, dim=1)
    options = {"norm-clip": {"bound": f"{float(norms.median()):.6g}"}}
    rules = {}
    for name in names:
        opts = options.get(name, {})
        rule = make_rule(name, opts)
        label = " ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        rules[name] = (label, rule)
    return rules


def _spin() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_path:
        from server.aggregation import base

        base.use_numpy_path = lambda _t: False  # the chunked passes' torch branch
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for sp in spinners:
        sp.start()
    try:
        return _bench(args)
    finally:
        for sp in spinners:
            sp.terminate()


def _bench(args: argparse.Namespace) -> int:
    updates, weights = make_round(args.k, args.d, args.seed)
    rules = build_rules(args.rule_names, updates)
    # what a round gives every rule (fedseq/engine.py RoundContext): a root update for FLTrust, the layout
    ctx = RoundContext(weights, 0, bench_layout(updates.shape[1]), root=updates[: min(8, updates.shape[0])].mean(dim=0))
    times: dict[tuple[str, int], list[float]] = {(n, t): [] for n in rules for t in args.thread_counts}
    for name, (_, rule) in rules.items():
        for threads in args.thread_counts:  # warm-up
            torch.set_num_threads(threads)
            rule(updates, ctx)
        for _ in range(args.repeats):
            for threads in args.thread_counts:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                rule(updates, ctx)
                times[(name, threads)].append(time.perf_counter() - start)
        row = ", ".join(
            f"{t} thr {statistics.median(times[(name, t)]) * 1e3:.1f} ms" for t in args.thread_counts
        )
        print(f"{name:13s} {row}", flush=True)

    size_mb = args.k * args.d * 4 / 1e6
    header = (
        f"K = {args.k}, D = {args.d:,} ({size_mb:.0f} MB float32 round), {args.repeats} repeats; "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; chunked passes in "
        f"{'torch' if args.torch_path else 'NumPy on the CPU'}, {args.busy} busy process(es) beside. "
        "Median (min..max) ms per aggregation."
    )
    cols = [f"{t} thread{'s' if t > 1 else ''}" for t in args.thread_counts]
    lines = [header, "", "| rule | options | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, (label, _) in rules.items():
        cells = []
        for t in args.thread_counts:
            ts = times[(name, t)]
            cells.append(f"{statistics.median(ts) * 1e3:.1f} ({min(ts) * 1e3:.1f}..{max(ts) * 1e3:.1f})")
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
