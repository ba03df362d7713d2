"""Tensor codec: the one place where tensors become bytes (wire and model store) and back.

No pickle anywhere: every payload is a fixed, documented little-endian layout, and every decode
validates lengths, indices and finiteness before it returns a tensor.

Two formats live here:

- per-tensor encodings (:func:`encode` / :func:`decode`, :func:`encode_state` /
  :func:`decode_state`) and their container (:func:`pack` / :func:`unpack`), for updates on the
  wire and for model patches (fedseq.delta);
- whole-model blobs (:func:`model_to_bytes` / :func:`model_from_bytes`), the format of the model
  store and of model downloads (see "Model blobs" at the end).

:class:`FlatCodec` is a fast path of the first for one model layout's flat update vectors: the
same container bytes, and a decode straight into a round-matrix row.

An :class:`EncodedTensor` mirrors the protobuf message
``Tensor { string name = 1; string dtype = 2; repeated int64 shape = 3; string encoding = 4;
bytes data = 5; }``. ``dtype`` is the dtype of the *original* tensor, ``shape`` its shape, and
``data`` the payload whose layout is fixed by ``encoding`` (and, for integer tensors, ``dtype``).

Encodings (``ENCODINGS``, registry order) and their payload layouts; all multi-byte numbers
are little-endian. ``N`` is the element count of ``shape``.

``dense-fp32``
    ``N`` float32 values in C order. Lossless for float32 (and float16/bfloat16) input,
    including -0.0 and subnormals; float64 input is rounded to float32.
``dense-fp16``
    ``N`` IEEE binary16 values. Values whose magnitude rounds beyond the fp16 range
    (``|x| >= 65520``) are **rejected** with :class:`CodecError` at encode (never a silent inf
    and never a silent clamp); pick ``dense-bf16`` or ``dense-fp32`` for such tensors.
    Round-to-nearest-even, relative error <= 2**-11 (absolute 2**-25 in the subnormal range).
``dense-bf16``
    ``N`` bfloat16 values (the upper 16 bits of float32, round-to-nearest-even), stored as the
    raw 16-bit patterns. Same overflow rule as fp16 (only near float32 max). Relative error
    <= 2**-8.
``sparse-fp32`` / ``sparse-fp16`` (2-D ``[R, C]`` float tensors only, e.g. embedding tables)
    Only rows that hold any element whose bit pattern is not +0.0's (so rows containing -0.0
    are kept, which makes ``sparse-fp32`` bit-exact, and any downstream sum bit-exact)::

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
``int8-row``
    Absmax per-row symmetric int8 quantisation, the vector-wise quantisation of LLM.int8()
    (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
    Scale"), without the outlier decomposition. Rows: ``shape[0]`` rows of ``N / shape[0]``
    columns for tensors with ndim >= 2; one row for 1-D and 0-D tensors. Per row
    ``scale = absmax / 127`` in float32 (nudged by one ulp where float32 rounding would break
    the bound: subnormal scales, and scales whose ``127 * scale`` overflows) and
    ``q = clamp(round(x / scale), -127, 127)``::

        R float32 scales (>= 0, finite), then R * C int8 values (-128 is invalid), row-major

    Error bound per element: ``|decode(x) - x| <= scale / 2`` (plus the float32 rounding of the
    dequantised value). All-zero rows get scale 0.

Integer and bool tensors (``int8, uint8, int16, int32, int64, bool``): every ``dense-*``
encoding stores the raw values in the original dtype (``N * itemsize`` bytes; bool as one byte
0/1), losslessly, and :func:`decode` returns the original dtype. ``sparse-*`` and ``int8-row``
reject integer tensors (:func:`encode_state` falls back to ``dense-fp32`` for them).

Float tensors decode to float32 (whatever their original float dtype), CPU, contiguous.
Non-finite input (NaN/inf) is rejected at encode, and decode rejects payloads that would
produce NaN/inf (e.g. a corrupted exponent), so a decoded update is always finite.

A bare :class:`EncodedTensor` carries no checksum: decode detects truncation, inconsistent
lengths, bad indices and non-finite results, but a bit flip that yields another finite number
can only be caught by the CRC32 of the :func:`pack` container (or by the transport).

Container (:func:`pack` / :func:`unpack`), for chunked gRPC byte streams and for the store::

    header  4s magic b"FSQT" | uint8 version (1) | uint8 flags (0) | uint16 reserved (0)
            | uint32 record count
    record  uint16 name length | name (UTF-8)
            | uint8 dtype length | dtype (ASCII) | uint8 encoding length | encoding (ASCII)
            | uint8 ndim | ndim * int64 dims
            | uint64 data length | data
            | uint32 CRC32 (zlib) of every preceding byte of this record
    nothing may follow the last record.

Model blobs (:func:`model_to_bytes` / :func:`model_from_bytes`) are safetensors files: a
``uint64`` little-endian header length ``n``, ``n`` bytes of JSON header (per tensor: dtype,
shape, data offsets; optional ``"__metadata__"``, a str -> str map), then the raw tensor data.
Tensors keep their dtype and values exactly (no encoding step). Equal tensors with at most one
metadata key give equal bytes, so the store can compare versions by sha256 (see
:func:`model_to_bytes` for two or more keys).
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "ENCODINGS",
    "MAX_NUMEL",
    "CodecError",
    "EncodedTensor",
    "FlatCodec",
    "decode",
    "decode_state",
    "encode",
    "encode_state",
    "model_from_bytes",
    "model_to_bytes",
    "pack",
    "read_model_header",
    "unpack",
]

ENCODINGS: tuple[str, ...] = (
    "dense-fp32",
    "dense-fp16",
    "dense-bf16",
    "sparse-fp32",
    "sparse-fp16",
    "int8-row",
)

#: Default cap on the element count decode will materialise (sparse payloads expand to R*C
#: elements, so a tiny hostile payload could otherwise ask for an enormous allocation).
MAX_NUMEL = 1 << 28
# the row-sparse tables of every fedseq model: the tensors a sparse-* update encodes sparsely (the
# rest fall back to a dense encoding), and that a server requires in the declared encoding
SPARSE_TABLES = ("item_emb.weight", "pos_emb.weight")

_DENSE_OF = {
    "dense-fp32": "dense-fp32",
    "dense-fp16": "dense-fp16",
    "dense-bf16": "dense-bf16",
    "sparse-fp32": "dense-fp32",
    "sparse-fp16": "dense-fp16",
    "int8-row": "dense-fp32",
}

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# original dtype -> (torch dtype, little-endian numpy dtype of the raw payload)
_INT_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int64": (torch.int64, np.dtype("<i8")),
    "bool": (torch.bool, np.dtype("u1")),
}
_DTYPE_NAME: dict[torch.dtype, str] = {v: k for k, v in _FLOAT_DTYPES.items()}
_DTYPE_NAME.update({v[0]: k for k, v in _INT_DTYPES.items()})

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I16 = np.dtype("<i2")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")

_F32_OVERFLOW = 2.0**128 - 2.0**103  # reals at or above this round to inf in float32
_SPARSE_HDR = struct.Struct("<B3xI")  # flags, 3 zero bytes, k
_U16_MAX_ROWS = 65536

_MAGIC = b"FSQT"
_VERSION = 1
_PACK_HDR = struct.Struct("<4sBBHI")
_U8 = struct.Struct("<B")
_U16S = struct.Struct("<H")
_U32S = struct.Struct("<I")
_U64S = struct.Struct("<Q")
_MAX_NDIM = 32
_MAX_MODEL_HEADER = 100 * 1024 * 1024  # bytes of safetensors JSON header a model blob may declare


class CodecError(ValueError):
    """A tensor cannot be encoded, or a payload/container is corrupted, truncated or inconsistent."""


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded tensor; mirrors the protobuf ``Tensor`` message field for field.

    ``shape`` accepts any iterable of ints (e.g. a protobuf repeated field) and is stored as a
    tuple; ``data`` accepts any bytes-like object and is stored as ``bytes``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    data: bytes

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(d) for d in self.shape)
        except (TypeError, ValueError) as e:
            raise CodecError(f"tensor {self.name!r}: shape must be a sequence of ints: {e}") from None
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.data, bytes):
            object.__setattr__(self, "data", bytes(self.data))

    @property
    def nbytes(self) -> int:
        """Payload size in bytes (``len(data)``)."""
        return len(self.data)


def _err(name: str, encoding: str, what: str) -> CodecError:
    return CodecError(f"tensor {name!r} (encoding {encoding!r}): {what}")


def _check_encoding(name: str, encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise CodecError(
            f"tensor {name!r}: unknown encoding {encoding!r}; known encodings: {', '.join(ENCODINGS)}"
        )


def _le(arr: np.ndarray, dt: np.dtype) -> bytes:
    return arr.astype(dt, copy=False).tobytes()


def _int8_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    n = math.prod(shape)
    if len(shape) >= 2:
        r = shape[0]
        return r, (n // r if r else 0)
    return 1, n


def _first_nonfinite(x: torch.Tensor) -> str:
    bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
    return f"value {x[tuple(bad)].item()} at index {tuple(bad)}"


def _to_half(name: str, encoding: str, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    h = x.to(dt)
    if not bool(torch.isfinite(h).all()):
        kind = "fp16 range (|x| < 65520)" if dt == torch.float16 else "bf16 range"
        big = x.abs().max().item()
        raise _err(
            name,
            encoding,
            f"values overflow the {kind} (max |x| = {big:g}); values are not clamped, "
            "use dense-fp32 (or dense-bf16) for this tensor",
        )
    return h


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


def encode(name: str, tensor: torch.Tensor, encoding: str = "dense-fp32") -> EncodedTensor:
    """Encode one tensor (any device; gradients detached). See the module docstring for layouts.

    Raises :class:`CodecError` for unknown encodings, unsupported dtypes, non-finite values,
    fp16/bf16 overflow, sparse encodings on non-2-D tensors, and sparse/int8 on integer tensors.
    """
    if not isinstance(name, str):
        raise CodecError(f"tensor name must be a str, got {type(name).__name__}")
    _check_encoding(name, encoding)
    if not isinstance(tensor, torch.Tensor):
        raise _err(name, encoding, f"expected a torch.Tensor, got {type(tensor).__name__}")
    dtype = _DTYPE_NAME.get(tensor.dtype)
    if dtype is None:
        raise _err(name, encoding, f"unsupported dtype {tensor.dtype}")
    t = tensor.detach().cpu().contiguous()
    shape = tuple(t.shape)

    if dtype in _INT_DTYPES:
        if not encoding.startswith("dense-"):
            raise _err(name, encoding, f"integer tensor (dtype {dtype}) needs a dense-* encoding")
        raw = t.to(torch.uint8) if dtype == "bool" else t
        data = _le(raw.numpy(), _INT_DTYPES[dtype][1])
        return EncodedTensor(name, dtype, shape, encoding, data)

    # sparse-fp32 checks only the rows it stores (any non-finite row is stored): the hot path of uploads
    if encoding != "sparse-fp32" and not bool(torch.isfinite(t).all()):
        raise _err(name, encoding, f"non-finite input: {_first_nonfinite(t)}")
    x = t.to(torch.float32)
    if dtype == "float64" and not bool(torch.isfinite(x).all()):
        raise _err(name, encoding, "float64 values overflow the float32 range")

    if encoding == "dense-fp32":
        data = _le(x.numpy(), _F32)
    elif encoding == "dense-fp16":
        data = _le(_to_half(name, encoding, x, torch.float16).numpy(), _F16)
    elif encoding == "dense-bf16":
        data = _le(_to_half(name, encoding, x, torch.bfloat16).view(torch.int16).numpy(), _I16)
    elif encoding in ("sparse-fp32", "sparse-fp16"):
        if x.dim() != 2:
            raise _err(name, encoding, f"sparse encodings need a 2-D tensor, got shape {list(shape)}")
        if encoding == "sparse-fp32":
            data = _sparse_encode(name, encoding, x, x, torch.int32, _F32)
        else:
            data = _sparse_encode(name, encoding, x, _to_half(name, encoding, x, torch.float16), torch.int16, _F16)
    else:  # int8-row
        data = _int8_encode(x, shape)
    return EncodedTensor(name, dtype, shape, encoding, data)


def _int8_encode(x: torch.Tensor, shape: tuple[int, ...]) -> bytes:
    r, c = _int8_rows(shape)
    m = x.reshape(r, c)
    if c == 0:
        scale = torch.zeros(r, dtype=torch.float32)
        q = torch.zeros((r, 0), dtype=torch.int8)
    else:
        absmax = m.abs().amax(dim=1)
        scale = absmax / 127.0
        # float32 rounding of the scale: (a) for subnormal scales it can be far below absmax/127
        # (even 0), making |x| / scale exceed 127.5, where clamping would break the scale/2 bound:
        # step those scales up; (b) next to float32 max, 127 * scale can round to inf on decode:
        # step those down (the clamp to 127 then costs a relative 1e-7 of the scale at most).
        s64, a64 = scale.double(), absmax.double()
        up = a64 > s64 * 127.5
        down = s64 * 127.0 >= _F32_OVERFLOW
        if bool(up.any()) or bool(down.any()):
            scale = torch.where(up, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
            scale = torch.where(down, torch.nextafter(scale, torch.zeros_like(scale)), scale)
        div = torch.where(scale > 0, scale, torch.ones_like(scale)).double().unsqueeze(1)
        q = torch.round(m.double() / div).clamp_(-127, 127).to(torch.int8)
    return _le(scale.numpy(), _F32) + q.numpy().tobytes()


def _expect_len(enc: EncodedTensor, n: int) -> None:
    if len(enc.data) != n:
        what = "truncated" if len(enc.data) < n else "too long"
        raise _err(
            enc.name,
            enc.encoding,
            f"payload {what}: {len(enc.data)} bytes, expected {n} for shape {list(enc.shape)}",
        )


def _finite_or_raise(enc: EncodedTensor, out: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(out).all()):
        raise _err(enc.name, enc.encoding, f"payload decodes to non-finite {_first_nonfinite(out)}")
    return out


def _from_le(data: bytes | memoryview, dt: np.dtype, offset: int = 0, count: int = -1) -> torch.Tensor:
    arr = np.frombuffer(data, dtype=dt, count=count, offset=offset)
    return torch.from_numpy(arr.astype(dt.newbyteorder("="), copy=True))


def decode(enc: EncodedTensor, *, max_numel: int = MAX_NUMEL) -> torch.Tensor:
    """Decode one tensor: float32 (or the original integer/bool dtype for dense-encoded integer
    tensors), on CPU, contiguous, with ``enc.shape``.

    Raises :class:`CodecError` on unknown encoding/dtype, bad shape, wrong payload length, bad
    sparse header or indices, invalid int8 scales/values, non-finite results, or more than
    ``max_numel`` elements.
    """
    name, encoding = enc.name, enc.encoding
    _check_encoding(name, encoding)
    shape = enc.shape
    if any(d < 0 for d in shape):
        raise _err(name, encoding, f"negative dimension in shape {list(shape)}")
    n = math.prod(shape)
    if n > max_numel:
        raise _err(name, encoding, f"shape {list(shape)} has {n} elements, over the limit {max_numel}")

    if enc.dtype in _INT_DTYPES:
        if not encoding.startswith("dense-"):
            raise _err(name, encoding, f"integer dtype {enc.dtype} is only valid with dense-* encodings")
        tdt, ndt = _INT_DTYPES[enc.dtype]
        _expect_len(enc, n * ndt.itemsize)
        raw = _from_le(enc.data, ndt)
        if enc.dtype == "bool" and bool((raw > 1).any()):
            raise _err(name, encoding, "bool payload holds bytes other than 0 and 1")
        return raw.to(tdt).reshape(shape)
    if enc.dtype not in _FLOAT_DTYPES:
        raise _err(name, encoding, f"unknown dtype {enc.dtype!r}")

    if encoding == "dense-fp32":
        _expect_len(enc, 4 * n)
        out = _from_le(enc.data, _F32).reshape(shape)
    elif encoding == "dense-fp16":
        _expect_len(enc, 2 * n)
        out = _from_le(enc.data, _F16).to(torch.float32).reshape(shape)
    elif encoding == "dense-bf16":
        _expect_len(enc, 2 * n)
        out = _from_le(enc.data, _I16).view(torch.bfloat16).to(torch.float32).reshape(shape)
    elif encoding in ("sparse-fp32", "sparse-fp16"):
        return _sparse_decode(enc)  # checked for finite values on its stored rows
    else:
        out = _int8_decode(enc)
    return _finite_or_raise(enc, out.contiguous())


def _sparse_decode(enc: EncodedTensor) -> torch.Tensor:
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
    idt, vdt = (_U32 if wide else _U16), (_F32 if encoding == "sparse-fp32" else _F16)
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


def _int8_decode(enc: EncodedTensor) -> torch.Tensor:
    name, encoding, data = enc.name, enc.encoding, enc.data
    r, c = _int8_rows(enc.shape)
    _expect_len(enc, 4 * r + r * c)
    scale = np.frombuffer(data, dtype=_F32, count=r)
    if r and not (np.isfinite(scale).all() and (scale >= 0).all()):
        bad = int(np.argmax(~(np.isfinite(scale) & (scale >= 0))))
        raise _err(name, encoding, f"invalid scale {float(scale[bad])!r} in row {bad} (need finite, >= 0)")
    q = np.frombuffer(data, dtype=np.int8, count=r * c, offset=4 * r).reshape(r, c)
    if q.size and int(q.min()) == -128:
        raise _err(name, encoding, "int8 value -128 outside the symmetric range [-127, 127]")
    out = torch.from_numpy(q.astype(np.float64) * scale.astype(np.float64)[:, None]).to(torch.float32)
    return out.reshape(enc.shape)


def _resolve(name: str, t: torch.Tensor, requested: str, sparse_ok: Callable[[str], bool]) -> str:
    _check_encoding(name, requested)
    if t.dtype not in _FLOAT_DTYPES.values():
        return "dense-fp32"  # integer/bool: raw values in their own dtype, lossless
    return _resolve_float(name, t.dim(), requested, sparse_ok)


def _resolve_float(name: str, ndim: int, requested: str, sparse_ok: Callable[[str], bool]) -> str:
    if requested.startswith("sparse-"):
        return requested if ndim == 2 and sparse_ok(name) else _DENSE_OF[requested]
    if requested == "int8-row" and ndim == 0:
        return "dense-fp32"
    return requested


def encode_state(
    tensors: Mapping[str, torch.Tensor],
    encoding: str | Mapping[str, str] = "dense-fp32",
    sparse_ok: Callable[[str], bool] | None = None,
) -> list[EncodedTensor]:
    """Encode a state dict / update, choosing the encoding per tensor (order preserved).

    ``encoding`` is one name for all tensors, or a mapping name -> encoding; a mapping must cover
    every tensor, either by name or through the default key ``"*"``, and may not name tensors
    that are absent (typos fail loudly). The requested encoding is then adapted per tensor:

    * integer/bool tensors -> ``dense-fp32`` (raw, lossless, original dtype), whatever was asked;
    * ``sparse-fp32`` / ``sparse-fp16`` apply only to 2-D float tensors with ``sparse_ok(name)``
      true (``sparse_ok=None`` means every 2-D tensor is eligible); other tensors fall back to
      ``dense-fp32`` / ``dense-fp16`` respectively;
    * ``int8-row`` applies to float tensors with ndim >= 1 (1-D as one row); 0-D scalars fall
      back to ``dense-fp32`` (a scale per scalar saves nothing);
    * ``dense-*`` apply as asked.
    """
    ok: Callable[[str], bool] = sparse_ok if sparse_ok is not None else (lambda _name: True)
    if isinstance(encoding, str):
        _check_encoding("*", encoding)
        per: Callable[[str], str] = lambda _name: encoding  # noqa: E731
    else:
        extra = set(encoding) - set(tensors) - {"*"}
        if extra:
            raise CodecError(f"encoding mapping names unknown tensors: {sorted(extra)}")
        missing = [n for n in tensors if n not in encoding and "*" not in encoding]
        if missing:
            raise CodecError(f"encoding mapping has no entry (and no '*' default) for tensors {missing}")
        per = lambda name: encoding.get(name, encoding.get("*", "dense-fp32"))  # noqa: E731
    out = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        out.append(encode(name, t, _resolve(name, t, per(name), ok)))
    return out


def decode_state(encs: Iterable[EncodedTensor], *, max_numel: int = MAX_NUMEL) -> dict[str, torch.Tensor]:
    """Decode tensors into a dict (input order); duplicate names raise :class:`CodecError`."""
    out: dict[str, torch.Tensor] = {}
    for enc in encs:
        if enc.name in out:
            raise CodecError(f"tensor {enc.name!r}: duplicate tensor name in state")
        out[enc.name] = decode(enc, max_numel=max_numel)
    return out


def _ascii(name: str, field: str, value: str) -> bytes:
    try:
        b = value.encode("ascii")
    except UnicodeEncodeError:
        raise CodecError(f"pack: tensor {name!r}: {field} {value!r} is not ASCII") from None
    if len(b) > 255:
        raise CodecError(f"pack: tensor {name!r}: {field} longer than 255 bytes")
    return b


def _meta_prefix(name: str, dtype: str, encoding: str, shape: Sequence[int]) -> bytes:
    """A container record's bytes up to (not including) its data length."""
    name_b = name.encode("utf-8")
    if len(name_b) > 0xFFFF:
        raise CodecError(f"pack: tensor name {name[:40]!r}... longer than 65535 bytes")
    dtype_b = _ascii(name, "dtype", dtype)
    encoding_b = _ascii(name, "encoding", encoding)
    if len(shape) > _MAX_NDIM:
        raise CodecError(f"pack: tensor {name!r}: more than {_MAX_NDIM} dimensions")
    return b"".join(
        (
            _U16S.pack(len(name_b)),
            name_b,
            _U8.pack(len(dtype_b)),
            dtype_b,
            _U8.pack(len(encoding_b)),
            encoding_b,
            _U8.pack(len(shape)),
            struct.pack(f"<{len(shape)}q", *shape),
        )
    )


