"""Tests for fedseq.data: loaders, leave-one-out split, stats and the synthetic generator."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from fedseq.data import (
    DataError,
    DatasetStats,
    SeqDataset,
    least_popular_item,
    leave_one_out,
    load_csv,
    load_dataset,
    load_movielens,
    load_sequences,
    preset_targets,
    stats,
    synthetic,
)

STEAM_ROOT = Path(__file__).parents[1] / "../shared/data"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _as_lists(sequences: list[tuple[int, np.ndarray]]) -> list[tuple[int, list[int]]]:
    return [(user, seq.tolist()) for user, seq in sequences]


# --------------------------------------------------------------------------------------------
# leave_one_out


def test_leave_one_out_splits_last_item_and_drops_short_users(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    sequences = [(10, [1, 2, 3]), (20, [4, 5]), (30, [6])]

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedseq.data"):
        ds = leave_one_out(sequences, name="tiny")

    # Assert
    assert ds.name == "tiny"
    assert ds.num_users == 2
    assert ds.num_items == 6  # the dropped user's item 6 is still part of the catalogue
    assert [t.tolist() for t in ds.train] == [[1, 2], [4]]
    assert ds.test.tolist() == [3, 5]
    assert ds.user_ids.tolist() == [10, 20]
    assert ds.train_lengths().tolist() == [2, 1]
    assert ds.item_counts().tolist() == [0, 1, 1, 0, 1, 0, 0]
    assert all(t.dtype == np.int64 for t in ds.train)
    assert ds.test.dtype == np.int64 and ds.user_ids.dtype == np.int64
    assert "dropped 1 of 3 users" in caplog.text


def test_leave_one_out_explicit_num_items_and_min_length() -> None:
    # Prepare
    sequences = [(1, np.array([2, 1, 3])), (2, np.array([1, 2]))]

    # Execute
    ds = leave_one_out(sequences, name="x", num_items=9, min_length=3)

    # Assert
    assert ds.num_items == 9
    assert ds.user_ids.tolist() == [1]
    assert ds.item_counts().shape == (10,)


@pytest.mark.parametrize(
    ("sequences", "kwargs", "message"),
    [
        ([(1, [1, 0, 2])], {}, "item id 0 is reserved for padding"),
        ([(1, [1, -4, 2])], {}, "item id -4 is negative"),
        ([(1, [1, 7])], {"num_items": 5}, "item id 7 exceeds num_items=5"),
        ([(1, [1, 2]), (1, [3, 4])], {}, "user 1 occurs more than once"),
        ([(1, [1]), (2, [2])], {}, "no user has at least 2 items"),
        ([(1, [[1, 2], [3, 4]])], {}, "must be 1-D"),
    ],
)
def test_leave_one_out_rejects_bad_data(sequences: list, kwargs: dict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match=message):
        leave_one_out(sequences, name="bad", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"min_length": 0}, "min_length"), ({"num_items": 0}, "num_items")]
)
def test_leave_one_out_rejects_bad_parameters(kwargs: dict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        leave_one_out([(1, [1, 2])], name="x", **kwargs)


def test_seq_dataset_rejects_inconsistent_shapes() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="2 training sequences"):
        SeqDataset(
            name="x",
            num_items=3,
            train=(np.array([1], dtype=np.int64), np.array([2], dtype=np.int64)),
            test=np.array([3], dtype=np.int64),
            user_ids=np.array([0, 1], dtype=np.int64),
        )


# --------------------------------------------------------------------------------------------
# load_sequences


def test_load_sequences_reads_users_in_file_order_and_skips_blank_lines(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "seq.txt", "7 3 1 2\n\n   \n2 5 4\t6\n")

    # Execute
    sequences = load_sequences(path)

    # Assert
    assert _as_lists(sequences) == [(7, [3, 1, 2]), (2, [5, 4, 6])]
    assert all(seq.dtype == np.int64 for _, seq in sequences)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("1 1 2\n2 3 abc 4\n", 2, "item id 'abc' is not an integer"),
        ("1 1 2\n\nx 3 4\n", 3, "user id 'x' is not an integer"),
        ("1 1 2.5\n", 1, "item id '2.5' is not an integer"),
        ("1 1 1_000\n", 1, "item id '1_000' is not an integer"),
        ("1 1 2\n2 3 0 4\n", 2, "item id 0 is reserved for padding"),
        ("1 1 -2\n", 1, "item id -2 is negative"),
        ("1 1 2\n2\n", 2, "user 2 has no items"),
        ("1 1 99999999999999999999\n", 1, "does not fit in 64 bits"),
        ("1 1 2\n2 3 4\n1 5 6\n", 3, r"duplicate user id 1 \(first seen on line 1\)"),
    ],
)
def test_load_sequences_malformed_line_reports_path_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    # Prepare
    path = _write(tmp_path, "steam.txt", text)

    # Execute
    with pytest.raises(DataError) as info:
        load_sequences(path)

    # Assert
    message = str(info.value)
    assert f"steam.txt:{line}: " in message
    assert str(path) in message
    assert re.search(reason, message), message


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_load_sequences_empty_file(tmp_path: Path, text: str) -> None:
    # Prepare
    path = _write(tmp_path, "empty.txt", text)

    # Execute / Assert
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        load_sequences(path)


def test_load_sequences_missing_file(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_sequences(tmp_path / "nope.txt")


def test_load_sequences_rejects_non_utf8(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bin.txt"
    path.write_bytes(b"1 2 3\n\xff\xfe\n")

    # Execute / Assert
    with pytest.raises(DataError, match=r"bin\.txt: not a UTF-8 text file"):
        load_sequences(path)


# --------------------------------------------------------------------------------------------
# load_movielens


def test_load_movielens_sorts_by_timestamp_and_remaps_ids(tmp_path: Path) -> None:
    # Prepare: users out of order, timestamps out of order, a timestamp tie (keeps file order)
    path = _write(
        tmp_path,
        "ratings.dat",
        "\n".join(
            [
                "5::1000::4::300",
                "2::50::3::200",
                "5::7::5::100",
                "2::7::1::100",
                "",
                "5::50::2::300",
                "2::1000::4::50",
            ]
        )
        + "\n",
    )

    # Execute
    sequences = load_movielens(path)

    # Assert: original ids 7, 50, 1000 -> 1, 2, 3
    assert _as_lists(sequences) == [(2, [3, 1, 2]), (5, [1, 3, 2])]
    assert all(seq.dtype == np.int64 for _, seq in sequences)


def test_load_movielens_is_deterministic(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "ratings.dat", "1::10::5::3\n1::20::5::1\n2::30::1::2\n")

    # Execute
    first, second = load_movielens(path), load_movielens(path)

    # Assert
    assert _as_lists(first) == _as_lists(second) == [(1, [2, 1]), (2, [3])]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("1::2::3::4\n1::2::3\n", 2, "expected 4 fields separated by '::', got 3"),
        ("1::2::3::4::5\n", 1, "expected 4 fields separated by '::', got 5"),
        ("1::2::3::4\n\n1::abc::3::4\n", 3, "movie id 'abc' is not an integer"),
        ("u1::2::3::4\n", 1, "user id 'u1' is not an integer"),
        ("1::2::3::noon\n", 1, "timestamp 'noon' is not an integer"),
        ("1::2::good::4\n", 1, "rating 'good' is not a number"),
        ("1::2_0::3::4\n", 1, "movie id '2_0' is not an integer"),
    ],
)
def test_load_movielens_malformed_line_reports_path_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    # Prepare
    path = _write(tmp_path, "ratings.dat", text)

    # Execute
    with pytest.raises(DataError) as info:
        load_movielens(path)

    # Assert
    message = str(info.value)
    assert f"{path}:{line}: {reason}" in message


def test_load_movielens_empty_file(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "ratings.dat", "\n")

    # Execute / Assert
    with pytest.raises(DataError, match=r"ratings\.dat: empty file"):
        load_movielens(path)


# --------------------------------------------------------------------------------------------
# load_csv


def test_load_csv_with_reordered_and_extra_columns(tmp_path: Path) -> None:
    # Prepare: header in another order, mixed case, an extra column, a quoted field, a tie
    path = _write(
        tmp_path,
        "log.csv",
        "rating, Timestamp ,ITEM,note,user\n"
        '5,30,900,"a, b",1\n'
        "4,10,12,x,1\n"
        "3,20.5,900,y,3\n"
        "\n"
        "2,30,44,z,1\n"
        "1,5,12,w,3\n",
    )

    # Execute
    sequences = load_csv(path)

    # Assert: original ids 12, 44, 900 -> 1, 2, 3; user 1's tie at t=30 keeps file order
    assert _as_lists(sequences) == [(1, [1, 3, 2]), (3, [1, 3])]


def test_load_csv_accepts_utf8_bom(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffuser,item,timestamp\n1,5,2\n1,6,1\n".encode())

    # Execute
    sequences = load_csv(path)

    # Assert
    assert _as_lists(sequences) == [(1, [2, 1])]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("user,rating\n1,2\n", 1, "missing column(s) item, timestamp"),
        ("\nuser,item,time\n1,2,3\n", 2, "missing column(s) timestamp"),
        ("user,item,timestamp,user\n1,2,3,4\n", 1, "column(s) user appear more than once"),
        ("user,item,timestamp\n1,2,3\n1,2\n", 3, "expected 3 fields, got 2"),
        ("user,item,timestamp\n1,2,3\n1,x,4\n", 3, "item id 'x' is not an integer"),
        ("user,item,timestamp\n1,2,soon\n", 2, "timestamp 'soon' is not a number"),
        ("user,item,timestamp\n1,2,nan\n", 2, "timestamp 'nan' is not finite"),
    ],
)
def test_load_csv_malformed_reports_path_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    # Prepare
    path = _write(tmp_path, "log.csv", text)

    # Execute
    with pytest.raises(DataError) as info:
        load_csv(path)

    # Assert
    assert f"{path}:{line}: {reason}" in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"), [("", "empty file"), ("user,item,timestamp\n\n", "no interactions")]
)
def test_load_csv_empty(tmp_path: Path, text: str, reason: str) -> None:
    # Prepare
    path = _write(tmp_path, "log.csv", text)

    # Execute / Assert
    with pytest.raises(DataError, match=rf"log\.csv: {reason}"):
        load_csv(path)


# --------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_dispatches_on_file_type(tmp_path: Path) -> None:
    # Prepare
    ml = _write(tmp_path, "ratings.dat", "1::10::5::2\n1::20::5::1\n")
    seq_dat = _write(tmp_path, "seq.dat", "1 2 3\n")
    seq_txt = _write(tmp_path, "seq.txt", "1 2 3\n")
    log = _write(tmp_path, "log.csv", "user,item,timestamp\n1,30,2\n1,10,1\n")

    # Execute
    datasets = [load_dataset(str(p)) for p in (ml, seq_dat, seq_txt, log)]

    # Assert
    assert [(ds.train[0].tolist(), int(ds.test[0])) for ds in datasets] == [
        ([2], 1),
        ([2], 3),
        ([2], 3),
        ([1], 2),
    ]
    assert datasets[0].name == str(ml)


def test_load_dataset_named_uses_data_root(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "steam").mkdir()
    _write(tmp_path / "steam", "sequences.txt", "1 1 2 3\n2 3 4\n")
    (tmp_path / "ml-1m").mkdir()
    _write(tmp_path / "ml-1m", "ratings.dat", "1::5::3::1\n1::9::3::2\n")

    # Execute
    steam = load_dataset("steam", tmp_path)
    ml = load_dataset("ml-1m", str(tmp_path))

    # Assert
    assert (steam.name, steam.num_users, steam.num_items) == ("steam", 2, 4)
    assert (ml.name, ml.train[0].tolist(), ml.test.tolist()) == ("ml-1m", [1], [2])


def test_load_dataset_reads_data_root_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    (tmp_path / "steam").mkdir()
    _write(tmp_path / "steam", "sequences.txt", "4 1 2\n")
    monkeypatch.setenv("FEDSEQ_DATA_ROOT", str(tmp_path))

    # Execute
    ds = load_dataset("steam")

    # Assert
    assert ds.user_ids.tolist() == [4]


def test_load_dataset_missing_named_file_says_where_it_looked(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(DataError) as info:
        load_dataset("ml-1m", tmp_path)

    # Assert
    message = str(info.value)
    assert str(tmp_path / "ml-1m" / "ratings.dat") in message
    assert "FEDSEQ_DATA_ROOT" in message


def test_load_dataset_missing_path(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        load_dataset(str(tmp_path / "missing.txt"))


def test_load_dataset_synthetic_uses_seed() -> None:
    # Execute
    a, b = load_dataset("synthetic", seed=3), synthetic(seed=3)

    # Assert
    assert a.name == "synthetic"
    assert np.array_equal(a.test, b.test)


# --------------------------------------------------------------------------------------------
# stats and least_popular_item


def test_stats_on_tiny_case_is_exact() -> None:
    # Prepare: items 1..10, item 9 only as a test item, item 10 never
    ds = leave_one_out([(1, [1, 2, 3, 4]), (2, [2, 5]), (3, [6, 7, 8, 2, 9])], name="t", num_items=10)

    # Execute
    result = stats(ds)

    # Assert
    assert result == DatasetStats(
        users=3,
        items=10,
        interactions=11,
        train_interactions=8,
        mean_len=11 / 3,
        median_len=4.0,
        max_len=5,
        min_len=2,
        sparsity=1 - 11 / 30,
        distinct_items=9,
    )
    assert result.as_dict()["distinct_items"] == 9
    text = result.format()
    assert "11 (8 train + 3 test)" in text and "63.33%" in text


def test_least_popular_item_breaks_ties_by_lowest_id() -> None:
    # Prepare: train counts 1 -> 1, 2 -> 1, 3 -> 2, 4 -> 2 (tie at 1 between items 1 and 2)
    first = leave_one_out([(1, [1, 2, 3, 4, 2]), (2, [4, 3, 1])], name="a")
    # train counts 1 -> 2, 2 -> 1, 3 -> 1, 4 -> 1 (tie at 1 between items 2, 3 and 4)
    second = leave_one_out([(1, [1, 1, 2, 3, 4, 3])], name="b")

    # Execute / Assert
    assert least_popular_item(first) == 1
    assert least_popular_item(second) == 2


def test_least_popular_item_includes_items_without_training_interactions() -> None:
    # Prepare: item 3 only as a test item, items 4 and 5 never occur
    ds = leave_one_out([(1, [1, 2, 3]), (2, [2, 1, 3])], name="c", num_items=5)

    # Execute / Assert
    assert least_popular_item(ds) == 3


# --------------------------------------------------------------------------------------------
# synthetic


def _top3_transition_share(train: tuple[np.ndarray, ...], num_items: int) -> float:
    """Fraction of next-item transitions that go to one of the source item's 3 commonest successors."""
    counts = np.zeros((num_items + 1, num_items + 1), dtype=np.int64)
    for seq in train:
        np.add.at(counts, (seq[:-1], seq[1:]), 1)
    return float(np.sort(counts, axis=1)[:, -3:].sum() / counts.sum())


