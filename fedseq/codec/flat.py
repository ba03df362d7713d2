"""The fast path of update uploads: :class:`FlatCodec` encodes the flat ``[D]`` float32 update
vector of one model layout into exactly the container bytes of ``pack(encode_state(...))``, and
decodes such a container straight into a round-matrix row. Which tensors it handles itself and
which it leaves to :func:`encode` / :func:`decode` is the registry's ``Codec.fast``.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import registry
from .container import _MAGIC, _PACK_HDR, _U32S, _U64S, _VERSION, _meta_prefix, pack
from .records import _F32, _I16, MAX_NUMEL, CodecError, EncodedTensor
from .sparse import _decode_rows_into, _fast_payload
from .tensors import _resolve_float, decode, encode, encode_state


def _fast_finite(a: np.ndarray) -> bool:
    """True only if every value of the float32 array ``a`` is finite. One pass (a dot product):
    NaN and inf propagate into it, but huge finite values can overflow it too, so False means
    "check exactly", never "refuse"."""
    if a.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.dot(a, a)))


# value type of a dense run -> the bound below which |x| converts to a finite value: fp16 max (|x| <= fp16
# max converts to a finite fp16, |x| >= 65520 overflows; between: checked exactly), bf16 max (the same for
# bf16); float32 needs none
_SAFE = {torch.float32: math.inf, torch.float16: 65504.0, torch.bfloat16: 3.3895313892515355e38}


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    encoding: str  # resolved for a float32 tensor of this shape
    prefix: bytes  # the container record up to its data length
    prefix_crc: int
    fast: str | None  # the registry's fast path of the encoding ("dense", "sparse" or None) ...
    values: torch.dtype | None  # ... and its value type


class FlatCodec:
    """Encode and decode the flat ``[D]`` float32 update vectors of one model layout, fast.

    :meth:`encode` returns exactly the bytes of
    ``pack(encode_state(split(vec), codec, sparse_ok=lambda n: n in sparse))`` (``split``: the
    layout's views of ``vec``) without building those tensors: record headers and their CRC
    prefixes are computed once, dense tensors are checked and converted by runs of consecutive
    tensors in one encoding (dense-fp32 ones go from the vector's memory straight into the one
    output join), and the sparse tables' stored rows are found from a hint of touched rows when the
    hint provably covers them. Tensors in an encoding without a fast path in the registry
    (``Codec.fast`` None: int8-row) take :func:`encode` one by one.

    :meth:`decode_into` decodes a container of exactly that form straight into a ``[D]`` row
    (sparse rows into their slots, no per-tensor dense tensor); a container in any other form, or
    one with any fault, is left to the general path (:func:`unpack`, :func:`decode_state`), which
    gives the verdict.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], codec: str,
                 sparse: Iterable[str] | None = None) -> None:
        registry.lookup("*", codec)
        self.names = tuple(names)
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        if len(self.names) != len(self.shapes):
            raise CodecError("FlatCodec: names and shapes differ in length")
        self.codec = codec  # the update's codec; each tensor's record encoding is its _Spec's
        self.sparse = None if sparse is None else frozenset(sparse)
        ok: Callable[[str], bool] = (lambda _n: True) if self.sparse is None else self.sparse.__contains__
        self._ok = ok
        specs: list[_Spec] = []
        off = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            if any(d < 0 for d in shape):
                raise CodecError(f"FlatCodec: tensor {name!r} has a negative dimension {list(shape)}")
            n = math.prod(shape)
            enc = _resolve_float(name, len(shape), codec, ok)
            prefix = _meta_prefix(name, "float32", enc, shape)
            entry = registry.CODECS[enc]
            specs.append(_Spec(name, shape, off, n, enc, prefix, zlib.crc32(prefix), entry.fast, entry.values))
            off += n
        self._specs = tuple(specs)
        self.dim = off
        self._header = _PACK_HDR.pack(_MAGIC, _VERSION, 0, 0, len(specs))
        # runs [i, j) of consecutive tensors in one dense encoding: one finiteness pass (and one
        # conversion to fp16/bf16) each
        runs: dict[int, int] = {}
        i = 0
        while i < len(specs):
            if specs[i].fast == "dense":
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
            return pack(encode_state(self._split(vec), self.codec, sparse_ok=self._ok))
        a = vec.detach().cpu().contiguous().numpy()
        parts: list[Any] = [self._header]
        run, run_at = a, 0  # the current run's payload values (bit patterns) and its offset in `a`
        for i, s in enumerate(self._specs):
            seg = a[s.offset : s.offset + s.size]
            if s.fast == "dense":
                j = self._runs.get(i)
                if j is not None:
                    run, run_at = self._run_payload(a, i, j), s.offset
                data: Any = run[s.offset - run_at : s.offset - run_at + s.size].data.cast("B")  # the join is the copy
            elif s.fast == "sparse":
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
        assert first.values is not None
        limit = _SAFE[first.values]
        if not _fast_finite(x) or (limit < math.inf and x.size and not float(np.abs(x).max()) < limit):
            for t in self._specs[i:j]:  # exact checks, in order (a false alarm passes them all)
                encode(t.name, torch.from_numpy(a[t.offset : t.offset + t.size]).view(t.shape), t.encoding)
        if first.values == torch.float32:
            return x
        # the conversion encode() makes; finite, as |x| is below the limit or the exact checks passed
        return torch.from_numpy(x).to(first.values).view(torch.int16).numpy()

    def _sparse(self, s: _Spec, x: np.ndarray, hint: Any) -> bytes:
        assert s.values is not None
        data = _fast_payload(s.values, x, hint)
        if data is None:  # a non-finite or overflowing stored value: the general path raises the usual error
            return encode(s.name, torch.from_numpy(x), s.encoding).data
        return data

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
            if s.fast == "dense" and s.values == torch.float32:
                if dlen != 4 * s.size:
                    return False
                dst[:] = np.frombuffer(data, dtype=_F32)
            elif s.fast == "dense" and s.values is not None:  # fp16 / bf16: widened exactly, as decode() does
                if dlen != 2 * s.size:
                    return False
                raw = torch.from_numpy(np.frombuffer(data, dtype=_I16).copy())
                out[s.offset : s.offset + s.size].copy_(raw.view(s.values))
            elif s.fast == "sparse" and s.values is not None:
                written = _decode_rows_into(s.values, s.shape, data, dst, None if dirty is None else dirty.get(s.name))
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

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], codec: str,
           sparse: frozenset[str] | None = None) -> FlatCodec:
        """A cached :class:`FlatCodec` (arguments hashable: tuples, a frozenset)."""
        return FlatCodec(names, shapes, codec, sparse)
