"""Tests for fedseq.codec.FlatCodec, the fast path of update uploads: its bytes equal
``pack(encode_state(...))`` for every encoding, with and without a hint of touched rows (exact,
too wide, too narrow, out of range); its decode equals ``decode_state(unpack(...))`` bit for bit;
and it never accepts a container the general path would refuse (it answers False and leaves the
verdict to the general path). Also: compute_updates' item rows cover every nonzero item row."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseq.codec import CODEC_NAMES, SPARSE_TABLES, CodecError, FlatCodec, decode_state, encode_state, pack, unpack
from fedseq.models import build_model
from fedseq.models.common import reference_init
from fedseq.params import Layout, get_vector
from fedseq.training import ITEM_TABLE, LocalConfig, compute_updates
from server.intake import check_schema

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = ("item_emb.weight", "pos_emb.weight", "blocks.0.w.weight", "blocks.0.w.bias", "last.scale")
SHAPES = ((300, 8), (11, 8), (8, 8), (8,), ())
ITEMS, HID = SHAPES[0]
DIM = sum(int(np.prod(s)) for s in SHAPES)
SPARSE = frozenset(SPARSE_TABLES)


def reference(vec: torch.Tensor, encoding: str) -> bytes:
    """The general path: the layout's tensors through encode_state and pack."""
    tensors = Layout(NAMES, SHAPES).unflatten(vec)
    return pack(encode_state(tensors, encoding, sparse_ok=lambda n: n in SPARSE))


def general_decode(blob: bytes) -> torch.Tensor:
    dec = decode_state(unpack(blob))
    return torch.cat([dec[n].reshape(-1).to(torch.float32) for n in NAMES])


