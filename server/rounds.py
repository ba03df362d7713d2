"""The round buffer of the aggregation server: the open round (its assignments, tokens and
weights, the updates received so far, decoded straight into the round matrix), the refusals
counted for the next round summary, and the hand-over of a round to be closed.

Every header is checked by server/intake.py (:func:`precheck`, against a snapshot of the open
round and the run taken under the state lock); an update's data is decoded into its row without
the lock, its row reserved first so that a concurrent duplicate never writes there. A round taken
out for closing (:meth:`RoundBuffer.take`) is no longer the open round: an update of it that
arrives or finishes decoding afterwards is refused "stale", as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from fedseq import codec, observe
from fedseq.engine import UPDATE_BOUND, out_of_bounds
from fedseq.params import Layout
from fedseq.rpc import CHUNK_BYTES
from fedseq.v1 import aggregator_pb2 as pb
from fedseq.v1 import common_pb2

from .intake import OpenRound, check_schema, precheck, reason, word
from .keeper import ModelKeeper

log = logging.getLogger(__name__)

REFUSED_SAMPLE = 20  # refused uploads of non-assigned senders listed per round summary

# (header, data, layout, row, row's dirty tables) -> why it is refused (None: decoded into the row)
Decode = Callable[[Any, bytes | bytearray, Layout, torch.Tensor, dict[str, np.ndarray]], str | None]


@dataclass
class Round:
    round_id: int
    version: int
    tokens: dict[int, str]
    weights: dict[int, int]  # user -> aggregation weight, as the orchestrator assigned it
    deadline: float
    lr: float
    matrix: torch.Tensor  # [assigned, D]: row i holds the update of the i-th assigned user by id
    rows: dict[int, int]  # user -> row of ``matrix``
    # per row of ``matrix``: the rows of each sparse table that may be nonzero there (a reused
    # buffer holds earlier rounds' updates; codec.FlatCodec.decode_into clears only those)
    dirty: list[dict[str, np.ndarray]]
    updates: dict[int, int] = field(default_factory=dict)  # accepted user -> num_samples
    pending: set[int] = field(default_factory=set)  # users whose update is being decoded
    rejected: dict[int, str] = field(default_factory=dict)  # assigned user -> its last refusal reason
    bytes_received: int = 0
    user_bytes: dict[int, int] = field(default_factory=dict)  # assigned user -> its uploads' bytes (sum: bytes_received)
    refused_by_engine: int = 0  # accepted updates the round engine refused (sanity bound, exploding step)
    decode_seconds: float = 0.0

    def snapshot(self) -> OpenRound:
        return OpenRound(self.round_id, self.deadline, self.tokens, frozenset(self.updates) | frozenset(self.pending),
                         self.weights)


@dataclass
class Refusals:
    """Refusals since the last round summary: all of them by reason word, and the bytes and a
    sample of those that were not an assigned user's update of the open round."""

    counts: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    sample: list[tuple[int, str]] = field(default_factory=list)

    def merge(self, later: Refusals) -> None:
        """Add ``later``'s refusals (counted after these) to these."""
        self.counts.update(later.counts)
        self.bytes += later.bytes
        self.sample = (self.sample + later.sample)[:REFUSED_SAMPLE]


def decode_update(h, data: bytes | bytearray, layout: Layout, row: torch.Tensor,
                  dirty: dict[str, np.ndarray]) -> str | None:
    """Decode an update into its round-matrix row; why it is refused (None: decoded). Updates
    in the form the workers write are decoded straight into the row (codec.FlatCodec), which
    clears only the ``dirty`` table rows an earlier update left there and records its own;
    any other container, and any fault, goes the general way (unpack, schema, decode), which
    decides exactly as it always did and writes the whole row."""
    try:
        if codec.FlatCodec.of(layout.names, layout.shapes, h.encoding,
                              frozenset(codec.SPARSE_TABLES)).decode_into(data, row, dirty):
            return None
    except codec.CodecError:
        pass
    dirty.clear()  # the row is partly written, or written whole below
    try:
        encoded = codec.unpack(data)
        why = check_schema(encoded, layout, h.encoding)  # before decoding allocates anything
        if why is not None:
            return why
        tensors = codec.decode_state(encoded)
    except (codec.CodecError, ValueError) as e:  # includes non-finite values: codec.decode checks them
        text = str(e)
        return reason("non-finite" if "non-finite" in text else "malformed", text)
    try:
        layout.flatten_into(tensors, row)
    except ValueError as e:
        return reason("malformed", str(e))
    return None


