"""Item-wise sparse aggregation: a robust rule per item row, over the updates that touched the row.

Zhang, Ma, Shi, Li, Li, Shi, Wang, "Rethinking Byzantine Robustness in Federated Recommendation
from Sparse Aggregation Perspective", AAAI 2025 (arXiv:2501.03301). In federated recommendation a
client's update touches only the item-embedding rows of the items it used (its history and its
sampled negatives); a dense robust rule over all K updates sees mostly zeros in every item row and
returns about zero for any item fewer than half the clients touched (a coordinate-wise median then
never trains the item table). Sparse aggregation applies the rule, for every item row, to only the
updates that touched that row; the paper shows this is what robust federated recommenders do and
that it opens a new attack surface (Spattack, :mod:`attacker.attacks.spattack`): an item that few
benign clients touch is decided by whoever else touches it.

What fedseq computes, for the round's ``U [K, D]`` and the item table (rows ``R x W`` of the flat
layout, parameter ``item_emb.weight``, found in the round context's ``ctx.layout``: the rule declares
``needs_layout``, so :func:`fedseq.engine.aggregate_round` always passes it):

    touched[k, r] = row r of update k is not all zero
    row r of the output  = n_r * inner(U[touched[:, r], row r])   (n_r = touches; 0 when n_r = 0)
    the other weights    = K   * inner(U[:, other weights])         (the shared Transformer)

with the factors ``n_r`` and ``K`` only when the inner rule's output is on the *mean* scale (median,
trimmed mean, Krum, RFA, ...); a sum-scale inner rule (``fedavg``, ``none``) is used as is. So the
output is always on the **sum** scale (``scale = "sum"``, :func:`fedseq.engine.step_lr` steps it with
``lr`` as the paper's "common" sum): a row moves by the robust estimate of its touchers' update times
how many touched it, as the sum would move it: ``sparse:fedavg`` *is* the plain sum, bit for bit
(``sparse:mean`` equals it up to float rounding). Rows
nobody touched stay exactly zero. Sample weights go to the inner rule (restricted to the touchers).

Options (``--defense sparse:<inner>``, e.g. ``sparse:median``, ``sparse:trimmed-mean``, ``sparse:krum``,
``sparse:rfa``, ``sparse:fedavg``; or ``--defense sparse --defense-opt inner=median``; in a sweep cell
``sparse:inner=median``):

    inner        the rule applied per row and to the dense weights (default ``median``; any registered
                 rule except ``sparse``); its options as ``inner.<key>=<value>``, e.g.
                 ``sparse:trimmed-mean --defense-opt inner.beta=0.2``. An inner rule needing FLTrust's
                 root update gets the root's row (or its dense part) alongside.
    table        the parameter holding one row per item (default ``item_emb.weight``).
    vectorised   true (default): ``median``, ``trimmed-mean``, ``fedavg``/``none``/``mean``, ``krum`` and ``rfa``
                 run batched over all rows with the same touch count (one ``[G, n, W]`` block per
                 count n, no Python loop over rows); false, or any other inner rule: the inner rule
                 object is called once per touched row (the reference; tests compare the two).
                 A seeded inner rule (``flame``, ``dnc``) reads the round id from the same context in
                 every call, so every row's call draws the same numbers (FLAME's noise pattern
                 repeats across rows).

Cost. The touched mask is one pass over the item block (``K x R`` booleans); the touchers' rows are
gathered once (``touches x W`` floats: about 12,000 x 64 for 256 benign Steam updates, plus
``R x W`` per dense update such as DV-FSR's; at most the item block itself when every update is
dense) and reduced in ``[G, n, W]`` blocks of at most 32 MiB; the dense part is the inner rule on a ``[K, D - R W]``
view (no copy when the table is the first parameter, as in SASRec and BERT4Rec). Measured on a
K = 256 Steam-shaped round (bench/bench_sparse.py): see the registry docstring.

Measured against DV-FSR and Spattack on the synthetic default: docs/results/newer-defenses.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from fedseq.params import Layout

from .base import (
    AggregationResult,
    AggregationRule,
    RoundContext,
    RuleConfigError,
    WrappingRule,
    check_floating,
    check_inputs,
    option_error,
    parse_options,
    split_inner,
    use_numpy_path,
)
from .fedavg import FedAvg
from .krum import Krum, max_byzantine
from .median import Median
from .rfa import RFA
from .trimmed_mean import TrimmedMean, trimmed_count

DEFAULT_TABLE = "item_emb.weight"  # fedseq.training.ITEM_TABLE: one row per item id (SASRec, BERT4Rec)
TOUCH_CHUNK_BYTES = 16 << 20  # scratch of the touched-mask pass
GROUP_CHUNK_BYTES = 32 << 20  # one [G, n, W] block of rows with the same touch count


class MissingLayout(RuntimeError):
    """The sparse rule was called with no parameter layout in its context (``ctx.layout``)."""


@dataclass(frozen=True)
class ItemRows:
    """Where the item table sits in the flat ``[D]`` vector: ``rows x width`` floats from ``offset``."""

    offset: int
    rows: int
    width: int

    @classmethod
    def of(cls, layout: Layout, table: str = DEFAULT_TABLE) -> ItemRows:
        if table not in layout.names:
            raise ValueError(f"rule 'sparse' needs the item table {table!r} in the model's parameters; "
                             f"the layout has {list(layout.names)} (option table=<name>)")
        i = layout.names.index(table)
        shape = layout.shapes[i]
        if len(shape) != 2:
            raise ValueError(f"rule 'sparse': parameter {table!r} has shape {shape}; an item table is 2-D [items, dim]")
        return cls(sum(layout.sizes[:i]), int(shape[0]), int(shape[1]))

    @property
    def end(self) -> int:
        return self.offset + self.rows * self.width


def touched_rows(updates: torch.Tensor, rows: ItemRows) -> torch.Tensor:
    """``[K, R]`` bool: row r of update k is not all zero (a few updates at a time)."""
    k = updates.shape[0]
    block = updates[:, rows.offset : rows.end]
    out = torch.empty(k, rows.rows, dtype=torch.bool, device=updates.device)
    step = max(1, TOUCH_CHUNK_BYTES // max(1, rows.rows * rows.width * updates.element_size()))
    if use_numpy_path(updates):  # NumPy's any() is ~2.5x faster than torch's here (one thread)
        a, o = block.numpy(), out.numpy()
        for s in range(0, k, step):
            o[s : s + step] = (a[s : s + step].reshape(-1, rows.rows, rows.width) != 0).any(axis=2)
        return out
    for s in range(0, k, step):
        out[s : s + step] = (block[s : s + step].reshape(-1, rows.rows, rows.width) != 0).any(dim=2)
    return out


def dense_part(updates: torch.Tensor, rows: ItemRows) -> torch.Tensor:
    """``[K, D - R W]``: every weight outside the item table (a view when the table is first or last)."""
    d = updates.shape[1]
    if rows.offset == 0:
        return updates[:, rows.end :]
    if rows.end == d:
        return updates[:, : rows.offset]
    return torch.cat([updates[:, : rows.offset], updates[:, rows.end :]], dim=1)


def put_dense(out: torch.Tensor, vec: torch.Tensor, rows: ItemRows) -> None:
    """Write the dense part ``vec`` back around the item table of ``out [D]``."""
    out[: rows.offset] = vec[: rows.offset]
    out[rows.end :] = vec[rows.offset :]


# ------------------------------------------------------------- batched inner rules on [G, n, W]
def _median(vals: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of each ``[n, W]`` block (numpy.median semantics, as :class:`Median`)."""
    n = vals.shape[1]
    lo, hi = (n - 1) // 2, n // 2
    s = np.sort(vals.numpy(), axis=1) if vals.device.type == "cpu" else torch.sort(vals, dim=1).values
    res = s[:, lo] if lo == hi else (s[:, lo] + s[:, hi]) / 2
    return torch.as_tensor(res)