def pack(encs: Sequence[EncodedTensor]) -> bytes:
    """Serialise encoded tensors into the self-describing container (see module docstring)."""
    parts = [_PACK_HDR.pack(_MAGIC, _VERSION, 0, 0, len(encs))]
    for enc in encs:
        meta = _meta_prefix(enc.name, enc.dtype, enc.encoding, enc.shape) + _U64S.pack(len(enc.data))
        crc = zlib.crc32(enc.data, zlib.crc32(meta))
        parts += (meta, enc.data, _U32S.pack(crc))
    return b"".join(parts)


def _need(total: int, count: int, i: int, at: int, n: int, what: str) -> None:
    if at + n > total:
        raise CodecError(
            f"pack container truncated in record {i} ({what}): needs {at + n - total} more bytes "
            f"(container has {total} bytes, header says {count} records)"
        )


def unpack(buf: bytes | bytearray | memoryview) -> list[EncodedTensor]:
    """Parse a :func:`pack` container; any truncation, trailing bytes, bad magic/version or CRC
    mismatch raises :class:`CodecError`. Payloads are not decoded (call :func:`decode`)."""
    mv = memoryview(buf).cast("B")
    total = len(mv)
    if total < _PACK_HDR.size:
        raise CodecError(f"pack container truncated: {total} bytes, header needs {_PACK_HDR.size}")
    magic, version, flags, reserved, count = _PACK_HDR.unpack_from(mv)
    if magic != _MAGIC:
        raise CodecError(f"not a fedseq tensor container: magic {bytes(magic)!r}, expected {_MAGIC!r}")
    if version != _VERSION:
        raise CodecError(f"unsupported tensor container version {version} (this codec reads {_VERSION})")
    if flags or reserved:
        raise CodecError(f"corrupted container header: flags={flags} reserved={reserved} must be 0")

    pos = _PACK_HDR.size
    out: list[EncodedTensor] = []
    for i in range(count):
        start = pos
        _need(total, count, i, pos, 2, "name length")
        (nlen,) = _U16S.unpack_from(mv, pos)
        pos += 2
        _need(total, count, i, pos, nlen + 1, "name")
        name_b = bytes(mv[pos : pos + nlen])
        pos += nlen
        (dlen,) = _U8.unpack_from(mv, pos)
        pos += 1
        _need(total, count, i, pos, dlen + 1, "dtype")
        dtype_b = bytes(mv[pos : pos + dlen])
        pos += dlen
        (elen,) = _U8.unpack_from(mv, pos)
        pos += 1
        _need(total, count, i, pos, elen + 1, "encoding")
        enc_b = bytes(mv[pos : pos + elen])
        pos += elen
        (ndim,) = _U8.unpack_from(mv, pos)
        pos += 1
        _need(total, count, i, pos, 8 * ndim + 8, "shape")
        shape = struct.unpack_from(f"<{ndim}q", mv, pos)
        pos += 8 * ndim
        (data_len,) = _U64S.unpack_from(mv, pos)
        pos += 8
        _need(total, count, i, pos, data_len + 4, "data")
        data = bytes(mv[pos : pos + data_len])
        pos += data_len
        (crc,) = _U32S.unpack_from(mv, pos)
        actual = zlib.crc32(mv[start:pos])
        pos += 4
        label = name_b.decode("utf-8", errors="replace")
        if crc != actual:
            raise CodecError(
                f"pack container record {i} (tensor {label!r}): CRC32 mismatch "
                f"(stored {crc:#010x}, computed {actual:#010x}); the container is corrupted"
            )
        try:
            name, dtype, encoding = name_b.decode("utf-8"), dtype_b.decode("ascii"), enc_b.decode("ascii")
        except UnicodeDecodeError as e:
            raise CodecError(f"pack container record {i}: undecodable text field: {e}") from None
        if encoding not in ENCODINGS:
            raise CodecError(f"pack container record {i} (tensor {name!r}): unknown encoding {encoding!r}")
        if dtype not in _FLOAT_DTYPES and dtype not in _INT_DTYPES:
            raise CodecError(f"pack container record {i} (tensor {name!r}): unknown dtype {dtype!r}")
        if ndim > _MAX_NDIM or any(d < 0 for d in shape):
            raise CodecError(f"pack container record {i} (tensor {name!r}): invalid shape {list(shape)}")
        out.append(EncodedTensor(name, dtype, shape, encoding, data))
    if pos != total:
        raise CodecError(
            f"pack container has {total - pos} trailing bytes after its {count} records (corrupted length?)"
        )
    return out


