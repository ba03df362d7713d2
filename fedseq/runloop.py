"""The run loop of the round engine: one loop for every runner.

fedseq/engine.py says what a round *is* (the plan, the step, the bounds); this module walks the
plan. :func:`run_rounds` owns everything a run does between rounds, for the in-process runner
(``fedseq sim``, cli/sim.py) and for the orchestrator (orchestrator/run.py) alike:

- the schedule: from the first round not yet done (the store head when a run resumes) to the
  last round of :func:`fedseq.engine.plan_run`, each with its epoch's learning rate;
- the reruns: a round whose transport failed under it (:class:`RoundFailed`) is retried up to
  :data:`ROUND_RETRIES` times with backoff, after the federation recovers (or finds the round
  was completed after all);
- the epochs: after the last round of an epoch, one row with the epoch's summed round counts, the
  evaluation when :func:`fedseq.engine.eval_due` says so, and the stall warning
  (:func:`fedseq.engine.stall_warning`); an epoch whose rounds all finished before a crash but
  whose evaluation did not is finished first on resume;
- the stop: a set ``stop`` event ends the run between rounds.

What differs between runners is injected as a :class:`Federation`: how a round's updates are
trained (a compute pool in this process, or Train tasks down the workers' streams), how they are
aggregated (the rule here, or the aggregation server's CloseRound), how the benign users are
evaluated, and where the records go. tests/test_runloop.py checks the loop with a scripted
federation; tests/test_engine_equal.py checks that both federations compute the same run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import ExperimentConfig
from .engine import RoundPlan, eval_due, last_of_epoch, stall_warning

log = logging.getLogger(__name__)

ROUND_RETRIES = 8  # reruns of a round whose transport failed (backoff 1, 2, 4, ... 15 s)
MAX_BACKOFF = 15.0

Progress = Callable[[str], None]


class RoundFailed(Exception):
    """The transport under a round failed (a restarted aggregation server lost the open round,
    the store is restarting): the loop waits and reruns the round. ``error`` is the failure
    itself; it is raised as is when the retries run out."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__(what)
        self.what, self.error = what, error


@dataclass(frozen=True)
class RoundTally:
    """What one round reports to the loop.

    counts: numbers summed over the epoch's rounds into its row (accepted, rejected, ...).
    loss: the round's mean training loss, for the progress line (None: not known here).
    """

    counts: Mapping[str, float] = field(default_factory=dict)
    loss: float | None = None


class Federation(Protocol):
    """The parts of a run that differ between runners.

    ``resume`` binds the run (new, or resumed from the store head) and returns ``(rounds already done, epoch rows already recorded)``;
    ``train`` computes round ``rp``'s updates on model version ``rp.round_id`` and returns a
    handle that ``aggregate`` turns into version ``rp.round_id + 1``; ``recover`` is called after
    a :class:`RoundFailed` and says whether the round must be rerun (None) or was completed (its
    tally); ``evaluate`` returns the benign users' metrics on ``version`` (with any fields the
    runner adds); ``record_epoch`` stores an epoch row (and may add fields to it).
    ``rule_name``/``rule_scale`` name the rule for the stall warning."""

    def resume(self) -> tuple[int, Sequence[dict[str, Any]]]: ...

    def train(self, rp: RoundPlan) -> Any: ...

    def aggregate(self, rp: RoundPlan, trained: Any) -> RoundTally: ...

    def recover(self, rp: RoundPlan) -> RoundTally | None: ...

    def evaluate(self, epoch: int, version: int) -> dict[str, Any]: ...

    def record_epoch(self, row: dict[str, Any]) -> None: ...

    def rule_name(self) -> str: ...

    def rule_scale(self) -> str: ...


@dataclass
class RunOutcome:
    """Where :func:`run_rounds` left the run: ``state`` ``"done"`` or ``"stopped"``, the epoch rows
    (those recorded before a resume included), the warnings, and the rounds done."""

    state: str
    epochs: list[dict[str, Any]]
    warnings: list[str]
    rounds_done: int


def _quiet(_line: str) -> None:
    pass