def update(seed: int, touched: int, scale: float, neg_zero: bool, tiny_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat update: ``touched`` item rows nonzero (optionally one holding only -0.0 and one below
    fp16's range), a few position rows, dense rest. Returns (vector, touched rows)."""
    g = torch.Generator().manual_seed(seed)
    vec = torch.zeros(DIM)
    table = vec[: ITEMS * HID].view(ITEMS, HID)
    rows = torch.randperm(ITEMS, generator=g)[:touched]
    table[rows] = torch.randn(len(rows), HID, generator=g) * scale
    if neg_zero and touched:
        table[rows[0]] = -0.0
    if tiny_row and touched > 1:
        table[rows[1]] = 1e-9  # nonzero in fp32, +0.0 in fp16: stored by sparse-fp32 only
    pos = vec[ITEMS * HID : ITEMS * HID + 88].view(11, HID)
    pos[: seed % 11] = torch.randn(seed % 11, HID, generator=g)
    vec[ITEMS * HID + 88 :] = torch.randn(DIM - ITEMS * HID - 88, generator=g)
    return vec, rows


@SETTINGS
@given(seed=st.integers(0, 10_000), touched=st.integers(0, 40), scale=st.sampled_from([1.0, 1e-3, 1e-6]),
       neg_zero=st.booleans(), tiny_row=st.booleans())
def test_flat_encode_equals_the_general_path_for_every_encoding_and_hint(seed, touched, scale, neg_zero, tiny_row):
    # Prepare
    vec, rows = update(seed, touched, scale, neg_zero, tiny_row)
    hints = {
        "none": None,
        "exact": {ITEM_TABLE: rows},
        "with repeats and padding row": {ITEM_TABLE: torch.cat([torch.zeros(3, dtype=torch.long), rows, rows])},
        "every row": {ITEM_TABLE: torch.arange(ITEMS)},
        "too narrow": {ITEM_TABLE: rows[: len(rows) // 2]},
        "out of range": {ITEM_TABLE: torch.cat([rows, torch.tensor([ITEMS])])},
        "negative": {ITEM_TABLE: torch.cat([rows, torch.tensor([-1])])},
        "numpy": {ITEM_TABLE: rows.numpy()},
    }
    for encoding in CODEC_NAMES:
        flat = FlatCodec(NAMES, SHAPES, encoding, SPARSE)
        want = reference(vec, encoding)
        # Execute / Assert: the same bytes whatever the hint
        for label, hint in hints.items():
            assert flat.encode(vec, hint) == want, (encoding, label)


@pytest.mark.parametrize("encoding", CODEC_NAMES)
def test_flat_decode_equals_the_general_path_bit_for_bit(encoding):
    for seed in range(6):
        # Prepare: a row full of NaN, so every element the decode leaves alone would show
        vec, _ = update(seed, 5 + seed, 1.0, seed % 2 == 0, seed % 3 == 0)
        blob = reference(vec, encoding)
        row = torch.full((DIM,), float("nan"))
        # Execute
        ok = FlatCodec(NAMES, SHAPES, encoding, SPARSE).decode_into(blob, row)
        # Assert
        assert ok
        assert np.array_equal(row.numpy().view(np.uint32), general_decode(blob).numpy().view(np.uint32))


@pytest.mark.parametrize("encoding", CODEC_NAMES)
def test_a_reused_row_clears_only_its_dirty_table_rows_and_still_decodes_bit_for_bit(encoding):
    # Prepare: one row decoded into again and again (the server's reused round matrix), with
    # different touched rows each time; between them a refused container and a general-path write
    flat = FlatCodec(NAMES, SHAPES, encoding, SPARSE)
    row = torch.full((DIM,), float("nan"))
    dirty: dict = {}
    for seed in range(8):
        vec, _ = update(seed, 3 + 4 * (seed % 3), 1.0, False, seed % 2 == 1)
        blob = reference(vec, encoding)
        if seed == 3:  # a refused container leaves the row partly written: the caller clears dirty
            bad = bytearray(blob)
            bad[-1] ^= 0xFF
            assert not flat.decode_into(bytes(bad), row, dirty)
            dirty.clear()
        if seed == 5:  # the general path writes the whole row (dirty stays cleared)
            Layout(NAMES, SHAPES).flatten_into(decode_state(unpack(blob)), row)
            dirty.clear()
            row[:] = float("nan")
        # Execute
        ok = flat.decode_into(blob, row, dirty)
        # Assert: the row equals a fresh decode; dirty names the stored rows of the sparse tables
        assert ok
        assert np.array_equal(row.numpy().view(np.uint32), general_decode(blob).numpy().view(np.uint32)), seed
        if encoding.startswith("sparse-"):
            table = row[: ITEMS * HID].view(ITEMS, HID)
            assert set(dirty) == {"item_emb.weight", "pos_emb.weight"}
            assert set(np.flatnonzero(table.numpy().view(np.uint32).any(axis=1))) <= set(dirty[ITEM_TABLE].tolist())
        else:
            assert dirty == {}  # dense tables are written whole


@pytest.mark.parametrize("encoding", CODEC_NAMES)
def test_flat_output_passes_the_server_schema_check(encoding):
    blob = FlatCodec(NAMES, SHAPES, encoding, SPARSE).encode(update(1, 9, 1.0, False, False)[0])
    assert check_schema(unpack(blob), Layout(NAMES, SHAPES), encoding) is None


def _general_verdict(blob: bytes) -> torch.Tensor | None:
    try:
        return general_decode(blob)
    except CodecError:
        return None


@pytest.mark.parametrize("encoding", ["sparse-fp32", "sparse-fp16", "dense-fp32"])
def test_flat_decode_never_accepts_what_the_general_path_refuses(encoding):
    # Prepare: a small container, then every single-byte corruption, truncation and extension of it
    names, shapes = ("item_emb.weight", "pos_emb.weight", "b"), ((6, 2), (3, 2), (3,))
    flat = FlatCodec(names, shapes, encoding, SPARSE)
    vec = torch.tensor([0, 0, 1.5, -2, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0.25, 0, 1, 2, 3], dtype=torch.float32)
    blob = flat.encode(vec)
    variants = [blob[:i] + bytes([blob[i] ^ 0x40]) + blob[i + 1 :] for i in range(len(blob))]
    variants += [blob[:i] for i in range(len(blob))] + [blob + b"\0", blob + blob]
    for bad in variants:
        row = torch.zeros(flat.dim)
        # Execute
        ok = flat.decode_into(bad, row)
        # Assert: accepted only with the general path's values (a corruption the CRC cannot see)
        if ok:
            general = _general_verdict(bad)
            assert general is not None and torch.equal(row, torch.cat([general[: flat.dim]]))


def _with_crc(blob: bytes, record_start: int, data_end: int) -> bytes:
    """``blob`` with the CRC of the record [record_start, data_end) recomputed."""
    crc = zlib.crc32(blob[record_start:data_end])
    return blob[:data_end] + struct.pack("<I", crc) + blob[data_end + 4 :]


def test_flat_decode_leaves_valid_but_other_containers_to_the_general_path():
    flat = FlatCodec(NAMES, SHAPES, "sparse-fp32", SPARSE)
    vec, _ = update(3, 7, 1.0, False, False)
    tensors = Layout(NAMES, SHAPES).unflatten(vec)
    others = {
        "other order": pack(encode_state(dict(reversed(list(tensors.items()))), "sparse-fp32",
                                         sparse_ok=lambda n: n in SPARSE)),
        "dense tables": pack(encode_state(tensors, "dense-fp32")),
        "float64 dtype": pack(encode_state({n: t.double() for n, t in tensors.items()}, "sparse-fp32",
                                           sparse_ok=lambda n: n in SPARSE)),
        "other encoding": reference(vec, "sparse-fp16"),
    }
    for label, blob in others.items():
        assert not flat.decode_into(blob, torch.zeros(DIM)), label
        assert _general_verdict(blob) is not None, label  # valid: the general path decides


def test_flat_decode_refuses_non_finite_values_even_with_a_valid_crc():
    flat = FlatCodec(NAMES, SHAPES, "sparse-fp32", SPARSE)
    vec, _ = update(4, 3, 1.0, False, False)
    blob = flat.encode(vec)
    # the last record is the 0-D dense scalar: its 4 data bytes sit just before its CRC
    start = blob.rfind(struct.pack("<H", len(NAMES[-1])) + NAMES[-1].encode())
    nan = blob[:-8] + struct.pack("<f", float("nan")) + blob[-4:]
    bad = _with_crc(nan, start, len(blob) - 4)
    with pytest.raises(CodecError, match="non-finite"):
        decode_state(unpack(bad))
    assert not flat.decode_into(bad, torch.zeros(DIM))
    # a NaN in a stored sparse row: encoding it raises exactly the general path's error
    vec[5] = float("nan")
    with pytest.raises(CodecError) as fast:
        flat.encode(vec, {ITEM_TABLE: torch.tensor([0])})
    with pytest.raises(CodecError) as general:
        reference(vec, "sparse-fp32")
    assert str(fast.value) == str(general.value)


@pytest.mark.parametrize(("encoding", "at", "value"), [
    ("sparse-fp32", -20, float("inf")), ("dense-fp16", -20, float("nan")), ("int8-row", -20, float("inf")),
    ("dense-fp16", -20, 70000.0), ("dense-bf16", -20, 3.4e38), ("sparse-fp16", -20, 70000.0),
    ("sparse-fp16", None, 70000.0), ("sparse-fp32", None, float("-inf")),
])
def test_flat_encode_raises_the_general_paths_errors(encoding, at, value):
    vec, rows = update(5, 4, 1.0, False, False)
    vec[int(rows[2]) * HID + 1 if at is None else at] = value  # in a dense tensor, or in a touched item row
    with pytest.raises(CodecError) as fast:
        FlatCodec(NAMES, SHAPES, encoding, SPARSE).encode(vec, {ITEM_TABLE: rows})
    with pytest.raises(CodecError) as general:
        reference(vec, encoding)
    assert str(fast.value) == str(general.value)


def test_huge_but_finite_values_take_the_exact_check_and_still_round_trip():
    # the one-pass finiteness test (a dot product) overflows on them; the exact check decides
    flat = FlatCodec(NAMES, SHAPES, "sparse-fp32", SPARSE)
    vec, rows = update(6, 4, 1.0, False, False)
    vec[-30:] = 3e38
    blob = flat.encode(vec, {ITEM_TABLE: rows})
    assert blob == reference(vec, "sparse-fp32")
    row = torch.zeros(DIM)
    assert not flat.decode_into(blob, row)  # left to the general path, which accepts it
    assert torch.equal(general_decode(blob), vec)


def test_other_dtypes_and_wrong_sizes():
    flat = FlatCodec(NAMES, SHAPES, "sparse-fp32", SPARSE)
    vec, _ = update(7, 4, 1.0, False, False)
    assert flat.encode(vec.double()) == pack(encode_state(Layout(NAMES, SHAPES).unflatten(vec.double()),
                                                          "sparse-fp32", sparse_ok=lambda n: n in SPARSE))
    with pytest.raises(CodecError, match="expected"):
        flat.encode(vec[:-1])
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        flat.decode_into(flat.encode(vec), torch.zeros(DIM - 1))
    assert FlatCodec.of(NAMES, SHAPES, "sparse-fp32", SPARSE) is FlatCodec.of(NAMES, SHAPES, "sparse-fp32", SPARSE)


def test_compute_updates_item_rows_cover_every_nonzero_item_row():
    # Prepare: a tiny SASRec and a few users
    model = build_model("sasrec", 30, hidden=8, heads=2, ffn=16, max_len=10)
    reference_init(model, 1)
    layout = Layout.of(model)
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, 31), size=n, replace=False).astype(np.int64) for n in (2, 5, 9, 12)]
    for mode in ("paper", "fedavg"):
        # Execute
        ub = compute_updates(model, get_vector(model), seqs, [1, 2, 3, 4], 0, 0, LocalConfig(mode=mode, local_epochs=2))
        # Assert: the rows named hold every nonzero row, and the fast encode equals the general one
        assert ub.item_rows is not None and len(ub.item_rows) == 4
        flat = FlatCodec.of(layout.names, layout.shapes, "sparse-fp32", SPARSE)
        for i in range(4):
            table = layout.unflatten(ub.updates[i])[ITEM_TABLE]
            nonzero = set(torch.nonzero(table.abs().sum(dim=1)).flatten().tolist())
            assert nonzero and nonzero <= set(ub.item_rows[i].tolist())
            blob = flat.encode(ub.updates[i], {ITEM_TABLE: ub.item_rows[i]})
            assert blob == pack(encode_state(layout.unflatten(ub.updates[i]), "sparse-fp32",
                                             sparse_ok=lambda n: n in SPARSE))


@pytest.mark.parametrize(("encoding", "value"), [("dense-fp16", 65510.0), ("sparse-fp16", 65519.0),
                                                 ("dense-bf16", 3.3895e38)])
def test_values_near_the_half_range_take_the_exact_check(encoding, value):
    # above the one-pass bound but still finite after rounding: same bytes as the general path
    vec, rows = update(8, 4, 1.0, False, False)
    vec[-12:] = value
    vec[-3] = -value
    assert FlatCodec(NAMES, SHAPES, encoding, SPARSE).encode(vec, {ITEM_TABLE: rows}) == reference(vec, encoding)