# ---------------------------------------------------------------------------- flat updates
def _fast_finite(a: np.ndarray) -> bool:
    """True only if every value of the float32 array ``a`` is finite. One pass (a dot product):
    NaN and inf propagate into it, but huge finite values can overflow it too, so False means
    "check exactly", never "refuse"."""
    if a.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.dot(a, a)))


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


_RUN_ENCODINGS = ("dense-fp32", "dense-fp16", "dense-bf16")
_F16_SAFE = 65504.0  # |x| <= fp16 max converts to a finite fp16 (|x| >= 65520 overflows; between: checked exactly)
_BF16_SAFE = 3.3895313892515355e38  # bf16 max: the same for bf16


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    encoding: str  # resolved for a float32 tensor of this shape
    prefix: bytes  # the container record up to its data length
    prefix_crc: int


class FlatCodec:
    """Encode and decode the flat ``[D]`` float32 update vectors of one model layout, fast.

    :meth:`encode` returns exactly the bytes of
    ``pack(encode_state(split(vec), encoding, sparse_ok=lambda n: n in sparse))`` (``split``: the
    layout's views of ``vec``) without building those tensors: record headers and their CRC
    prefixes are computed once, dense tensors are checked and converted by runs of consecutive
    tensors in one encoding (dense-fp32 ones go from the vector's memory straight into the one
    output join), and the sparse tables' stored rows are found from a hint of touched rows when the
    hint provably covers them. int8-row tensors take :func:`encode` one by one.

    :meth:`decode_into` decodes a container of exactly that form straight into a ``[D]`` row
    (sparse rows into their slots, no per-tensor dense tensor); a container in any other form, or
    one with any fault, is left to the general path (:func:`unpack`, :func:`decode_state`), which
    gives the verdict.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], encoding: str,
                 sparse: Iterable[str] | None = None) -> None:
        _check_encoding("*", encoding)
        self.names = tuple(names)
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        if len(self.names) != len(self.shapes):
            raise CodecError("FlatCodec: names and shapes differ in length")
        self.encoding = encoding
        self.sparse = None if sparse is None else frozenset(sparse)
        ok: Callable[[str], bool] = (lambda _n: True) if self.sparse is None else self.sparse.__contains__
        self._ok = ok
        specs: list[_Spec] = []
        off = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            if any(d < 0 for d in shape):
                raise CodecError(f"FlatCodec: tensor {name!r} has a negative dimension {list(shape)}")
            n = math.prod(shape)
            enc = _resolve_float(name, len(shape), encoding, ok)
            prefix = _meta_prefix(name, "float32", enc, shape)
            specs.append(_Spec(name, shape, off, n, enc, prefix, zlib.crc32(prefix)))
            off += n
        self._specs = tuple(specs)
        self.dim = off
        self._header = _PACK_HDR.pack(_MAGIC, _VERSION, 0, 0, len(specs))
        # runs [i, j) of consecutive tensors in one dense encoding: one finiteness pass (and one
        # conversion to fp16/bf16) each
        runs: dict[int, int] = {}
        i = 0
        while i < len(specs):
            if specs[i].encoding in _RUN_ENCODINGS:
                j = i
                while j < len(specs) and specs[j].encoding == specs[i].encoding:
                    j += 1
                runs[i] = j
                i = j
            else:
                i += 1
        self._runs = runs
        self._decodable = len(set(self.names)) == len(self.names) and all(s.size <= MAX_NUMEL for s in specs)

    # ------------------------------------------------------------------ encode
    def _split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vec.reshape(-1), [s.size for s in self._specs])
        return {s.name: p.view(s.shape) for s, p in zip(self._specs, parts, strict=True)}

    def encode(self, vec: torch.Tensor, touched: Mapping[str, Any] | None = None) -> bytes:
        """The packed container of ``vec`` (see the class docstring); ``touched`` maps a sparse
        table's name to candidate rows (an int tensor or array) said to hold all its nonzero rows,
        e.g. the item rows a user's gradient was scattered into. A wrong hint costs only time."""
        if not isinstance(vec, torch.Tensor):
            raise CodecError(f"FlatCodec.encode: expected a torch.Tensor, got {type(vec).__name__}")
        if vec.dtype != torch.float32 or vec.dim() != 1 or vec.numel() != self.dim:
            if vec.numel() != self.dim:
                raise CodecError(f"FlatCodec.encode: expected {self.dim} values, got shape {list(vec.shape)}")
            return pack(encode_state(self._split(vec), self.encoding, sparse_ok=self._ok))
        a = vec.detach().cpu().contiguous().numpy()
        parts: list[Any] = [self._header]
        run, run_at = a, 0  # the current run's payload values (bit patterns) and its offset in `a`
        for i, s in enumerate(self._specs):
            seg = a[s.offset : s.offset + s.size]
            if s.encoding in _RUN_ENCODINGS:
                j = self._runs.get(i)
                if j is not None:
                    run, run_at = self._run_payload(a, i, j), s.offset
                data: Any = run[s.offset - run_at : s.offset - run_at + s.size].data.cast("B")  # the join is the copy
            elif s.encoding in ("sparse-fp32", "sparse-fp16"):
                hint = None if touched is None else touched.get(s.name)
                if isinstance(hint, torch.Tensor):
                    hint = hint.detach().cpu().numpy()
                data = self._sparse(s, seg.reshape(s.shape), hint)
            else:
                data = encode(s.name, torch.from_numpy(seg).view(s.shape), s.encoding).data
            length = _U64S.pack(len(data))
            crc = zlib.crc32(data, zlib.crc32(length, s.prefix_crc))
            parts += (s.prefix, length, data, _U32S.pack(crc))
        return b"".join(parts)

    def _run_payload(self, a: np.ndarray, i: int, j: int) -> np.ndarray:
        """The payload values of the run of tensors ``[i, j)`` (all in one dense encoding), after
        the checks :func:`encode` makes on each (a failing run is redone tensor by tensor, which
        raises the usual error of the first bad tensor)."""
        first, last = self._specs[i], self._specs[j - 1]
        x = a[first.offset : last.offset + last.size]
        limit = {"dense-fp32": math.inf, "dense-fp16": _F16_SAFE, "dense-bf16": _BF16_SAFE}[first.encoding]
        if not _fast_finite(x) or (limit < math.inf and x.size and not float(np.abs(x).max()) < limit):
            for t in self._specs[i:j]:  # exact checks, in order (a false alarm passes them all)
                encode(t.name, torch.from_numpy(a[t.offset : t.offset + t.size]).view(t.shape), t.encoding)
        if first.encoding == "dense-fp32":
            return x
        half = torch.float16 if first.encoding == "dense-fp16" else torch.bfloat16
        # the conversion encode() makes; finite, as |x| is below the limit or the exact checks passed
        return torch.from_numpy(x).to(half).view(torch.int16).numpy()

    def _sparse(self, s: _Spec, x: np.ndarray, hint: Any) -> bytes:
        r, _c = s.shape
        rows = _nonzero_rows(x.view(np.uint32), hint)  # every row that is not all +0.0
        vals = x[rows]
        if not np.isfinite(vals).all():  # a NaN/inf row is among them: the general path raises the usual error
            return encode(s.name, torch.from_numpy(x), s.encoding).data
        if s.encoding == "sparse-fp32":
            return _sparse_payload(rows, r, vals)
        h = torch.from_numpy(vals).to(torch.float16)  # rows outside `rows` are +0.0, in fp16 too
        if not bool(torch.isfinite(h).all()):  # fp16 overflow: the general path raises the usual error
            return encode(s.name, torch.from_numpy(x), s.encoding).data
        hb = h.view(torch.int16).numpy()
        keep = hb.any(axis=1)  # a row is stored iff its fp16 bits are not all zero
        return _sparse_payload(rows[keep], r, hb[keep])

    # ------------------------------------------------------------------ decode
    def decode_into(self, buf: bytes | bytearray | memoryview, out: torch.Tensor,
                    dirty: dict[str, np.ndarray] | None = None) -> bool:
        """Decode the container ``buf`` into ``out`` (a contiguous float32 ``[D]`` tensor).

        True: ``out`` holds what ``decode_state(unpack(buf))`` gives, flattened in layout order,
        and every check of :func:`unpack` and :func:`decode` passed (CRCs, lengths, sparse header
        and indices, finite values). False: ``buf`` is not exactly in the form :meth:`encode`
        writes (other record order, dtype or encodings) or has a fault; ``out`` may be partly
        overwritten, and the general path must decide (it refuses or accepts as always).

        ``dirty`` (a reused ``out``): for a sparse table, the rows of it in ``out`` that may be
        nonzero (a table not named: any row may be). Only those rows are cleared before the stored
        rows are written, instead of the whole table; on True it is updated to the rows now
        written (a table written whole is dropped from it). On False its content is undefined:
        clear it."""
        if out.dtype != torch.float32 or out.shape != (self.dim,) or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"FlatCodec.decode_into: out must be a contiguous CPU float32 [{self.dim}] tensor")
        if not self._decodable:
            return False
        mv = memoryview(buf).cast("B")
        total = len(mv)
        hdr = len(self._header)
        if total < hdr or mv[:hdr] != self._header:
            return False
        o = out.numpy()
        pos = hdr
        rows_written: dict[str, np.ndarray] = {}
        for s in self._specs:
            dpos = pos + len(s.prefix) + 8
            if dpos > total or mv[pos : dpos - 8] != s.prefix:
                return False
            (dlen,) = _U64S.unpack_from(mv, dpos - 8)
            end = dpos + dlen
            if end + 4 > total:
                return False
            (crc,) = _U32S.unpack_from(mv, end)
            if crc != zlib.crc32(mv[pos:end]):
                return False
            data = mv[dpos:end]
            dst = o[s.offset : s.offset + s.size]
            if s.encoding == "dense-fp32":
                if dlen != 4 * s.size:
                    return False
                dst[:] = np.frombuffer(data, dtype=_F32)
            elif s.encoding in _RUN_ENCODINGS:  # fp16 / bf16: widened exactly, as decode() does
                if dlen != 2 * s.size:
                    return False
                raw = torch.from_numpy(np.frombuffer(data, dtype=_I16).copy())
                out[s.offset : s.offset + s.size].copy_(raw.view(torch.float16 if s.encoding == "dense-fp16"
                                                                 else torch.bfloat16))
            elif s.encoding in ("sparse-fp32", "sparse-fp16"):
                written = self._sparse_into(s, data, dst, None if dirty is None else dirty.get(s.name))
                if written is None:
                    return False
                rows_written[s.name] = written
            else:
                try:
                    dst[:] = decode(EncodedTensor(s.name, "float32", s.shape, s.encoding, bytes(data))).reshape(-1).numpy()
                except CodecError:
                    return False
            pos = end + 4
        if pos != total:
            return False
        for i, j in self._runs.items():  # dense values: one finiteness pass per run
            last = self._specs[j - 1]
            if not _fast_finite(o[self._specs[i].offset : last.offset + last.size]):
                return False
        if dirty is not None:
            dirty.clear()
            dirty.update(rows_written)
        return True

    def _sparse_into(self, s: _Spec, data: memoryview, dst: np.ndarray,
                     nonzero: np.ndarray | None = None) -> np.ndarray | None:
        """The checks of the general sparse decode, then the stored rows straight into ``dst``
        (cleared first: only its rows ``nonzero`` when given, else all of it). The rows written,
        or None when a check fails."""
        r, c = s.shape
        if len(data) < _SPARSE_HDR.size or data[1:4] != b"\0\0\0":
            return None
        flags, k = _SPARSE_HDR.unpack_from(data)
        wide = r > _U16_MAX_ROWS
        if flags != (1 if wide else 0) or k > r:
            return None
        idt, vdt = (_U32 if wide else _U16), (_F32 if s.encoding == "sparse-fp32" else _F16)
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

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], encoding: str,
           sparse: frozenset[str] | None = None) -> FlatCodec:
        """A cached :class:`FlatCodec` (arguments hashable: tuples, a frozenset)."""
        return FlatCodec(names, shapes, encoding, sparse)


