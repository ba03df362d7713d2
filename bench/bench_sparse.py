"""Time item-wise sparse aggregation (rule ``sparse``) on a Steam-shaped round.

    python bench/bench_sparse.py --k 256 --repeats 3 --inners median,trimmed-mean,krum,rfa,fedavg

The round: K updates in the layout of Steam SASRec (5,137 x 64 item table, D = 433,536); the shared
weights Gaussian; each benign update touches on average ``--rows`` item rows (48, as measured for
Steam benign updates on the public code) drawn with a Zipf-like popularity, so popular rows are touched by
many updates and most rows by few; ``--dense`` updates (3, the DV-FSR uploads) touch every row. Each
inner rule is timed vectorised (batched by touch count) and, with ``--per-row``, calling the inner
rule once per touched row (the reference path). One torch thread by default. Benchmarks measure;
they do not gate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedseq.models import build_model  # noqa: E402
from fedseq.params import Layout  # noqa: E402
from server.aggregation import RoundContext, make_rule  # noqa: E402
from server.aggregation.sparse import ItemRows  # noqa: E402


def steam_round(k: int, rows_per_update: int, dense: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    layout = Layout.of(build_model("sasrec", 5135))
    it = ItemRows.of(layout)
    g = torch.Generator().manual_seed(seed)
    updates = torch.zeros(k, layout.dim)
    updates[:, it.end:] = torch.randn(k, layout.dim - it.end, generator=g)
    pop = 1.0 / torch.arange(1, it.rows, dtype=torch.float64) ** 0.8  # rows 1.. (0 is padding)
    table = updates[:, it.offset:it.end].view(k, it.rows, it.width)
    for i in range(k - dense):
        n = max(1, int(torch.poisson(torch.tensor(float(rows_per_update)), generator=g)))
        rows = 1 + torch.multinomial(pop, n, replacement=False, generator=g)
        table[i, rows] = torch.randn(n, it.width, generator=g)
    if dense:
        table[k - dense:, 1:] = torch.randn(dense, it.rows - 1, it.width, generator=g)
    weights = torch.randint(1, 51, (k,), generator=g).float()
    return updates, weights, layout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--rows", type=int, default=48, help="mean item rows touched per benign update")
    p.add_argument("--dense", type=int, default=3, help="updates touching every item row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inners", default="median,trimmed-mean,krum,rfa,fedavg")
    p.add_argument("--per-row", action="store_true", help="also time the per-row reference path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    updates, weights, layout = steam_round(args.k, args.rows, args.dense, args.seed)
    print(f"K = {args.k}, D = {layout.dim:,}, item table {ItemRows.of(layout)}, {args.threads} thread(s)")
    for inner in [x for x in args.inners.split(",") if x]:
        for vec in (True, False) if args.per_row else (True,):
            rule = make_rule(f"sparse:{inner}", {"vectorised": str(vec)})
            ctx = RoundContext(weights, layout=layout)
            res = rule(updates, ctx)  # warm-up
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                rule(updates, ctx)
                ts.append(time.perf_counter() - t0)
            dense_rule = make_rule(inner)
            t0 = time.perf_counter()
            dense_rule(updates, RoundContext(weights))
            t_dense = time.perf_counter() - t0
            print(f"sparse:{inner:13s} {'vectorised' if vec else 'per-row   '} median {statistics.median(ts):.3f} s "
                  f"(min {min(ts):.3f}, max {max(ts):.3f}); rows touched {res.info['rows_touched']}, "
                  f"touches {res.info['touches']}; the dense rule alone {t_dense:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