class RoundBuffer:
    """The open round and the refusals of the next summary. ``lock`` is the server's state lock
    (shared with ``keeper``, whose run it reads); the ``*_locked`` methods expect it held, the
    others take it. ``decode``: how an update is decoded into its row (:func:`decode_update`)."""

    def __init__(self, lock: threading.Lock, keeper: ModelKeeper, decode: Decode = decode_update) -> None:
        self._lock = lock
        self._keeper = keeper
        self._decode = decode
        self.round: Round | None = None
        self._buffer: torch.Tensor | None = None  # reused round matrix
        self._dirty: list[dict[str, np.ndarray]] = []  # its rows' dirty tables
        self._refused = Refusals()

    # ------------------------------------------------------------------ control (the lock held)
    def reset_locked(self) -> None:
        """No round open (a new run)."""
        if self.round is not None and self.round.pending:  # late decodes may still write into its rows
            self._buffer = None
        self.round = None

    def open_locked(self, request, context) -> pb.OpenRoundReply:
        """Open the round ``request`` names, replacing an open one (FAILED_PRECONDITION when it names
        another model version than the head or a round already closed, INVALID_ARGUMENT for a user
        assigned twice or a weight below 1)."""
        keeper = self._keeper
        keeper.check_run_locked(request.run_id, context)
        if request.model_version != keeper.version:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"round {request.round_id} names model version {request.model_version}, "
                          f"the head is {keeper.version}")
        if self.round is not None and self.round.round_id != request.round_id:
            log.warning("round %d replaced by round %d before closing", self.round.round_id, request.round_id)
        if request.round_id <= keeper.last_closed:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"round {request.round_id} was already closed (last closed: {keeper.last_closed})")
        tokens = {a.user_id: a.token for a in request.assignments}
        if len(tokens) != len(request.assignments):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a user is assigned twice in one round")
        light = next((a for a in request.assignments if a.weight < 1), None)
        if light is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"user {light.user_id} is assigned weight {light.weight}; every assignment needs a "
                          "weight >= 1 (the user's training items)")
        weights = {a.user_id: int(a.weight) for a in request.assignments}
        order = sorted(tokens)
        prev, self.round = self.round, None
        matrix, dirty = self._matrix(len(order), busy=prev is not None and bool(prev.pending))
        self.round = Round(request.round_id, request.model_version, tokens, weights, request.deadline_unix,
                           request.lr, matrix, {u: i for i, u in enumerate(order)}, dirty)
        keeper.compress(context)
        return pb.OpenRoundReply(round_id=request.round_id, expected=len(tokens), max_chunk_bytes=CHUNK_BYTES,
                                 accepted_encodings=list(keeper.accepted_codecs))

    def _matrix(self, rows: int, busy: bool) -> tuple[torch.Tensor, list[dict[str, np.ndarray]]]:
        """The round matrix ``[rows, D]`` and its rows' dirty tables (see :class:`Round`): updates
        are decoded straight into their row. The buffer is reused across rounds (fresh pages cost
        more than the decoding), unless a replaced round may still be writing into it (``busy``)."""
        layout = self._keeper.layout
        assert layout is not None
        buf = self._buffer
        if busy or buf is None or buf.shape[0] < rows or buf.shape[1] != layout.dim:
            buf = torch.empty(rows, layout.dim)
            dirty: list[dict[str, np.ndarray]] = [{} for _ in range(rows)]  # {}: any row may be nonzero
            if not busy:
                self._buffer, self._dirty = buf, dirty
        else:
            dirty = self._dirty
        return buf[:rows], dirty

    def take_locked(self, request, context) -> tuple[Round, Refusals]:
        """Take the round ``request`` closes out of the buffer (FAILED_PRECONDITION when it is not
        the open one), with the refusals counted so far; from now on it is not open, and its
        rows are the closer's alone (a late decode writes only the row it reserved, which is
        left out). Later refusals go to the next summary."""
        self._keeper.check_run_locked(request.run_id, context)
        rnd = self.round
        if rnd is None or rnd.round_id != request.round_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"round {request.round_id} is not open (open: {None if rnd is None else rnd.round_id})")
        assert rnd is not None  # context.abort() raises
        self.round = None
        if rnd.pending:  # late decodes may still write into this round's rows: never reuse its buffer
            self._buffer = None
        refused, self._refused = self._refused, Refusals()
        return rnd, refused

    def restore_locked(self, refused: Refusals) -> None:
        """Put back the refusals :meth:`take_locked` handed out (their round did not close)."""
        refused.merge(self._refused)
        self._refused = refused

    # ------------------------------------------------------------------ intake (takes the lock)
    def count(self, why_word: str) -> None:
        """Count a refusal that names no update (a stream refused or cancelled)."""
        with self._lock:
            self._refused.counts[why_word] += 1

    def precheck(self, h) -> str | None:
        """Why the update of header ``h`` is refused before any of its data is read (None: read it)."""
        with self._lock:
            return self._precheck_locked(h)

    def _precheck_locked(self, h) -> str | None:
        keeper = self._keeper
        rnd = None if self.round is None else self.round.snapshot()
        return precheck(h, keeper.run_id, rnd, keeper.accepted_codecs, keeper.limit_for(h.encoding))

    def refuse(self, h, why: str, wire: int) -> common_pb2.UpdateStatus:
        """Count a refused upload: under its user when it is an assigned user's update of the open
        round (and that user has none accepted), else in the refused bytes and sample."""
        user = -1 if h is None else int(h.user_id)
        observe.UPDATES.labels("refused", word(why)).inc()
        with self._lock:
            self._refused.counts[word(why)] += 1
            rnd = self.round
            mine = (rnd is not None and h is not None and h.run_id == self._keeper.run_id
                    and h.round_id == rnd.round_id and user in rnd.tokens and rnd.tokens[user] == h.token)
            if mine and rnd is not None:
                if user not in rnd.updates:
                    rnd.rejected[user] = why
                rnd.bytes_received += wire
                rnd.user_bytes[user] = rnd.user_bytes.get(user, 0) + wire
            else:
                self._refused.bytes += wire
                if len(self._refused.sample) < REFUSED_SAMPLE:
                    self._refused.sample.append((user, why))
        return common_pb2.UpdateStatus(user_id=user, accepted=False, reason=why, bytes=wire)

    def accept(self, h, data: bytes | bytearray, wire: int) -> common_pb2.UpdateStatus:
        """Check the header again (the round may have changed while the data arrived), decode the
        update into its user's row and count it; or refuse it."""
        rnd, layout, why = self._reserve(h)
        if why is not None:
            return self.refuse(h, why, wire)
        assert rnd is not None and layout is not None
        t0 = time.perf_counter()
        row = rnd.rows[h.user_id]
        why = self._decode(h, data, layout, rnd.matrix[row], rnd.dirty[row])
        if why is None and out_of_bounds(rnd.matrix[row : row + 1]):  # the sanity bound, on the row just written
            why = reason("out-of-bounds", f"the update of user {h.user_id} holds a value beyond {UPDATE_BOUND:g} "
                                          "(fedseq/engine.py UPDATE_BOUND) or not finite")
        if why is not None:
            with self._lock:
                rnd.pending.discard(h.user_id)
            return self.refuse(h, why, wire)
        return self._land(h, rnd, wire, time.perf_counter() - t0)

    def _reserve(self, h) -> tuple[Round | None, Layout | None, str | None]:
        """The open round and the run's layout with the user's row reserved (pending), or why not.
        The check and the reservation are one step: a concurrent duplicate must not write there."""
        with self._lock:
            rnd, layout = self.round, self._keeper.layout
            why = self._precheck_locked(h)
            if why is None and rnd is not None and (h.user_id in rnd.updates or h.user_id in rnd.pending):
                why = reason("duplicate", f"duplicate update for user {h.user_id} in round {h.round_id}")
            if why is None and rnd is not None:
                rnd.pending.add(h.user_id)
        return rnd, layout, why

    def _land(self, h, rnd: Round, wire: int, seconds: float) -> common_pb2.UpdateStatus:
        """Count the decoded update of a reserved row as accepted, unless its round closed meanwhile."""
        with self._lock:
            rnd.pending.discard(h.user_id)
            closed = self.round is not rnd
            if not closed:
                rnd.updates[h.user_id] = rnd.weights[h.user_id]  # the orchestrator's weight (precheck: num_samples equals it)
                rnd.rejected.pop(h.user_id, None)
                rnd.bytes_received += wire
                rnd.user_bytes[h.user_id] = rnd.user_bytes.get(h.user_id, 0) + wire
                rnd.decode_seconds += seconds
        if closed:
            return self.refuse(h, reason("stale", f"round {h.round_id} closed while the update was decoded"), wire)
        observe.UPDATES.labels("accepted", "").inc()
        return common_pb2.UpdateStatus(user_id=h.user_id, accepted=True, bytes=wire)
