"""The ``dense-*`` encodings: every element, one after the other. :func:`codec` makes the
registry entry of one of them from its value type. All multi-byte numbers are little-endian;
``N`` is the element count of ``shape``.

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

Integer and bool tensors are stored raw by every ``dense-*`` encoding (fedseq/codec/tensors.py);
this module handles float tensors.
"""

from __future__ import annotations

import functools
import math

import torch

from .records import _F32, _I16, Codec, EncodedTensor, _expect_len, _finite_or_raise, _from_le, _le, _to_half


def _encode(encoding: str, values: torch.dtype, name: str, x: torch.Tensor) -> bytes:
    if values == torch.float32:
        return _le(x.numpy(), _F32)
    # fp16 / bf16: the raw 16-bit patterns (the same bytes as the little-endian fp16 values)
    return _le(_to_half(name, encoding, x, values).view(torch.int16).numpy(), _I16)


def _decode(values: torch.dtype, enc: EncodedTensor) -> torch.Tensor:
    n = math.prod(enc.shape)
    if values == torch.float32:
        _expect_len(enc, 4 * n)
        out = _from_le(enc.data, _F32).reshape(enc.shape)
    else:  # widened exactly
        _expect_len(enc, 2 * n)
        out = _from_le(enc.data, _I16).view(values).to(torch.float32).reshape(enc.shape)
    return _finite_or_raise(enc, out.contiguous())


def codec(name: str, values: torch.dtype) -> Codec:
    """The registry entry of the dense encoding ``name`` of ``values`` (float32, float16 or
    bfloat16) elements."""
    return Codec(name, functools.partial(_encode, name, values), functools.partial(_decode, values),
                 fallback=name, dense=True, fast="dense", values=values)
