"""The run loop (fedseq/runloop.py) on a scripted federation: which rounds it runs in which
order, what each epoch row sums, when it evaluates, how it resumes, reruns a failed round, stops,
and warns about a stall. The federations of the real runners are checked against each other in
tests/test_engine_equal.py."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedseq.config import ExperimentConfig
from fedseq.engine import RoundPlan
from fedseq.runloop import RoundFailed, RoundTally, run_rounds

CFG = ExperimentConfig(dataset="synthetic", epochs=3, clients_per_round=2, lr=0.5, eval_every=2)


def _plan(rounds_per_epoch: int = 2, epochs: int = 3) -> list[RoundPlan]:
    out: list[RoundPlan] = []
    for e in range(epochs):
        for i in range(rounds_per_epoch):
            out.append(RoundPlan(len(out), e, i, np.array([2 * i, 2 * i + 1]), 0.5 / (e + 1)))
    return out


class Scripted:
    """A federation whose parts say what they were asked, in order."""

    def __init__(self, head: int = 0, recorded: list[dict[str, Any]] | None = None,
                 fail: dict[int, int] | None = None, hr10: float | None = None) -> None:
        self.head, self.recorded = head, recorded or []
        self.fail = dict(fail or {})  # round id -> how many times train fails
        self.calls: list[tuple[str, int]] = []
        self.rows: list[dict[str, Any]] = []
        self.hr10 = hr10
        self.completed_on_recover: set[int] = set()

    def resume(self):
        return self.head, self.recorded

    def train(self, rp: RoundPlan):
        self.calls.append(("train", rp.round_id))
        if self.fail.get(rp.round_id, 0) > 0:
            self.fail[rp.round_id] -= 1
            raise RoundFailed("server gone", ConnectionError(f"round {rp.round_id}"))
        return rp.round_id * 10

    def aggregate(self, rp: RoundPlan, trained: Any) -> RoundTally:
        assert trained == rp.round_id * 10
        self.calls.append(("aggregate", rp.round_id))
        return RoundTally({"accepted": 2, "rejected": rp.round_id % 2}, loss=1.0)

    def recover(self, rp: RoundPlan):
        self.calls.append(("recover", rp.round_id))
        return RoundTally({"accepted": 0, "rejected": 0}) if rp.round_id in self.completed_on_recover else None

    def evaluate(self, epoch: int, version: int) -> dict[str, Any]:
        self.calls.append(("evaluate", version))
        return {"hr@10": self.hr10 if self.hr10 is not None else 0.1 * version, "ndcg@10": 0.0, "er@5": 0.0,
                "er@10": 0.0}

    def record_epoch(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def rule_name(self) -> str:
        return "fedavg"

    def rule_scale(self) -> str:
        return "sum"


def test_every_round_runs_once_in_order_and_epochs_are_evaluated_when_due():
    # Prepare: 3 epochs of 2 rounds, evaluation every 2 epochs (and after the last)
    fed = Scripted()
    # Execute
    out = run_rounds(CFG, _plan(), fed)
    # Assert: train then aggregate per round; evaluation after epochs 2 and 3 on the version made
    rounds = [c for c in fed.calls if c[0] != "evaluate"]
    assert rounds == [(k, r) for r in range(6) for k in ("train", "aggregate")]
    assert [c for c in fed.calls if c[0] == "evaluate"] == [("evaluate", 4), ("evaluate", 6)]
    assert out.state == "done" and out.rounds_done == 6
    assert [r["epoch"] for r in fed.rows] == [1, 2, 3] and out.epochs == fed.rows
    first = fed.rows[0]
    assert (first["rounds"], first["accepted"], first["rejected"], first["round_id"], first["lr"]) == (2, 4, 1, 2, 0.5)
    assert "hr@10" not in first and fed.rows[1]["hr@10"] == pytest.approx(0.4)
    assert fed.rows[2]["lr"] == pytest.approx(0.5 / 3)


def test_a_resumed_run_finishes_the_unevaluated_epoch_then_continues_at_the_head():
    # Prepare: a crash after round 3 (the last of epoch 2) before epoch 2 was evaluated
    fed = Scripted(head=4, recorded=[{"epoch": 1, "round_id": 2}])
    # Execute
    out = run_rounds(CFG, _plan(), fed)
    # Assert: epoch 2 is evaluated on version 4 first, then rounds 4 and 5 run
    assert fed.calls[0] == ("evaluate", 4)
    assert [c for c in fed.calls[1:] if c[0] == "train"] == [("train", 4), ("train", 5)]
    assert [r["epoch"] for r in out.epochs] == [1, 2, 3]
    assert fed.rows[0]["train_seconds"] == 0.0 and "rounds" not in fed.rows[0]


def test_a_failed_round_is_rerun_after_recovery_and_counted_once():
    # Prepare: round 1's training fails twice
    fed = Scripted(fail={1: 2})
    # Execute
    out = run_rounds(replace(CFG, epochs=1), _plan(epochs=1), fed, stop=threading.Event(), retries=3, backoff=0.001)
    # Assert: two recoveries, the round counted once in its epoch
    assert fed.calls.count(("recover", 1)) == 2 and fed.calls.count(("aggregate", 1)) == 1
    assert out.epochs[0]["rounds"] == 2 and out.epochs[0]["accepted"] == 4


def test_a_round_completed_before_its_failure_is_not_run_again():
    fed = Scripted(fail={0: 1})
    fed.completed_on_recover = {0}
    out = run_rounds(replace(CFG, epochs=1), _plan(epochs=1), fed, stop=threading.Event(), retries=3, backoff=0.001)
    assert ("aggregate", 0) not in fed.calls and fed.calls.count(("train", 0)) == 1
    assert out.epochs[0]["accepted"] == 2  # round 0's tally from recover (0) + round 1's (2)


def test_the_failure_itself_is_raised_when_the_retries_run_out():
    fed = Scripted(fail={0: 5})
    with pytest.raises(ConnectionError, match="round 0"):
        run_rounds(CFG, _plan(), fed, stop=threading.Event(), retries=1, backoff=0.001)
    assert fed.calls.count(("train", 0)) == 2


def test_a_set_stop_ends_the_run_between_rounds():
    # Prepare: stop once round 2 is aggregated
    stop = threading.Event()

    class Stopping(Scripted):
        def aggregate(self, rp, trained):
            if rp.round_id == 2:
                stop.set()
            return super().aggregate(rp, trained)

    fed = Stopping()
    # Execute
    out = run_rounds(CFG, _plan(), fed, stop=stop)
    # Assert
    assert out.state == "stopped" and out.rounds_done == 3
    assert max(r for k, r in fed.calls if k == "train") == 2


def test_a_run_whose_hr_does_not_move_warns_in_its_row_and_outcome():
    fed = Scripted(hr10=0.2)
    lines: list[str] = []
    out = run_rounds(replace(CFG, eval_every=1), _plan(), fed, progress=lines.append)
    assert len(out.warnings) == 1 and "HR@10 has not moved" in out.warnings[0]
    assert fed.rows[2]["warning"] == out.warnings[0] and "warning" not in fed.rows[1]
    assert any(line.startswith("WARNING: ") for line in lines)
    assert sum(line.startswith("~epoch") for line in lines) == 6


def test_a_record_appended_twice_is_read_once_the_last_kept():
    # Prepare: an epoch row written again (an append Redis applied but whose reply was lost, sent again)
    from orchestrator.run import latest_by

    rows = [{"epoch": 1, "v": "a"}, {"epoch": 1, "v": "b"}, {"epoch": 2, "v": "c"}]
    # Execute / Assert
    assert latest_by(rows, "epoch") == [{"epoch": 1, "v": "b"}, {"epoch": 2, "v": "c"}]
    assert latest_by([], "epoch") == []
