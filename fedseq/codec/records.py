"""The types every part of the codec shares: the record every encoding produces
(:class:`EncodedTensor`), the entry of an encoding in the registry (:class:`Codec`; the table
itself is registry.py), the codec's error, the dtypes it knows, and the small helpers the encoding
modules share (little-endian conversions, length and finiteness checks, the fp16/bf16 conversion
that refuses overflow).

An :class:`EncodedTensor` mirrors the protobuf message
``Tensor { string name = 1; string dtype = 2; repeated int64 shape = 3; string encoding = 4;
bytes data = 5; }``. ``dtype`` is the dtype of the *original* tensor, ``shape`` its shape, and
``data`` the payload whose layout is fixed by ``encoding`` (and, for integer tensors, ``dtype``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

#: Default cap on the element count decode will materialise (sparse payloads expand to R*C
#: elements, so a tiny hostile payload could otherwise ask for an enormous allocation).
MAX_NUMEL = 1 << 28

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


class CodecError(ValueError):
    """A tensor cannot be encoded, or a payload/container is corrupted, truncated or inconsistent."""


CodecError.__module__ = "fedseq.codec"  # its public home (tracebacks and reprs name fedseq.codec.CodecError)


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


#: The encoding integer and bool tensors are stored under (raw values in their own dtype),
#: whatever encoding an update asks for.
RAW_INTS = "dense-fp32"


def _any_ndim(_ndim: int) -> bool:
    return True


@dataclass(frozen=True)
class Codec:
    """One codec: its name on the wire (an update's codec, and the encoding of the tensor records
    in its payload layout), its payload functions and the rules around them.

    ``encode(name, x)``: the payload of ``x``, a CPU contiguous float32 tensor (finite, unless
    ``checks_finite``), or :class:`CodecError`. ``decode(enc)``: a finite, CPU, contiguous float32
    tensor of ``enc.shape`` from a float tensor's record (shape and element count checked
    already), or :class:`CodecError`.

    ``fallback``: the encoding :func:`encode_state` uses for float tensors this one does not fit
    (itself if it fits every tensor). ``fits(ndim)``: whether it fits a float tensor of that many
    dimensions. ``sparse``: row-sparse, so it applies only to the tables ``sparse_ok`` names (and
    an update declared in it must carry those tables in it). ``dense``: a ``dense-*`` encoding,
    which also stores integer/bool tensors raw and under which an update's float tensors must all
    use it exactly. ``checks_finite``: ``encode`` checks its input for NaN/inf itself (e.g. only
    on the rows it stores), so the generic check before it is skipped.

    ``fast`` / ``values``: the payload layout :class:`FlatCodec` may write and read itself:
    ``"dense"`` (``N`` values of the torch dtype ``values``: float32, float16 or bfloat16, in C
    order) or ``"sparse"`` (the sparse.py row layout with ``values`` float32 or float16); None:
    FlatCodec calls ``encode``/``decode`` for such tensors.
    """

    name: str
    encode: Callable[[str, torch.Tensor], bytes]
    decode: Callable[[EncodedTensor], torch.Tensor]
    fallback: str
    fits: Callable[[int], bool] = _any_ndim
    sparse: bool = False
    dense: bool = False
    checks_finite: bool = False
    fast: str | None = None
    values: torch.dtype | None = None

    def __post_init__(self) -> None:
        ok = {None: (None,), "dense": (torch.float32, torch.float16, torch.bfloat16),
              "sparse": (torch.float32, torch.float16)}
        if self.values not in ok.get(self.fast, ()):
            raise ValueError(f"codec {self.name!r}: fast path {self.fast!r} with values {self.values}")

    @property
    def carries(self) -> frozenset[str]:
        """The tensor record encodings an update in this codec may carry: its own, its fallback,
        and for a dense-* codec :data:`RAW_INTS` (its integer tensors)."""
        return frozenset({self.name, self.fallback, *([RAW_INTS] if self.dense else [])})


def _err(name: str, encoding: str, what: str) -> CodecError:
    return CodecError(f"tensor {name!r} (encoding {encoding!r}): {what}")


def _le(arr: np.ndarray, dt: np.dtype) -> bytes:
    return arr.astype(dt, copy=False).tobytes()


def _from_le(data: bytes | memoryview, dt: np.dtype, offset: int = 0, count: int = -1) -> torch.Tensor:
    arr = np.frombuffer(data, dtype=dt, count=count, offset=offset)
    return torch.from_numpy(arr.astype(dt.newbyteorder("="), copy=True))


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