def test_synthetic_is_deterministic_given_seed() -> None:
    # Execute
    a, b, c = synthetic(seed=5), synthetic(seed=5), synthetic(seed=6)

    # Assert
    assert a.num_items == b.num_items and np.array_equal(a.test, b.test)
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    assert not np.array_equal(a.test, c.test)


def test_synthetic_defaults_have_the_documented_shape() -> None:
    # Execute
    ds = synthetic()
    lengths = ds.train_lengths() + 1

    # Assert
    assert (ds.name, ds.num_users, ds.num_items) == ("synthetic", 400, 300)
    assert lengths.min() >= 5 and lengths.max() <= 60
    assert np.median(lengths) < lengths.mean()  # right-skewed lengths
    for seq, test in zip(ds.train, ds.test, strict=True):
        full = np.append(seq, test)
        assert full.min() >= 1 and full.max() <= ds.num_items
        assert len(np.unique(full)) == len(full)  # no repeated items within a user
    counts = ds.item_counts()[1:]
    assert np.sort(counts)[-10:].sum() > 5 * np.sort(counts[counts > 0])[:10].sum()  # popularity skew


def test_synthetic_target_item_is_cold() -> None:
    # Execute
    ds = synthetic(seed=2)
    target = least_popular_item(ds)

    # Assert
    assert 1 <= target <= ds.num_items
    assert ds.item_counts()[target] == 0
    assert target not in ds.test


