"""Bytes per benign update for every update encoding, over one epoch's worth of real updates of
Steam SASRec (or any dataset), with encode and decode time per update. Writes a markdown table.

The updates are computed in process with ``fedseq.training.compute_updates`` (the functions the
workers call), round by round, with the server step applied between rounds (FedSGD, the paper's
setting), so they are the updates one networked epoch would upload. Each update is encoded the
way a worker does it (``client.worker.encode_update``: sparse encodings only on the embedding
tables) and decoded the way the aggregator does it (``unpack`` + ``decode_state`` + layout
flatten). Sizes:

* ``payload``: the fedseq.codec pack() container (what ``UpdateHeader.total_bytes`` declares);
* ``message``: the serialized ``UpdateChunk`` messages of the update (what the ledger records as
  ``bytes`` of an ``update`` entry; header included);
* ``gzip``: the ledger's ``wire_bytes`` under ``--compression gzip`` (gRPC's per-message gzip),
  on a sample of updates (zlib on 1.7 MB costs ~50 ms).

It also measures what a model *delta* download would save: per round, the rows of the embedding
tables the step changed (the only rows a row-patch against the previous version would carry).

    .venv/bin/python bench/bench_codecs_epoch.py --data-root ../shared/data            # one epoch
    .venv/bin/python bench/bench_codecs_epoch.py --data-root ../shared/data --rounds 3 # quicker
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.worker import SPARSE_TABLES, encode_update  # noqa: E402
from fedseq import codec, ledger  # noqa: E402
from fedseq.config import build_config  # noqa: E402
from fedseq.delta import make_patch  # noqa: E402
from fedseq.engine import RoundContext, epoch_rounds  # noqa: E402
from fedseq.experiment import setup  # noqa: E402
from fedseq.rpc import chunks  # noqa: E402
from fedseq.store import model_to_bytes  # noqa: E402
from fedseq.training import compute_updates  # noqa: E402
from fedseq.v1 import aggregator_pb2 as agg_pb  # noqa: E402
from server.aggregation import make_rule, server_step  # noqa: E402


def message_bytes(data: bytes, user: int, encoding: str) -> tuple[int, list]:
    header = agg_pb.UpdateHeader(run_id="bench", round_id=0, user_id=user, token="0123456789abcdef", num_samples=10,
                                 total_bytes=len(data), encoding=encoding, loss=0.5)
    msgs = [agg_pb.UpdateChunk(header=header, data=p) if i == 0 else agg_pb.UpdateChunk(data=p)
            for i, p in enumerate(chunks(data))]
    return sum(m.ByteSize() for m in msgs), msgs


def _per_encoding() -> dict[str, list]:
    return {e: [] for e in codec.CODEC_NAMES}


@dataclass
class _Measured:
    """Everything measured over the epoch: per encoding one entry per update (``wire``: the first
    ``--gzip-sample``), per sparse table the rows each round's step changed, the row-patch sizes."""

    payload: dict[str, list] = field(default_factory=_per_encoding)
    message: dict[str, list] = field(default_factory=_per_encoding)
    wire: dict[str, list] = field(default_factory=_per_encoding)
    t_enc: dict[str, list] = field(default_factory=_per_encoding)
    t_dec: dict[str, list] = field(default_factory=_per_encoding)
    err: dict[str, list] = field(default_factory=_per_encoding)
    changed_rows: dict[str, list] = field(default_factory=lambda: {n: [] for n in SPARSE_TABLES})
    patch_sizes: list[int] = field(default_factory=list)
    compute_s: float = 0.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="steam")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--model", default="sasrec")
    p.add_argument("--rounds", type=int, default=0, help="rounds of the epoch to use (0 = all: one epoch)")
    p.add_argument("--clients-per-round", type=int, default=256)
    p.add_argument("--gzip-sample", type=int, default=48, help="updates per encoding whose gzip size is computed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_codecs_epoch.md"), help="markdown table file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = build_config(None, {"dataset": args.dataset, "data_root": args.data_root, "model": args.model,
                              "clients_per_round": args.clients_per_round})
    s = setup(cfg)
    ds, layout = s.dataset, s.layout
    params = s.initial_params()
    rule = make_rule(cfg.defense, dict(cfg.defense_opts))
    rounds = epoch_rounds(cfg, s.benign_users, 0)
    if args.rounds:
        rounds = rounds[: args.rounds]
    n_users = sum(len(r) for r in rounds)
    print(f"{ds.name} {cfg.model}: {ds.num_users} users, {ds.num_items} items, {layout.dim:,} parameters "
          f"(dense fp32 {4 * layout.dim:,} B); {len(rounds)} rounds, {n_users} updates", file=sys.stderr)

    m = _Measured()
    full_blob = len(model_to_bytes(layout.unflatten(params)))
    t_start = time.perf_counter()
    for r, users in enumerate(rounds):
        t0 = time.perf_counter()
        ub = compute_updates(s.model, params, [ds.train[u] for u in users], users, cfg.seed, r, cfg.local())
        m.compute_s += time.perf_counter() - t0
        for i, u in enumerate(users.tolist()):
            _measure_update(m, layout, ub.updates[i], u, args.gzip_sample)
        params = _server_round(m, rule, ub, params, layout, cfg.lr_at(0), r)
        print(f"round {r + 1}/{len(rounds)}: {len(users)} users ({time.perf_counter() - t_start:.0f}s)",
              file=sys.stderr)

    head = (f"Bytes per benign update, {ds.name} {cfg.model} ({layout.dim:,} parameters), over {n_users} real updates "
            f"({len(rounds)} rounds of {cfg.clients_per_round} of epoch 1, computed in process with "
            f"`fedseq.training.compute_updates`, FedSGD step between rounds). ")
    text = "\n".join(_report(m, head, layout, args.gzip_sample, full_blob, n_users, t_start))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


