"""The row-sparse encodings ``sparse-fp32`` / ``sparse-fp16`` (2-D ``[R, C]`` float tensors only,
e.g. embedding tables): :func:`codec` makes the registry entry of one from its value type; the
fast-path helpers :class:`fedseq.codec.FlatCodec` uses (:func:`_nonzero_rows`,
:func:`_sparse_payload`, :func:`_decode_rows_into`) write and check the same layout.

Only rows that hold any element whose bit pattern is not +0.0's are stored (so rows containing
-0.0 are kept, which makes ``sparse-fp32`` bit-exact, and any downstream sum bit-exact); all
multi-byte numbers are little-endian::

    offset 0   uint8   flags: bit 0 = index width (0: uint16, used iff R <= 65536;
                               1: uint32, used iff R > 65536); other bits zero
    offset 1   3 bytes zero
    offset 4   uint32  k, the number of rows stored (k <= R)
    offset 8   k row indices (uint16 or uint32), strictly increasing, each < R,
               then zero bytes up to the next multiple of 4
    then       k * C values (float32 or float16), row-major

For a [5136, 64] table with 48 touched rows that is 8 + 96 + 48*64*4 = 12,392 bytes
(dense-fp32: 1,314,816). ``sparse-fp16`` keeps a row iff its *fp16-converted* value has a
non-+0.0 bit, so it decodes bit-identically to ``dense-fp16``; same overflow rule.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import numpy as np
import torch

from .records import (
    _F16,
    _F32,
    _I16,
    _U16,
    _U32,
    Codec,
    EncodedTensor,
    _err,
    _expect_len,
    _finite_or_raise,
    _first_nonfinite,
    _from_le,
    _le,
    _to_half,
)

_SPARSE_HDR = struct.Struct("<B3xI")  # flags, 3 zero bytes, k
_U16_MAX_ROWS = 65536
# value type -> its little-endian numpy dtype
_VALUES_NP: dict[torch.dtype, np.dtype] = {torch.float32: _F32, torch.float16: _F16}


def _is_2d(ndim: int) -> bool:
    return ndim == 2


def _sparse_encode(name: str, encoding: str, x: torch.Tensor, h: torch.Tensor, bits_dt: torch.dtype,
                   vdt: np.dtype) -> bytes:
    r, _c = x.shape
    mask = (h.view(bits_dt) != 0).any(dim=1)
    idx = torch.nonzero(mask).squeeze(1)
    k = int(idx.numel())
    wide = r > _U16_MAX_ROWS
    idx_np = idx.numpy()
    idx_bytes = _le(idx_np, _U32 if wide else _U16)
    pad = b"\0" * (-len(idx_bytes) % 4)
    vals = h.index_select(0, idx)
    if not bool(torch.isfinite(vals).all()):  # a NaN/inf row is never all-zero bits, so it is among vals
        raise _err(name, encoding, f"non-finite input: {_first_nonfinite(x)}")
    if bits_dt == torch.int16:
        vals_bytes = _le(vals.view(torch.int16).numpy(), _I16)
    else:
        vals_bytes = _le(vals.numpy(), vdt)
    return b"".join((_SPARSE_HDR.pack(1 if wide else 0, k), idx_bytes, pad, vals_bytes))


def _encode(encoding: str, values: torch.dtype, name: str, x: torch.Tensor) -> bytes:
    if x.dim() != 2:
        raise _err(name, encoding, f"sparse encodings need a 2-D tensor, got shape {list(x.shape)}")
    if values == torch.float32:
        return _sparse_encode(name, encoding, x, x, torch.int32, _F32)
    return _sparse_encode(name, encoding, x, _to_half(name, encoding, x, values), torch.int16, _VALUES_NP[values])


def _decode(values: torch.dtype, enc: EncodedTensor) -> torch.Tensor:
    name, encoding, shape, data = enc.name, enc.encoding, enc.shape, enc.data
    if len(shape) != 2:
        raise _err(name, encoding, f"sparse payload needs a 2-D shape, got {list(shape)}")
    r, c = shape
    if len(data) < _SPARSE_HDR.size:
        raise _err(name, encoding, f"payload truncated: {len(data)} bytes, header needs {_SPARSE_HDR.size}")
    if data[1:4] != b"\0\0\0":
        raise _err(name, encoding, "corrupted sparse header: reserved bytes are not zero")
    flags, k = _SPARSE_HDR.unpack_from(data)
    wide = r > _U16_MAX_ROWS
    if flags != (1 if wide else 0):
        raise _err(
            name,
            encoding,
            f"corrupted sparse header: flags {flags:#04x}, expected {int(wide)} "
            f"(uint{32 if wide else 16} indices for {r} rows)",
        )
    if k > r:
        raise _err(name, encoding, f"sparse row count {k} exceeds the {r} rows of shape {list(shape)}")
    idt, vdt = (_U32 if wide else _U16), _VALUES_NP[values]
    idx_len = k * idt.itemsize
    vals_off = _SPARSE_HDR.size + idx_len + (-idx_len % 4)
    _expect_len(enc, vals_off + k * c * vdt.itemsize)
    if any(data[_SPARSE_HDR.size + idx_len : vals_off]):
        raise _err(name, encoding, "corrupted sparse payload: index padding bytes are not zero")
    idx = np.frombuffer(data, dtype=idt, count=k, offset=_SPARSE_HDR.size).astype(np.int64)
    if k:
        if int(idx.max()) >= r:
            raise _err(name, encoding, f"sparse row index {int(idx.max())} out of range for {r} rows")
        steps = np.diff(idx)
        if steps.size and int(steps.min()) <= 0:
            at = int(np.argmax(steps <= 0))
            kind = "duplicate" if steps[at] == 0 else "unsorted"
            raise _err(
                name,
                encoding,
                f"{kind} sparse row indices at positions {at}, {at + 1} "
                f"({int(idx[at])}, {int(idx[at + 1])}); indices must be strictly increasing",
            )
    vals = _from_le(data, vdt, offset=vals_off, count=k * c).reshape(k, c).to(torch.float32)
    _finite_or_raise(enc, vals)  # only the stored rows can be non-finite: check k x C, not R x C
    out = torch.zeros((r, c), dtype=torch.float32)
    if k:
        out.index_copy_(0, torch.from_numpy(idx), vals)
    return out


def codec(name: str, values: torch.dtype, fallback: str) -> Codec:
    """The registry entry of the row-sparse encoding ``name`` of ``values`` (float32 or float16)
    elements; tensors it does not fit (not 2-D, or not a table ``sparse_ok`` names) fall back to
    ``fallback``. sparse-fp32 checks finiteness only on the rows it stores (the hot path of
    uploads); sparse-fp16 checks the whole tensor first, like the dense encodings."""
    return Codec(name, functools.partial(_encode, name, values), functools.partial(_decode, values),
                 fallback=fallback, fits=_is_2d, sparse=True, checks_finite=values == torch.float32,
                 fast="sparse", values=values)


# ---------------------------------------------------------------------------- FlatCodec's fast path
def _nonzero_rows(bits: np.ndarray, hint: np.ndarray | None) -> np.ndarray:
    """Sorted indices (int64) of the rows of ``bits [R, C]`` (the values' integer bit patterns)
    that hold any nonzero element.

    ``hint`` names candidate rows (any order, repeats allowed), e.g. the rows a user's gradient
    touched. It is used only when it provably covers every nonzero row: the whole table must hold
    exactly as many nonzero elements as the candidate rows (one vectorised count, no per-row
    reduction over the table); otherwise, or without a hint, every row is scanned."""
    r, c = bits.shape
    if hint is not None:
        cand = np.unique(np.asarray(hint, dtype=np.int64))
        if cand.size == 0 or (cand[0] >= 0 and cand[-1] < r):
            sub = bits[cand]
            if np.count_nonzero(bits) == np.count_nonzero(sub):
                return cand[sub.any(axis=1)] if c else cand[:0]
    if c == 0:
        return np.zeros(0, dtype=np.int64)
    if bits.itemsize == 4 and c % 2 == 0 and bits.flags.c_contiguous:
        bits = bits.view(np.uint64)  # half the elements to OR together
    return np.flatnonzero(np.bitwise_or.reduce(bits, axis=1)).astype(np.int64, copy=False)


def _sparse_payload(idx: np.ndarray, r: int, vals_bits: np.ndarray) -> bytes:
    wide = r > _U16_MAX_ROWS
    idx_bytes = idx.astype(_U32 if wide else _U16).tobytes()
    pad = b"\0" * (-len(idx_bytes) % 4)
    return b"".join((_SPARSE_HDR.pack(1 if wide else 0, len(idx)), idx_bytes, pad, vals_bits.tobytes()))


def _fast_payload(values: torch.dtype, x: np.ndarray, hint: Any) -> bytes | None:
    """The payload of the float32 table ``x [R, C]`` (as :func:`_encode` writes it), its nonzero
    rows found with ``hint`` (see :func:`_nonzero_rows`); None when a stored value is non-finite or
    overflows ``values`` (the general path then raises the usual error)."""
    r, _c = x.shape
    rows = _nonzero_rows(x.view(np.uint32), hint)  # every row that is not all +0.0
    vals = x[rows]
    if not np.isfinite(vals).all():  # a NaN/inf row is among them
        return None
    if values == torch.float32:
        return _sparse_payload(rows, r, vals)
    h = torch.from_numpy(vals).to(values)  # rows outside `rows` are +0.0, in fp16 too
    if not bool(torch.isfinite(h).all()):  # fp16 overflow
        return None
    hb = h.view(torch.int16).numpy()
    keep = hb.any(axis=1)  # a row is stored iff its fp16 bits are not all zero
    return _sparse_payload(rows[keep], r, hb[keep])


def _decode_rows_into(values: torch.dtype, shape: tuple[int, ...], data: memoryview, dst: np.ndarray,
                      nonzero: np.ndarray | None = None) -> np.ndarray | None:
    """The checks of :func:`_decode`, then the stored rows straight into ``dst`` (cleared first:
    only its rows ``nonzero`` when given, else all of it). The rows written, or None when a check
    fails."""
    r, c = shape
    if len(data) < _SPARSE_HDR.size or data[1:4] != b"\0\0\0":
        return None
    flags, k = _SPARSE_HDR.unpack_from(data)
    wide = r > _U16_MAX_ROWS
    if flags != (1 if wide else 0) or k > r:
        return None
    idt, vdt = (_U32 if wide else _U16), _VALUES_NP[values]
    idx_len = k * idt.itemsize
    vals_off = _SPARSE_HDR.size + idx_len + (-idx_len % 4)
    if len(data) != vals_off + k * c * vdt.itemsize or any(data[_SPARSE_HDR.size + idx_len : vals_off]):
        return None
    idx = np.frombuffer(data, dtype=idt, count=k, offset=_SPARSE_HDR.size).astype(np.int64)
    if k and (int(idx[-1]) >= r or (k > 1 and int(np.diff(idx).min()) <= 0)):
        return None
    vals = np.frombuffer(data, dtype=vdt, count=k * c, offset=vals_off).reshape(k, c)
    if vdt is _F16:
        vals = vals.astype(np.float32)
    if not np.isfinite(vals).all():
        return None
    table = dst.reshape(r, c)
    if nonzero is None:
        table.fill(0.0)
    else:
        table[nonzero] = 0.0
    table[idx] = vals
    return idx
