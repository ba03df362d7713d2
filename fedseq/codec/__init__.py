"""Tensor codec: the one place where tensors become bytes (wire and model store) and back.

No pickle anywhere: every payload is a fixed, documented little-endian layout, and every decode
validates lengths, indices and finiteness before it returns a tensor.

Two formats live here:

- per-tensor encodings (:func:`encode` / :func:`decode`, :func:`encode_state` /
  :func:`decode_state`) and their container (:func:`pack` / :func:`unpack`), for updates on the
  wire and for model patches (fedseq.delta);
- whole-model blobs (:func:`model_to_bytes` / :func:`model_from_bytes`), the format of the model
  store and of model downloads.

:class:`FlatCodec` is a fast path of the first for one model layout's flat update vectors: the
same container bytes, and a decode straight into a round-matrix row.

Codecs (``CODEC_NAMES``, registry order): ``dense-fp32``, ``dense-fp16``, ``dense-bf16``,
``sparse-fp32``, ``sparse-fp16``, ``int8-row``. Each is one entry of the registry
(``registry.CODECS``), whose module documents its payload layout.

Two names, two things (docs/architecture.md, "Names"): a *codec* is what a whole update is
written in (the run's ``--codec``, what an update declares and a server accepts); an *encoding*
is the payload layout of one tensor record (``EncodedTensor.encoding``). Every encoding is named
after the codec whose layout it is; an update in codec ``c`` carries records in the encodings
``c.carries``: ``c``'s own, its fallback, and for a ``dense-*`` codec ``dense-fp32`` (integer
tensors stored raw).

Modules (every public name is re-exported here: import from ``fedseq.codec``):

- ``records.py``: :class:`EncodedTensor` (mirrors the protobuf ``Tensor`` message),
  :class:`CodecError`, the registry entry type ``Codec``, dtypes and shared helpers;
- ``registry.py``: ``CODECS``, one ``Codec`` line per codec;
- ``dense.py`` (``dense-*``), ``sparse.py`` (``sparse-*``), ``int8_row.py`` (``int8-row``): the
  payload layouts and their encode/decode functions;
- ``tensors.py``: :func:`encode`, :func:`decode`, :func:`encode_state`, :func:`decode_state`
  (integer/bool tensors, finiteness, the encoding chosen per tensor);
- ``container.py``: :func:`pack` / :func:`unpack`, the container layout;
- ``flat.py``: :class:`FlatCodec`;
- ``model_blob.py``: :func:`model_to_bytes`, :func:`read_model_header`, :func:`model_from_bytes`
  (safetensors).

To add a codec: a module with its encode and decode functions, its ``Codec`` line in
``registry.CODECS``, and tests (docs/architecture.md, "An update codec").
"""

from __future__ import annotations

from ..codec_names import CODEC_NAMES
from .container import pack, unpack
from .flat import FlatCodec
from .model_blob import model_from_bytes, model_to_bytes, read_model_header
from .records import MAX_NUMEL, CodecError, EncodedTensor
from .tensors import SPARSE_TABLES, decode, decode_state, encode, encode_state

__all__ = [
    "CODEC_NAMES",
    "MAX_NUMEL",
    "SPARSE_TABLES",
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
