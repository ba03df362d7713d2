"""The aggregation-rule interface shared by every rule in this package.

Convention (used everywhere in fedseq): an *update* is a descent direction. In paper mode it is
the gradient of a user's local loss at the global weights; in FedAvg mode it is
``w_global - w_local`` after local training. The server step is always

    w <- w - lr * aggregate(updates, weights)

A rule is a pure function of the round's stacked updates ``U`` of shape ``[K, D]`` (K updates,
D parameters, all tensors flattened in a fixed layout) and the round's context ``ctx``
(:class:`fedseq.engine.RoundContext`): ``ctx.weights``, the non-negative sample-count weights
``n`` of shape ``[K]`` (the user's number of training items), the round id (the seed stream of a
rule that draws random numbers), the parameter layout, the global weights and, for a rule that
declares ``needs_root``, the server's root update. It returns the ``[D]`` aggregate and a small
record of what it did, for the round summary.

Every rule subclasses :class:`fedseq.engine.AggregationRule`, which defines its declarations
(``scale``, ``uses_weights``, ``needs_root``, ``root_users``, ``needs_layout``) with their
defaults; a rule overrides those that differ. The engine builds the context
(:func:`fedseq.engine.aggregate_round`); a direct caller builds one itself, e.g.
``rule(U, RoundContext(n))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedseq.engine import (  # noqa: F401 - the contract
    AggregationResult,
    AggregationRule,
    RoundContext,
    rule_scale,
    rule_uses_weights,
)
from fedseq.seeding import torch_generator


class RuleConfigError(ValueError):
    """A rule name or option is unknown or invalid (message says which and why)."""


# the rule contract is the round engine's (fedseq/engine.py): rules are plug-ins of the library
RuleFactory = Callable[[Mapping[str, str]], AggregationRule]


class WrappingRule(AggregationRule):
    """The base of a rule that wraps an inner rule (``norm-clip``, ``dp-fixed``, ``sparse``): its
    declarations are its ``inner_rule``'s unless it overrides one (``sparse`` declares its own
    ``scale`` and ``needs_layout``). A subclass is a frozen dataclass with an ``inner_rule`` field."""

    inner_rule: AggregationRule

    @property
    def scale(self) -> str:
        """The inner rule's output scale (fedseq/engine.py step_lr)."""
        return self.inner_rule.scale

    @property
    def uses_weights(self) -> bool:
        """Whether the inner rule reads the sample weights (fedseq/engine.py rule_uses_weights)."""
        return self.inner_rule.uses_weights

    @property
    def needs_root(self) -> bool:
        """Whether the inner rule reads the round's root update (``inner=fltrust``)."""
        return self.inner_rule.needs_root

    @property
    def root_users(self) -> int:
        """The inner rule's root users (FLTrust), read by the runners' root source (fedseq/root.py)."""
        return self.inner_rule.root_users

    @property
    def needs_layout(self) -> bool:
        """Whether the inner rule reads the parameter layout (``inner=sparse``)."""
        return self.inner_rule.needs_layout


def check_inputs(updates: torch.Tensor, weights: torch.Tensor) -> None:
    """Validate the stacked round matrix and weights (shared by all rules)."""
    if updates.dim() != 2:
        raise ValueError(f"updates must be [K, D], got shape {tuple(updates.shape)}")
    if weights.dim() != 1 or weights.shape[0] != updates.shape[0]:
        raise ValueError(f"weights must be [K={updates.shape[0]}], got shape {tuple(weights.shape)}")
    if updates.shape[0] == 0:
        raise ValueError("cannot aggregate an empty round (K = 0)")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")


def parse_options(
    rule: str, options: Mapping[str, str], allowed: Mapping[str, type]
) -> dict[str, Any]:
    """Parse string options (from the CLI ``--defense-opt k=v`` or config) into typed values.

    Unknown keys and unparsable values raise :class:`RuleConfigError` naming the rule, the key
    and the accepted keys.
    """
    out: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in allowed:
            raise RuleConfigError(
                f"rule {rule!r} has no option {key!r}; accepted options: {sorted(allowed) or 'none'}"
            )
        typ = allowed[key]
        try:
            if typ is bool:
                low = str(raw).strip().lower()
                if low not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(raw)
                out[key] = low in {"true", "1", "yes"}
            else:
                out[key] = typ(raw)
        except (TypeError, ValueError):
            raise RuleConfigError(
                f"rule {rule!r} option {key!r}={raw!r} is not a valid {typ.__name__}"
            ) from None
    return out


