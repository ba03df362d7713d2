"""The aggregation server (gRPC ``fedseq.v1.Aggregator``).

Opens rounds, receives streamed user updates, validates each one (server/intake.py: run, open
round, deadline, assigned user, token, duplicate, accepted encoding, the weight the orchestrator
assigned and the declared size from the header before any data is buffered; then checksum, schema
before decoding, finite values), aggregates the accepted ones with the configured rule
(server/aggregation), weighted by the orchestrator's weights, steps the model and writes version
v+1 to the model store. It never learns which users are malicious. Every refused upload is counted
by reason in the next round summary.

An update's data is written, chunk by chunk as it arrives, into one buffer of its declared size,
which the header check bounds by the largest update an honest worker can send for the run's model
and codec (:attr:`AggregatorServicer.update_limits`, set at StartRun): a stream holds at most one
such buffer, and a byte beyond the declared size drops it at once ("oversize").
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from fedseq import codec, observe
from fedseq.config import ExperimentConfig
from fedseq.delta import make_patch
from fedseq.engine import UPDATE_BOUND, AggregationRule, RootUpdate, aggregate_round, out_of_bounds
from fedseq.fairshare import identity
from fedseq.models import SeqModel, build_model
from fedseq.models.common import reference_init
from fedseq.params import Layout, get_vector
from fedseq.root import root_source
from fedseq.rpc import CHUNK_BYTES, chunks
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2 as pb
from fedseq.v1 import aggregator_pb2_grpc as pb_grpc
from fedseq.v1 import common_pb2

from .aggregation import RuleConfigError, make_run_rule
from .intake import OpenRound, StreamLimits, check_schema, precheck, reason, update_limit, word

log = logging.getLogger(__name__)

ACCEPTED_ENCODINGS = codec.ENCODINGS  # the default: every encoding of fedseq.codec


def parse_encodings(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The encodings a server accepts, from a comma list or names (None/empty: all of them).
    ValueError naming the unknown ones and the known encodings."""
    if value is None:
        return ACCEPTED_ENCODINGS
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not names:
        return ACCEPTED_ENCODINGS
    bad = [n for n in names if n not in codec.ENCODINGS]
    if bad:
        raise ValueError(f"unknown encoding(s) {bad}; known encodings: {', '.join(codec.ENCODINGS)}")
    return tuple(dict.fromkeys(names))


@dataclass
class _Round:
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


REFUSED_SAMPLE = 20  # refused uploads of non-assigned senders listed per round summary

