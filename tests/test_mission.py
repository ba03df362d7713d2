"""The main job's claim (README, docs/results/mission.md) on five seeds: `fedseq sweep mission`'s
three scenarios, in process. A file of its own, so one of the suite's workers (`--dist loadfile`)
runs it while the other runs the rest."""

from __future__ import annotations

import argparse

import pytest

from cli.sweep import add_arguments, spec_from
from cli.sweep_spec import MISSION_DATA


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_the_mission_shows_the_attack_and_the_defense_on_every_seed(seed):
    """The main job's claim (docs/results/mission.md) on each of seeds 0-4, in process (the services
    compute the same run: tests/test_engine_equal.py), made cheaper: the mission's data with
    histories cut to 20 items (the generator's max_length; 60 in the mission), 3 of the 8 epochs,
    evaluated once at the end. DV-FSR lifts ER@10 by 0.3 or more over clean, and mixed-RFA holds
    it to at most half with HR@10 within 0.05 of clean. Measured 2026-12-04 on seeds 0-4: the
    smallest lift 0.435 (seed 4), the largest defended/attacked ER@10 ratio 0.201 (seed 1), the
    largest HR@10 gap 0.020 (seed 2), 4.4 CPU s a seed instead of 11 (full histories, 4 epochs).
    Not every cut keeps the claim: histories of 30 items at 4 epochs gave seed 4 a lift of only
    0.115 (docs/results/suite.md has the variants tried)."""
    from cli.sim import run_inprocess
    from fedseq.config import build_config

    # Prepare: the mission preset's three scenarios on this seed, on shorter histories, 3 epochs,
    # evaluated after the last
    spec = spec_from(_args("mission", "--seeds", str(seed), "--set", "epochs=3", "--set", "eval_every=3",
                           "--set", f"dataset={MISSION_DATA},max_length=20"))
    final = {}
    # Execute
    for cell in spec.cells():
        cfg = build_config(None, {**spec.base, **cell.overrides(), "threads": 1}, environ={})
        final[cell.name] = run_inprocess(cfg, None, progress=lambda _line: None)["epochs"][-1]
    clean, attacked, defended = final["clean"], final["dv-fsr"], final["dv-fsr + mixed-rfa"]
    # Assert
    assert attacked["er@10"] >= clean["er@10"] + 0.3
    assert defended["er@10"] <= attacked["er@10"] / 2
    assert abs(defended["hr@10"] - clean["hr@10"]) <= 0.05
