"""Interaction data: loaders, the leave-one-out split, a synthetic generator, stats and sharding.

Every dataset ends up as a :class:`SeqDataset`: one chronological item sequence per user, split
leave-one-out (the last item is the held-out test item, everything before it is training data).
Item ids are ``1..M``; ``0`` is padding and ``M + 1`` is reserved as the BERT4Rec mask token, so a
model's token table has ``M + 2`` rows.

Sources:

- the sequence format (``user_id item_1 ... item_n`` per line, 1-based ids, chronological), which
  is how the DV-FSR Steam data ships (:func:`load_sequences`);
- MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) (:func:`load_movielens`);
- a CSV interaction log with ``user``, ``item`` and ``timestamp`` columns (:func:`load_csv`);
- :func:`synthetic`, the project's default dataset: Markov-structured sequences with latent
  clusters and Zipf popularity, small enough for a federated run to train in seconds.

:func:`load_dataset` maps a spec (``"synthetic"``, ``"steam"``, ``"ml-1m"`` or a file path) to a
:class:`SeqDataset`. Malformed files raise :class:`DataError` with ``path:line: reason``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DataError",
    "DatasetStats",
    "SeqDataset",
    "least_popular_item",
    "leave_one_out",
    "load_csv",
    "load_dataset",
    "load_movielens",
    "load_sequences",
    "parse_shard",
    "shard",
    "stats",
    "synthetic",
]

logger = logging.getLogger(__name__)

IntArray = NDArray[np.int64]
UserSequences = list[tuple[int, IntArray]]

DATA_ROOT_ENV = "FEDSEQ_DATA_ROOT"
"""Environment variable naming the folder that holds ``steam/`` and ``ml-1m/``."""

_NAMED_FILES: dict[str, tuple[str, ...]] = {
    "steam": ("steam", "sequences.txt"),
    "ml-1m": ("ml-1m", "ratings.dat"),
}

# A line of whitespace-separated ASCII integers (the fast path of the sequence parser).
_INT_LINE = re.compile(r"[+-]?[0-9]+(?:[ \t]+[+-]?[0-9]+)*", re.ASCII)
_INT_TOKEN = re.compile(r"[+-]?[0-9]+", re.ASCII)
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT64_MIN = int(np.iinfo(np.int64).min)


class DataError(ValueError):
    """A data file or a data set is missing or malformed.

    File errors read ``<path>:<line>: <reason>`` (1-based line numbers) so that the offending
    line can be found directly.
    """


# --------------------------------------------------------------------------------------------
# Data set


@dataclass(frozen=True, eq=False)
class SeqDataset:
    """A leave-one-out split of per-user chronological item sequences.

    Attributes:
        name: a label for reports (``"steam"``, ``"synthetic"``, a file path ...).
        num_items: ``M``; item ids are ``1..M``, ``0`` is padding, ``M + 1`` is the mask token.
        train: per user (index ``0..N-1``) the int64 chronological training items, i.e. the
            user's whole history except the last item. Treat the arrays as read-only.
        test: ``[N]`` int64, each user's held-out last item.
        user_ids: ``[N]`` int64, the original user ids (for reporting only; users are addressed
            by index everywhere else).
    """

    name: str
    num_items: int
    train: tuple[IntArray, ...]
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
        return np.fromiter((len(seq) for seq in self.train), dtype=np.int64, count=len(self.train))

    def item_counts(self) -> IntArray:
        """``[M + 1]`` int64: how often each item id occurs in the training sequences.

        Index 0 (padding) is always 0. Test items are not counted.
        """
        if not self.train:
            return np.zeros(self.num_items + 1, dtype=np.int64)
        flat = np.concatenate(self.train)
        return np.bincount(flat, minlength=self.num_items + 1).astype(np.int64, copy=False)


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


# --------------------------------------------------------------------------------------------
# Split


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


# --------------------------------------------------------------------------------------------
# Loaders


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None


def _parse_int(token: str, what: str, path: Path, lineno: int) -> int:
    """Parse one ASCII decimal integer strictly (no underscores, no blanks, fits int64)."""
    token = token.strip()
    if not _INT_TOKEN.fullmatch(token):
        raise DataError(f"{path}:{lineno}: {what} {token!r} is not an integer")
    value = int(token)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise DataError(f"{path}:{lineno}: {what} {token} does not fit in 64 bits")
    return value


def _parse_number(token: str, what: str, path: Path, lineno: int) -> float:
    token = token.strip()
    try:
        value = float(token)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} {token!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{lineno}: {what} {token!r} is not finite")
    return value


def load_sequences(path: str | Path) -> UserSequences:
    """Load the sequence format: one ``user_id item_1 ... item_n`` line per user.

    Fields are whitespace separated; item ids are 1-based integers in chronological order.
    Blank lines are skipped. Users are returned in file order.

    Raises:
        DataError: missing/empty file, a non-integer token, item id ``<= 0``, a line with a user
            id but no items, or a user id that occurs on two lines (both line numbers given).
    """
    path = Path(path)
    text = _read_text(path)
    result: UserSequences = []
    first_line: dict[int, int] = {}
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line:
            continue
        if _INT_LINE.fullmatch(line):
            tokens = line.split()
            try:
                values = np.array(tokens, dtype=np.int64)
            except OverflowError:
                values = None
        else:
            tokens = line.split()
            values = None
        if values is None:  # slow path: find and report the offending token
            _parse_int(tokens[0], "user id", path, lineno)
            for token in tokens[1:]:
                _parse_int(token, "item id", path, lineno)
            raise AssertionError("unreachable: every token parsed")  # pragma: no cover
        user = int(values[0])
        items = values[1:]
        if user < 0:
            raise DataError(f"{path}:{lineno}: user id {user} is negative")
        if items.size == 0:
            raise DataError(f"{path}:{lineno}: user {user} has no items")
        lo = int(items.min())
        if lo <= 0:
            reason = "is reserved for padding" if lo == 0 else "is negative (ids are 1-based)"
            raise DataError(f"{path}:{lineno}: item id {lo} {reason}")
        if user in first_line:
            raise DataError(
                f"{path}:{lineno}: duplicate user id {user} (first seen on line {first_line[user]})"
            )
        first_line[user] = lineno
        result.append((user, items))
    if not result:
        raise DataError(f"{path}: empty file: no user sequences found")
    return result


def _group_by_user(users: IntArray, items: IntArray, timestamps: NDArray[Any]) -> UserSequences:
    """Sort interactions by (user, timestamp, file order) and remap item ids to ``1..M``.

    Item ids are remapped in ascending order of the original ids (sorted unique ids -> 1..M).
    """
    _, remapped = np.unique(items, return_inverse=True)
    remapped = remapped.reshape(-1).astype(np.int64) + 1
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    users_sorted = users[order]
    items_sorted = remapped[order]
    cuts = np.flatnonzero(np.diff(users_sorted)) + 1
    starts = np.concatenate(([0], cuts))
    return [
        (int(users_sorted[s]), np.array(chunk, dtype=np.int64))
        for s, chunk in zip(starts, np.split(items_sorted, cuts), strict=True)
    ]


def load_movielens(path: str | Path) -> UserSequences:
    """Load MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp`` per line).

    Each user's ratings are sorted by timestamp (stable: ties keep file order); users come out in
    ascending id order. Movie ids are remapped to ``1..M`` in ascending order of the original ids,
    so the result is deterministic. The rating itself is validated as a number and then ignored
    (implicit feedback).

    Raises:
        DataError: missing/empty file, a line without exactly 4 ``::`` fields, or a non-integer
            user id, movie id or timestamp.
    """
    path = Path(path)
    text = _read_text(path)
    users: list[int] = []
    items: list[int] = []
    stamps: list[int] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line:
            continue
        fields = line.split("::")
        if len(fields) != 4:
            raise DataError(f"{path}:{lineno}: expected 4 fields separated by '::', got {len(fields)}")
        user_s, item_s, rating_s, stamp_s = fields
        try:
            user, item, stamp = int(user_s), int(item_s), int(stamp_s)
        except ValueError:
            user = _parse_int(user_s, "user id", path, lineno)
            item = _parse_int(item_s, "movie id", path, lineno)
            stamp = _parse_int(stamp_s, "timestamp", path, lineno)
        if "_" in line:  # int() accepts "1_000"; the format does not
            user = _parse_int(user_s, "user id", path, lineno)
            item = _parse_int(item_s, "movie id", path, lineno)
            stamp = _parse_int(stamp_s, "timestamp", path, lineno)
        _parse_number(rating_s, "rating", path, lineno)
        if user < 0 or item < 0:
            raise DataError(f"{path}:{lineno}: {'user' if user < 0 else 'movie'} id "
                            f"{user if user < 0 else item} is negative")
        users.append(user)
        items.append(item)
        stamps.append(stamp)
    if not users:
        raise DataError(f"{path}: empty file: no ratings found")
    try:
        arrays = (
            np.array(users, dtype=np.int64),
            np.array(items, dtype=np.int64),
            np.array(stamps, dtype=np.int64),
        )
    except OverflowError:
        raise DataError(f"{path}: an id or timestamp does not fit in 64 bits") from None
    return _group_by_user(*arrays)


_CSV_COLUMNS = ("user", "item", "timestamp")


def load_csv(path: str | Path) -> UserSequences:
    """Load a CSV interaction log with a header naming ``user``, ``item`` and ``timestamp``.

    Column names are matched case-insensitively after stripping blanks; extra columns are allowed
    and the order is free. User and item ids are integers, timestamps are numbers (int or float).
    Interactions are sorted by timestamp per user (stable: ties keep file order), users come out
    in ascending id order, and item ids are remapped to ``1..M`` in ascending order of the
    original ids (as in :func:`load_movielens`).

    Raises:
        DataError: missing/empty file, missing columns (all listed), a row with the wrong number
            of fields, a non-integer id or a non-numeric timestamp.
    """
    path = Path(path)
    text = _read_text(path, encoding="utf-8-sig")
    reader = csv.reader(text.splitlines())
    header: list[str] | None = None
    header_line = 0
    for row in reader:
        if any(cell.strip() for cell in row):
            header = [cell.strip().lower() for cell in row]
            header_line = reader.line_num
            break
    if header is None:
        raise DataError(f"{path}: empty file: expected a header with columns {', '.join(_CSV_COLUMNS)}")
    missing = [col for col in _CSV_COLUMNS if col not in header]
    if missing:
        raise DataError(
            f"{path}:{header_line}: missing column(s) {', '.join(missing)} in header "
            f"(found: {', '.join(header) or 'none'})"
        )
    duplicated = [col for col in _CSV_COLUMNS if header.count(col) > 1]
    if duplicated:
        raise DataError(f"{path}:{header_line}: column(s) {', '.join(duplicated)} appear more than once")
    ui, ii, ti = (header.index(col) for col in _CSV_COLUMNS)

    users: list[int] = []
    items: list[int] = []
    stamps: list[float] = []
    for row in reader:
        lineno = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        users.append(_parse_int(row[ui], "user id", path, lineno))
        items.append(_parse_int(row[ii], "item id", path, lineno))
        if users[-1] < 0 or items[-1] < 0:
            raise DataError(f"{path}:{lineno}: {'user' if users[-1] < 0 else 'item'} id "
                            f"{users[-1] if users[-1] < 0 else items[-1]} is negative")
        stamps.append(_parse_number(row[ti], "timestamp", path, lineno))
    if not users:
        raise DataError(f"{path}: no interactions after the header")
    return _group_by_user(
        np.array(users, dtype=np.int64), np.array(items, dtype=np.int64), np.array(stamps, dtype=np.float64)
    )


# --------------------------------------------------------------------------------------------
# Named data sets


def _data_root_candidates(data_root: str | Path | None) -> list[tuple[Path, str]]:
    """Where to look for the named data sets, with a note on where each candidate came from."""
    if data_root is not None:
        return [(Path(data_root), "data_root argument")]
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return [(Path(env), f"${DATA_ROOT_ENV}")]
    return [
        (Path.cwd() / ".." / "shared" / "data", "../shared/data relative to the working directory"),
        (
            Path(__file__).resolve().parents[1] / ".." / "shared" / "data",
            "../shared/data next to the repository",
        ),
    ]


def _sniff_dat(path: Path) -> bool:
    """True when the first non-blank line of a ``.dat`` file uses MovieLens ``::`` separators."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    return "::" in line
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    return False


