"""Closing a round on the aggregation server (``CloseRound``): the round is taken out of the round
buffer under the state lock, its accepted updates are aggregated with the run's rule (the round
engine, fedseq/engine.py) and the new model version is written to the store without the lock, and
the new head is published under the lock.

While the round is aggregated and written, uploads are checked against no open round (refused
"stale", as they always were once the round closed; an update that finishes decoding then is
refused "stale" too) and GetModel serves the previous head, whole in the store. The control calls
(StartRun, OpenRound, another CloseRound) wait for the close (server/service.py). A close that
fails (the store cannot be written) publishes nothing: the head stays, and the refusals it took
go back to the next summary.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedseq import observe
from fedseq.engine import RoundOutcome, aggregate_round
from fedseq.v1 import aggregator_pb2 as pb

from .intake import reason, word
from .keeper import ModelKeeper
from .rounds import Refusals, Round, RoundBuffer


@dataclass
class _Step:
    """The round's step: the new parameters and what the summary says of it."""

    params: torch.Tensor
    users: list[int]  # the users aggregated
    norm: float = 0.0  # of the parameters' change
    info_json: str = "{}"
    kept_users: list[int] = field(default_factory=list)
    kept_reported: bool = False
    state: Mapping[str, Any] | None = None  # the rule state the next round gets (fedseq/engine.py RoundContext.state)


class RoundCloser:
    """Closes the open round: aggregate, write the next version, publish it, summarize."""

    def __init__(self, keeper: ModelKeeper, rounds: RoundBuffer, lock: threading.Lock) -> None:
        self._keeper = keeper
        self._rounds = rounds
        self._lock = lock

    def close(self, request, context) -> pb.RoundSummary:
        """The summary of the round ``request`` closes (FAILED_PRECONDITION when it is not open).
        The summary is written to the store with the new version, in one atomic step
        (fedseq/store.py ``round_summary``): an orchestrator that dies before this reply reaches
        it reads the round's counts back instead of losing them."""
        with self._lock:
            rnd, refused = self._rounds.take_locked(request, context)
        try:
            timings = {"decode": rnd.decode_seconds}
            step = self._step(rnd, refused, timings)
            summary = self._summary(rnd, step, self._keeper.version + 1, refused, timings)
            written = self._keeper.write(rnd.round_id, step.params, timings, summary.SerializeToString())
        except BaseException:
            with self._lock:
                self._rounds.restore_locked(refused)
            raise
        with self._lock:
            store_read = self._keeper.publish_head_locked(written, rnd.round_id)
            self._keeper.rule_state = step.state
        self._keeper.compress(context)
        # what only the write knows, in the reply (the stored copy has the counts, not these)
        summary.store_bytes, summary.patch_bytes, summary.store_bytes_read = (
            written.store_bytes, written.patch_bytes, store_read)
        summary.timings.update(timings)
        return summary

    def _step(self, rnd: Round, refused: Refusals, timings: dict[str, float]) -> _Step:
        """The model after the round: the head stepped with the accepted updates (the head itself
        when there are none). Updates the engine refuses become rejections of the round."""
        keeper = self._keeper
        assert keeper.params is not None
        t0 = time.perf_counter()
        users = sorted(rnd.updates)
        if not users:
            return _Step(keeper.params, users, state=keeper.rule_state)
        out = self._aggregate(rnd, users, refused)
        t1 = time.perf_counter()
        step = _Step(out.params, list(out.users), norm=float((out.params - keeper.params).norm()),
                     state=out.rule_state(keeper.rule_state))
        timings.update(aggregate=t1 - t0, step=time.perf_counter() - t1)
        observe.AGGREGATE_SECONDS.observe(time.perf_counter() - t0)
        if out.result is not None:
            step.info_json = json.dumps(out.info, default=float)
            if out.kept_users is not None:
                step.kept_users, step.kept_reported = list(out.kept_users), True
        return step

    def _aggregate(self, rnd: Round, users: list[int], refused: Refusals) -> RoundOutcome:
        """The round engine's step (fedseq/engine.py) on the accepted ``users``' updates. Updates
        refused because the aggregate overflowed are recorded as rejected ("non-finite")."""
        keeper = self._keeper
        assert keeper.params is not None and keeper.aggregation is not None
        rows = [rnd.rows[u] for u in users]  # ascending: rows follow user ids
        # [K, D] sorted by user id; no copy when every assigned user's update arrived
        U = rnd.matrix if len(rows) == rnd.matrix.shape[0] else rnd.matrix[torch.as_tensor(rows)]
        w = torch.tensor([rnd.updates[u] for u in users], dtype=torch.float32)
        # bound_rows=(): every row passed the same sanity bound (fedseq/engine.py out_of_bounds) as it was decoded
        out = aggregate_round(keeper.aggregation, keeper.params, U, w, users, rnd.lr, rnd.round_id, bound_rows=(),
                              state=keeper.rule_state)
        for user, why in out.refused.items():
            del rnd.updates[user]
            rnd.rejected[user] = reason(word(why), why.split(": ", 1)[1])
            rnd.refused_by_engine += 1
            refused.counts[word(why)] += 1
            observe.UPDATES.labels("refused", word(why)).inc()
        return out

    def _summary(self, rnd: Round, step: _Step, version: int, refused: Refusals, timings: dict[str, float]
                 ) -> pb.RoundSummary:
        cfg = self._keeper.cfg
        missing = sorted(set(rnd.tokens) - set(rnd.updates) - set(rnd.rejected))
        return pb.RoundSummary(
            round_id=rnd.round_id, new_version=version, accepted=len(step.users),
            rejected=[pb.Rejection(user_id=u, reason=r) for u, r in sorted(rnd.rejected.items())], missing=missing,
            bytes_received=rnd.bytes_received, timings=timings, defense=cfg.defense if cfg else "",
            defense_info_json=step.info_json, kept_users=step.kept_users, kept_reported=step.kept_reported,
            update_norm=step.norm, refused=dict(refused.counts), bytes_refused=refused.bytes,
            refused_sample=[pb.Rejection(user_id=u, reason=r) for u, r in refused.sample], user_bytes=rnd.user_bytes,
            refused_by_engine=rnd.refused_by_engine)