class _Loop:
    """The state of one pass of :func:`run_rounds` (split out so each step is a short method)."""

    def __init__(self, cfg: ExperimentConfig, plan: Sequence[RoundPlan], fed: Federation, progress: Progress,
                 stop: threading.Event | None, retries: int, backoff: float) -> None:
        self.cfg, self.plan, self.fed, self.progress = cfg, plan, fed, progress
        self.stop, self.retries, self.backoff = stop, retries, backoff
        self.epochs: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.done = 0

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def wait(self, seconds: float) -> None:
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)

    def round(self, rp: RoundPlan) -> RoundTally:
        """``rp`` trained and aggregated, rerun after a :class:`RoundFailed`."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self.fed.aggregate(rp, self.fed.train(rp))
            except RoundFailed as e:
                if attempt == self.retries or self.stopped():
                    raise e.error from None
                log.warning("round %d failed (%s); retrying in %.0f s (%d/%d)", rp.round_id, e.what, delay,
                            attempt + 1, self.retries)
                self.progress(f"round {rp.round_id}: {e.what[:80]}; retrying")
            self.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)
            try:
                completed = self.fed.recover(rp)
            except RoundFailed as e:
                log.warning("round %d: not back yet: %s", rp.round_id, e.what)
                continue
            if completed is not None:
                return completed
        raise AssertionError("unreachable")

    def end_epoch(self, rp: RoundPlan, seconds: float, acc: Mapping[str, float]) -> None:
        """The row of ``rp``'s epoch (``rp``: its last round): counts, evaluation, stall warning."""
        epoch = rp.epoch
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": rp.lr, "train_seconds": seconds,
                               "round_id": rp.round_id + 1, **acc}
        if eval_due(self.cfg, epoch):
            t = time.perf_counter()
            row.update(self.fed.evaluate(epoch, rp.round_id + 1))
            row["eval_seconds"] = time.perf_counter() - t
            self.check_stall(row)
        row["seconds"] = seconds + row.get("eval_seconds", 0.0)
        self.fed.record_epoch(row)
        self.epochs = [e for e in self.epochs if e["epoch"] != epoch + 1] + [row]
        if "hr@10" in row:
            mal = ""
            if "malicious_updates" in row:
                mal = f" malicious updates {row['malicious_updates']} (kept {row['malicious_kept']})"
            self.progress(f"epoch {epoch + 1}/{self.cfg.epochs}: HR@10 {row['hr@10']:.4f} "
                          f"NDCG@10 {row['ndcg@10']:.4f} ER@5 {row['er@5']:.4f} ER@10 {row['er@10']:.4f}{mal} "
                          f"({row['seconds']:.1f}s)")

    def check_stall(self, row: dict[str, Any]) -> None:
        hr10 = [e["hr@10"] for e in self.epochs if "hr@10" in e and e["epoch"] < row["epoch"]] + [row["hr@10"]]
        warning = stall_warning(self.cfg, self.fed.rule_name(), self.fed.rule_scale(), hr10,
                                self.cfg.clients_per_round)
        if warning:
            log.warning("%s", warning)
            self.warnings.append(warning)
            row["warning"] = warning
            self.progress(f"WARNING: {warning}")

    def outcome(self, state: str) -> RunOutcome:
        return RunOutcome(state, list(self.epochs), list(self.warnings), self.done)

    def run(self) -> RunOutcome:
        head, recorded = self.fed.resume()
        self.epochs, self.done, plan = [dict(e) for e in recorded], head, self.plan
        # an epoch whose rounds all finished before a crash but whose evaluation did not
        if 0 < head <= len(plan) and last_of_epoch(plan, head - 1) and len(self.epochs) <= plan[head - 1].epoch:
            self.end_epoch(plan[head - 1], 0.0, {})
        t0, acc = time.perf_counter(), dict[str, float]()
        for rid in range(head, len(plan)):
            if self.stopped():
                return self.outcome("stopped")
            rp = plan[rid]
            tally = self.round(rp)
            self.done = rid + 1
            acc["rounds"] = acc.get("rounds", 0) + (0 if rp.adversarial else 1)
            for k, v in tally.counts.items():
                acc[k] = acc.get(k, 0) + v
            if tally.loss is not None:
                self.progress(f"~epoch {rp.epoch + 1}/{self.cfg.epochs} round {rid + 1}/{len(plan)} "
                              f"loss {tally.loss:.4f}")
            if last_of_epoch(plan, rid):
                self.end_epoch(rp, time.perf_counter() - t0, acc)
                t0, acc = time.perf_counter(), {}
        return self.outcome("done")


def run_rounds(cfg: ExperimentConfig, plan: Sequence[RoundPlan], fed: Federation, progress: Progress = _quiet,
               stop: threading.Event | None = None, retries: int = ROUND_RETRIES, backoff: float = 1.0) -> RunOutcome:
    """Run ``plan`` (:func:`fedseq.engine.plan_run` of ``cfg``) on ``fed`` from the round
    ``fed.resume()`` says is next, to the end or until ``stop`` is set. ``progress`` gets one line
    per round (starting ``~``: a line to overwrite) and one per evaluated epoch. A
    :class:`RoundFailed` round is rerun up to ``retries`` times, the first after ``backoff``
    seconds, each wait twice the last (at most :data:`MAX_BACKOFF`); any other exception ends the
    run (the caller reports it)."""
    return _Loop(cfg, plan, fed, progress, stop, retries, backoff).run()
