"""Whole-model blobs (:func:`model_to_bytes` / :func:`model_from_bytes`), the format of the model
store (fedseq/store.py) and of model downloads.

They are safetensors files: a ``uint64`` little-endian header length ``n``, ``n`` bytes of JSON
header (per tensor: dtype, shape, data offsets; optional ``"__metadata__"``, a str -> str map),
then the raw tensor data. Tensors keep their dtype and values exactly (no encoding step). Equal
tensors with at most one metadata key give equal bytes, so the store can compare versions by
sha256 (see :func:`model_to_bytes` for two or more keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from .records import CodecError

_MAX_MODEL_HEADER = 100 * 1024 * 1024  # bytes of safetensors JSON header a model blob may declare


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
