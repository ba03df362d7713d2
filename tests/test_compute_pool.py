"""Tests for fedseq.compute_pool: benign updates computed by forked processes into one shared
round matrix are, bit for bit, what one 1-thread process computes (round by round, with attackers'
rows in between, and over a whole ``fedseq sim`` run); whole micro-batches are dealt out; a child
that dies or fails fails the round with its reason; ``procs`` is checked.

Prepare / Execute / Assert; real forked processes, real kills.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

from cli.plugins import prepare
from cli.sim import round_updates, run_inprocess
from fedseq.compute_pool import ComputePool, split_groups
from fedseq.config import ConfigError, ExperimentConfig
from fedseq.local import LocalDP
from fedseq.training import micro_batches

SMALL = "synthetic:users=40,items=60,max_length=12"


def test_split_groups_deals_whole_groups_costliest_first_to_the_least_loaded():
    # Prepare: four groups of index arrays with costs 5, 1, 4, 3
    groups = [np.array([4, 0]), np.array([1]), np.array([5, 2]), np.array([3])]
    cost = [5, 1, 4, 3]

    # Execute
    two = split_groups(groups, cost, 2)
    three = split_groups(groups, cost, 3)
    many = split_groups(groups, cost, 6)

    # Assert: 5 -> bin 0, 4 -> bin 1, 3 -> bin 1 (load 4 < 5), 1 -> bin 0 (load 5 < 7); sorted indices
    assert [b.tolist() for b in two] == [[0, 1, 4], [2, 3, 5]]
    assert [b.tolist() for b in three] == [[0, 4], [2, 5], [1, 3]]
    assert sorted(np.concatenate(many).tolist()) == list(range(6)) and len(many) == 4  # empty bins dropped


def test_a_union_of_whole_micro_batches_is_grouped_as_in_the_whole_round():
    # Prepare: lengths with ties across group boundaries
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, size=200).tolist()
    groups = micro_batches(lengths, 8, 90)

    for part in split_groups(groups, [len(g) for g in groups], 3):
        # Execute: group the part alone, as a child's compute_updates does
        sub = micro_batches([lengths[i] for i in part], 8, 90)

        # Assert: the same groups, mapped back to round indices
        got = sorted(tuple(part[g].tolist()) for g in sub)
        want = sorted(tuple(g.tolist()) for g in groups if set(g.tolist()) <= set(part.tolist()))
        assert got == want


@pytest.mark.parametrize("model,attack,ldp", [("sasrec", "dv-fsr", False), ("sasrec", "none", False),
                                               ("bert4rec", "none", False), ("sasrec", "dv-fsr", True)])
def test_pool_rounds_equal_one_process_bit_for_bit(one_torch_thread, model, attack, ldp):
    # Prepare: rounds of changing users (benign rows follow attackers' whole rows and vice versa),
    # micro-batches of 2 users so both children get several; with local DP, rows noised whole are
    # followed by localised writes (stale noise in a reused row would show)
    cfg = ExperimentConfig(dataset=SMALL, model=model, clients_per_round=9, num_negatives=20, attack=attack,
                           malicious_ratio=0.1 if attack != "none" else 0.0)
    p = prepare(cfg)
    s = p.setup
    local = dataclasses.replace(cfg.local(), micro_batch=2, ldp=LocalDP(1.0, 0.01, seed=3) if ldp else None)
    params = s.initial_params()
    everyone = np.arange(s.dataset.num_users + len(s.malicious_users))
    rng = np.random.default_rng(0)
    with ComputePool(s.model, s.dataset.train, cfg.seed, 2, 9) as pool:
        for r in range(6):
            users = np.sort(rng.choice(everyone, size=9 - (r % 3), replace=False))
            # Execute
            fresh = round_updates(s, p.adversary, params, users, r, local)
            pooled = round_updates(s, p.adversary, params, users, r, local, pool.matrix, pool)
            # Assert
            assert pooled.users.tolist() == fresh.users.tolist() == users.tolist()
            assert torch.equal(pooled.updates.view(torch.int32), fresh.updates.view(torch.int32)), r
            assert pooled.num_samples.tolist() == fresh.num_samples.tolist()
            assert np.array_equal(pooled.losses, fresh.losses)
            params = params - 0.05 * fresh.updates.sum(0)  # the next round sees other weights


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_sim_with_two_processes_equals_one_thread_bit_for_bit(one_torch_thread, tmp_path):
    # Prepare: a DV-FSR run big enough that torch splits its operators over two threads (so a run
    # whose runner-side work used two threads would differ: checked below); every round's weights
    base = dict(dataset="synthetic:users=120,items=3000,max_length=60", clients_per_round=40, num_negatives=50,
                epochs=1, attack="dv-fsr", malicious_ratio=0.05)
    runs = {"one thread": (1, 1), "two processes": (2, 1), "two threads": (1, 2)}
    weights: dict[str, list[torch.Tensor]] = {k: [] for k in runs}

    # Execute
    res = {}
    for name, (procs, threads) in runs.items():
        cfg = ExperimentConfig(**base, procs=procs, threads=threads)
        res[name] = run_inprocess(cfg, tmp_path / name.replace(" ", "-"), progress=lambda _m: None,
                                  on_round=lambda _rp, w, k=name: weights[k].append(w.clone()))

    # Assert: bit for bit the one-thread run, which two intra-op threads are not
    def same(a: str, b: str) -> bool:
        return len(weights[a]) == len(weights[b]) and all(
            torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(weights[a], weights[b], strict=True))

    assert len(weights["one thread"]) >= 3
    assert same("two processes", "one thread")
    assert not same("two threads", "one thread")
    for e1, e2 in zip(res["one thread"]["epochs"], res["two processes"]["epochs"], strict=True):
        assert {k: v for k, v in e1.items() if "seconds" not in k} == {k: v for k, v in e2.items() if "seconds" not in k}


def _pool_and_round():
    cfg = ExperimentConfig(dataset=SMALL, clients_per_round=9, num_negatives=20)
    s = prepare(cfg).setup
    pool = ComputePool(s.model, s.dataset.train, cfg.seed, 2, 9)
    users = np.arange(9)
    pool.matrix.take(9)
    return s, cfg, pool, users


@pytest.mark.parametrize("victim,micro_batch", [(0, 2), (1, 64)], ids=["busy", "idle"])
def test_a_killed_compute_process_fails_the_round_with_its_reason(victim, micro_batch):
    # Prepare: micro-batches of 2 give both children work; of 64, one group for child 0 only
    s, cfg, pool, users = _pool_and_round()
    local = dataclasses.replace(cfg.local(), micro_batch=micro_batch)
    pool.compute(s.initial_params(), users, np.arange(9), 0, local)
    proc = pool._procs[victim]

    # Execute: a real kill, then the next round
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    with pytest.raises(RuntimeError, match=rf"fedseq-compute-{victim} \(pid \d+\) died with exit code -9"):
        pool.compute(s.initial_params(), users, np.arange(9), 1, local)

    # Assert: the pool closed itself; every child is gone
    assert all(not p.is_alive() for p in pool._procs)
    with pytest.raises(RuntimeError, match="closed"):
        pool.compute(s.initial_params(), users, np.arange(9), 2, cfg.local())


def test_a_failing_computation_in_a_child_reports_its_exception():
    # Prepare: user 1's history names an item the model has no row for
    cfg = ExperimentConfig(dataset=SMALL, clients_per_round=9, num_negatives=20)
    s = prepare(cfg).setup
    seqs = (np.array([1, 2, 3]), np.array([4, 10_000, 5]))
    pool = ComputePool(s.model, seqs, cfg.seed, 2, 2)
    pool.matrix.take(2)

    # Execute / Assert: the child's exception, with its type and pid
    with pytest.raises(RuntimeError, match=r"a compute process failed: pid \d+: Traceback(.|\n)*IndexError"):
        pool.compute(s.initial_params(), np.array([0, 1]), np.arange(2), 0, cfg.local())
    assert all(not p.is_alive() for p in pool._procs)


def test_procs_is_checked():
    # Execute / Assert
    with pytest.raises(ConfigError, match="procs must be >= 1"):
        ExperimentConfig(procs=0)
    with pytest.raises(ValueError, match="procs >= 2"):
        ComputePool(None, (), 0, 1, 4)  # type: ignore[arg-type]


def test_fedseq_run_refuses_procs(capsys):
    # Prepare
    from cli.main import main

    # Execute
    code = main(["run", "--procs", "2", "--epochs", "1"])

    # Assert: refused before any process starts
    assert code == 2
    assert "--procs is fedseq sim's" in capsys.readouterr().err
