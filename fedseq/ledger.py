"""The communication ledger: every byte that crossed a gRPC call or the model store, attributed
to run, round, worker, user and message kind.

One :class:`Entry` per (call or store operation, purpose): a user's update upload, a worker's
model download in a round, the orchestrator's Train request to a worker and its reply, a model
version the aggregator wrote to the store, ... Services measure what they send or receive and
report it as ``fedseq.v1.ByteCount`` messages (workers in ``TrainReply.ledger`` /
``EvaluateReply.ledger``); the orchestrator measures its own requests and replies, adds the
aggregator's store writes and reads from ``RoundSummary``, and appends the entries of every
round to the run's Redis stream ``ledger`` (``fedseq:{run}:log:ledger``). ``results.json`` holds
the totals and the per-round series; ``ledger.jsonl`` beside it holds every entry.

What a size is
--------------
``bytes``
    gRPC messages: the serialized protobuf size (``Message.ByteSize()``), summed over the
    messages of the entry (e.g. every ``UpdateChunk`` of one user's update). Store operations:
    the payload size (the safetensors blob of a model version). Not counted: gRPC's 5-byte
    length prefix per message (``5 * messages`` if you want it), HTTP/2 frame and header
    overhead, TCP/IP and TLS, and Redis protocol framing and keys.
``wire_bytes``
    The size of the message body after gRPC message compression. With ``compression: gzip``
    gRPC core compresses every message on its own with zlib deflate at ``Z_DEFAULT_COMPRESSION``
    (level 6), window bits ``15 | 16`` (gzip wrapper), memLevel 8, default strategy, and sends
    the compressed form only when it is strictly smaller than the original (else the message
    goes uncompressed); see ``src/core/lib/compression/message_compress.cc`` in grpc/grpc.
    :func:`wire_size` computes exactly that with Python's :mod:`zlib`, independently of gRPC (it
    is not read back from the transport; a zlib build other than gRPC's bundled one could differ
    by a few bytes). Without compression, and for store operations, ``wire_bytes == bytes``.

Directions (a worker's link to the rest of the federation)
----------------------------------------------------------
``up``
    Bytes a worker sends: its update uploads to the aggregator (kind ``update``), its replies
    to the orchestrator (Train/Evaluate/Describe replies) and requests it makes (Register,
    GetModel).
``down``
    Bytes a worker receives: model downloads (``model_download``: store reads, or GetModel
    chunks when models are served by the aggregator; a cache hit moves nothing and has no
    entry), the orchestrator's requests to it (Train, Evaluate, Describe) and replies to it
    (Register), and the aggregator's upload acknowledgements (SubmitReply).
``internal``
    The service plane, not a worker's link: orchestrator <-> aggregator control (StartRun,
    OpenRound, CloseRound) and the aggregator's model store writes (``model_write``) and reads.

``bytes_up`` / ``bytes_down`` of ``results.json`` (per epoch, per round, and in the summary) are
the sums of ``bytes`` over the ``up`` / ``down`` entries; ``wire_up`` / ``wire_down`` the same for
``wire_bytes``. Monitoring calls (GetStatus, health checks, reflection) and the bookkeeping
records (rounds, epochs and this ledger in Redis) are not federation traffic and not counted.

Kinds: ``update`` (a user's update upload), ``model_download``, ``model_write`` (aggregator ->
store), ``control`` (every other RPC message).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "COMPRESSIONS",
    "CallCounter",
    "DEFINITIONS",
    "DIRECTIONS",
    "KINDS",
    "Entry",
    "Ledger",
    "by",
    "count",
    "counted",
    "per_round",
    "read_jsonl",
    "recording",
    "totals",
    "wire_size",
    "write_jsonl",
]

KINDS = ("update", "model_download", "model_write", "control")
DIRECTIONS = ("up", "down", "internal")
COMPRESSIONS = ("none", "gzip")
STREAM = "ledger"  # Redis stream of the run's entries

#: How results.json's byte columns are defined (written beside the per-round series).
DEFINITIONS = {
    "bytes": "serialized protobuf message bytes (ByteSize) or store payload bytes; excludes gRPC's 5-byte "
             "message prefix, HTTP/2, TCP/IP and Redis protocol overhead",
    "wire_bytes": "bytes after gRPC message compression (gzip level 6, kept only when smaller), computed "
                  "with zlib; equals bytes when compression is none",
    "bytes_up": "bytes workers send: update uploads + their Orchestrator.Connect stream's hello, task "
                "results and heartbeats + their GetModel requests",
    "bytes_down": "bytes workers receive: model downloads (store reads or GetModel chunks) + the "
                  "Orchestrator.Connect stream's welcome, tasks and heartbeats + the aggregator's upload "
                  "acknowledgements",
    "bytes_internal": "orchestrator <-> aggregator control and the aggregator's model store writes/reads",
    "bytes_per_update": "mean bytes of one user's update upload (all UpdateChunk messages of the update)",
}

# gRPC core's message compression parameters (message_compress.cc: deflateInit2(&zs,
# Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 | 16, 8, Z_DEFAULT_STRATEGY) for gzip).
_GZIP_LEVEL = zlib.Z_DEFAULT_COMPRESSION
_GZIP_WBITS = 15 | 16
_GZIP_MEMLEVEL = 8


def wire_size(data: bytes | bytearray | memoryview, compression: str) -> int:
    """Bytes gRPC sends for one serialized message body under ``compression`` ("none"/"gzip"):
    the gzip size when strictly smaller than ``len(data)``, else ``len(data)`` (gRPC then sends
    the message uncompressed)."""
    n = len(data)
    if compression == "none" or n == 0:
        return n
    if compression != "gzip":
        raise ValueError(f"unknown compression {compression!r}; known: {COMPRESSIONS}")
    c = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS, _GZIP_MEMLEVEL, zlib.Z_DEFAULT_STRATEGY)
    size = len(c.compress(data)) + len(c.flush())
    return size if size < n else n


def message_sizes(msg: Any, compression: str) -> tuple[int, int]:
    """``(serialized bytes, wire bytes)`` of one protobuf message."""
    if compression == "none":
        n = msg.ByteSize()
        return n, n
    data = msg.SerializeToString()
    return len(data), wire_size(data, compression)


def count(msgs: Any, *, kind: str, direction: str, link: str, what: str, compression: str = "none",
          user: int = -1):
    """A ``fedseq.v1.ByteCount`` for one protobuf message or a sequence of messages."""
    from .v1 import common_pb2

    seq = msgs if isinstance(msgs, list | tuple) else [msgs]
    raw = wire = 0
    for m in seq:
        r, w = message_sizes(m, compression)
        raw += r
        wire += w
    return common_pb2.ByteCount(kind=kind, what=what, direction=direction, user_id=user, bytes=raw,
                                wire_bytes=wire, messages=len(seq), link=link)


def store_count(nbytes: int, *, kind: str, direction: str, link: str, what: str, user: int = -1):
    """A ``fedseq.v1.ByteCount`` for a store operation of ``nbytes`` payload bytes (uncompressed)."""
    from .v1 import common_pb2

    return common_pb2.ByteCount(kind=kind, what=what, direction=direction, user_id=user, bytes=int(nbytes),
                                wire_bytes=int(nbytes), messages=1, link=link)


SOURCES = ("measured", "reported")
WIRE_SLACK = 64  # gzip's header and trailer: a compressed message is at most this much larger
MAX_REPORTED_MESSAGES = 1 << 20


@dataclass(frozen=True)
class ReportBounds:
    """What one worker reply may report (:meth:`Ledger.add_reported`): ``max_entries`` entries of
    kinds ``model_download`` (``down``, at most ``max_model_bytes`` each: a whole model version)
    and ``control`` (at most ``max_control_bytes`` each: gRPC's message limit)."""

    max_entries: int = 8
    max_model_bytes: int = 1 << 30
    max_control_bytes: int = 8 << 20

    def why_not(self, c: Any) -> str | None:
        """Why the reported count ``c`` is not accepted (None: it is)."""
        if c.kind == "update":
            return "update uploads are measured by the aggregator, not taken from a worker's report"
        if c.kind not in ("model_download", "control"):
            return f"a worker cannot report kind {str(c.kind)[:20]!r}"
        if c.direction not in ("up", "down") or (c.kind == "model_download" and c.direction != "down"):
            return f"direction {str(c.direction)[:20]!r} is not a worker's for kind {c.kind}"
        limit = self.max_model_bytes if c.kind == "model_download" else self.max_control_bytes
        if not 0 <= c.bytes <= limit or c.wire_bytes < 0:
            return f"{c.kind} of {c.bytes} bytes is outside [0, {limit}]"
        return None


@dataclass(frozen=True)
class Entry:
    """One line of the ledger (one JSON record in Redis and in ``ledger.jsonl``)."""

    run: str
    round: int  # global round id (setup entries: the first round run after them)
    epoch: int  # 1-based epoch of the round; 0 before the first
    phase: str  # setup | train | eval | register
    worker: str  # worker id; "" on links without a worker
    user: int  # user id of an update; -1 when not per user
    kind: str  # update | model_download | model_write | control
    direction: str  # up | down | internal
    link: str  # worker-aggregator | worker-store | worker-orchestrator | orchestrator-aggregator | aggregator-store
    what: str  # RPC message or store operation
    bytes: int  # serialized protobuf bytes (or store payload bytes)
    wire_bytes: int  # after gRPC message compression (== bytes without compression)
    messages: int = 1
    # measured: by the orchestrator's channels or the aggregator (update uploads: the bytes the
    # aggregator received); reported: a worker's word (its store reads, its own sends), bounded by
    # :class:`ReportBounds` and never in place of a measured figure
    source: str = "measured"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ledger entry kind must be one of {KINDS}, got {self.kind!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"ledger entry direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.bytes < 0 or self.wire_bytes < 0 or self.messages < 0:
            raise ValueError(f"ledger entry sizes must be >= 0: {self}")
        if self.source not in SOURCES:
            raise ValueError(f"ledger entry source must be one of {SOURCES}, got {self.source!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Ledger:
    """Collects the entries of one round (or phase) of a run, then hands them over."""

    def __init__(self, run: str, round: int = -1, epoch: int = 0, phase: str = "train") -> None:
        self.run, self.round, self.epoch, self.phase = run, round, epoch, phase
        self.entries: list[Entry] = []
        self._calls = 0  # calls in flight whose reply a CallCounter still has to record
        self._settled = threading.Condition()

    def _call_started(self) -> None:
        with self._settled:
            self._calls += 1

    def _call_ended(self) -> None:
        with self._settled:
            self._calls -= 1
            self._settled.notify_all()

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every counted call's reply is recorded (replies arrive on gRPC's threads)."""
        with self._settled:
            self._settled.wait_for(lambda: self._calls == 0, timeout)

    def add(self, *, worker: str = "", user: int = -1, kind: str, direction: str, link: str, what: str,
            bytes: int, wire_bytes: int | None = None, messages: int = 1, phase: str | None = None,
            source: str = "measured") -> Entry:
        e = Entry(self.run, self.round, self.epoch, phase or self.phase, worker, int(user), kind, direction, link,
                  what, int(bytes), int(bytes if wire_bytes is None else wire_bytes), int(messages), source)
        self.entries.append(e)
        return e

    def add_message(self, msgs: Any, *, compression: str = "none", worker: str = "", user: int = -1, kind: str,
                    direction: str, link: str, what: str, phase: str | None = None) -> Entry:
        """Record one protobuf message (or a list of them) measured here."""
        c = count(msgs, kind=kind, direction=direction, link=link, what=what, compression=compression, user=user)
        return self.add_count(c, worker=worker, phase=phase)

    def add_count(self, c: Any, *, worker: str = "", phase: str | None = None) -> Entry:
        """Record a ``fedseq.v1.ByteCount`` reported by a service."""
        return self.add(worker=worker, user=c.user_id, kind=c.kind, direction=c.direction, link=c.link,
                        what=c.what, bytes=c.bytes, wire_bytes=c.wire_bytes, messages=c.messages, phase=phase)

    def add_counts(self, counts: Iterable[Any], *, worker: str = "", phase: str | None = None) -> list[str]:
        """Record counts a service reported; counts that are not valid entries (unknown kind or
        direction, negative sizes: a buggy or hostile peer) are skipped and described in the
        returned list instead of failing the run."""
        problems = []
        for c in counts:
            try:
                self.add_count(c, worker=worker, phase=phase)
            except ValueError as e:
                problems.append(str(e))
        return problems

    def add_reported(self, counts: Iterable[Any], bounds: ReportBounds, *, worker: str = "",
                     phase: str | None = None) -> list[str]:
        """Record what a worker *reports* of one call (its store reads, its requests and acks):
        never update uploads (the aggregator measures those: :meth:`add_measured_updates`), at most
        ``bounds.max_entries`` entries, each within its kind's size bound, labelled
        ``source="reported"``. Everything else is skipped and described in the returned list (a
        hostile worker's 50,000 fake entries cost the run a list of reasons, not 150 TB)."""
        problems: list[str] = []
        n = 0
        for c in counts:
            why = bounds.why_not(c)
            if why is None and n >= bounds.max_entries:
                why = f"more than {bounds.max_entries} reported entries in one reply"
            if why is not None:
                if len(problems) < 20:
                    problems.append(why)
                elif len(problems) == 20:
                    problems.append("... (further problems not listed)")
                continue
            try:
                self.add(worker=worker, user=-1, kind=c.kind, direction=c.direction, link=c.link[:64], what=c.what[:96],
                         bytes=c.bytes, wire_bytes=min(c.wire_bytes, c.bytes + WIRE_SLACK),
                         messages=min(max(c.messages, 0), MAX_REPORTED_MESSAGES), phase=phase, source="reported")
                n += 1
            except ValueError as e:
                problems.append(str(e)[:200])
        return problems

    def add_measured_updates(self, measured: Mapping[int, int], workers: Mapping[int, str],
                             reported: Iterable[tuple[str, Any]] = (), compression: str = "none") -> list[str]:
        """One ``update`` entry per user upload the aggregator measured (``measured``: user ->
        serialized bytes it received), attributed to the worker the user was assigned to
        (``workers``). A worker's own count of the same upload (``reported``: (worker, ByteCount))
        supplies only the gRPC message count and, under compression, the compressed size, bounded
        by the measured size; a report of a user the worker was not given, or a second report of
        one, is skipped and described in the returned list."""
        problems: list[str] = []
        mine: dict[int, Any] = {}
        for wid, c in reported:
            u = int(c.user_id)
            if workers.get(u) != wid or u in mine:
                if len(problems) < 20:
                    problems.append(f"worker {wid[:40]!r} reported an upload of user {u} "
                                    f"({'not its user' if workers.get(u) != wid else 'twice'})")
                continue
            mine[u] = c
        for u in sorted(measured):
            b = int(measured[u])
            c = mine.get(u)
            wire = b if compression == "none" or c is None else min(max(int(c.wire_bytes), 0), b + WIRE_SLACK)
            msgs = 1 if c is None else min(max(int(c.messages), 1), b // 4 + 1)
            self.add(worker=workers.get(u, ""), user=u, kind="update", direction="up", link="worker-aggregator",
                     what="Aggregator.SubmitUpdates", bytes=b, wire_bytes=wire, messages=msgs)
        return problems

    def dicts(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries]


# ---------------------------------------------------------------------------- sums
def _get(e: Entry | Mapping[str, Any], key: str) -> Any:
    return e[key] if isinstance(e, Mapping) else getattr(e, key)


def _zero() -> dict[str, int]:
    return {"bytes": 0, "wire_bytes": 0, "messages": 0, "entries": 0}


def _add(acc: dict[str, int], e: Entry | Mapping[str, Any]) -> None:
    acc["bytes"] += int(_get(e, "bytes"))
    acc["wire_bytes"] += int(_get(e, "wire_bytes"))
    acc["messages"] += int(_get(e, "messages"))
    acc["entries"] += 1


def totals(entries: Iterable[Entry | Mapping[str, Any]]) -> dict[str, Any]:
    """Totals of ``entries``: ``bytes`` and ``wire_bytes`` overall, ``bytes_up`` / ``bytes_down`` /
    ``bytes_internal`` (and ``wire_*``), ``by_kind`` and ``by_direction`` breakdowns, and the
    update statistics ``updates`` (count), ``update_bytes``, ``bytes_per_update`` (mean bytes of
    one user's update upload) and ``wire_per_update``. Every breakdown sums to the total."""
    all_ = _zero()
    kinds: dict[str, dict[str, int]] = {k: _zero() for k in KINDS}
    dirs: dict[str, dict[str, int]] = {d: _zero() for d in DIRECTIONS}
    for e in entries:
        _add(all_, e)
        _add(kinds[_get(e, "kind")], e)
        _add(dirs[_get(e, "direction")], e)
    upd = kinds["update"]
    n = upd["entries"]
    return {
        "bytes": all_["bytes"], "wire_bytes": all_["wire_bytes"], "messages": all_["messages"],
        "entries": all_["entries"],
        "bytes_up": dirs["up"]["bytes"], "bytes_down": dirs["down"]["bytes"],
        "bytes_internal": dirs["internal"]["bytes"],
        "wire_up": dirs["up"]["wire_bytes"], "wire_down": dirs["down"]["wire_bytes"],
        "wire_internal": dirs["internal"]["wire_bytes"],
        "updates": n, "update_bytes": upd["bytes"], "update_wire_bytes": upd["wire_bytes"],
        "bytes_per_update": upd["bytes"] / n if n else 0.0,
        "wire_per_update": upd["wire_bytes"] / n if n else 0.0,
        "by_kind": kinds, "by_direction": dirs,
    }


def by(entries: Iterable[Entry | Mapping[str, Any]], key: str) -> dict[Any, dict[str, int]]:
    """Sums per value of ``key`` (e.g. "worker", "kind", "round", "link"), with ``up``, ``down``,
    ``internal`` byte columns and ``bytes``/``wire_bytes``/``messages``/``entries``."""
    out: dict[Any, dict[str, int]] = {}
    for e in entries:
        acc = out.setdefault(_get(e, key), {**_zero(), "up": 0, "down": 0, "internal": 0})
        _add(acc, e)
        acc[_get(e, "direction")] += int(_get(e, "bytes"))
    return dict(sorted(out.items(), key=lambda kv: (str(type(kv[0])), kv[0])))


def per_round(entries: Iterable[Entry | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-round series: one row per round id with its
    epoch, ``bytes_up``, ``bytes_down``, ``bytes_internal`` (and ``wire_*``), ``updates``,
    ``update_bytes``, ``update_wire_bytes``, ``bytes_per_update`` and ``wire_per_update`` (all phases of the round: its
    training, the epoch's evaluation after its last round, registrations in between)."""
    rows: dict[int, dict[str, Any]] = {}
    for e in entries:
        r = int(_get(e, "round"))
        row = rows.setdefault(r, {"round": r, "epoch": int(_get(e, "epoch")), "bytes_up": 0, "bytes_down": 0,
                                  "bytes_internal": 0, "wire_up": 0, "wire_down": 0, "wire_internal": 0,
                                  "updates": 0, "update_bytes": 0, "update_wire_bytes": 0})
        d = _get(e, "direction")
        row[f"bytes_{d}"] += int(_get(e, "bytes"))
        row[f"wire_{d}"] += int(_get(e, "wire_bytes"))
        if _get(e, "kind") == "update":
            row["updates"] += 1
            row["update_bytes"] += int(_get(e, "bytes"))
            row["update_wire_bytes"] += int(_get(e, "wire_bytes"))
    out = [rows[r] for r in sorted(rows)]
    for row in out:
        n = row["updates"]
        row["bytes_per_update"] = row["update_bytes"] / n if n else 0.0
        row["wire_per_update"] = row["update_wire_bytes"] / n if n else 0.0
    return out


def write_jsonl(path: str | Path, entries: Sequence[Entry | Mapping[str, Any]]) -> Path:
    """Write entries as JSON lines (atomically: temp file + rename)."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with open(tmp, "w") as f:
        for e in entries:
            f.write(json.dumps(e if isinstance(e, Mapping) else e.to_dict(), sort_keys=True) + "\n")
    tmp.replace(p)
    return p


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a ``ledger.jsonl`` (ValueError naming the line when one is not JSON)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON ledger entry: {exc}") from None
    return out


# ---------------------------------------------------------------------------- the call counter
_CURRENT: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar("fedseq_ledger", default=None)


def current() -> Ledger | None:
    """The ledger :func:`recording` in this context, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def recording(led: Ledger) -> Iterator[Ledger]:
    """Within the block, every call through a :class:`CallCounter` channel of this thread goes
    into ``led`` (its request when sent, its reply when it arrives)."""
    token = _CURRENT.set(led)
    try:
        yield led
    finally:
        _CURRENT.reset(token)


class CallCounter(grpc.UnaryUnaryClientInterceptor):
    """A client interceptor that accounts each unary call of its channel in the ledger that is
    :func:`recording` when the call is made: the request (``request_direction``) at once, the
    reply (``reply_direction``) when it arrives; ``what`` is ``Service.Method request|reply``.
    Calls made while nothing records go to ``fallback`` (e.g. counts kept for the next round)."""

    def __init__(self, *, link: str, request_direction: str, reply_direction: str, compression: str = "none",
                 worker: str = "", fallback: Callable[[str, Any], None] | None = None) -> None:
        self.link, self.worker, self.compression = link, worker, compression
        self.directions = (request_direction, reply_direction)
        self.fallback = fallback

    def _record(self, led: Ledger | None, msg: Any, direction: str, what: str, compression: str) -> None:
        if led is not None:
            led.add_message(msg, compression=compression, worker=self.worker, kind="control",
                            direction=direction, link=self.link, what=what)
        elif self.fallback is not None:
            self.fallback(self.worker, count(msg, kind="control", direction=direction, link=self.link, what=what,
                                             compression=compression))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        led = _CURRENT.get()
        method = client_call_details.method.rsplit("/", 2)
        what = f"{method[-2].rsplit('.', 1)[-1]}.{method[-1]}"
        per_call = getattr(client_call_details, "compression", None)
        comp = "gzip" if per_call == grpc.Compression.Gzip else self.compression
        self._record(led, request, self.directions[0], f"{what} request", comp)
        if led is not None:
            led._call_started()
        call = continuation(client_call_details, request)

        def done(f) -> None:
            try:
                if f.exception() is None:
                    self._record(led, f.result(), self.directions[1], f"{what} reply", comp)
            finally:
                if led is not None:
                    led._call_ended()

        call.add_done_callback(done)
        return call


def counted(channel: grpc.Channel, counter: CallCounter) -> grpc.Channel:
    """``channel`` with its unary calls accounted by ``counter``."""
    return grpc.intercept_channel(channel, counter)
