"""The aggregation server (gRPC ``fedseq.v1.Aggregator``).

Opens rounds, receives streamed user updates, validates each one (run, open round, deadline,
assigned user, token, duplicate, accepted encoding, size, checksum, schema, finite values),
aggregates the accepted ones with the configured rule (server/aggregation), steps the model and
writes version v+1 to the model store. It never learns which users are malicious.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import torch

from fedseq import codec
from fedseq.config import ExperimentConfig
from fedseq.delta import make_patch
from fedseq.models import SeqModel, build_model
from fedseq.models.common import reference_init
from fedseq.params import Layout, get_vector
from fedseq.rpc import CHUNK_BYTES, chunks
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2 as pb
from fedseq.v1 import aggregator_pb2_grpc as pb_grpc
from fedseq.v1 import common_pb2

from .aggregation import RuleConfigError, make_rule, server_step
from .aggregation.base import AggregationRule, bind_root, needs_root
from .root import RootData, load_root, root_update

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


def _tensor_encodings(encoding: str) -> set[str]:
    """Encodings the tensors of an update declared as ``encoding`` may use: the encoding itself and
    the dense fallback fedseq.codec.encode_state applies to tensors it does not fit."""
    if encoding.startswith("dense-"):
        return {encoding, "dense-fp32"}  # integer tensors are stored raw under dense-fp32
    return {encoding, "dense-fp16" if encoding == "sparse-fp16" else "dense-fp32"}


@dataclass
class _Round:
    round_id: int
    version: int
    tokens: dict[int, str]
    deadline: float
    lr: float
    matrix: torch.Tensor  # [assigned, D]: row i holds the update of the i-th assigned user by id
    rows: dict[int, int]  # user -> row of ``matrix``
    updates: dict[int, int] = field(default_factory=dict)  # accepted user -> num_samples
    pending: set[int] = field(default_factory=set)  # users whose update is being decoded
    rejected: list[tuple[int, str]] = field(default_factory=list)
    bytes_received: int = 0
    decode_seconds: float = 0.0


class AggregatorServicer(pb_grpc.AggregatorServicer):
    def __init__(self, store_factory, max_update_bytes: int = 64 << 20,
                 accept_encodings: str | Iterable[str] | None = None) -> None:
        self._store_factory = store_factory  # run_id -> RedisStore
        self.max_update_bytes = max_update_bytes
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
        self.model: SeqModel | None = None
        self.root: RootData | None = None
        self.round: _Round | None = None
        self.last_closed = -1

    # ------------------------------------------------------------------ run
    def StartRun(self, request, context):
        try:
            cfg = ExperimentConfig.from_dict(json.loads(request.config_json))
            rule = make_rule(cfg.aggregation, dict(cfg.aggregation_opts))
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
            self.root = load_root(cfg, getattr(rule, "root_users", 10)) if needs_root(rule) else None
            self.last_closed = version - 1  # round r produces version r + 1 (a new run on this server starts over)
            self._store_read_mark = store.io_counters()["bytes_read"]
            log.info("run %s: %s at version %d (%s)", request.run_id, cfg.model, version,
                     "resumed" if resumed else "new")
            return pb.StartRunReply(head_version=version, num_parameters=layout.dim,
                                    accepted_encodings=list(self.accepted_encodings), resumed=resumed,
                                    max_chunk_bytes=CHUNK_BYTES, store_bytes=store_bytes)

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
            assert self.layout is not None
            order = sorted(tokens)
            prev, self.round = self.round, None
            self.round = _Round(request.round_id, request.model_version, tokens, request.deadline_unix, request.lr,
                                self._matrix(len(order), busy=prev is not None and bool(prev.pending)),
                                {u: i for i, u in enumerate(order)})
            self._compress(context)
            return pb.OpenRoundReply(round_id=request.round_id, expected=len(tokens), max_chunk_bytes=CHUNK_BYTES,
                                     accepted_encodings=list(self.accepted_encodings))

    def _matrix(self, rows: int, busy: bool) -> torch.Tensor:
        """The round matrix ``[rows, D]``: updates are decoded straight into their row. The buffer is
        reused across rounds (fresh pages cost more than the decoding), unless a replaced round may
        still be writing into it (``busy``)."""
        assert self.layout is not None
        buf = self._buffer
        if busy or buf is None or buf.shape[0] < rows or buf.shape[1] != self.layout.dim:
            buf = torch.empty(rows, self.layout.dim)
            if not busy:
                self._buffer = buf
        return buf[:rows]

    def SubmitUpdates(self, request_iterator, context):
        self._compress(context)
        statuses: list[common_pb2.UpdateStatus] = []
        total = 0
        header = None
        buf = bytearray()
        wire = 0
        for chunk in request_iterator:
            size = chunk.ByteSize()
            total += size
            if chunk.HasField("header"):
                if header is not None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"update of user {header.user_id} ended after {len(buf)} of {header.total_bytes} bytes")
                header, buf, wire = chunk.header, bytearray(), 0
                if header.total_bytes < 0 or header.total_bytes > self.max_update_bytes:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"update of user {header.user_id} declares {header.total_bytes} bytes; "
                                  f"the limit is {self.max_update_bytes}")
            elif header is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "data chunk before any update header")
            assert header is not None  # context.abort() raises
            buf += chunk.data
            wire += size
            if len(buf) > header.total_bytes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"update of user {header.user_id} is longer than its declared {header.total_bytes} bytes")
            if len(buf) == header.total_bytes:
                statuses.append(self._accept(header, bytes(buf), wire))
                header = None
        if header is not None:
            statuses.append(common_pb2.UpdateStatus(user_id=header.user_id, accepted=False, bytes=wire,
                                                    reason=f"truncated: stream ended after {len(buf)} of "
                                                           f"{header.total_bytes} bytes"))
        return pb.SubmitReply(statuses=statuses, bytes_received=total)

    def _accept(self, h, data: bytes, wire: int) -> common_pb2.UpdateStatus:
        def reject(reason: str) -> common_pb2.UpdateStatus:
            with self._lock:
                if self.round is not None and h.round_id == self.round.round_id:
                    self.round.rejected.append((h.user_id, reason))
                    self.round.bytes_received += wire
            return common_pb2.UpdateStatus(user_id=h.user_id, accepted=False, reason=reason, bytes=wire)

        with self._lock:
            rnd, run_id, layout = self.round, self.run_id, self.layout
        if h.run_id != run_id:
            return reject(f"unknown run {h.run_id!r}")
        if rnd is None or h.round_id != rnd.round_id:
            open_id = "none" if rnd is None else str(rnd.round_id)
            return reject(f"stale round: round {h.round_id} is not open (open round: {open_id})")
        if time.time() > rnd.deadline:
            return reject(f"late: round {h.round_id} deadline passed")
        if h.user_id not in rnd.tokens:
            return reject(f"user {h.user_id} is not assigned to round {h.round_id}")
        if rnd.tokens[h.user_id] != h.token:
            return reject(f"bad token for user {h.user_id}")
        if h.user_id in rnd.updates:
            return reject(f"duplicate update for user {h.user_id} in round {h.round_id}")
        if h.encoding not in self.accepted_encodings:
            return reject(f"encoding {h.encoding!r} not accepted (this server accepts "
                          f"{', '.join(self.accepted_encodings)})")
        if h.num_samples < 0:
            return reject("negative num_samples")
        t0 = time.perf_counter()
        try:
            encoded = codec.unpack(data)
            allowed = _tensor_encodings(h.encoding)
            odd = next((e for e in encoded if e.encoding not in allowed), None)
            if odd is not None:
                return reject(f"malformed update: tensor {odd.name!r} is encoded {odd.encoding!r} but the update "
                              f"declares {h.encoding!r} (allowed per tensor: {sorted(allowed)})")
            tensors = codec.decode_state(encoded)
        except (codec.CodecError, ValueError) as e:  # includes non-finite values: codec.decode checks them
            return reject(f"malformed update: {e}")
        with self._lock:  # reserve the user's row: a concurrent duplicate must not write into it
            if h.user_id in rnd.updates or h.user_id in rnd.pending:
                return reject(f"duplicate update for user {h.user_id} in round {h.round_id}")
            rnd.pending.add(h.user_id)
        try:
            assert layout is not None
            layout.flatten_into(tensors, rnd.matrix[rnd.rows[h.user_id]])
        except ValueError as e:
            with self._lock:
                rnd.pending.discard(h.user_id)
            return reject(f"malformed update: {e}")
        dt = time.perf_counter() - t0
        with self._lock:
            rnd.pending.discard(h.user_id)
            if self.round is not rnd:
                return reject(f"stale round: round {h.round_id} closed while the update was decoded")
            rnd.updates[h.user_id] = int(h.num_samples)
            rnd.bytes_received += wire
            rnd.decode_seconds += dt
        return common_pb2.UpdateStatus(user_id=h.user_id, accepted=True, bytes=wire)

    def CloseRound(self, request, context):
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
            users = sorted(rnd.updates)
            timings = {"decode": rnd.decode_seconds}
            t0 = time.perf_counter()
            info_json, kept_users, norm = "{}", [], 0.0
            assert self.params is not None and self.layout is not None and self.store is not None
            old_params = self.params
            if users:
                rows = [rnd.rows[u] for u in users]  # ascending: rows follow user ids
                # [K, D] sorted by user id; no copy when every assigned user's update arrived
                U = rnd.matrix if len(rows) == rnd.matrix.shape[0] else rnd.matrix[torch.as_tensor(rows)]
                w = torch.tensor([rnd.updates[u] for u in users], dtype=torch.float32)
                rule = self.rule
                assert rule is not None  # set by StartRun with the run id that _check_run just matched
                if self.root is not None:  # FLTrust: this round's root update from the server's own data
                    assert self.model is not None and self.cfg is not None  # set by StartRun with self.root
                    rule = bind_root(rule, root_update(self.model, self.params, self.root, self.cfg, rnd.round_id))
                res = rule(U, w)
                del U
                t1 = time.perf_counter()
                new = server_step(self.params, res.vector, rnd.lr)
                norm = float((new - self.params).norm())
                if not bool(torch.isfinite(new).all()):
                    context.abort(grpc.StatusCode.INTERNAL, f"aggregate of round {rnd.round_id} is not finite")
                self.params = new
                timings.update(aggregate=t1 - t0, step=time.perf_counter() - t1)
                info_json = json.dumps(dict(res.info), default=float)
                if res.kept is not None:
                    kept_users = [users[i] for i in res.kept]
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
            read_now = self.store.io_counters()["bytes_read"]
            store_read, self._store_read_mark = read_now - self._store_read_mark, read_now
            self._compress(context)
            missing = sorted(set(rnd.tokens) - set(rnd.updates) - {u for u, _ in rnd.rejected})
            return pb.RoundSummary(
                round_id=rnd.round_id, new_version=self.version, accepted=len(users),
                rejected=[pb.Rejection(user_id=u, reason=r) for u, r in rnd.rejected], missing=missing,
                bytes_received=rnd.bytes_received, timings=timings, rule=self.cfg.aggregation if self.cfg else "",
                rule_info_json=info_json, kept_users=kept_users, store_bytes=store_bytes, update_norm=norm,
                store_bytes_read=store_read, patch_bytes=patch_bytes)

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