def test_synthetic_has_concentrated_sequential_structure() -> None:
    # Prepare
    ds = synthetic(seed=0)
    rng = np.random.default_rng(0)
    shuffled = tuple(rng.permutation(seq) for seq in ds.train)

    # Execute
    share = _top3_transition_share(ds.train, ds.num_items)
    null_share = _top3_transition_share(shuffled, ds.num_items)

    # Assert: uniform would give ~3/300; order-destroyed sequences keep only the popularity effect
    assert share > 0.6
    assert share > 2 * null_share


def test_synthetic_next_item_is_predictable_from_the_last_item() -> None:
    # Prepare: a bigram "model" from the training transitions vs a popularity ranking
    ds = synthetic(seed=1)
    transitions = np.zeros((ds.num_items + 1, ds.num_items + 1))
    for seq in ds.train:
        np.add.at(transitions, (seq[:-1], seq[1:]), 1)
    popularity = ds.item_counts().astype(float)

    # Execute: HR@10 of the held-out item, ranking unseen items only
    def hit_rate(score_fn) -> float:
        hits = 0
        for seq, test in zip(ds.train, ds.test, strict=True):
            scores = score_fn(seq)
            scores[seq] = -np.inf
            scores[0] = -np.inf
            hits += int(test in np.argsort(-scores, kind="stable")[:10])
        return hits / ds.num_users

    bigram = hit_rate(lambda seq: transitions[seq[-1]] + 1e-3 * popularity / popularity.max())
    popular = hit_rate(lambda seq: popularity.copy())

    # Assert
    assert bigram > 0.5
    assert bigram > 2 * popular


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_users": 0}, "num_users must be >= 1"),
        ({"num_items": 20, "max_length": 60}, r"max_length \(60\) must be <= num_items - cold_items"),
        ({"follow_prob": 0.9, "cluster_prob": 0.2}, "follow_prob \\+ cluster_prob must be <= 1"),
        ({"follow_prob": 1.5}, r"follow_prob must be in \[0, 1\]"),
        ({"min_length": 1}, "min_length must be >= 2"),
        ({"min_length": 10, "max_length": 5}, "max_length"),
        ({"num_clusters": 400}, "num_clusters"),
        ({"successors": 299}, "successors"),
        ({"cold_items": -1}, "cold_items"),
        ({"zipf_exponent": -1.0}, "zipf_exponent"),
        ({"median_length": 0.0}, "median_length"),
        ({"successor_concentration": 0.0}, "successor_concentration"),
    ],
)
def test_synthetic_validates_parameters(kwargs: dict, message: str) -> None:
    # Execute / Assert: a DataError, which the `fedseq` command prints in one line (no traceback)
    with pytest.raises(DataError, match=message):
        synthetic(**kwargs)