def _trimmed(vals: torch.Tensor, beta: float) -> torch.Tensor:
    n = vals.shape[1]
    t = trimmed_count(n, beta)
    if vals.device.type == "cpu":
        s = np.sort(vals.numpy(), axis=1) if t else vals.numpy()
        return torch.from_numpy(s[:, t : n - t].mean(axis=1, dtype=np.float64).astype(s.dtype))
    s2 = torch.sort(vals, dim=1).values if t else vals
    return s2[:, t : n - t].to(torch.float64).mean(dim=1).to(vals.dtype)


def _fedavg(vals: torch.Tensor, w: torch.Tensor, rule: FedAvg) -> torch.Tensor:
    if rule.reduce == "sum":
        return vals.sum(dim=1)
    if not rule.weighted:
        return vals.mean(dim=1)
    total = w.to(vals.dtype).sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("reduce=mean with weighted=true needs a positive total weight in every item row")
    return torch.einsum("gn,gnw->gw", w.to(vals.dtype) / total, vals)


def _krum(vals: torch.Tensor, rule: Krum) -> torch.Tensor:
    g, n, _ = vals.shape
    f_max = max_byzantine(n)
    if f_max < 0:
        if rule.strict:
            raise ValueError(f"rule 'krum' needs K >= 3 updates, got K={n} (an item row's touchers)")
        return vals.mean(dim=1)
    f = f_max if rule.f is None else rule.f
    if f > f_max:
        if rule.strict:
            raise ValueError(f"rule 'krum' needs K > 2f + 2; got K={n}, f={f} (an item row's touchers)")
        f = f_max
    m = min(rule.m, n)
    gram = torch.bmm(vals, vals.transpose(1, 2)).to(torch.float64)
    gram = (gram + gram.transpose(1, 2)) / 2
    sq = torch.diagonal(gram, dim1=1, dim2=2)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min_(0)
    eye = torch.eye(n, dtype=torch.bool, device=vals.device)
    d2.masked_fill_(eye, float("inf"))
    scores = torch.topk(d2, n - f - 2, dim=2, largest=False, sorted=False).values.sum(dim=2)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :m]  # [G, m]
    picked = torch.gather(vals, 1, order[:, :, None].expand(g, m, vals.shape[2]))
    coef = torch.full((m,), 1.0 / m, dtype=vals.dtype, device=vals.device)
    return torch.einsum("m,gmw->gw", coef, picked)


