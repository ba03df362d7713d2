"""The registry of update codecs: one :class:`Codec` line per codec in :data:`CODECS` (each
codec's name is also the encoding of the tensor records in its payload layout).

Everything that depends on which codecs exist reads this table: :func:`fedseq.codec.encode` /
:func:`fedseq.codec.decode` dispatch on it, :func:`fedseq.codec.encode_state` takes its fallbacks
from it, :func:`fedseq.codec.unpack` refuses encodings not in it, :class:`fedseq.codec.FlatCodec`
picks its fast paths from it, and the server's intake (server/intake.py) derives which tensor
encodings an update may carry from it. ``CODEC_NAMES`` (fedseq/codec_names.py, re-exported by
fedseq.codec; the run config reads it without torch) is its names, in order: this module refuses
to import when the two differ.

A new codec is a module with its encode and decode functions (see dense.py, sparse.py,
int8_row.py) and one line below. The registry is read at call time (``registry.CODECS``), so a
test can register a codec in a copy of it (tests/test_codec.py
``test_a_codec_is_one_registry_line``).
"""

from __future__ import annotations

import torch

from ..codec_names import CODEC_NAMES
from . import dense, int8_row, sparse
from .records import RAW_INTS, Codec, CodecError

__all__ = ["CODECS", "RAW_INTS", "Codec", "lookup"]


def _table(*codecs: Codec) -> dict[str, Codec]:
    table = {c.name: c for c in codecs}
    if len(table) != len(codecs):
        raise ValueError("two codecs share an encoding name")
    if any(c.fallback not in table for c in codecs):
        raise ValueError("a codec falls back to an encoding that is not registered")
    return table


#: name -> :class:`Codec`, in the order of ``fedseq.codec.CODEC_NAMES``.
CODECS: dict[str, Codec] = _table(
    dense.codec("dense-fp32", torch.float32),
    dense.codec("dense-fp16", torch.float16),
    dense.codec("dense-bf16", torch.bfloat16),
    sparse.codec("sparse-fp32", torch.float32, fallback="dense-fp32"),
    sparse.codec("sparse-fp16", torch.float16, fallback="dense-fp16"),
    int8_row.CODEC,
)
if tuple(CODECS) != CODEC_NAMES:  # the torch-free copy of the names the run config checks
    raise ImportError(f"fedseq/codec_names.py CODEC_NAMES {CODEC_NAMES} differ from the registry's {tuple(CODECS)}")


def lookup(name: str, encoding: str) -> Codec:
    """The codec of ``encoding`` (for tensor ``name``); :class:`CodecError` if there is none."""
    codec = CODECS.get(encoding) if isinstance(encoding, str) else None
    if codec is None:
        raise CodecError(
            f"tensor {name!r}: unknown encoding {encoding!r}; known encodings: {', '.join(CODECS)}"
        )
    return codec
