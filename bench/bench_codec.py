"""Benchmark fedseq.codec on a synthetic Steam-SASRec-shaped client update.

The update mirrors SASRec on Steam: item embedding [5136, 64] with only the rows of the items
the user touched nonzero (48 by default), position embedding [201, 64] and ~92k dense
transformer parameters, 433,536 float32 in all. Every encoding is applied through
``encode_state`` with only the item table marked sparse-eligible (so the other tensors fall back
to the matching dense encoding), and timed as the median of N repeats.

    .venv/bin/python bench/bench_codec.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from fedseq.codec import CODEC_NAMES, EncodedTensor, decode_state, encode_state, pack, unpack


def steam_sasrec_update(
    items: int, hidden: int, maxlen: int, dense: int, touched: int, seed: int
) -> dict[str, torch.Tensor]:
    """A gradient-like update: ``touched`` nonzero item rows, everything else dense."""
    g = torch.Generator().manual_seed(seed)
    item = torch.zeros(items, hidden)
    rows = torch.randperm(items, generator=g)[:touched]
    item[rows] = torch.randn(touched, hidden, generator=g) * 1e-2
    state = {
        "item_emb.weight": item,
        "pos_emb.weight": torch.randn(maxlen + 1, hidden, generator=g) * 1e-2,
    }
    # dense transformer parameters: [hidden, hidden] matrices plus 1-D vectors up to `dense`
    left, i = dense, 0
    while left >= hidden * hidden + hidden:
        state[f"blocks.{i}.weight"] = torch.randn(hidden, hidden, generator=g) * 1e-2
        state[f"blocks.{i}.bias"] = torch.randn(hidden, generator=g) * 1e-2
        left -= hidden * hidden + hidden
        i += 1
    if left:
        state["last_layernorm.rest"] = torch.randn(left, generator=g) * 1e-2
    return state


def _pack_unpack(encs: list[EncodedTensor]) -> list[EncodedTensor]:
    return unpack(pack(encs))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=5136, help="rows of the item embedding (Steam: 5136)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--maxlen", type=int, default=200, help="position table has maxlen + 1 rows")
    p.add_argument("--dense", type=int, default=91_968, help="other (dense) parameters")
    p.add_argument("--touched", type=int, default=48, help="nonzero item rows in the update")
    p.add_argument("--repeats", type=int, default=20, help="timing repeats (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    state = steam_sasrec_update(args.items, args.hidden, args.maxlen, args.dense, args.touched, args.seed)
    total = sum(t.numel() for t in state.values())
    dense_bytes = 4 * total
    print(
        f"update: {len(state)} tensors, {total:,} float32 ({dense_bytes:,} bytes raw); item table "
        f"[{args.items}, {args.hidden}] with {args.touched} nonzero rows; median of {args.repeats}, "
        f"{args.threads} thread(s)\n"
    )
    print("| encoding | payload bytes | packed bytes | ratio | encode ms | decode ms | pack+unpack ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    sparse_ok = lambda name: name == "item_emb.weight"  # noqa: E731
    for encoding in CODEC_NAMES:
        encs = encode_state(state, encoding, sparse_ok=sparse_ok)
        blob = pack(encs)
        payload = sum(e.nbytes for e in encs)
        enc_ms = median_ms(partial(encode_state, state, encoding, sparse_ok=sparse_ok), args.repeats)
        dec_ms = median_ms(partial(decode_state, encs), args.repeats)
        pk_ms = median_ms(partial(_pack_unpack, encs), args.repeats)
        print(
            f"| {encoding} | {payload:,} | {len(blob):,} | {payload / dense_bytes:.3f} | "
            f"{enc_ms:.2f} | {dec_ms:.2f} | {pk_ms:.2f} |"
        )


if __name__ == "__main__":
    main()