def _load_file(path: Path, name: str, min_length: int) -> SeqDataset:
    if not path.is_file():
        raise DataError(
            f"dataset file {path} does not exist; pass an existing file path, or one of "
            f"'synthetic', {', '.join(repr(k) for k in _NAMED_FILES)}"
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        sequences = load_csv(path)
    elif suffix == ".dat" and _sniff_dat(path):
        sequences = load_movielens(path)
    else:
        sequences = load_sequences(path)
    return leave_one_out(sequences, name=name, min_length=min_length)


def load_dataset(spec: str, data_root: str | Path | None = None, seed: int = 0) -> SeqDataset:
    """Load a data set by name or path and split it leave-one-out.

    ``spec`` is one of:

    - ``"synthetic"``: :func:`synthetic` with its defaults and ``seed``;
      ``"synthetic:users=N,items=M"`` overrides its integer/float parameters (any keyword of
      :func:`synthetic`, e.g. ``synthetic:users=2000,items=800,follow_prob=0.6``);
    - ``"steam"``: ``<data_root>/steam/sequences.txt`` (sequence format);
    - ``"ml-1m"``: ``<data_root>/ml-1m/ratings.dat`` (MovieLens format);
    - a file path: ``*.csv`` -> :func:`load_csv`; ``*.dat`` whose lines contain ``::`` ->
      :func:`load_movielens`; anything else -> :func:`load_sequences`. The data set is named
      by the path as given.

    ``data_root`` defaults to ``$FEDSEQ_DATA_ROOT``, else ``../shared/data`` relative to the
    working directory, else ``../shared/data`` next to this repository. ``seed`` only affects
    the synthetic data set.

    Raises:
        DataError: the file is missing (the message says where it looked and how to point at the
            data) or malformed.
    """
    if spec == "synthetic":
        return synthetic(seed=seed)
    if spec.startswith("synthetic:"):
        return synthetic(seed=seed, **_synthetic_params(spec))
    if spec in _NAMED_FILES:
        rel = Path(*_NAMED_FILES[spec])
        tried: list[str] = []
        for root, origin in _data_root_candidates(data_root):
            candidate = root / rel
            if candidate.is_file():
                return _load_file(candidate, name=spec, min_length=2)
            tried.append(f"{candidate} ({origin})")
        raise DataError(
            f"dataset {spec!r} not found; looked for {rel} in: {'; '.join(tried)}. Set "
            f"{DATA_ROOT_ENV} to the folder that contains {_NAMED_FILES[spec][0]}/, pass data_root, "
            f"or give the file path directly as the dataset spec"
        )
    return _load_file(Path(spec), name=spec, min_length=2)


def _synthetic_params(spec: str) -> dict[str, Any]:
    """Parse ``synthetic:k=v,...`` (``users``/``items`` alias ``num_users``/``num_items``)."""
    import inspect

    allowed = {p for p in inspect.signature(synthetic).parameters if p not in ("seed", "name")}
    out: dict[str, Any] = {}
    for item in spec.split(":", 1)[1].split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise DataError(f"dataset spec {spec!r}: {item!r} must look like key=value")
        key, raw = (x.strip() for x in item.split("=", 1))
        key = {"users": "num_users", "items": "num_items"}.get(key, key)
        if key not in allowed:
            raise DataError(f"dataset spec {spec!r}: unknown synthetic parameter {key!r}; known: {sorted(allowed)}")
        try:
            out[key] = int(raw) if raw.lstrip("-").isdigit() else float(raw)
        except ValueError:
            raise DataError(f"dataset spec {spec!r}: {key}={raw!r} is not a number") from None
    return out


# --------------------------------------------------------------------------------------------
# Sharding


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


# --------------------------------------------------------------------------------------------
# Synthetic data


class _Sampler:
    """Draws from a fixed discrete distribution over candidate item ids, avoiding excluded ids.

    Sampling uses the cumulative weights and rejection against the user's already-seen items;
    after a few rejections it falls back to an exact draw from the renormalised remainder.
    """

    _TRIES = 16

    def __init__(self, candidates: IntArray, weights: NDArray[np.float64]) -> None:
        positive = weights > 0
        self.candidates = candidates[positive]
        self.weights = weights[positive]
        self.cdf = np.cumsum(self.weights)

    def draw(self, rng: np.random.Generator, seen: set[int]) -> int | None:
        """One id not in ``seen`` drawn proportionally to its weight, or None if all are seen."""
        n = len(self.candidates)
        if n == 0:
            return None
        total = float(self.cdf[-1])
        for _ in range(self._TRIES):
            k = min(int(np.searchsorted(self.cdf, rng.random() * total, side="right")), n - 1)
            item = int(self.candidates[k])
            if item not in seen:
                return item
        mask = np.fromiter((int(c) not in seen for c in self.candidates), dtype=bool, count=n)
        if not mask.any():
            return None
        w = self.weights[mask]
        k = min(int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right")), len(w) - 1)
        return int(self.candidates[mask][k])


def synthetic(
    num_users: int = 400,
    num_items: int = 300,
    seed: int = 0,
    *,
    num_clusters: int = 10,
    successors: int = 3,
    successor_concentration: float = 1.0,
    in_cluster_successor_prob: float = 0.85,
    follow_prob: float = 0.75,
    cluster_prob: float = 0.15,
    zipf_exponent: float = 1.0,
    two_cluster_prob: float = 0.35,
    median_length: float = 15.0,
    length_sigma: float = 0.6,
    min_length: int = 5,
    max_length: int = 60,
    cold_items: int = 2,
    name: str = "synthetic",
) -> SeqDataset:
    """Generate the project's default data set: sequences with learnable sequential structure.

    Generative process (everything from ``np.random.default_rng(seed)``, so deterministic):

    1. **Clusters** ("genres"): the item ids ``1..M`` are shuffled and cut into ``num_clusters``
       nearly equal clusters.
    2. **Popularity**: a random permutation ranks the items; item of rank ``r`` (1-based) gets
       weight ``r ** -zipf_exponent`` (Zipf). The ``cold_items`` lowest-ranked items get weight 0:
       they are in the catalogue but never generated, like Steam's item 1358, so the least
       popular item (the default attack target) has zero training interactions.
    3. **Transitions** (sparse first-order Markov chain): every generated item gets
       ``successors`` distinct successor items, each drawn (without replacement, proportionally
       to popularity) from the item's own cluster with probability ``in_cluster_successor_prob``
       and from the whole catalogue otherwise. Their transition probabilities are a
       ``Dirichlet(successor_concentration)`` draw sorted in decreasing order.
    4. **Users**: each user prefers one cluster, or two with probability ``two_cluster_prob``.
       The sequence length (train + test item) is a lognormal draw with median
       ``median_length`` and log-scale ``length_sigma``, rounded and clipped to
       ``[min_length, max_length]`` (a right-skewed distribution, like real data).
    5. **Sequences**: the first item is drawn from the preferred clusters by popularity. Each next
       item is, with probability ``follow_prob``, a successor of the current item (by transition
       probability); with probability ``cluster_prob``, a popular item of the preferred
       clusters; otherwise (noise) a popular item of the whole catalogue. A user never repeats
       an item (each draw skips items already in the sequence and falls back to the preferred
       clusters, then to the whole catalogue, when a source is exhausted).

    The result is split leave-one-out. With the defaults (400 users, 300 items) it has about
    7,000 interactions and a next-item distribution that a bigram model, and so SASRec and
    BERT4Rec, can learn; small federated runs train on it in seconds.

    Raises:
        ValueError: a parameter out of range (the message names it).
    """
    _check_synthetic_params(
        num_users=num_users,
        num_items=num_items,
        num_clusters=num_clusters,
        successors=successors,
        successor_concentration=successor_concentration,
        in_cluster_successor_prob=in_cluster_successor_prob,
        follow_prob=follow_prob,
        cluster_prob=cluster_prob,
        zipf_exponent=zipf_exponent,
        two_cluster_prob=two_cluster_prob,
        median_length=median_length,
        length_sigma=length_sigma,
        min_length=min_length,
        max_length=max_length,
        cold_items=cold_items,
    )
    rng = np.random.default_rng(seed)
    ids = np.arange(1, num_items + 1, dtype=np.int64)

    # 1. clusters
    cluster_of = np.empty(num_items + 1, dtype=np.int64)
    cluster_of[0] = -1
    clusters = np.array_split(rng.permutation(ids), num_clusters)
    for c, members in enumerate(clusters):
        cluster_of[members] = c

    # 2. popularity (index = item id; 0 unused)
    rank = np.empty(num_items + 1, dtype=np.int64)
    rank[0] = 0
    rank[rng.permutation(ids)] = np.arange(1, num_items + 1)
    popularity = np.zeros(num_items + 1, dtype=np.float64)
    popularity[1:] = rank[1:].astype(np.float64) ** -zipf_exponent
    popularity[rank > num_items - cold_items] = 0.0

    # 3. transitions: succ[i] (k ids) with probabilities succ_p[i]
    succ = np.zeros((num_items + 1, successors), dtype=np.int64)
    succ_p = np.zeros((num_items + 1, successors), dtype=np.float64)
    for item in ids[popularity[1:] > 0]:
        chosen: list[int] = []
        own = clusters[cluster_of[item]]
        for _ in range(successors):
            pool = own if rng.random() < in_cluster_successor_prob else ids
            w = popularity[pool].copy()
            w[pool == item] = 0.0
            w[np.isin(pool, chosen)] = 0.0
            if w.sum() <= 0:  # own cluster exhausted: use the whole catalogue
                pool = ids
                w = popularity[pool].copy()
                w[pool == item] = 0.0
                w[np.isin(pool, chosen)] = 0.0
            chosen.append(int(rng.choice(pool, p=w / w.sum())))
        succ[item] = chosen
        succ_p[item] = np.sort(rng.dirichlet(np.full(successors, successor_concentration)))[::-1]

    # 4./5. users and sequences
    global_sampler = _Sampler(ids, popularity[1:])
    cluster_samplers = [_Sampler(members, popularity[members]) for members in clusters]
    lengths = np.clip(
        np.rint(rng.lognormal(math.log(median_length), length_sigma, size=num_users)), min_length, max_length
    ).astype(np.int64)

    sequences: UserSequences = []
    for user in range(num_users):
        n_pref = 2 if (num_clusters >= 2 and rng.random() < two_cluster_prob) else 1
        prefs = rng.choice(num_clusters, size=n_pref, replace=False)
        members = np.concatenate([clusters[c] for c in prefs])
        pref_sampler = _Sampler(members, popularity[members]) if n_pref > 1 else cluster_samplers[prefs[0]]

        seen: set[int] = set()
        seq: list[int] = []
        current = _draw_first(rng, seen, pref_sampler, global_sampler)
        for _ in range(int(lengths[user])):
            seq.append(current)
            seen.add(current)
            if len(seq) == lengths[user]:
                break
            u = rng.random()
            nxt: int | None = None
            if u < follow_prob:
                nxt = _draw_successor(rng, seen, succ[current], succ_p[current])
            elif u >= follow_prob + cluster_prob:
                nxt = global_sampler.draw(rng, seen)
            if nxt is None:
                nxt = _draw_first(rng, seen, pref_sampler, global_sampler)
            current = nxt
        sequences.append((user, np.array(seq, dtype=np.int64)))

    return leave_one_out(sequences, name=name, num_items=num_items, min_length=2)


def _draw_first(rng: np.random.Generator, seen: set[int], pref: _Sampler, fallback: _Sampler) -> int:
    item = pref.draw(rng, seen)
    if item is None:
        item = fallback.draw(rng, seen)
    if item is None:  # excluded by the max_length check in _check_synthetic_params
        raise RuntimeError("synthetic: every generatable item is already in the sequence")
    return item


def _draw_successor(
    rng: np.random.Generator, seen: set[int], succ: IntArray, probs: NDArray[np.float64]
) -> int | None:
    """A successor not yet seen, by transition probability renormalised over unseen ones."""
    total = 0.0
    for s, p in zip(succ, probs, strict=True):
        if int(s) not in seen:
            total += float(p)
    if total <= 0.0:
        return None
    r = rng.random() * total
    last: int | None = None
    for s, p in zip(succ, probs, strict=True):
        if int(s) in seen:
            continue
        last = int(s)
        r -= float(p)
        if r < 0.0:
            return last
    return last


def _check_synthetic_params(**p: Any) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"synthetic: {msg}")

    for key in ("num_users", "num_items", "num_clusters", "successors", "min_length", "max_length"):
        if p[key] < 1:
            fail(f"{key} must be >= 1, got {p[key]}")
    for key in ("in_cluster_successor_prob", "follow_prob", "cluster_prob", "two_cluster_prob"):
        if not 0.0 <= p[key] <= 1.0:
            fail(f"{key} must be in [0, 1], got {p[key]}")
    if p["follow_prob"] + p["cluster_prob"] > 1.0:
        fail(f"follow_prob + cluster_prob must be <= 1, got {p['follow_prob'] + p['cluster_prob']}")
    if p["cold_items"] < 0:
        fail(f"cold_items must be >= 0, got {p['cold_items']}")
    live = p["num_items"] - p["cold_items"]
    if live < 2:
        fail(f"num_items - cold_items must be >= 2 items that can be generated, got {live}")
    if p["num_clusters"] > live:
        fail(f"num_clusters ({p['num_clusters']}) must be <= num_items - cold_items ({live})")
    if p["successors"] >= live:
        fail(f"successors ({p['successors']}) must be < num_items - cold_items ({live})")
    if p["min_length"] < 2:
        fail(f"min_length must be >= 2 (a test item and at least one training item), got {p['min_length']}")
    if p["max_length"] < p["min_length"]:
        fail(f"max_length ({p['max_length']}) must be >= min_length ({p['min_length']})")
    if p["max_length"] > live:
        fail(
            f"max_length ({p['max_length']}) must be <= num_items - cold_items ({live}): items do not repeat"
        )
    if not (p["successor_concentration"] > 0 and math.isfinite(p["successor_concentration"])):
        fail(f"successor_concentration must be > 0, got {p['successor_concentration']}")
    if not (p["zipf_exponent"] >= 0 and math.isfinite(p["zipf_exponent"])):
        fail(f"zipf_exponent must be >= 0, got {p['zipf_exponent']}")
    if not (p["median_length"] > 0 and math.isfinite(p["median_length"])):
        fail(f"median_length must be > 0, got {p['median_length']}")
    if not (p["length_sigma"] >= 0 and math.isfinite(p["length_sigma"])):
        fail(f"length_sigma must be >= 0, got {p['length_sigma']}")