# ---------------------------------------------------------------------------- model blobs
def model_to_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> bytes:
    """Serialize named tensors (and string metadata) to safetensors bytes.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing memory (tied
    weights) are copied so each name gets its own data. Deterministic for equal input with at
    most one metadata key: safetensors writes ``__metadata__`` from a hash map, so the order of
    two or more keys, and with it the bytes and their sha256, can differ from call to call.

    Raises :class:`CodecError` for a non-mapping, an empty or non-str name, a value that is not
    a dense torch.Tensor, or metadata that is not str -> str.
    """
    if not isinstance(tensors, Mapping):
        raise CodecError(
            f"tensors must be a mapping name -> torch.Tensor, got {type(tensors).__name__}"
        )
    flat: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise CodecError(f"tensor {name!r} is a {type(value).__name__}, not a torch.Tensor")
        if value.layout != torch.strided:
            raise CodecError(
                f"tensor {name!r} has layout {value.layout}; only dense tensors are stored"
            )
        t = value.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen_storage.add(ptr)
        flat[name] = t
    metadata: dict[str, str] | None = None
    if meta:
        metadata = {}
        for key, val in meta.items():
            if not isinstance(key, str) or not isinstance(val, str):
                raise CodecError(f"model metadata must map str -> str, got {key!r}: {val!r}")
            metadata[key] = val
    return safetensors.torch.save(flat, metadata=metadata)


def read_model_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a :func:`model_to_bytes` blob (tensor entries and ``"__metadata__"``).

    Checks only the framing (length prefix, JSON object), not the tensor data; :class:`CodecError`
    if the blob is not a safetensors blob.
    """
    if len(blob) < 8:
        raise CodecError(
            f"not a safetensors blob: {len(blob)} bytes is shorter than its 8-byte header length"
        )
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_MODEL_HEADER or 8 + n > len(blob):
        raise CodecError(f"not a safetensors blob: header length {n} does not fit in {len(blob)} bytes")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"not a safetensors blob: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CodecError("not a safetensors blob: header is not a JSON object")
    return header


def model_from_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inverse of :func:`model_to_bytes`: ``(tensors on CPU, metadata)``. CodecError if malformed."""
    header = read_model_header(bytes(blob))
    meta = header.get("__metadata__") or {}
    try:
        tensors = safetensors.torch.load(bytes(blob))
    except Exception as exc:  # SafetensorError is not exported under a stable name
        raise CodecError(f"not a valid safetensors blob: {exc}") from exc
    return tensors, {str(k): str(v) for k, v in meta.items()}
