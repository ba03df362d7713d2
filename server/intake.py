"""Update intake checks of the aggregation server, in one unit: what is refused, with which reason
word, and in which order, so that a peer can neither starve nor blow up the server.

Order: everything that the update's *header* alone can refute (run, round, deadline, user, token,
duplicate, codec, weight, declared size) is checked before a single data byte is buffered
(:func:`precheck`); the size limit is the largest update an honest worker can send for the run's
model (:func:`update_limit`), not a fixed generous cap; the container's tensor names and shapes are checked against the model layout
before anything is decoded or allocated (:func:`check_schema`); values last (the codec refuses
non-finite values and bad sparse indices).

Every refusal reason is ``"<word>: <detail>"`` with a word from :data:`REASONS` and at most
:data:`MAX_REASON` characters; identifiers a peer chose are shortened before they are quoted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from fedseq.codec import SPARSE_TABLES, EncodedTensor, FlatCodec, registry
from fedseq.params import Layout

REASONS: dict[str, str] = {
    "unknown-run": "the update names a run this server is not serving",
    "stale": "the update's round is closed (or no round is open)",
    "future": "the update's round has not been opened yet",
    "late": "the round's deadline passed",
    "unassigned": "the user is not assigned to the round",
    "bad-token": "the token is not the user's token for this round",
    "duplicate": "the user's update for this round already arrived",
    "wrong-encoding": "the declared codec is not accepted, or a tensor's record encoding is not one it carries",
    "oversize": "declared or sent more bytes than allowed or declared",
    "truncated": "the stream ended before the declared bytes arrived",
    "malformed": "bad container, schema, sparse indices or sample count",
    "weight": "the declared num_samples is not the weight the orchestrator assigned the user",
    "non-finite": "NaN/inf values, or a step that would leave the model non-finite or exploding with this update",
    "out-of-bounds": "a value beyond the sanity bound (fedseq/engine.py UPDATE_BOUND: 65504, the largest float16)",
    "busy": "too many upload streams open (overall, or from this certificate)",
    "idle": "the upload stream sent too few bytes in its last window (StreamLimits) and was cancelled",
}
MAX_REASON = 200


def short(value: object, limit: int = 40) -> str:
    """``repr`` of a peer-chosen value, at most ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def reason(word: str, detail: str) -> str:
    """``"word: detail"``, capped at :data:`MAX_REASON` characters."""
    if word not in REASONS:
        raise ValueError(f"unknown reason word {word!r}")
    text = f"{word}: {detail}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def word(text: str) -> str:
    """The reason word of a reason string."""
    return text.split(":", 1)[0]


@dataclass(frozen=True)
class OpenRound:
    """What :func:`precheck` needs of the open round (a snapshot taken under the server's lock)."""

    round_id: int
    deadline: float
    tokens: Mapping[int, str]
    taken: frozenset[int]  # users whose update was accepted or is being decoded
    # user -> aggregation weight the orchestrator assigned (its training items); a header's
    # num_samples must equal it. A user missing here is not checked (the server names every one)
    weights: Mapping[int, int] = field(default_factory=dict)


def precheck(h, run_id: str | None, rnd: OpenRound | None, accepted_codecs: Iterable[str],
             max_update_bytes: int, now: float | None = None) -> str | None:
    """Why the update with header ``h`` is refused before any of its data is read (None: read it)."""
    if h.run_id != run_id:
        return reason("unknown-run", f"run {short(h.run_id)} (serving {short(run_id)})")
    if rnd is None or h.round_id < rnd.round_id:
        return reason("stale", f"round {h.round_id} is not open (open round: {'none' if rnd is None else rnd.round_id})")
    if h.round_id > rnd.round_id:
        return reason("future", f"round {h.round_id} is not open yet (open round: {rnd.round_id})")
    if (time.time() if now is None else now) > rnd.deadline:
        return reason("late", f"round {h.round_id} deadline passed")
    if h.user_id not in rnd.tokens:
        return reason("unassigned", f"user {h.user_id} is not assigned to round {h.round_id}")
    if rnd.tokens[h.user_id] != h.token:
        return reason("bad-token", f"bad token for user {h.user_id} in round {h.round_id}")
    if h.user_id in rnd.taken:
        return reason("duplicate", f"duplicate update for user {h.user_id} in round {h.round_id}")
    accepted = list(accepted_codecs)
    if h.encoding not in accepted:  # the header's (wire) field "encoding" is the update's codec
        return reason("wrong-encoding", f"encoding {short(h.encoding)} not accepted (this server accepts "
                                        f"{', '.join(accepted)})")
    if h.num_samples < 0:
        return reason("malformed", "negative num_samples")
    weight = rnd.weights.get(h.user_id)
    if weight is not None and h.num_samples != weight:
        return reason("weight", f"update of user {h.user_id} declares num_samples {h.num_samples}; the "
                                f"orchestrator assigned weight {weight}")
    if h.total_bytes < 0 or h.total_bytes > max_update_bytes:
        return reason("oversize", f"update of user {h.user_id} declares {h.total_bytes} bytes; the limit is "
                                  f"{max_update_bytes}")
    return None


