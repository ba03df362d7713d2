"""Sharding users across workers: shard ``i`` of ``n`` holds every user index ``u`` with ``u % n == i``."""

from __future__ import annotations

import numpy as np

from .base import IntArray

__all__ = ["parse_shard", "shard"]


def shard(num_users: int, index: int, count: int) -> IntArray:
    """The user indices of shard ``index`` of ``count``: every ``u`` with ``u % count == index``.

    Deterministic, sorted int64; the ``count`` shards partition ``0..num_users-1``.
    """
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must satisfy 0 <= index < count={count}, got {index}")
    if num_users < 0:
        raise ValueError(f"num_users must be >= 0, got {num_users}")
    return np.arange(index, num_users, count, dtype=np.int64)


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (shard ``i`` of ``n``, 0-based) into ``(i, n)``."""
    parts = text.strip().split("/")
    if len(parts) != 2:
        raise ValueError(f"shard {text!r} must look like 'i/n' (e.g. '0/4'): shard i of n, 0-based")
    try:
        index, count = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"shard {text!r}: i and n in 'i/n' must be integers") from None
    if count < 1:
        raise ValueError(f"shard {text!r}: the shard count n must be >= 1")
    if not 0 <= index < count:
        raise ValueError(f"shard {text!r}: the shard index i must satisfy 0 <= i < n={count}")
    return index, count
