"""The leave-one-out split: per-user chronological sequences -> :class:`SeqDataset`."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike

from .base import DataError, IntArray, SeqDataset

__all__ = ["leave_one_out"]

# the package's logger, as before fedseq.data became a package (log filters and tests use the name)
logger = logging.getLogger("fedseq.data")


def leave_one_out(
    sequences: Iterable[tuple[int, ArrayLike]],
    name: str,
    num_items: int | None = None,
    min_length: int = 2,
) -> SeqDataset:
    """Split chronological per-user sequences leave-one-out.

    The last item of each sequence is the test item and the rest is the training sequence. Users
    with fewer than ``min_length`` items are dropped and the number dropped is logged as a
    warning. ``num_items`` defaults to the largest item id among all given sequences (including
    dropped users', since they are part of the catalogue); if given it must cover every id.

    Raises:
        ValueError: ``min_length < 1`` or ``num_items < 1``.
        DataError: an item id outside ``1..num_items``, a duplicate user id, a non-1-D sequence,
            or no user left after dropping short ones.
    """
    if min_length < 1:
        raise ValueError(f"min_length must be >= 1 (the test item needs one item), got {min_length}")
    if num_items is not None and num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")

    users: list[int] = []
    seqs: list[IntArray] = []
    seen_users: set[int] = set()
    max_id = 0
    for user, raw in sequences:
        seq = np.asarray(raw, dtype=np.int64)
        if seq.ndim != 1:
            raise DataError(f"dataset {name!r}: user {user}: sequence must be 1-D, got shape {seq.shape}")
        if user in seen_users:
            raise DataError(f"dataset {name!r}: user {user} occurs more than once")
        seen_users.add(user)
        if seq.size:
            lo = int(seq.min())
            if lo < 1:
                reason = "is reserved for padding" if lo == 0 else "is negative"
                raise DataError(f"dataset {name!r}: user {user}: item id {lo} {reason}")
            max_id = max(max_id, int(seq.max()))
        users.append(int(user))
        seqs.append(seq)

    if num_items is None:
        num_items = max_id
    elif max_id > num_items:
        raise DataError(f"dataset {name!r}: item id {max_id} exceeds num_items={num_items}")

    keep = [i for i, seq in enumerate(seqs) if len(seq) >= min_length]
    dropped = len(seqs) - len(keep)
    if dropped:
        logger.warning(
            "dataset %r: dropped %d of %d users with fewer than %d items",
            name,
            dropped,
            len(seqs),
            min_length,
        )
    if not keep:
        raise DataError(
            f"dataset {name!r}: no user has at least {min_length} items ({len(seqs)} users given)"
        )

    train = tuple(np.array(seqs[i][:-1], dtype=np.int64) for i in keep)
    test = np.fromiter((seqs[i][-1] for i in keep), dtype=np.int64, count=len(keep))
    user_ids = np.array([users[i] for i in keep], dtype=np.int64)
    return SeqDataset(name=name, num_items=int(num_items), train=train, test=test, user_ids=user_ids)