def test_synthetic_small_custom_configuration() -> None:
    # Execute
    ds = synthetic(
        num_users=20, num_items=12, seed=4, num_clusters=3, min_length=3, max_length=8, cold_items=1
    )

    # Assert
    assert ds.num_users == 20 and ds.num_items == 12
    assert ds.item_counts()[least_popular_item(ds)] == 0
    assert (ds.train_lengths() + 1).max() <= 8


# --------------------------------------------------------------------------------------------
# real data


def test_steam_numbers() -> None:
    # Prepare
    if not (STEAM_ROOT / "steam" / "sequences.txt").is_file():
        pytest.skip(f"Steam data not found under {STEAM_ROOT}")

    # Execute
    ds = load_dataset("steam", STEAM_ROOT)
    summary = stats(ds)

    # Assert
    assert ds.num_users == 3753
    assert ds.num_items == 5134
    assert int(ds.train_lengths().sum()) == 110960
    assert least_popular_item(ds) == 1358
    assert ds.item_counts()[1358] == 0
    assert summary.distinct_items == 5092
    assert round(summary.sparsity, 4) == 0.9940


def test_synthetic_seed_key_fixes_the_data_across_run_seeds() -> None:
    """``synthetic:seed=N`` draws the data with N whatever the run's seed; without it the run's
    seed draws it."""
    # Prepare / Execute
    fixed = [load_dataset("synthetic:users=40,items=50,max_length=20,seed=7", seed=s) for s in (0, 1)]
    by_run = [load_dataset("synthetic:users=40,items=50,max_length=20", seed=s) for s in (7, 1)]
    # Assert
    def lists(ds: SeqDataset) -> list[list[int]]:
        return [np.asarray(x).tolist() for x in ds.train]

    assert lists(fixed[0]) == lists(fixed[1]) == lists(by_run[0])
    assert lists(by_run[1]) != lists(by_run[0])
    with pytest.raises(DataError, match="seed"):
        load_dataset("synthetic:seed=x", seed=0)