def tensor_encodings(codec: str) -> set[str]:
    """Record encodings the tensors of an update in ``codec`` may use: the codec's own, the
    fallback fedseq.codec.encode_state applies to tensors it does not fit, and for a dense-*
    codec dense-fp32 (integer tensors are stored raw under it); the registry's ``carries``
    (fedseq/codec/registry.py). Empty for a codec the registry does not know."""
    entry = registry.CODECS.get(codec)
    return set() if entry is None else set(entry.carries)


def check_schema(encoded: list[EncodedTensor], layout: Layout, codec: str) -> str | None:
    """Why the unpacked container of an update in ``codec`` cannot be this model's update (None:
    decode it). Names, shapes and per-tensor record encodings are compared with the layout *before*
    decoding, so a payload that declares a huge shape (a "sparse bomb") allocates nothing."""
    allowed = tensor_encodings(codec)
    entry = registry.CODECS.get(codec)
    odd = next((e for e in encoded if e.encoding not in allowed), None)
    if odd is None and entry is not None and entry.sparse:  # the tables must really be sparse: no dense bypass
        odd = next((e for e in encoded if e.name in SPARSE_TABLES and e.encoding != codec), None)
    if odd is None and entry is not None and entry.dense:  # only integer tensors may fall back to dense-fp32
        odd = next((e for e in encoded if "float" in e.dtype and e.encoding != codec), None)
    if odd is not None:
        return reason("wrong-encoding", f"tensor {short(odd.name)} is encoded {short(odd.encoding)} but the update "
                                        f"declares {short(codec)} (allowed per tensor: {sorted(allowed)}; the "
                                        f"embedding tables exactly the declared one)")
    want = dict(zip(layout.names, layout.shapes, strict=True))
    got = {e.name: tuple(e.shape) for e in encoded}
    if len(got) != len(encoded):
        return reason("malformed", "a tensor name appears twice")
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return reason("malformed", f"tensor names differ from the model: missing {short(missing, 60)}, "
                                   f"unexpected {short(extra, 60)}")
    bad = next((n for n in want if tuple(want[n]) != got[n]), None)
    if bad is not None:
        return reason("malformed", f"tensor {bad!r} has shape {short(list(got[bad]))}, the model's is {list(want[bad])}")
    return None


UPDATE_MARGIN = 1.1  # the per-update limit: the largest honest update times this ...
UPDATE_FRAMING = 4096  # ... plus this many bytes


def largest_update(layout: Layout, codec: str) -> int:
    """Bytes of the largest update an honest worker can send for ``layout`` in ``codec``: every
    coordinate nonzero (every row of the sparse tables stored), encoded by the encoder the workers
    use (:class:`fedseq.codec.FlatCodec`, the bytes of ``pack(encode_state(...))``). A container's
    size depends only on which rows are stored, never on the values, so this is exact."""
    flat = FlatCodec.of(tuple(layout.names), tuple(tuple(s) for s in layout.shapes), codec, frozenset(SPARSE_TABLES))
    return len(flat.encode(torch.ones(layout.dim)))


def update_limit(layout: Layout, codec: str, cap: int) -> int:
    """The most bytes an update in ``codec`` may declare in a run of ``layout``:
    :func:`largest_update` times :data:`UPDATE_MARGIN` plus :data:`UPDATE_FRAMING`, and at most
    ``cap`` (the server's ``max_update_bytes``). For the default run (synthetic data, SASRec,
    sparse-fp32) 553 KB instead of the 64 MiB cap."""
    return min(cap, int(largest_update(layout, codec) * UPDATE_MARGIN) + UPDATE_FRAMING)


CONTROL_THREADS = 8  # gRPC threads a server keeps beyond its upload streams and one identity's share


@dataclass(frozen=True)
class StreamLimits:
    """Upload streams a server keeps open at once (overall and per certificate) and the byte rate
    below which one is cancelled. The gRPC thread pool holds ``max_streams`` plus one identity's
    fair share (fedseq/fairshare.py) plus :data:`CONTROL_THREADS`, so control calls (OpenRound,
    CloseRound, health) find a thread however many uploads hang and whatever one peer opens.

    ``max_per_peer`` counts the streams of one certificate common name, whatever address they come
    from (of one host without TLS). A stream that received fewer than ``min_bytes`` bytes (chunks
    as serialized) in its last window of ``idle_timeout`` seconds is cancelled ("idle"), so a drip
    of a byte every 20 s is cut after one window. Honest streams always pass: a worker sends every
    update it computes as soon as it is encoded, and the smallest honest update is far above
    ``min_bytes`` (measured on the default synthetic run, SASRec, first round of 400 users: 372 KB
    under sparse-fp32, 187 KB under sparse-fp16, 115 KB under int8-row, 442-498 KB dense-fp32; the
    tests' tiny data sets give the same, the model's dense blocks dominate), so a window with one
    update in it passes, and a window without any is one the old rule (nothing for
    ``idle_timeout`` seconds) cut as well. Default 16 KiB: 7x below the smallest measured update,
    546 B/s over the 30 s window."""

    max_streams: int = 16
    max_per_peer: int = 4
    idle_timeout: float = 30.0  # seconds: the window over which a stream must send min_bytes
    min_bytes: int = 16 << 10

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.max_per_peer < 1 or self.idle_timeout <= 0 or self.min_bytes < 1:
            raise ValueError("stream limits must be positive")
