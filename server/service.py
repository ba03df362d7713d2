"""The aggregation server (gRPC ``fedseq.v1.Aggregator``).

Opens rounds, receives streamed user updates, validates each one (server/intake.py: run, open
round, deadline, assigned user, token, duplicate, accepted codec, the weight the orchestrator
assigned and the declared size from the header before any data is buffered; then checksum, schema
before decoding, finite values), aggregates the accepted ones with the configured rule
(server/aggregation), weighted by the orchestrator's weights, steps the model and writes version
v+1 to the model store. It never learns which users are malicious. Every refused upload is counted
by reason in the next round summary.

The servicer is thin; its parts are modules of their own:

- server/streams.py: stream intake (SubmitUpdates): stream limits, idle streams, chunk reassembly
  into one buffer of the declared size (bounded by :attr:`AggregatorServicer.update_limits`, set at
  StartRun: the largest update an honest worker can send for the run's model and codec);
- server/rounds.py: the round buffer: the open round, its assignments and the updates received
  (decoded straight into the round matrix), the refusals of the next summary;
- server/closing.py: CloseRound: aggregate the round and write the next version;
- server/keeper.py: the model keeper: the run (StartRun, resumed from the store's head), the
  current version, the write and publication of each new one, GetModel.

Locking: the state lock (the run, the head, the open round, the refusal counts) is held only for
short bookkeeping, never across building the model, aggregation or a store read or write; the
streams have a lock of their own. The control calls (StartRun, OpenRound, CloseRound) run one at a
time under a control lock, which no upload or GetModel takes: a close aggregates and writes with
the round already taken out of the buffer (uploads of it are refused "stale") while GetModel serves
the previous head, and publishes the new head under the state lock once it is in the store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from fedseq import codec, observe
from fedseq.config import ExperimentConfig
from fedseq.engine import AggregationRule, RootUpdate
from fedseq.params import Layout
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2_grpc as pb_grpc

from .closing import RoundCloser
from .intake import StreamLimits
from .keeper import ModelKeeper
from .rounds import REFUSED_SAMPLE, Round, RoundBuffer, decode_update
from .streams import StreamIntake

__all__ = ["ACCEPTED_CODECS", "REFUSED_SAMPLE", "AggregatorServicer", "Round", "parse_codecs"]

ACCEPTED_CODECS = codec.CODEC_NAMES  # the default: every codec of fedseq.codec


def parse_codecs(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The codecs a server accepts updates in, from a comma list or names (None/empty: all of
    them). ValueError naming the unknown ones and the known codecs."""
    if value is None:
        return ACCEPTED_CODECS
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not names:
        return ACCEPTED_CODECS
    bad = [n for n in names if n not in codec.CODEC_NAMES]
    if bad:
        raise ValueError(f"unknown codec(s) {bad}; known codecs: {', '.join(codec.CODEC_NAMES)}")
    return tuple(dict.fromkeys(names))


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """``fedseq.v1.Aggregator``, delegating to its parts (see the module's docstring)."""

    # how an update is decoded into its round-matrix row (a subclass may wrap it)
    _decode = staticmethod(decode_update)

    def __init__(self, store_factory, max_update_bytes: int = 64 << 20,
                 accept_codecs: str | Iterable[str] | None = None, limits: StreamLimits | None = None) -> None:
        self._lock = threading.Lock()  # the state lock: short bookkeeping only
        self._control = threading.Lock()  # StartRun, OpenRound and CloseRound, one at a time
        self.keeper = ModelKeeper(store_factory, self._lock, max_update_bytes, parse_codecs(accept_codecs))
        self.rounds = RoundBuffer(self._lock, self.keeper, self._decode)
        self.intake = StreamIntake(limits or StreamLimits(), self.rounds, self.keeper.compress)
        self.closer = RoundCloser(self.keeper, self.rounds, self._lock)

    def StartRun(self, request, context):
        with self._control:
            run = self.keeper.load(request, context)
            with self._lock:
                self.keeper.publish_run_locked(run)
                self.rounds.reset_locked()
            return self.keeper.started(run)

    def OpenRound(self, request, context):
        observe.set_context(run=request.run_id[:64], round_id=request.round_id)
        with self._control, self._lock:
            return self.rounds.open_locked(request, context)

    def SubmitUpdates(self, request_iterator, context):
        """Uploads, each a header chunk then data chunks. The header is checked first: a refused
        update's data is read off the stream and counted but never buffered. Streams are capped in
        number (overall, per peer) and cancelled when idle (:class:`StreamLimits`)."""
        return self.intake.submit(request_iterator, context)

    def CloseRound(self, request, context):
        observe.set_context(run=request.run_id[:64], round_id=request.round_id)
        with self._control:
            return self.closer.close(request, context)

    def GetModel(self, request, context):
        yield from self.keeper.get_model(request, context)

    # ------------------------------------------------------------------ the parts' state
    @property
    def accepted_codecs(self) -> tuple[str, ...]:
        """The codecs this server accepts updates in (a run in another codec is refused at StartRun)."""
        return self.keeper.accepted_codecs

    @accepted_codecs.setter
    def accepted_codecs(self, value: tuple[str, ...]) -> None:
        self.keeper.accepted_codecs = value

    @property
    def round(self) -> Round | None:
        """The open round (None: none open)."""
        return self.rounds.round

    @property
    def run_id(self) -> str | None:
        return self.keeper.run_id

    @property
    def cfg(self) -> ExperimentConfig | None:
        return self.keeper.cfg

    @property
    def layout(self) -> Layout | None:
        return self.keeper.layout

    @property
    def params(self) -> torch.Tensor | None:
        """The head's parameters."""
        return self.keeper.params

    @property
    def version(self) -> int:
        """The head version (-1 before a run)."""
        return self.keeper.version

    @property
    def last_closed(self) -> int:
        return self.keeper.last_closed

    @property
    def store(self) -> RedisStore | None:
        return self.keeper.store

    @property
    def rule(self) -> AggregationRule | None:
        return self.keeper.aggregation.rule if self.keeper.aggregation else None

    @property
    def root(self) -> RootUpdate | None:
        return self.keeper.aggregation.root if self.keeper.aggregation else None

    @property
    def max_update_bytes(self) -> int:
        return self.keeper.max_update_bytes

    @property
    def update_limits(self) -> dict[str, int]:
        """codec -> the most bytes an update may declare in the current run (intake.update_limit:
        the largest honest update of the run's model x 1.1 + 4 KiB, at most max_update_bytes)."""
        return self.keeper.update_limits

    @property
    def update_limit(self) -> int:
        """The most bytes an update in the run's codec may declare (``max_update_bytes`` before a run)."""
        return self.keeper.update_limit

    @property
    def limits(self) -> StreamLimits:
        return self.intake.limits

    @property
    def buffered(self) -> int:
        """Bytes of update data held in the streams' buffers now."""
        return self.intake.buffered

    @property
    def peak_buffered(self) -> int:
        """The most bytes of update data ever held in the streams' buffers at once."""
        return self.intake.peak_buffered
