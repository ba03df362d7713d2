"""A ragged sequence collection in CSR form: :class:`Ragged`.

One flat item array plus ``N + 1`` offsets instead of one numpy array per user, so a data set of a
million users costs its interactions' bytes plus 8 bytes a user, not a Python object per user. It
behaves like the tuple of arrays it replaces everywhere :attr:`SeqDataset.train` is read:
``len``, truth value, indexing by a Python or numpy integer (a read-only int64 view), iteration
and ``np.concatenate`` (which iterates). Slicing and fancy indexing give another :class:`Ragged`.

The flat array may be a ``np.memmap`` (:meth:`Ragged.save` / :meth:`Ragged.load`), so processes
that read the same file share its pages and only the parts a process touches are resident.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

__all__ = ["Ragged"]


class Ragged(Sequence[NDArray[np.int64]]):
    """Per-user int64 sequences stored as ``flat[offsets[u]:offsets[u + 1]]``."""

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: NDArray[Any], offsets: NDArray[Any]) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0:
            raise ValueError("offsets must be a 1-D int array starting at 0")
        if len(offsets) > 1 and np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        if flat.ndim != 1 or flat.dtype != np.int64:
            raise ValueError(f"flat must be a 1-D int64 array, got {flat.dtype} with shape {flat.shape}")
        if int(offsets[-1]) != len(flat):
            raise ValueError(f"offsets end at {int(offsets[-1])} but flat has {len(flat)} items")
        if flat.flags.writeable:
            flat = flat.view()
            flat.flags.writeable = False
        offsets.flags.writeable = False
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_sequences(cls, seqs: Iterable[Any]) -> Ragged:
        """Copy a sequence of 1-D arrays (the tuple form) into CSR form."""
        arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        if arrays:
            np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(flat.astype(np.int64, copy=False), offsets)

    # ---------------------------------------------------------------- the tuple's behaviour
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> NDArray[np.int64]: ...

    @overload
    def __getitem__(self, index: slice) -> Ragged: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            n = len(self)
            i = int(index)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"user index {int(index)} out of range for {n} sequences")
            return self.flat[self.offsets[i] : self.offsets[i + 1]]
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        return self.take(np.asarray(index))

    def __iter__(self) -> Iterator[NDArray[np.int64]]:
        flat, off = self.flat, self.offsets
        for i in range(len(off) - 1):
            yield flat[off[i] : off[i + 1]]

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"Ragged({len(self)} sequences, {len(self.flat)} items)"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ragged):
            return bool(np.array_equal(self.offsets, other.offsets) and np.array_equal(self.flat, other.flat))
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(np.array_equal(a, b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: unhashable like a list

    # ---------------------------------------------------------------- CSR helpers
    def lengths(self) -> NDArray[np.int64]:
        """``[N]`` int64 sequence lengths."""
        return np.diff(self.offsets)

    def take(self, index: NDArray[Any]) -> Ragged:
        """The sequences at ``index`` (integer array or boolean mask), copied into a new Ragged."""
        idx = np.arange(len(self))[index] if np.asarray(index).dtype == bool else np.asarray(index, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError("user index out of range")
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lens = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        # positions: for each output item, its source index in flat
        pos = np.repeat(starts - offsets[:-1], lens) + np.arange(int(offsets[-1]), dtype=np.int64)
        return Ragged(np.asarray(self.flat)[pos], offsets)

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes + self.offsets.nbytes)

    def save(self, path: str | Path) -> None:
        """Write ``<path>.flat.npy`` and ``<path>.offsets.npy`` (readable with :meth:`load`)."""
        p = Path(path)
        np.save(p.with_name(p.name + ".flat.npy"), np.asarray(self.flat))
        np.save(p.with_name(p.name + ".offsets.npy"), np.asarray(self.offsets))

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> Ragged:
        """Read what :meth:`save` wrote; with ``mmap`` the flat array is memory-mapped read-only."""
        p = Path(path)
        flat = np.load(p.with_name(p.name + ".flat.npy"), mmap_mode="r" if mmap else None)
        offsets = np.load(p.with_name(p.name + ".offsets.npy"))
        return cls(flat, offsets)
