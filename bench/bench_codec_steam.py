"""Benchmark the upload codec on real Steam SASRec updates: the general path against the fast path.

The updates come from fedseq.training.compute_updates on the Steam data (one round's users at the
initial weights), so the item rows a user touches, the position rows and the dense part are the
real ones. Per encoding, per update:

- encode, general: ``pack(encode_state(layout.unflatten(u), enc, sparse_ok=SPARSE_TABLES))``
  (client.worker.encode_update, what workers did before);
- encode, fast: ``FlatCodec.encode(u, {item table: the user's touched rows})`` (what workers do
  now), and without the hint (rows found by scanning the table);
- decode, general: ``unpack``, ``check_schema``, ``decode_state``, ``Layout.flatten_into`` the
  round-matrix row (what the server did before, and still does for any other container);
- decode, fast: ``FlatCodec.decode_into`` the row (what the server does now).

Both paths are checked to give the same bytes and the same decoded rows (bit for bit) first. Each
repetition times all updates through every path, interleaved; reported: the median over
repetitions of the mean ms per update, and old / new ratios. Benchmarks measure; they do not gate.

    .venv/bin/python bench/bench_codec_steam.py --data-root ../shared/data --users 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedseq import codec  # noqa: E402
from fedseq.config import build_config  # noqa: E402
from fedseq.experiment import setup  # noqa: E402
from fedseq.params import Layout  # noqa: E402
from fedseq.training import ITEM_TABLE, UpdateBatch, compute_updates  # noqa: E402
from server.intake import check_schema  # noqa: E402

SPARSE = frozenset(codec.SPARSE_TABLES)


def time_encoding(layout: Layout, ub: UpdateBatch, encoding: str, matrix: torch.Tensor,
                  repeats: int) -> tuple[dict[str, float], float]:
    """Median ms per update of each path (eg, ef, es: encode general, fast, fast without hint;
    dg, df: decode general, fast) and the mean bytes per update, after checking the paths agree."""
    K = matrix.shape[0]
    assert ub.item_rows is not None
    flat = codec.FlatCodec(layout.names, layout.shapes, encoding, SPARSE)
    hints = [{ITEM_TABLE: r} for r in ub.item_rows]

    def enc_general(i: int) -> bytes:
        return codec.pack(codec.encode_state(layout.unflatten(ub.updates[i]), encoding,
                                             sparse_ok=lambda n: n in SPARSE))

    def enc_fast(i: int) -> bytes:
        return flat.encode(ub.updates[i], hints[i])

    def enc_scan(i: int) -> bytes:
        return flat.encode(ub.updates[i])

    blobs = [enc_general(i) for i in range(K)]
    assert all(enc_fast(i) == blobs[i] and enc_scan(i) == blobs[i] for i in range(K)), encoding

    def dec_general(i: int) -> None:
        encoded = codec.unpack(blobs[i])
        assert check_schema(encoded, layout, encoding) is None
        layout.flatten_into(codec.decode_state(encoded), matrix[i])

    def dec_fast(i: int) -> None:
        if not flat.decode_into(blobs[i], matrix[i]):
            raise AssertionError(f"{encoding}: the fast decode refused update {i}")

    for i in range(K):
        dec_general(i)
    want = matrix.clone()
    matrix.fill_(float("nan"))
    for i in range(K):
        dec_fast(i)
    assert torch.equal(want.view(torch.int32), matrix.view(torch.int32)), encoding

    paths: dict[str, Callable[[int], object]] = {"eg": enc_general, "ef": enc_fast, "es": enc_scan,
                                                 "dg": dec_general, "df": dec_fast}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):  # interleaved, so that the machine's noise hits every path alike
        for key, fn in paths.items():
            t0 = time.perf_counter()
            for i in range(K):
                fn(i)
            times[key].append((time.perf_counter() - t0) / K * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}, statistics.mean(len(b) for b in blobs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="steam")
    p.add_argument("--data-root", default=None)
    p.add_argument("--users", type=int, default=256, help="updates to time (one round: 256)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions (median reported)")
    p.add_argument("--codecs", "--encodings", dest="codecs", default=",".join(codec.CODEC_NAMES),
                   help="comma-separated codecs to time (--encodings: the former name)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cfg = build_config(None, {"dataset": args.dataset, "data_root": args.data_root, "threads": 1})
    s = setup(cfg)
    layout = s.layout
    rng = np.random.default_rng(args.seed)
    users = sorted(rng.choice(np.asarray(s.benign_users), size=min(args.users, len(s.benign_users)),
                              replace=False).tolist())
    t0 = time.perf_counter()
    ub = compute_updates(s.model, s.initial_params(), [s.dataset.train[u] for u in users], users, cfg.seed, 0,
                         cfg.local())
    compute_s = time.perf_counter() - t0
    assert ub.item_rows is not None
    item = layout.unflatten(ub.updates[0])[ITEM_TABLE]
    nz = [int((layout.unflatten(ub.updates[i])[ITEM_TABLE] != 0).any(dim=1).sum()) for i in range(len(users))]
    print(f"{args.dataset} {cfg.model}: D = {layout.dim:,}, item table {list(item.shape)}; {len(users)} updates "
          f"(compute {compute_s:.2f} s), nonzero item rows per update: median {statistics.median(nz):.0f}, "
          f"max {max(nz)}; 1 torch thread; median of {args.repeats} repetitions, ms per update\n")
    print("| codec | bytes/update | encode general | encode fast | ratio | fast, no hint | "
          "decode general | decode fast | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    matrix = torch.empty(len(users), layout.dim)
    for name in args.codecs.split(","):
        m, size = time_encoding(layout, ub, name, matrix, args.repeats)
        print(f"| {name} | {size:,.0f} | {m['eg']:.3f} | {m['ef']:.3f} | {m['eg'] / m['ef']:.1f}x | "
              f"{m['es']:.3f} | {m['dg']:.3f} | {m['df']:.3f} | {m['dg'] / m['df']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