# ---------------------------------------------------------------------------------------------
# Helpers shared by the rules (not part of the rule contract). They keep memory bounded: no
# helper materialises anything larger than a few MiB beyond the [K, D] input and [K, K] matrices.
# ---------------------------------------------------------------------------------------------

#: Scratch budget (bytes) for one chunk of a chunked pass over the round matrix. Small enough to
#: stay in cache-friendly territory (measured: 4-row chunks of D = 433,000 are ~6x faster than
#: 64-row chunks on the 2-core dev machine), large enough that the Python loop is short.
CHUNK_BYTES = 8 * 1024 * 1024


def use_numpy_path(t: torch.Tensor) -> bool:
    """Chunked passes run in NumPy for CPU float32/float64 tensors (zero-copy views).

    Why: a chunked pass issues hundreds of small ops; as torch ops each one is an OpenMP parallel
    region, and with ``torch.set_num_threads(2)`` on a 2-core machine whose other core is busy
    every region waits for a time slice. NumPy's single-threaded loops have no such barrier, and
    its SIMD sort is far faster than ``torch.sort`` for rows of K = 256 (the coordinate-wise
    median: docs/results/speed.md, "Chunked passes in NumPy", ``bench/bench_aggregation.py
    --torch-path``). Other devices use the torch path.
    """
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad


def option_error(rule: str, option: str, value: Any, allowed: str) -> RuleConfigError:
    """A :class:`RuleConfigError` naming the rule, the option, the bad value and the allowed range."""
    return RuleConfigError(f"rule {rule!r} option {option}={value!r} is invalid; allowed: {allowed}")


def check_floating(updates: torch.Tensor) -> None:
    """Rules compute in the updates' floating dtype (float32 in fedseq; float64 accepted)."""
    if not updates.is_floating_point():
        raise ValueError(f"updates must be a floating-point tensor, got {updates.dtype}")


def normalised_weights(weights: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """``alpha_i = n_i / sum_j n_j`` in float64 (uniform ``1/K`` when ``weighted`` is false).

    Raises ValueError when weighting is requested but every weight is zero.
    """
    k = weights.shape[0]
    if not weighted:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=weights.device)
    w = weights.to(torch.float64)
    total = float(w.sum())
    if total <= 0:
        raise ValueError("sample weights sum to zero; use weighted=false or send positive sample counts")
    return w / total


def row_distances(
    updates: torch.Tensor, point: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, use_numpy: bool | None = None
) -> torch.Tensor:
    """``||u_i - point||_2`` for every row of ``updates [K, D]``, as float64 ``[K]``.

    Computed directly on the difference (no ``|a|^2 - 2ab + |b|^2`` cancellation; pairwise
    summation in the updates' dtype), a few rows at a time so the scratch is at most
    ``chunk_bytes``.
    """
    k, d = updates.shape
    rows = max(1, chunk_bytes // max(1, d * updates.element_size()))
    p = point.to(updates.device, updates.dtype)
    if use_numpy is None:
        use_numpy = use_numpy_path(updates)
    if use_numpy:
        u, q = updates.numpy(), p.detach().numpy()
        res = np.empty(k, dtype=np.float64)
        for start in range(0, k, rows):
            diff = u[start : start + rows] - q
            np.square(diff, out=diff)
            res[start : start + rows] = np.sqrt(diff.sum(axis=1))
        return torch.from_numpy(res)
    out = torch.empty(k, dtype=torch.float64, device=updates.device)
    for start in range(0, k, rows):
        block = updates[start : start + rows] - p
        out[start : start + rows] = torch.linalg.vector_norm(block, dim=1).to(torch.float64)
    return out


def gram_matrix(updates: torch.Tensor) -> torch.Tensor:
    """``G = U U^T`` as float64 ``[K, K]`` (one BLAS call in the updates' dtype, no [K, D] copy)."""
    g = (updates @ updates.T).to(torch.float64)
    return (g + g.T) / 2  # exact symmetry (BLAS may round the two triangles differently)


def pairwise_sq_distances(gram: torch.Tensor) -> torch.Tensor:
    """``||u_i - u_j||^2`` from a Gram matrix; clamped at 0, zero diagonal.

    Gram-trick accuracy: absolute error about ``1e-7 * ||u_i|| * ||u_j||`` for float32 inputs.
    """
    sq = torch.diagonal(gram)
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)
    d2.fill_diagonal_(0)
    return d2


