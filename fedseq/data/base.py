"""The data set type every source produces: :class:`SeqDataset`, :class:`DataError` and the array types.

A :class:`SeqDataset` is one chronological item sequence per user, split leave-one-out. Item ids
are ``1..M``; ``0`` is padding and ``M + 1`` is reserved as the BERT4Rec mask token, so a model's
token table has ``M + 2`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .ragged import Ragged

__all__ = ["DataError", "IntArray", "Ragged", "SeqDataset", "UserSequences"]

IntArray = NDArray[np.int64]
UserSequences = list[tuple[int, IntArray]]


class DataError(ValueError):
    """A data file or a data set is missing or malformed.

    File errors read ``<path>:<line>: <reason>`` (1-based line numbers) so that the offending
    line can be found directly.
    """


@dataclass(frozen=True, eq=False)
class SeqDataset:
    """A leave-one-out split of per-user chronological item sequences.

    Attributes:
        name: a label for reports (``"steam"``, ``"synthetic"``, a file path ...).
        num_items: ``M``; item ids are ``1..M``, ``0`` is padding, ``M + 1`` is the mask token.
        train: per user (index ``0..N-1``) the int64 chronological training items, i.e. the
            user's whole history except the last item. Treat the arrays as read-only. A tuple of
            arrays, or (large synthetic sets) a :class:`Ragged`, which reads the same: ``train[u]``
            is a read-only int64 view, ``len``, iteration.
        test: ``[N]`` int64, each user's held-out last item.
        user_ids: ``[N]`` int64, the original user ids (for reporting only; users are addressed
            by index everywhere else).
    """

    name: str
    num_items: int
    train: tuple[IntArray, ...] | Ragged
    test: IntArray
    user_ids: IntArray

    def __post_init__(self) -> None:
        n = len(self.train)
        if self.num_items < 1:
            raise DataError(f"dataset {self.name!r}: num_items must be >= 1, got {self.num_items}")
        if self.test.shape != (n,) or self.user_ids.shape != (n,):
            raise DataError(
                f"dataset {self.name!r}: {n} training sequences but test has shape "
                f"{self.test.shape} and user_ids has shape {self.user_ids.shape}"
            )
        if self.test.dtype != np.int64 or self.user_ids.dtype != np.int64:
            raise DataError(f"dataset {self.name!r}: test and user_ids must be int64 arrays")

    @property
    def num_users(self) -> int:
        """``N``, the number of users."""
        return len(self.train)

    def train_lengths(self) -> IntArray:
        """``[N]`` int64: the length of each user's training sequence."""
        if isinstance(self.train, Ragged):
            return self.train.lengths()
        return np.fromiter((len(seq) for seq in self.train), dtype=np.int64, count=len(self.train))

    def item_counts(self) -> IntArray:
        """``[M + 1]`` int64: how often each item id occurs in the training sequences.

        Index 0 (padding) is always 0. Test items are not counted.
        """
        if not self.train:
            return np.zeros(self.num_items + 1, dtype=np.int64)
        flat = self.train.flat if isinstance(self.train, Ragged) else np.concatenate(self.train)
        return np.bincount(flat, minlength=self.num_items + 1).astype(np.int64, copy=False)