def _rfa(vals: torch.Tensor, w: torch.Tensor, rule: RFA) -> torch.Tensor:
    g, n, _ = vals.shape
    if rule.weighted:
        w64 = w.to(torch.float64)
        total = w64.sum(dim=1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError("sample weights sum to zero in an item row; use inner.weighted=false")
        alpha = w64 / total
    else:
        alpha = torch.full((g, n), 1.0 / n, dtype=torch.float64, device=vals.device)

    def dist(v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(vals - v[:, None, :], dim=2).to(torch.float64)

    v = torch.einsum("gn,gnw->gw", alpha.to(vals.dtype), vals)
    d = dist(v)
    obj = (alpha * d).sum(dim=1)
    active = torch.ones(g, dtype=torch.bool, device=vals.device)
    for _ in range(rule.maxiter):
        beta = alpha / d.clamp_min(rule.eps)
        beta = beta / beta.sum(dim=1, keepdim=True)
        v_new = torch.einsum("gn,gnw->gw", beta.to(vals.dtype), vals)
        d_new = dist(v_new)
        obj_new = (alpha * d_new).sum(dim=1)
        v = torch.where(active[:, None], v_new, v)
        d = torch.where(active[:, None], d_new, d)
        done = (obj - obj_new).abs() <= rule.ftol * obj_new
        obj = torch.where(active, obj_new, obj)
        active = active & ~done
        if not bool(active.any()):
            break
    return v


def batched(inner: AggregationRule) -> bool:
    """Whether :func:`batched_rows` has a vectorised form of ``inner``."""
    return isinstance(inner, Median | TrimmedMean | FedAvg | Krum | RFA)


def batched_rows(inner: AggregationRule, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``inner`` applied to each ``vals[g] [n, W]`` with weights ``w[g] [n]``: ``[G, W]``."""
    if isinstance(inner, Median):
        return _median(vals)
    if isinstance(inner, TrimmedMean):
        return _trimmed(vals, inner.beta)
    if isinstance(inner, FedAvg):
        return _fedavg(vals, w, inner)
    if isinstance(inner, Krum):
        return _krum(vals, inner)
    if isinstance(inner, RFA):
        return _rfa(vals, w, inner)
    raise TypeError(f"no batched form of rule {inner.name!r}")


# ------------------------------------------------------------------------------- the rule
def _dense_vec(vec: torch.Tensor | None, rows: ItemRows) -> torch.Tensor | None:
    return None if vec is None else dense_part(vec[None, :], rows)[0]


def _table_rows(vec: torch.Tensor | None, rows: ItemRows) -> torch.Tensor | None:
    return None if vec is None else vec[rows.offset : rows.end].view(rows.rows, rows.width)


def sparse_aggregate(updates: torch.Tensor, ctx: RoundContext, inner: AggregationRule, rows: ItemRows,
                     vectorised: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Item-wise sparse aggregation of ``updates [K, D]`` (module docstring): ``(aggregate [D] on the
    sum scale, info)``. ``ctx`` is the round's context (weights ``[K]``, round id, and FLTrust's root
    update ``[D]`` when ``inner`` needs one); the inner rule gets a copy of it for the part it sees:
    the dense part of the root and the weights, or one row's touchers' weights and the root's row
    (``layout`` None: the part is not a whole model)."""
    weights = ctx.weights
    check_inputs(updates, weights)
    check_floating(updates)
    k, d = updates.shape
    if rows.end > d or rows.rows < 1 or rows.width < 1:
        raise ValueError(f"item table {rows} does not fit in updates of D={d}")
    mean_scale = inner.scale == "mean"
    out = torch.zeros(d, dtype=updates.dtype, device=updates.device)
    # the shared weights: the inner rule over all K updates
    dense_ctx = replace(ctx, layout=None, root=_dense_vec(ctx.root, rows), params=_dense_vec(ctx.params, rows))
    dense = inner(dense_part(updates, rows), dense_ctx)
    dense_vec = dense.vector * k if mean_scale else dense.vector
    put_dense(out, dense_vec.to(updates.dtype), rows)
    # the item rows: the inner rule over each row's touchers
    touched = touched_rows(updates, rows)  # [K, R]
    counts = touched.sum(dim=0)  # [R]
    r_idx, k_idx = torch.nonzero(touched.T, as_tuple=True)  # row-major, updates ascending within a row
    table = updates[:, rows.offset : rows.end].reshape(k, rows.rows, rows.width)
    vals = table[k_idx, r_idx]  # [touches, W]
    wts = weights[k_idx]
    starts = torch.cumsum(counts, 0) - counts
    out_rows = out[rows.offset : rows.end].view(rows.rows, rows.width)
    fast = vectorised and batched(inner)
    root_rows, param_rows = _table_rows(ctx.root, rows), _table_rows(ctx.params, rows)
    for n in sorted({int(c) for c in counts.tolist() if c > 0}):
        rows_n = torch.nonzero(counts == n).flatten()  # rows touched by exactly n updates
        step = max(1, GROUP_CHUNK_BYTES // (n * rows.width * updates.element_size()))
        for g0 in range(0, len(rows_n), step):  # bounded [G, n, W] blocks
            sel = rows_n[g0 : g0 + step]
            index = starts[sel][:, None] + torch.arange(n)[None, :]  # [G, n] into vals
            block, wblock = vals[index], wts[index]  # [G, n, W], [G, n]
            if fast:
                res = batched_rows(inner, block, wblock)
            else:
                res = torch.empty(len(sel), rows.width, dtype=updates.dtype, device=updates.device)
                for j in range(len(sel)):
                    r = int(sel[j])
                    row_ctx = replace(ctx, weights=wblock[j], layout=None,
                                      root=None if root_rows is None else root_rows[r],
                                      params=None if param_rows is None else param_rows[r])
                    res[j] = inner(block[j], row_ctx).vector
            out_rows[sel] = (res * n if mean_scale else res).to(updates.dtype)
    info: dict[str, Any] = {
        "rows": rows.rows,
        "rows_touched": int((counts > 0).sum()),
        "touches": int(counts.sum()),
        "max_touches": int(counts.max()) if rows.rows else 0,
        "vectorised": fast,
        "dense_info": dict(dense.info),
    }
    return out, info


@dataclass(frozen=True)
class SparseAggregation(WrappingRule):
    """Rule object for :func:`sparse_aggregate` (registry name ``sparse``); it declares
    ``needs_layout`` and finds the item table in ``ctx.layout``, and declares what its inner rule
    declares about the weights and the root update."""

    inner_rule: AggregationRule = field(compare=False)
    inner: str = "median"
    table: str = DEFAULT_TABLE
    vectorised: bool = True
    name: str = "sparse"
    scale: ClassVar[str] = "sum"  # rows x their touch count, dense part x K (module docstring)
    needs_layout: ClassVar[bool] = True  # where the item table sits (ctx.layout)

    def item_rows(self, layout: Layout | None) -> ItemRows:
        """Where this rule's item table sits in the flat parameter ``layout``."""
        if layout is None:
            raise MissingLayout("rule 'sparse' needs the model's parameter layout in its context (ctx.layout; "
                                "fedseq.engine.aggregate_round passes the runner's)")
        try:
            return ItemRows.of(layout, self.table)
        except ValueError as e:
            raise RuleConfigError(str(e)) from None

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> AggregationResult:
        rows = self.item_rows(ctx.layout)
        if self.needs_root and ctx.root is None:
            raise ValueError(f"rule 'sparse' with inner={self.inner!r} needs the round's root update (ctx.root)")
        vec, info = sparse_aggregate(updates, ctx, self.inner_rule, rows, self.vectorised)
        return AggregationResult(vec, None, {"inner": self.inner, "table": self.table, **info})

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> SparseAggregation:
        from . import make_rule  # late import: the registry imports this module

        own, inner_opts = split_inner(options)
        opts = parse_options("sparse", own, {"inner": str, "table": str, "vectorised": bool})
        inner = opts.pop("inner", "median")
        if inner == "sparse":
            raise option_error("sparse", "inner", inner, "any registered rule other than 'sparse'")
        if "table" in opts and not opts["table"].strip():
            raise option_error("sparse", "table", opts["table"], "a parameter name such as 'item_emb.weight'")
        return cls(inner_rule=make_rule(inner, inner_opts), inner=inner, **opts)


__all__ = ["ItemRows", "MissingLayout", "SparseAggregation", "sparse_aggregate", "touched_rows"]