def test_target_presets_rank_items_by_training_popularity() -> None:
    """least-popular: the zero-count item; popular: the top-5% boundary of the interacted items
    (here the top one); mid-tail: their median; several: spread over their tail half (ties to the
    lower id)."""
    # Prepare: training counts item1: 4, item2: 3, item3: 2, item4: 1, item5: 1, item6: 0
    seqs = [(0, np.array([1, 2, 3, 4, 9])), (1, np.array([1, 2, 3, 5, 9])), (2, np.array([1, 2, 9])),
            (3, np.array([1, 9]))]
    ds = leave_one_out(seqs, name="hand", num_items=9)
    counts = ds.item_counts()
    assert counts[1:7].tolist() == [4, 3, 2, 1, 1, 0]
    # Execute / Assert
    assert preset_targets(ds, "least-popular") == (6,)
    assert preset_targets(ds, "popular") == (1,)
    assert preset_targets(ds, "mid-tail") == (3,)  # ranked 1, 2, 3, 4, 5: the middle
    assert preset_targets(ds, "several", several=2) == (3, 5)  # tail half 3, 4, 5: its ends
    with pytest.raises(ValueError, match="presets"):
        preset_targets(ds, "hot")


def test_a_file_format_is_one_registry_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file formats are a registry (``loaders.FORMATS``, tried in order): a new one is its
    loader and one line, and the existing ones keep their files."""
    from fedseq.data import loaders

    # Prepare: a tab-separated "user<TAB>item" format registered before the catch-all
    def load_tsv(path: Path) -> list[tuple[int, np.ndarray]]:
        by_user: dict[int, list[int]] = {}
        for line in path.read_text().splitlines():
            user, item = line.split("\t")
            by_user.setdefault(int(user), []).append(int(item))
        return [(u, np.asarray(v, dtype=np.int64)) for u, v in by_user.items()]

    tsv = loaders.FileFormat("tsv", lambda p: p.suffix == ".tsv", load_tsv)
    monkeypatch.setattr(loaders, "FORMATS", (tsv, *loaders.FORMATS))
    path = tmp_path / "d.tsv"
    path.write_text("7\t1\n7\t2\n7\t3\n9\t2\n9\t3\n9\t1\n")
    seqs = tmp_path / "d.txt"
    seqs.write_text("7 1 2 3\n9 2 3 1\n")
    # Execute
    got = load_dataset(str(path))
    same = load_dataset(str(seqs))
    # Assert: the new format read the file, as the sequence format reads the same users
    assert [f.name for f in loaders.FORMATS] == ["tsv", "csv", "movielens", "sequences"]
    assert got.num_users == same.num_users == 2
    assert [t.tolist() for t in got.train] == [t.tolist() for t in same.train]
