"""The container of encoded tensors (:func:`pack` / :func:`unpack`), for chunked gRPC byte streams
and for the store (model patches, fedseq/delta.py)::

    header  4s magic b"FSQT" | uint8 version (1) | uint8 flags (0) | uint16 reserved (0)
            | uint32 record count
    record  uint16 name length | name (UTF-8)
            | uint8 dtype length | dtype (ASCII) | uint8 encoding length | encoding (ASCII)
            | uint8 ndim | ndim * int64 dims
            | uint64 data length | data
            | uint32 CRC32 (zlib) of every preceding byte of this record
    nothing may follow the last record.

All multi-byte numbers are little-endian. A bare :class:`EncodedTensor` carries no checksum:
decode detects truncation, inconsistent lengths, bad indices and non-finite results, but a bit
flip that yields another finite number can only be caught by the CRC32 of the container (or by
the transport).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from . import registry
from .records import _FLOAT_DTYPES, _INT_DTYPES, CodecError, EncodedTensor

_MAGIC = b"FSQT"
_VERSION = 1
_PACK_HDR = struct.Struct("<4sBBHI")
_U8 = struct.Struct("<B")
_U16S = struct.Struct("<H")
_U32S = struct.Struct("<I")
_U64S = struct.Struct("<Q")
_MAX_NDIM = 32


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
    """Serialise encoded tensors into the self-describing container (see the module docstring)."""
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
        enc, pos = _record(mv, total, count, i, pos)
        out.append(enc)
    if pos != total:
        raise CodecError(
            f"pack container has {total - pos} trailing bytes after its {count} records (corrupted length?)"
        )
    return out


def _u8_field(mv: memoryview, total: int, count: int, i: int, pos: int, what: str) -> tuple[bytes, int]:
    """A field of record ``i`` stored as a 1-byte length then its bytes, at ``pos``, and the
    position after it (the byte after it, the next field's length, must be there too)."""
    (n,) = _U8.unpack_from(mv, pos)
    pos += 1
    _need(total, count, i, pos, n + 1, what)
    return bytes(mv[pos : pos + n]), pos + n


def _record(mv: memoryview, total: int, count: int, i: int, pos: int) -> tuple[EncodedTensor, int]:
    """Record ``i`` of the container ``mv``, which starts at ``pos``, and the position after it."""
    start = pos
    _need(total, count, i, pos, 2, "name length")
    (nlen,) = _U16S.unpack_from(mv, pos)
    pos += 2
    _need(total, count, i, pos, nlen + 1, "name")
    name_b = bytes(mv[pos : pos + nlen])
    pos += nlen
    dtype_b, pos = _u8_field(mv, total, count, i, pos, "dtype")
    enc_b, pos = _u8_field(mv, total, count, i, pos, "encoding")
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
    if encoding not in registry.CODECS:
        raise CodecError(f"pack container record {i} (tensor {name!r}): unknown encoding {encoding!r}")
    if dtype not in _FLOAT_DTYPES and dtype not in _INT_DTYPES:
        raise CodecError(f"pack container record {i} (tensor {name!r}): unknown dtype {dtype!r}")
    if ndim > _MAX_NDIM or any(d < 0 for d in shape):
        raise CodecError(f"pack container record {i} (tensor {name!r}): invalid shape {list(shape)}")
    return EncodedTensor(name, dtype, shape, encoding, data), pos
