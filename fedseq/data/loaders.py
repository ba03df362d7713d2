"""Loading data sets: the three file formats, the named sets (steam, ml-1m) and :func:`load_dataset`.

File formats:

- the sequence format (``user_id item_1 ... item_n`` per line, 1-based ids, chronological), which
  is how the DV-FSR Steam data ships (:func:`load_sequences`);
- MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) (:func:`load_movielens`);
- a CSV interaction log with ``user``, ``item`` and ``timestamp`` columns (:func:`load_csv`).

:func:`load_dataset` maps a spec (``"synthetic"``, ``"steam"``, ``"ml-1m"`` or a file path) to a
:class:`SeqDataset`. Malformed files raise :class:`DataError` with ``path:line: reason``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .base import DataError, IntArray, SeqDataset, UserSequences
from .generator import synthetic
from .split import leave_one_out

__all__ = ["DATA_CACHE_ENV", "DATA_ROOT_ENV", "load_csv", "load_dataset", "load_movielens", "load_sequences"]

DATA_ROOT_ENV = "FEDSEQ_DATA_ROOT"
"""Environment variable naming the folder that holds ``steam/`` and ``ml-1m/``."""

DATA_CACHE_ENV = "FEDSEQ_DATA_CACHE"
"""Environment variable naming a folder where vectorized synthetic data sets are written once and
memory-mapped by every process that loads them (unset: each process generates its own)."""

_NAMED_FILES: dict[str, tuple[str, ...]] = {
    "steam": ("steam", "sequences.txt"),
    "ml-1m": ("ml-1m", "ratings.dat"),
}

# A line of whitespace-separated ASCII integers (the fast path of the sequence parser).
_INT_LINE = re.compile(r"[+-]?[0-9]+(?:[ \t]+[+-]?[0-9]+)*", re.ASCII)
_INT_TOKEN = re.compile(r"[+-]?[0-9]+", re.ASCII)
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT64_MIN = int(np.iinfo(np.int64).min)


# --------------------------------------------------------------------------------------------
# File formats


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
            Path(__file__).resolve().parents[2] / ".." / "shared" / "data",
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


@dataclass(frozen=True)
class FileFormat:
    """A data set file format: ``matches(path)`` says whether a file is in it, ``load(path)``
    reads its users' chronological item sequences."""

    name: str
    matches: Callable[[Path], bool]
    load: Callable[[Path], UserSequences]


#: The file formats, tried in order; the last one takes any file. A new format is its loader
#: function and one line here (docs/architecture.md).
FORMATS: tuple[FileFormat, ...] = (
    FileFormat("csv", lambda p: p.suffix.lower() == ".csv", load_csv),
    FileFormat("movielens", lambda p: p.suffix.lower() == ".dat" and _sniff_dat(p), load_movielens),
    FileFormat("sequences", lambda p: True, load_sequences),
)


def _load_file(path: Path, name: str, min_length: int) -> SeqDataset:
    if not path.is_file():
        raise DataError(
            f"dataset file {path} does not exist; pass an existing file path, or one of "
            f"'synthetic', {', '.join(repr(k) for k in _NAMED_FILES)}"
        )
    fmt = next(f for f in FORMATS if f.matches(path))
    return leave_one_out(fmt.load(path), name=name, min_length=min_length)


def load_dataset(spec: str, data_root: str | Path | None = None, seed: int = 0) -> SeqDataset:
    """Load a data set by name or path and split it leave-one-out.

    ``spec`` is one of:

    - ``"synthetic"``: :func:`synthetic` with its defaults and ``seed``;
      ``"synthetic:users=N,items=M"`` overrides its integer/float parameters (any keyword of
      :func:`synthetic`, e.g. ``synthetic:users=2000,items=800,follow_prob=0.6``); ``seed=N``
      draws the data with seed N instead of the run's seed, so runs with different seeds share
      one data set (as they do on Steam);
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
        params = _synthetic_params(spec)
        data_seed = int(params.pop("seed", seed))  # synthetic:seed=N fixes the data across run seeds
        cache = os.environ.get(DATA_CACHE_ENV)
        if cache and params.get("vectorized"):
            return _cached_synthetic(Path(cache), data_seed, params)
        return synthetic(seed=data_seed, **params)
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


def _cached_synthetic(folder: Path, seed: int, params: dict[str, Any]) -> SeqDataset:
    """The vectorized synthetic data set for ``(seed, params)`` from ``folder``: generated and
    written by the first process that asks (under a file lock, files renamed into place), then
    memory-mapped read-only by every process, so processes on one machine share one copy of the
    training items through the page cache and only the first one pays the generation."""
    import fcntl
    import hashlib
    import json

    from .ragged import Ragged

    key = hashlib.sha256(json.dumps({"seed": seed, **params, "format": 1}, sort_keys=True).encode()).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"synthetic-{key}"
    meta_path = stem.with_name(stem.name + ".json")
    with open(stem.with_name(stem.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not meta_path.exists():
            ds = synthetic(seed=seed, **params)
            assert isinstance(ds.train, Ragged)
            tmp = stem.with_name(stem.name + f".tmp{os.getpid()}")
            ds.train.save(tmp)
            np.save(tmp.with_name(tmp.name + ".test.npy"), ds.test)
            for suffix in (".flat.npy", ".offsets.npy", ".test.npy"):
                os.replace(tmp.with_name(tmp.name + suffix), stem.with_name(stem.name + suffix))
            meta_path.write_text(json.dumps({"seed": seed, "params": params, "num_items": ds.num_items,
                                             "name": ds.name}))
            del ds
    meta = json.loads(meta_path.read_text())
    train = Ragged.load(stem, mmap=True)
    test = np.load(stem.with_name(stem.name + ".test.npy"))
    return SeqDataset(name=meta["name"], num_items=int(meta["num_items"]), train=train, test=test,
                      user_ids=np.arange(len(train), dtype=np.int64))


def _synthetic_params(spec: str) -> dict[str, Any]:
    """Parse ``synthetic:k=v,...`` (``users``/``items`` alias ``num_users``/``num_items``)."""
    import inspect

    allowed = {p for p in inspect.signature(synthetic).parameters if p != "name"}
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
