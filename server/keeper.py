"""The model keeper of the aggregation server: the run (StartRun: a new run at version 0, or one
resumed from the store's head), the current model version and its parameters, the write of each
new version (and its patch) to the model store, and GetModel.

Its state is read and published under the server's state lock (shared with the round buffer,
server/rounds.py); the slow parts (building the model, reading and writing the store) run without
it. Only the control calls change it (StartRun, CloseRound: one at a time, server/service.py), so
between a write and its publication every reader still sees the previous head, which is whole in
the store (a version is written at once, fedseq/store.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedseq import observe
from fedseq.config import ExperimentConfig
from fedseq.delta import make_patch
from fedseq.engine import Aggregation
from fedseq.models import SeqModel, build_model
from fedseq.models.common import reference_init
from fedseq.params import Layout, get_vector
from fedseq.root import root_source
from fedseq.rpc import CHUNK_BYTES, chunks
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2 as pb

from .aggregation import RuleConfigError, make_run_rule
from .intake import update_limit

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run as StartRun loaded it, before it is published (:meth:`ModelKeeper.publish_run`)."""

    run_id: str
    cfg: ExperimentConfig
    layout: Layout
    params: torch.Tensor
    version: int
    store: RedisStore
    model: SeqModel
    resumed: bool
    store_bytes: int  # bytes of the version 0 it wrote (0: resumed)
    store_read_mark: int  # the store's bytes read once loaded
    update_limits: dict[str, int]
    aggregation: Aggregation  # the rule with its root, the layout and the step (fedseq/engine.py)
    rule_state: Mapping[str, Any] | None = None  # what the rule's last round left (resumed: from the head's summary)


@dataclass
class Written:
    """A new model version in the store, not yet the head (:meth:`ModelKeeper.publish_head`)."""

    version: int
    params: torch.Tensor
    store_bytes: int
    patch_bytes: int