class AggregatorServicer(pb_grpc.AggregatorServicer):
    def __init__(self, store_factory, max_update_bytes: int = 64 << 20,
                 accept_encodings: str | Iterable[str] | None = None, limits: StreamLimits | None = None) -> None:
        self._store_factory = store_factory  # run_id -> RedisStore
        self.max_update_bytes = max_update_bytes  # the cap; the run's limits below are at most this
        # encoding -> the most bytes an update may declare in the current run (intake.update_limit:
        # the largest honest update of the run's model x 1.1 + 4 KiB, at most max_update_bytes)
        self.update_limits: dict[str, int] = {}
        self.limits = limits or StreamLimits()
        # bytes of update data held in the streams' buffers now, and the most ever (each stream holds
        # at most one update's, of at most update_limits[...] bytes)
        self.buffered = 0
        self.peak_buffered = 0
        # open upload streams: id -> [context, identity, window start, bytes received in the window]
        self._streams: dict[int, list] = {}
        self._watchdog: threading.Thread | None = None
        self.accepted_encodings = parse_encodings(accept_encodings)
        self._store_read_mark = 0
        self._lock = threading.Lock()
        self.run_id: str | None = None
        self.cfg: ExperimentConfig | None = None
        self.layout: Layout | None = None
        self.params: torch.Tensor | None = None
        self.version = -1
        self.store: RedisStore | None = None
        self.rule: AggregationRule | None = None
        self._buffer: torch.Tensor | None = None  # reused round matrix
        self._dirty: list[dict[str, np.ndarray]] = []  # its rows' dirty tables
        self.model: SeqModel | None = None
        self.root: RootUpdate | None = None  # FLTrust's root update from the server's own data
        self.round: _Round | None = None
        self.last_closed = -1
        # refusals since the last summary (all of them, by reason word), and the bytes and a sample
        # of those that were not an assigned user's update of the open round
        self._refused: Counter[str] = Counter()
        self._refused_bytes = 0
        self._refused_sample: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ run
    def StartRun(self, request, context):
        try:
            cfg = ExperimentConfig.from_dict(json.loads(request.config_json))
            rule = make_run_rule(cfg.defense, dict(cfg.defense_opts), cfg.seed)
        except (ValueError, RuleConfigError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad run config: {e}")
        if request.num_items < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_items must be >= 1")
        if cfg.codec not in self.accepted_encodings:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"codec {cfg.codec!r} is not accepted by this aggregation server; it accepts "
                          f"{', '.join(self.accepted_encodings)} (serve-server --accept-encodings / "
                          f"FEDSEQ_ACCEPT_ENCODINGS); pick one of those with --codec")
        self._compress(context, cfg)
        with self._lock:
            model = build_model(cfg.model, int(request.num_items))
            store = self._store_factory(request.run_id)
            head = store.head()
            layout = Layout.of(model)
            if head is None:
                reference_init(model, cfg.seed)
                params = get_vector(model)
                store_bytes = store.put_model(0, layout.unflatten(params), {"round": "-1"})
                version, resumed = 0, False
            else:
                tensors = store.get_model(head)
                params = layout.flatten(tensors)
                version, resumed, store_bytes = head, True, 0
            self.run_id, self.cfg, self.layout, self.params = request.run_id, cfg, layout, params
            self.version, self.store, self.rule, self.round = version, store, rule, None
            self.model = model
            self.root = root_source(rule, cfg, model)
            self.last_closed = version - 1  # round r produces version r + 1 (a new run on this server starts over)
            self._store_read_mark = store.io_counters()["bytes_read"]
            self.update_limits = {e: update_limit(layout, e, self.max_update_bytes) for e in self.accepted_encodings}
            log.info("run %s: %s at version %d (%s); updates of at most %d bytes (%s; cap %d)", request.run_id,
                     cfg.model, version, "resumed" if resumed else "new", self.update_limit, cfg.codec,
                     self.max_update_bytes)
            return pb.StartRunReply(head_version=version, num_parameters=layout.dim,
                                    accepted_encodings=list(self.accepted_encodings), resumed=resumed,
                                    max_chunk_bytes=CHUNK_BYTES, store_bytes=store_bytes)

    @property
    def update_limit(self) -> int:
        """The most bytes an update in the run's codec may declare (``max_update_bytes`` before a run)."""
        if self.cfg is None:
            return self.max_update_bytes
        return self.update_limits.get(self.cfg.codec, self.max_update_bytes)

    def _compress(self, context, cfg: ExperimentConfig | None = None) -> None:
        """Compress this call's responses when the run asks for it (config key ``compression``)."""
        cfg = cfg or self.cfg
        if cfg is not None and cfg.compression == "gzip":
            context.set_compression(grpc.Compression.Gzip)

    def _check_run(self, run_id: str, context) -> None:
        if self.run_id is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no run started on this server (call StartRun)")
        if run_id != self.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unknown run {run_id!r} (serving {self.run_id!r})")

    # ------------------------------------------------------------------ rounds
    def OpenRound(self, request, context):
        observe.set_context(run=request.run_id[:64], round_id=request.round_id)
        with self._lock:
            self._check_run(request.run_id, context)
            if request.model_version != self.version:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {request.round_id} names model version {request.model_version}, "
                              f"the head is {self.version}")
            if self.round is not None and self.round.round_id != request.round_id:
                log.warning("round %d replaced by round %d before closing", self.round.round_id, request.round_id)
            if request.round_id <= self.last_closed:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {request.round_id} was already closed (last closed: {self.last_closed})")
            tokens = {a.user_id: a.token for a in request.assignments}
            if len(tokens) != len(request.assignments):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a user is assigned twice in one round")
            light = next((a for a in request.assignments if a.weight < 1), None)
            if light is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"user {light.user_id} is assigned weight {light.weight}; every assignment needs a "
                              "weight >= 1 (the user's training items)")
            weights = {a.user_id: int(a.weight) for a in request.assignments}
            assert self.layout is not None
            order = sorted(tokens)
            prev, self.round = self.round, None
            matrix, dirty = self._matrix(len(order), busy=prev is not None and bool(prev.pending))
            self.round = _Round(request.round_id, request.model_version, tokens, weights, request.deadline_unix,
                                request.lr, matrix, {u: i for i, u in enumerate(order)}, dirty)
            self._compress(context)
            return pb.OpenRoundReply(round_id=request.round_id, expected=len(tokens), max_chunk_bytes=CHUNK_BYTES,
                                     accepted_encodings=list(self.accepted_encodings))

    def _matrix(self, rows: int, busy: bool) -> tuple[torch.Tensor, list[dict[str, np.ndarray]]]:
        """The round matrix ``[rows, D]`` and its rows' dirty tables (see :class:`_Round`): updates
        are decoded straight into their row. The buffer is reused across rounds (fresh pages cost
        more than the decoding), unless a replaced round may still be writing into it (``busy``)."""
        assert self.layout is not None
        buf = self._buffer
        if busy or buf is None or buf.shape[0] < rows or buf.shape[1] != self.layout.dim:
            buf = torch.empty(rows, self.layout.dim)
            dirty: list[dict[str, np.ndarray]] = [{} for _ in range(rows)]  # {}: any row may be nonzero
            if not busy:
                self._buffer, self._dirty = buf, dirty
        else:
            dirty = self._dirty
        return buf[:rows], dirty

    def _open_stream(self, context) -> int:
        """Admit an upload stream within :class:`StreamLimits` (else RESOURCE_EXHAUSTED, counted).
        The per-peer cap counts the streams of the caller's certificate (its common name, whatever
        address it calls from; the host without TLS): one worker certificate gets ``max_per_peer``
        slots however many addresses it drips from."""
        peer = identity(context)
        with self._lock:
            mine = sum(1 for s in self._streams.values() if s[1] == peer)
            if len(self._streams) >= self.limits.max_streams or mine >= self.limits.max_per_peer:
                self._refused["busy"] += 1
                busy = True
            else:
                busy = False
                sid = id(context)
                self._streams[sid] = [context, peer, time.monotonic(), 0]
                observe.UPLOAD_STREAMS.set(len(self._streams))
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, name="upload-watchdog", daemon=True)
                    self._watchdog.start()
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason(
                "busy", f"{len(self._streams)} upload streams open ({mine} from {peer}; limits "
                        f"{self.limits.max_streams}, {self.limits.max_per_peer} per certificate); retry later"))
        return sid

    def _watch(self) -> None:
        """Cancel upload streams that received fewer than ``min_bytes`` in their last window of
        ``idle_timeout`` seconds (slow-loris, byte drips); a stream that did starts a new window."""
        limits = self.limits
        while True:
            time.sleep(min(1.0, limits.idle_timeout / 4))
            now = time.monotonic()
            idle = []
            with self._lock:
                for s in self._streams.values():
                    if now - s[2] >= limits.idle_timeout:
                        if s[3] < limits.min_bytes:
                            idle.append((s[0], s[1], s[3]))
                        else:
                            s[2], s[3] = now, 0
            for ctx, peer, got in idle:
                log.warning("cancelling an upload stream from %s: %d bytes in %.0f s (at least %d needed)", peer, got,
                            limits.idle_timeout, limits.min_bytes)
                with self._lock:
                    if self._streams.pop(id(ctx), None) is not None:
                        self._refused["idle"] += 1
                ctx.cancel()

    def SubmitUpdates(self, request_iterator, context):
        """Uploads, each a header chunk then data chunks. The header is checked first: a refused
        update's data is read off the stream and counted but never buffered. Streams are capped in
        number (overall, per peer) and cancelled when idle (:class:`StreamLimits`)."""
        sid = self._open_stream(context)
        try:
            return self._submit(self._tracked(sid, request_iterator), context)
        finally:
            with self._lock:
                self._streams.pop(sid, None)
                observe.UPLOAD_STREAMS.set(len(self._streams))

    def _tracked(self, sid: int, request_iterator):
        """The stream's chunks, counting their bytes for the watchdog; ends when the stream is cancelled."""
        try:
            for chunk in request_iterator:
                with self._lock:
                    s = self._streams.get(sid)
                    if s is not None:
                        s[3] += chunk.ByteSize()
                yield chunk
        except grpc.RpcError:
            return

    def _submit(self, request_iterator, context):
        self._compress(context)
        statuses: list[common_pb2.UpdateStatus] = []
        total = 0
        header = None
        # the update's data so far: the one chunk that holds all of it (the usual update, no copy), or
        # one buffer of the declared size (within the run's limit: precheck) filled as chunks arrive.
        # None: nothing yet, or a refused update (its data is read off and counted, never kept)
        buf: bytes | bytearray | None = None
        held = 0  # len(buf), counted in self.buffered
        refusal: str | None = None
        got = wire = 0

        def drop() -> None:
            nonlocal buf, held
            buf = None
            if held:
                self._hold(-held)
                held = 0

        try:
            for chunk in request_iterator:
                size = chunk.ByteSize()
                total += size
                if chunk.HasField("header"):
                    if header is not None:
                        statuses.append(self._refuse(header, refusal or reason(
                            "truncated", f"update of user {header.user_id} ended after {got} of "
                                         f"{header.total_bytes} bytes (the next header came)"), wire))
                    drop()
                    header, got, wire = chunk.header, 0, 0
                    refusal = self._precheck(header)
                elif header is None:
                    statuses.append(self._refuse(None, reason("malformed", "data chunk before any update header"),
                                                 size))
                    continue
                assert header is not None
                data = chunk.data
                at = got
                got += len(data)
                wire += size
                if got > header.total_bytes:  # dropped at once; its further data is read off until the next header
                    if refusal is None:
                        refusal = reason("oversize", f"update of user {header.user_id} is longer than its declared "
                                                     f"{header.total_bytes} bytes")
                    drop()
                    continue
                if refusal is None and data:
                    if buf is None:
                        buf = data if len(data) == header.total_bytes else bytearray(header.total_bytes)
                        held = len(buf)
                        self._hold(held)
                    if buf is not data:
                        buf[at:got] = data  # type: ignore[index]
                if got == header.total_bytes:
                    if refusal is None and buf is not None:
                        statuses.append(self._accept(header, buf, wire))
                    else:
                        statuses.append(self._refuse(header, refusal or reason("malformed", "no data"), wire))
                    drop()
                    header, refusal = None, None
            if header is not None:
                statuses.append(self._refuse(header, refusal or reason(
                    "truncated", f"stream ended after {got} of {header.total_bytes} bytes"), wire))
        finally:
            drop()
        return pb.SubmitReply(statuses=statuses, bytes_received=total)

    def _hold(self, n: int) -> None:
        """Count ``n`` more (or, negative, fewer) bytes held in update buffers (:attr:`buffered`)."""
        with self._lock:
            self.buffered += n
            self.peak_buffered = max(self.peak_buffered, self.buffered)

    def _precheck(self, h) -> str | None:
        with self._lock:
            rnd = None if self.round is None else self.round.snapshot()
            run_id = self.run_id
            limit = self.update_limits.get(h.encoding, self.max_update_bytes)
        return precheck(h, run_id, rnd, self.accepted_encodings, limit)

    def _refuse(self, h, why: str, wire: int) -> common_pb2.UpdateStatus:
        """Count a refused upload: under its user when it is an assigned user's update of the open
        round (and that user has none accepted), else in the refused bytes and sample."""
        user = -1 if h is None else int(h.user_id)
        observe.UPDATES.labels("refused", word(why)).inc()
        with self._lock:
            self._refused[word(why)] += 1
            rnd = self.round
            mine = (rnd is not None and h is not None and h.run_id == self.run_id and h.round_id == rnd.round_id
                    and user in rnd.tokens and rnd.tokens[user] == h.token)
            if mine and rnd is not None:
                if user not in rnd.updates:
                    rnd.rejected[user] = why
                rnd.bytes_received += wire
                rnd.user_bytes[user] = rnd.user_bytes.get(user, 0) + wire
            else:
                self._refused_bytes += wire
                if len(self._refused_sample) < REFUSED_SAMPLE:
                    self._refused_sample.append((user, why))
        return common_pb2.UpdateStatus(user_id=user, accepted=False, reason=why, bytes=wire)

    def _accept(self, h, data: bytes | bytearray, wire: int) -> common_pb2.UpdateStatus:
        why = self._precheck(h)  # again: the round may have changed while the data arrived
        if why is not None:
            return self._refuse(h, why, wire)
        with self._lock:
            rnd, layout = self.round, self.layout
        assert rnd is not None and layout is not None
        with self._lock:  # reserve the user's row before decoding into it: a concurrent duplicate must not write there
            if h.user_id in rnd.updates or h.user_id in rnd.pending:
                return self._refuse(h, reason("duplicate", f"duplicate update for user {h.user_id} in round "
                                                           f"{h.round_id}"), wire)
            rnd.pending.add(h.user_id)
        t0 = time.perf_counter()
        row = rnd.rows[h.user_id]
        why = self._decode(h, data, layout, rnd.matrix[row], rnd.dirty[row])
        if why is None and out_of_bounds(rnd.matrix[row : row + 1]):  # the sanity bound, on the row just written
            why = reason("out-of-bounds", f"the update of user {h.user_id} holds a value beyond {UPDATE_BOUND:g} "
                                          "(fedseq/engine.py UPDATE_BOUND) or not finite")
        if why is not None:
            with self._lock:
                rnd.pending.discard(h.user_id)
            return self._refuse(h, why, wire)
        dt = time.perf_counter() - t0
        with self._lock:
            rnd.pending.discard(h.user_id)
            if self.round is not rnd:
                return self._refuse(h, reason("stale", f"round {h.round_id} closed while the update was decoded"),
                                    wire)
            rnd.updates[h.user_id] = rnd.weights[h.user_id]  # the orchestrator's weight (precheck: num_samples equals it)
            rnd.rejected.pop(h.user_id, None)
            rnd.bytes_received += wire
            rnd.user_bytes[h.user_id] = rnd.user_bytes.get(h.user_id, 0) + wire
            rnd.decode_seconds += dt
        observe.UPDATES.labels("accepted", "").inc()
        return common_pb2.UpdateStatus(user_id=h.user_id, accepted=True, bytes=wire)

    @staticmethod
    def _decode(h, data: bytes | bytearray, layout: Layout, row: torch.Tensor, dirty: dict[str, np.ndarray]) -> str | None:
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

    def CloseRound(self, request, context):
        observe.set_context(run=request.run_id[:64], round_id=request.round_id)
        with self._lock:
            self._check_run(request.run_id, context)
            rnd = self.round
            if rnd is None or rnd.round_id != request.round_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {request.round_id} is not open (open: {None if rnd is None else rnd.round_id})")
            assert rnd is not None  # context.abort() raises
            self.round = None
            if rnd.pending:  # late decodes may still write into this round's rows: never reuse its buffer
                self._buffer = None
            timings = {"decode": rnd.decode_seconds}
            t0 = time.perf_counter()
            info_json, kept_users, kept_reported, norm = "{}", [], False, 0.0
            assert self.params is not None and self.layout is not None and self.store is not None
            old_params = self.params
            users = sorted(rnd.updates)
            if users:
                out = self._aggregate(rnd, users)
                users = list(out.users)
                t1 = time.perf_counter()
                norm = float((out.params - self.params).norm())
                self.params = out.params
                timings.update(aggregate=t1 - t0, step=time.perf_counter() - t1)
                observe.AGGREGATE_SECONDS.observe(time.perf_counter() - t0)
                if out.result is not None:
                    info_json = json.dumps(out.info, default=float)
                    if out.kept_users is not None:
                        kept_users, kept_reported = list(out.kept_users), True
            t2 = time.perf_counter()
            self.version += 1
            store_bytes = self.store.put_model(self.version, self.layout.unflatten(self.params),
                                               {"round": str(rnd.round_id)})
            timings["store"] = time.perf_counter() - t2
            patch_bytes = 0
            if self.cfg is not None and self.cfg.model_delta:
                t3 = time.perf_counter()
                patch = make_patch(self.layout.unflatten(old_params), self.layout.unflatten(self.params),
                                   self.version - 1)
                patch_bytes = self.store.put_patch_bytes(self.version, patch)
                timings["patch"] = time.perf_counter() - t3
            self.last_closed = rnd.round_id
            observe.MODEL_VERSION.set(self.version)
            read_now = self.store.io_counters()["bytes_read"]
            store_read, self._store_read_mark = read_now - self._store_read_mark, read_now
            refused, refused_bytes, sample = dict(self._refused), self._refused_bytes, list(self._refused_sample)
            self._refused, self._refused_bytes, self._refused_sample = Counter(), 0, []
            self._compress(context)
            missing = sorted(set(rnd.tokens) - set(rnd.updates) - set(rnd.rejected))
            return pb.RoundSummary(
                round_id=rnd.round_id, new_version=self.version, accepted=len(users),
                rejected=[pb.Rejection(user_id=u, reason=r) for u, r in sorted(rnd.rejected.items())], missing=missing,
                bytes_received=rnd.bytes_received, timings=timings, rule=self.cfg.defense if self.cfg else "",
                rule_info_json=info_json, kept_users=kept_users, kept_reported=kept_reported, store_bytes=store_bytes, update_norm=norm,
                store_bytes_read=store_read, patch_bytes=patch_bytes, refused=refused, bytes_refused=refused_bytes,
                refused_sample=[pb.Rejection(user_id=u, reason=r) for u, r in sample], user_bytes=rnd.user_bytes,
                refused_by_engine=rnd.refused_by_engine)

    def _aggregate(self, rnd: _Round, users: list[int]):
        """The round engine's step (fedseq/engine.py) on the accepted ``users``' updates:
        ``(params, rule result, users aggregated)``. Updates refused because the aggregate
        overflowed are recorded as rejected ("non-finite")."""
        assert self.params is not None and self.rule is not None
        rows = [rnd.rows[u] for u in users]  # ascending: rows follow user ids
        # [K, D] sorted by user id; no copy when every assigned user's update arrived
        U = rnd.matrix if len(rows) == rnd.matrix.shape[0] else rnd.matrix[torch.as_tensor(rows)]
        w = torch.tensor([rnd.updates[u] for u in users], dtype=torch.float32)
        # bound_rows=(): every row passed the same sanity bound (fedseq/engine.py out_of_bounds) as it was decoded
        out = aggregate_round(self.rule, self.params, U, w, users, rnd.lr, rnd.round_id, self.root,
                              literal_step=bool(self.cfg and self.cfg.compat.literal_step), layout=self.layout,
                              bound_rows=())
        for user, why in out.refused.items():
            del rnd.updates[user]
            rnd.rejected[user] = reason(word(why), why.split(": ", 1)[1])
            rnd.refused_by_engine += 1
            self._refused[word(why)] += 1
            observe.UPDATES.labels("refused", word(why)).inc()
        return out

    # ------------------------------------------------------------------ models
    def GetModel(self, request, context):
        with self._lock:
            self._check_run(request.run_id, context)
            store = self.store
            version = self.version if request.version < 0 else request.version
        assert store is not None
        self._compress(context)
        try:
            blob = store.get_model_bytes(version)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        for piece in chunks(blob):
            yield pb.ModelChunk(version=version, total_bytes=len(blob), data=piece)