def _measure_update(m: _Measured, layout, vec: torch.Tensor, u: int, gzip_sample: int) -> None:
    """Encode and decode user ``u``'s update ``vec`` with every encoding; record sizes, times, error."""
    tensors = layout.unflatten(vec)
    for e in codec.CODEC_NAMES:
        t0 = time.perf_counter()
        data = encode_update(tensors, e)
        t1 = time.perf_counter()
        got = layout.flatten(codec.decode_state(codec.unpack(data)))
        t2 = time.perf_counter()
        m.t_enc[e].append(t1 - t0)
        m.t_dec[e].append(t2 - t1)
        m.payload[e].append(len(data))
        nbytes, msgs = message_bytes(data, u, e)
        m.message[e].append(nbytes)
        if len(m.wire[e]) < gzip_sample:
            m.wire[e].append(sum(ledger.wire_size(msg.SerializeToString(), "gzip") for msg in msgs))
        scale = float(vec.abs().max()) or 1.0
        m.err[e].append(float((got - vec).abs().max()) / scale)


def _server_round(m: _Measured, rule, ub, params: torch.Tensor, layout, lr: float, r: int) -> torch.Tensor:
    """Aggregate the round's updates and take the server step; record what the step changed."""
    res = rule(ub.updates, RoundContext(torch.as_tensor(ub.num_samples, dtype=torch.float32), round_id=r, layout=layout))
    new = server_step(params, res.vector, lr)
    old_t, new_t = layout.unflatten(params), layout.unflatten(new)
    for n in SPARSE_TABLES:
        m.changed_rows[n].append(int((old_t[n] != new_t[n]).any(dim=1).sum()))
    m.patch_sizes.append(len(make_patch(old_t, new_t, r)))
    return new


def _report(m: _Measured, head: str, layout, gzip_sample: int, full_blob: int, n_users: int,
            t_start: float) -> list[str]:
    """The markdown report: the table, the targets, the delta-download estimate, the timings."""
    dense = statistics.mean(m.message["dense-fp32"])
    lines = [
        head + f"`bench/bench_codecs_epoch.py`, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads.",
        "",
        "| encoding | payload B (mean) | message B (mean) | min / max | vs dense-fp32 | gzip wire B (mean of "
        f"{gzip_sample}) | encode ms (median) | decode ms (median) | max rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in codec.CODEC_NAMES:
        mean = statistics.mean(m.message[e])
        lines.append(
            f"| {e} | {statistics.mean(m.payload[e]):,.0f} | {mean:,.0f} | {min(m.message[e]):,} / "
            f"{max(m.message[e]):,} | {mean / dense:.3f} | {statistics.mean(m.wire[e]):,.0f} | "
            f"{1e3 * statistics.median(m.t_enc[e]):.2f} | {1e3 * statistics.median(m.t_dec[e]):.2f} | "
            f"{max(m.err[e]):.2e} |")
    sp32 = statistics.mean(m.message["sparse-fp32"]) / dense
    sp16 = statistics.mean(m.message["sparse-fp16"]) / dense
    patch = statistics.mean(m.patch_sizes)
    return lines + [
        "",
        f"Targets: sparse-fp32 / dense-fp32 = {sp32:.3f} (<= 1/3: {'met' if sp32 <= 1 / 3 else 'MISSED'}); "
        f"sparse-fp16 / dense-fp32 = {sp16:.3f} (<= 1/6: {'met' if sp16 <= 1 / 6 else 'MISSED'}). "
        "sparse-fp32 decodes bit-identically to dense-fp32 (max rel. error 0).",
        "",
        f"Model delta (download) estimate: a version is {full_blob:,} B (safetensors). Per round the step changed "
        + ", ".join(f"{n} rows: mean {statistics.mean(v):.0f} of {layout.shapes[layout.names.index(n)][0]} "
                    f"(min {min(v)}, max {max(v)})" for n, v in m.changed_rows.items())
        + f"; every other tensor changes entirely. A row patch (`model_delta`, fedseq/delta.py) is "
        f"{patch:,.0f} B on average ({patch / full_blob:.0%} of a version).",
        "",
        f"Update compute: {m.compute_s:.1f} s for {n_users} users; the whole benchmark "
        f"{time.perf_counter() - t_start:.0f} s.",
    ]


if __name__ == "__main__":
    sys.exit(main())
