"""The ``int8-row`` encoding and its registry entry (:data:`CODEC`).

Absmax per-row symmetric int8 quantisation, the vector-wise quantisation of LLM.int8()
(Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
Scale"), without the outlier decomposition. Rows: ``shape[0]`` rows of ``N / shape[0]``
columns for tensors with ndim >= 2; one row for 1-D and 0-D tensors. Per row
``scale = absmax / 127`` in float32 (nudged by one ulp where float32 rounding would break
the bound: subnormal scales, and scales whose ``127 * scale`` overflows) and
``q = clamp(round(x / scale), -127, 127)``; little-endian::

    R float32 scales (>= 0, finite), then R * C int8 values (-128 is invalid), row-major

Error bound per element: ``|decode(x) - x| <= scale / 2`` (plus the float32 rounding of the
dequantised value). All-zero rows get scale 0. :func:`fedseq.codec.encode_state` sends 0-D
scalars as ``dense-fp32`` instead (a scale per scalar saves nothing).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .records import _F32, Codec, EncodedTensor, _err, _expect_len, _finite_or_raise, _le

_F32_OVERFLOW = 2.0**128 - 2.0**103  # reals at or above this round to inf in float32


def _int8_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    n = math.prod(shape)
    if len(shape) >= 2:
        r = shape[0]
        return r, (n // r if r else 0)
    return 1, n


def _int8_encode(_name: str, x: torch.Tensor) -> bytes:
    r, c = _int8_rows(tuple(x.shape))
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
    return _finite_or_raise(enc, out.reshape(enc.shape).contiguous())


def _has_rows(ndim: int) -> bool:
    return ndim >= 1


CODEC = Codec("int8-row", _int8_encode, _int8_decode, fallback="dense-fp32", fits=_has_rows)