def sorted_column_reduce(
    updates: torch.Tensor,
    reduce: Callable[[Any], Any],
    chunk_bytes: int = CHUNK_BYTES // 2,
    use_numpy: bool | None = None,
) -> torch.Tensor:
    """Sort every column of ``updates [K, D]`` and reduce it to one value: returns ``[D]``.

    Works a block of columns at a time: ``S [c, K]`` = the block transposed, each row sorted
    ascending; ``reduce(S)`` must return the ``[c]`` values (it receives a NumPy array on the NumPy
    path and a tensor otherwise, so write it with operations both support, e.g. ``S[:, i]``,
    slicing, ``+``, ``/``). The output has the updates' dtype. Scratch: about ``chunk_bytes``
    (NumPy sorts the private transposed copy in place) or twice that (torch).
    """
    k, d = updates.shape
    cols = max(1, chunk_bytes // max(1, k * updates.element_size()))
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    if use_numpy is None:
        use_numpy = use_numpy_path(updates)
    if use_numpy:
        u, o = updates.numpy(), out.numpy()
        for start in range(0, d, cols):
            arr = np.ascontiguousarray(u[:, start : start + cols].T)
            arr.sort(axis=1)
            o[start : start + cols] = reduce(arr)
        return out
    for start in range(0, d, cols):
        block = torch.sort(updates[:, start : start + cols].T, dim=1).values
        out[start : start + cols] = reduce(block)
    return out


def column_mean64(updates: torch.Tensor, use_numpy: bool | None = None) -> torch.Tensor:
    """Column means of ``updates [K, D]`` accumulated in float64 (no [K, D] float64 copy)."""
    if use_numpy is None:
        use_numpy = use_numpy_path(updates)
    if use_numpy:
        mean = updates.numpy().mean(axis=0, dtype=np.float64)  # buffered casting
        return torch.from_numpy(mean.astype(updates.numpy().dtype))
    k, d = updates.shape
    rows = max(1, CHUNK_BYTES // max(1, d * 8))
    acc = torch.zeros(d, dtype=torch.float64, device=updates.device)
    for start in range(0, k, rows):
        acc += updates[start : start + rows].to(torch.float64).sum(dim=0)
    return (acc / k).to(updates.dtype)


def round_generator(seed: int, key: int, round_id: int, i: int = 0) -> torch.Generator:
    """A CPU generator for draw ``i`` of round ``round_id`` of a seeded rule (FLAME's noise, DnC's
    coordinate samples; ``key`` separates the rules' streams): a function of its arguments only, so
    every runner, and a resumed run, draws the same numbers."""
    return torch_generator(seed, key, round_id, i)


def add_seeded_noise(vec: torch.Tensor, sigma: float, seed: int, key: int, round_id: int, i: int = 0) -> torch.Tensor:
    """``vec [D]`` plus ``N(0, sigma^2)`` per coordinate from :func:`round_generator` (drawn in
    float64 on the CPU, then cast to ``vec``'s dtype and device); ``vec`` itself when sigma is 0."""
    if sigma <= 0:
        return vec
    noise = torch.randn(vec.shape[0], generator=round_generator(seed, key, round_id, i), dtype=torch.float64)
    return vec + (noise * sigma).to(vec.dtype).to(vec.device)


INNER_PREFIX = "inner."  # a wrapping rule's options for its inner rule: inner.<key>=<value>


def split_inner(options: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A wrapping rule's options: ``(its own, its inner rule's)``, the latter without the prefix."""
    own = {k: v for k, v in options.items() if not k.startswith(INNER_PREFIX)}
    inner = {k[len(INNER_PREFIX):]: v for k, v in options.items() if k.startswith(INNER_PREFIX)}
    return own, inner


def parse_f(rule: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Turn a parsed string option ``f`` (an integer >= 0 or ``auto``) into an int or None (auto)."""
    if "f" in opts:
        raw = str(opts["f"]).strip().lower()
        if raw == "auto":
            opts["f"] = None
        else:
            try:
                opts["f"] = int(raw)
            except ValueError:
                raise option_error(rule, "f", opts["f"], "an integer >= 0 or 'auto'") from None
    return opts