class ModelKeeper:
    """The run and its model versions. ``lock`` is the server's state lock: the attributes below
    are published under it, and the ``*_locked`` methods expect it held."""

    def __init__(self, store_factory: Callable[[str], RedisStore], lock: threading.Lock, max_update_bytes: int,
                 accepted_codecs: tuple[str, ...]) -> None:
        self._store_factory = store_factory  # run_id -> RedisStore
        self._lock = lock
        self.max_update_bytes = max_update_bytes  # the cap; the run's limits below are at most this
        self.accepted_codecs = accepted_codecs
        # codec -> the most bytes an update may declare in the current run (intake.update_limit:
        # the largest honest update of the run's model x 1.1 + 4 KiB, at most max_update_bytes)
        self.update_limits: dict[str, int] = {}
        self.run_id: str | None = None
        self.cfg: ExperimentConfig | None = None
        self.layout: Layout | None = None
        self.params: torch.Tensor | None = None
        self.version = -1
        self.last_closed = -1  # round r produces version r + 1
        self.store: RedisStore | None = None
        self.model: SeqModel | None = None
        self.aggregation: Aggregation | None = None
        self.rule_state: Mapping[str, Any] | None = None  # what the rule's last round left (fedseq/engine.py RoundContext.state)
        self._store_read_mark = 0

    # ------------------------------------------------------------------ the run
    def load(self, request, context) -> Run:
        """StartRun's checks (INVALID_ARGUMENT on a bad config, item count or codec), then the
        run's model: a new one written as version 0, or the store's head (without the lock)."""
        try:
            cfg = ExperimentConfig.from_dict(json.loads(request.config_json))
            rule = make_run_rule(cfg.defense, dict(cfg.defense_opts), cfg.seed, cfg.clients_per_round)
        except (ValueError, RuleConfigError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad run config: {e}")
        if request.num_items < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_items must be >= 1")
        if cfg.codec not in self.accepted_codecs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"codec {cfg.codec!r} is not accepted by this aggregation server; it accepts "
                          f"{', '.join(self.accepted_codecs)} (serve-server --accept-codecs / "
                          f"FEDSEQ_ACCEPT_CODECS); pick one of those with --codec")
        self.compress(context, cfg)
        model = build_model(cfg.model, int(request.num_items))
        store = self._store_factory(request.run_id)
        head = store.head()
        layout = Layout.of(model)
        if head is None:
            reference_init(model, cfg.seed)
            params = get_vector(model)
            store_bytes = store.put_model(0, layout.unflatten(params), {"round": "-1"})
            version, resumed, state = 0, False, None
        else:
            params = layout.flatten(store.get_model(head))
            version, resumed, store_bytes = head, True, 0
            state = stored_rule_state(store.round_summary(head))
        limits = {c: update_limit(layout, c, self.max_update_bytes) for c in self.accepted_codecs}
        try:
            aggregation = Aggregation(rule, root_source(rule, cfg, model), layout, cfg.compat.literal_step)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad run config: {e}")
        return Run(request.run_id, cfg, layout, params, version, store, model, resumed, store_bytes,
                   store.io_counters()["bytes_read"], limits, aggregation, state)

    def publish_run_locked(self, run: Run) -> None:
        """Serve ``run`` from now on (a new run on this server starts over)."""
        self.run_id, self.cfg, self.layout, self.params = run.run_id, run.cfg, run.layout, run.params
        self.version, self.store, self.model, self.aggregation = run.version, run.store, run.model, run.aggregation
        self.last_closed = run.version - 1  # round r produces version r + 1
        self._store_read_mark = run.store_read_mark
        self.update_limits = run.update_limits
        self.rule_state = run.rule_state

    def started(self, run: Run) -> pb.StartRunReply:
        log.info("run %s: %s at version %d (%s); updates of at most %d bytes (%s; cap %d)", run.run_id,
                 run.cfg.model, run.version, "resumed" if run.resumed else "new", self.update_limit, run.cfg.codec,
                 self.max_update_bytes)
        return pb.StartRunReply(head_version=run.version, num_parameters=run.layout.dim,
                                accepted_encodings=list(self.accepted_codecs), resumed=run.resumed,
                                max_chunk_bytes=CHUNK_BYTES, store_bytes=run.store_bytes)

    @property
    def update_limit(self) -> int:
        """The most bytes an update in the run's codec may declare (``max_update_bytes`` before a run)."""
        if self.cfg is None:
            return self.max_update_bytes
        return self.update_limits.get(self.cfg.codec, self.max_update_bytes)

    def limit_for(self, codec: str) -> int:
        """The most bytes an update declared in ``codec`` may hold in this run."""
        return self.update_limits.get(codec, self.max_update_bytes)

    def compress(self, context, cfg: ExperimentConfig | None = None) -> None:
        """Compress this call's responses when the run asks for it (config key ``compression``)."""
        cfg = cfg or self.cfg
        if cfg is not None and cfg.compression == "gzip":
            context.set_compression(grpc.Compression.Gzip)

    def check_run_locked(self, run_id: str, context) -> None:
        if self.run_id is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no run started on this server (call StartRun)")
        if run_id != self.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"unknown run {run_id!r} (serving {self.run_id!r})")

    # ------------------------------------------------------------------ new versions
    def write(self, round_id: int, params: torch.Tensor, timings: dict[str, float], summary: bytes = b"") -> Written:
        """Write ``params``, the model after round ``round_id``, as the next version with the round's
        ``summary`` (and, when the run asks for it, the patch from the head to it); the head does
        not move yet. Without the lock: only the one control call in progress changes the head."""
        assert self.store is not None and self.layout is not None and self.params is not None
        version = self.version + 1
        t2 = time.perf_counter()
        store_bytes = self.store.put_model(version, self.layout.unflatten(params), {"round": str(round_id)}, summary)
        timings["store"] = time.perf_counter() - t2
        patch_bytes = 0
        if self.cfg is not None and self.cfg.model_delta:
            t3 = time.perf_counter()
            patch = make_patch(self.layout.unflatten(self.params), self.layout.unflatten(params), version - 1)
            patch_bytes = self.store.put_patch_bytes(version, patch)
            timings["patch"] = time.perf_counter() - t3
        return Written(version, params, store_bytes, patch_bytes)

    def publish_head_locked(self, written: Written, round_id: int) -> int:
        """Make the written version the head (round ``round_id`` closed); the store's bytes read
        since the last round closed."""
        assert self.store is not None
        self.params, self.version, self.last_closed = written.params, written.version, round_id
        observe.MODEL_VERSION.set(self.version)
        read_now = self.store.io_counters()["bytes_read"]
        store_read, self._store_read_mark = read_now - self._store_read_mark, read_now
        return store_read

    # ------------------------------------------------------------------ GetModel
    def get_model(self, request, context):
        """The version asked for (negative: the head), in chunks; NOT_FOUND when the store lacks it."""
        with self._lock:
            self.check_run_locked(request.run_id, context)
            store = self.store
            version = self.version if request.version < 0 else request.version
        assert store is not None
        self.compress(context)
        try:
            blob = store.get_model_bytes(version)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        for piece in chunks(blob):
            yield pb.ModelChunk(version=version, total_bytes=len(blob), data=piece)


def stored_rule_state(summary: bytes | None) -> Mapping[str, Any] | None:
    """The rule state a stored round summary carries (its rule info's ``state``; fedseq/engine.py
    RoundContext.state), or None."""
    if not summary:
        return None
    msg = pb.RoundSummary()
    msg.ParseFromString(summary)
    try:
        info = json.loads(msg.defense_info_json) if msg.defense_info_json else {}
    except ValueError:
        return None
    state = info.get("state") if isinstance(info, dict) else None
    return state if isinstance(state, dict) else None
