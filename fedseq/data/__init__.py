"""Interaction data: loaders, the leave-one-out split, a synthetic generator and stats.

Every data set ends up as a :class:`SeqDataset`: one chronological item sequence per user, split
leave-one-out (the last item is the held-out test item, everything before it is training data).
Item ids are ``1..M``; ``0`` is padding and ``M + 1`` is reserved as the BERT4Rec mask token, so a
model's token table has ``M + 2`` rows.

One module per job; import from the package (``from fedseq.data import load_dataset``):

- :mod:`.base`: :class:`SeqDataset`, :class:`DataError` and the array types;
- :mod:`.ragged`: :class:`Ragged`, per-user sequences as one flat array plus offsets (CSR,
  optionally memory-mapped), which reads like the tuple of arrays it replaces (large data sets);
- :mod:`.loaders`: the file formats (:func:`load_sequences`, :func:`load_movielens`,
  :func:`load_csv`), the named sets ``steam`` and ``ml-1m``, and :func:`load_dataset`, which maps
  a spec (``"synthetic"``, ``"steam"``, ``"ml-1m"`` or a file path) to a :class:`SeqDataset`;
- :mod:`.split`: :func:`leave_one_out`;
- :mod:`.generator`: :func:`synthetic`, the project's default data set (Markov-structured
  sequences with latent clusters and Zipf popularity, small enough to train in seconds);
- :mod:`.summary`: :func:`stats`, :func:`least_popular_item` (the default attack target) and
  :func:`preset_targets` (named harder targets: popular, mid-tail, several);

Malformed files raise :class:`DataError` with ``path:line: reason``.
"""

from __future__ import annotations

from .base import DataError, IntArray, Ragged, SeqDataset, UserSequences
from .generator import synthetic
from .loaders import DATA_CACHE_ENV, DATA_ROOT_ENV, load_csv, load_dataset, load_movielens, load_sequences
from .split import leave_one_out
from .summary import TARGET_PRESETS, DatasetStats, least_popular_item, preset_targets, stats

__all__ = [
    "DATA_CACHE_ENV",
    "DATA_ROOT_ENV",
    "TARGET_PRESETS",
    "DataError",
    "DatasetStats",
    "IntArray",
    "Ragged",
    "SeqDataset",
    "UserSequences",
    "least_popular_item",
    "preset_targets",
    "leave_one_out",
    "load_csv",
    "load_dataset",
    "load_movielens",
    "load_sequences",
    "stats",
    "synthetic",
]
