"""Summary statistics of a :class:`SeqDataset` and the least popular item (the default attack target)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .base import DataError, SeqDataset

__all__ = ["DatasetStats", "least_popular_item", "stats"]


@dataclass(frozen=True)
class DatasetStats:
    """Summary numbers of a :class:`SeqDataset` (see :func:`stats`).

    Lengths are per-user full sequence lengths (training items plus the held-out test item).
    ``sparsity`` is ``1 - interactions / (users * items)`` as a fraction (Steam: 0.9940).
    ``distinct_items`` counts the item ids that occur anywhere (train or test).
    """

    users: int
    items: int
    interactions: int
    train_interactions: int
    mean_len: float
    median_len: float
    max_len: int
    min_len: int
    sparsity: float
    distinct_items: int

    def format(self) -> str:
        """A multi-line human-readable summary."""
        test = self.interactions - self.train_interactions
        lines = [
            f"users             {self.users:,}",
            f"items             {self.items:,} ({self.distinct_items:,} occur in the data)",
            f"interactions      {self.interactions:,} ({self.train_interactions:,} train + {test:,} test)",
            f"sequence length   mean {self.mean_len:.2f}, median {self.median_len:g}, "
            f"min {self.min_len}, max {self.max_len}",
            f"sparsity          {self.sparsity * 100:.2f}%",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable)."""
        return asdict(self)


def stats(ds: SeqDataset) -> DatasetStats:
    """Compute :class:`DatasetStats` for ``ds``."""
    if ds.num_users == 0:
        raise DataError(f"dataset {ds.name!r} has no users")
    lengths = ds.train_lengths() + 1
    interactions = int(lengths.sum())
    seen = ds.item_counts() > 0
    seen[ds.test] = True
    seen[0] = False
    return DatasetStats(
        users=ds.num_users,
        items=ds.num_items,
        interactions=interactions,
        train_interactions=interactions - ds.num_users,
        mean_len=float(lengths.mean()),
        median_len=float(np.median(lengths)),
        max_len=int(lengths.max()),
        min_len=int(lengths.min()),
        sparsity=1.0 - interactions / (ds.num_users * ds.num_items),
        distinct_items=int(seen.sum()),
    )


def least_popular_item(ds: SeqDataset) -> int:
    """The least popular item by training-set count among ids ``1..M``; ties go to the lowest id.

    Items that never occur in training (count 0) are included, so on Steam this is item 1358.
    This is the default target item of the attacks.
    """
    counts = ds.item_counts()
    return int(np.argmin(counts[1:])) + 1


TARGET_PRESETS = ("least-popular", "popular", "mid-tail", "several")


def preset_targets(ds: SeqDataset, preset: str, several: int = 5) -> tuple[int, ...]:
    """The attack targets of a named preset, by training-set popularity (ties to the lower id):

    - ``least-popular``: :func:`least_popular_item` (the paper's target; on Steam item 1358, no
      training interaction);
    - ``popular``: the item at the top-5% boundary of the popularity ranking of the items with at
      least one training interaction (popular, but not one most users already have: a target a
      user trained on is never exposed to them, so the top item leaves an attack no room; Steam:
      item 44, 92 users; the 400-user synthetic data: about a quarter of the users);
    - ``mid-tail``: the median item of the popularity ranking of the items with at least one
      training interaction;
    - ``several``: ``several`` items at once, spread evenly over the tail half of that ranking
      (from the median to the least popular interacted item).
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; presets: {', '.join(TARGET_PRESETS)}")
    if preset == "least-popular":
        return (least_popular_item(ds),)
    counts = ds.item_counts()[1:]
    ranked = np.lexsort((np.arange(len(counts)), -counts))  # most popular first, ties to the lower id
    ranked = ranked[counts[ranked] > 0] + 1
    if len(ranked) == 0:
        raise ValueError(f"dataset {ds.name!r} has no item with a training interaction")
    if preset == "popular":
        return (int(ranked[len(ranked) // 20]),)
    if preset == "mid-tail":
        return (int(ranked[len(ranked) // 2]),)
    tail = ranked[len(ranked) // 2:]
    picks = np.unique(np.linspace(0, len(tail) - 1, num=min(several, len(tail))).round().astype(int))
    return tuple(int(tail[i]) for i in picks)
