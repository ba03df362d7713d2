"""Encode and decode one tensor (:func:`encode` / :func:`decode`) and a state dict or update
(:func:`encode_state` / :func:`decode_state`): the checks every encoding shares, integer and bool
tensors (stored raw by the ``dense-*`` encodings), and the choice of encoding per tensor; the
payload itself is the registry's (registry.py).

Integer and bool tensors (``int8, uint8, int16, int32, int64, bool``): every ``dense-*``
encoding stores the raw values in the original dtype (``N * itemsize`` bytes; bool as one byte
0/1), losslessly, and :func:`decode` returns the original dtype. ``sparse-*`` and ``int8-row``
reject integer tensors (:func:`encode_state` falls back to ``dense-fp32`` for them).

Float tensors decode to float32 (whatever their original float dtype), CPU, contiguous.
Non-finite input (NaN/inf) is rejected at encode, and decode rejects payloads that would
produce NaN/inf (e.g. a corrupted exponent), so a decoded update is always finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from . import registry
from .records import (
    _DTYPE_NAME,
    _FLOAT_DTYPES,
    _INT_DTYPES,
    MAX_NUMEL,
    CodecError,
    EncodedTensor,
    _err,
    _expect_len,
    _first_nonfinite,
    _from_le,
    _le,
)

# the row-sparse tables of every fedseq model: the tensors a sparse-* update encodes sparsely (the
# rest fall back to a dense encoding), and that a server requires in the declared encoding
SPARSE_TABLES = ("item_emb.weight", "pos_emb.weight")


def encode(name: str, tensor: torch.Tensor, encoding: str = "dense-fp32") -> EncodedTensor:
    """Encode one tensor (any device; gradients detached). See the encoding modules for layouts.

    Raises :class:`CodecError` for unknown encodings, unsupported dtypes, non-finite values,
    fp16/bf16 overflow, sparse encodings on non-2-D tensors, and sparse/int8 on integer tensors.
    """
    if not isinstance(name, str):
        raise CodecError(f"tensor name must be a str, got {type(name).__name__}")
    codec = registry.lookup(name, encoding)
    if not isinstance(tensor, torch.Tensor):
        raise _err(name, encoding, f"expected a torch.Tensor, got {type(tensor).__name__}")
    dtype = _DTYPE_NAME.get(tensor.dtype)
    if dtype is None:
        raise _err(name, encoding, f"unsupported dtype {tensor.dtype}")
    t = tensor.detach().cpu().contiguous()
    shape = tuple(t.shape)

    if dtype in _INT_DTYPES:
        if not codec.dense:
            raise _err(name, encoding, f"integer tensor (dtype {dtype}) needs a dense-* encoding")
        raw = t.to(torch.uint8) if dtype == "bool" else t
        data = _le(raw.numpy(), _INT_DTYPES[dtype][1])
        return EncodedTensor(name, dtype, shape, encoding, data)

    if not codec.checks_finite and not bool(torch.isfinite(t).all()):
        raise _err(name, encoding, f"non-finite input: {_first_nonfinite(t)}")
    x = t.to(torch.float32)
    if dtype == "float64" and not bool(torch.isfinite(x).all()):
        raise _err(name, encoding, "float64 values overflow the float32 range")
    return EncodedTensor(name, dtype, shape, encoding, codec.encode(name, x))


def decode(enc: EncodedTensor, *, max_numel: int = MAX_NUMEL) -> torch.Tensor:
    """Decode one tensor: float32 (or the original integer/bool dtype for dense-encoded integer
    tensors), on CPU, contiguous, with ``enc.shape``.

    Raises :class:`CodecError` on unknown encoding/dtype, bad shape, wrong payload length, bad
    sparse header or indices, invalid int8 scales/values, non-finite results, or more than
    ``max_numel`` elements.
    """
    name, encoding = enc.name, enc.encoding
    codec = registry.lookup(name, encoding)
    shape = enc.shape
    if any(d < 0 for d in shape):
        raise _err(name, encoding, f"negative dimension in shape {list(shape)}")
    n = math.prod(shape)
    if n > max_numel:
        raise _err(name, encoding, f"shape {list(shape)} has {n} elements, over the limit {max_numel}")

    if enc.dtype in _INT_DTYPES:
        if not codec.dense:
            raise _err(name, encoding, f"integer dtype {enc.dtype} is only valid with dense-* encodings")
        tdt, ndt = _INT_DTYPES[enc.dtype]
        _expect_len(enc, n * ndt.itemsize)
        raw = _from_le(enc.data, ndt)
        if enc.dtype == "bool" and bool((raw > 1).any()):
            raise _err(name, encoding, "bool payload holds bytes other than 0 and 1")
        return raw.to(tdt).reshape(shape)
    if enc.dtype not in _FLOAT_DTYPES:
        raise _err(name, encoding, f"unknown dtype {enc.dtype!r}")
    return codec.decode(enc)


def _resolve(name: str, t: torch.Tensor, requested: str, sparse_ok: Callable[[str], bool]) -> str:
    registry.lookup(name, requested)
    if t.dtype not in _FLOAT_DTYPES.values():
        return registry.RAW_INTS  # integer/bool: raw values in their own dtype, lossless
    return _resolve_float(name, t.dim(), requested, sparse_ok)


def _resolve_float(name: str, ndim: int, requested: str, sparse_ok: Callable[[str], bool]) -> str:
    codec = registry.CODECS[requested]
    if codec.fits(ndim) and (not codec.sparse or sparse_ok(name)):
        return requested
    return codec.fallback


def encode_state(
    tensors: Mapping[str, torch.Tensor],
    encoding: str | Mapping[str, str] = "dense-fp32",
    sparse_ok: Callable[[str], bool] | None = None,
) -> list[EncodedTensor]:
    """Encode a state dict / update, choosing the encoding per tensor (order preserved).

    ``encoding`` is one name for all tensors, or a mapping name -> encoding; a mapping must cover
    every tensor, either by name or through the default key ``"*"``, and may not name tensors
    that are absent (typos fail loudly). The requested encoding is then adapted per tensor (the
    registry's ``fits``, ``sparse`` and ``fallback``):

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
        registry.lookup("*", encoding)
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
