"""The in-process runner: a whole experiment (epochs of rounds, the lr schedule, evaluation) in
one process, with the same round engine (fedseq/engine.py) the services call. Fast experiments, tests, and the
yardstick for what the network costs.

With an attack, every epoch shuffles benign and malicious clients together; a round's benign
users compute honest updates, its malicious users get the attack's updates, the round's updates
are stacked in client-id order and aggregated, and only benign users are evaluated. Each epoch
row reports ``malicious_updates`` (malicious updates in the epoch's rounds) and ``malicious_kept``
(those the rule kept; all of them for a rule that reports no selection)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacker.population import Adversary
from fedseq.adv_train import adversarial_updates
from fedseq.compute_pool import ComputePool
from fedseq.config import ConfigError, ExperimentConfig
from fedseq.device import resolve
from fedseq.engine import Aggregation, RoundPlan, aggregate_round, malicious_kept, plan_run, privacy_summary, rule_scale
from fedseq.experiment import Setup, all_clients
from fedseq.metrics import Evaluator
from fedseq.privacy import privacy_line
from fedseq.results import format_table, write_results
from fedseq.root import root_source
from fedseq.runloop import RoundTally, run_rounds
from fedseq.training import LocalConfig, UpdateBatch, UpdateMatrix, compute_updates

from .plugins import Prepared, prepare

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    end = "\r" if line.startswith("~") and sys.stderr.isatty() else "\n"
    if line.startswith("~"):
        if not sys.stderr.isatty():
            return
        line = line[1:]
    sys.stderr.write(line.ljust(100) + end)
    sys.stderr.flush()


def merge_updates(batches: list[UpdateBatch]) -> UpdateBatch:
    """One batch of all ``batches``' updates, sorted by user id (the server's stacking order)."""
    if len(batches) == 1:
        b = batches[0]
        if bool(np.all(np.diff(b.users) > 0)):
            return b
    users = np.concatenate([b.users for b in batches])
    order = np.argsort(users, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(len(order))  # the merged row of each concatenated row
    # one [K, D] allocation, each batch's rows copied straight to their place (no cat, no gather copy)
    merged = torch.empty(len(users), batches[0].updates.shape[1], dtype=batches[0].updates.dtype)
    start = 0
    for b in batches:
        merged.index_copy_(0, torch.as_tensor(where[start : start + len(b.users)]), b.updates)
        start += len(b.users)
    return UpdateBatch(
        users[order],
        merged,
        np.concatenate([b.num_samples for b in batches])[order],
        np.concatenate([b.losses for b in batches])[order],
    )


def round_updates(s: Setup, adversary: Adversary | None, params: torch.Tensor, users: np.ndarray, round_key: int,
                  local: LocalConfig, matrix: UpdateMatrix | None = None,
                  pool: ComputePool | None = None) -> UpdateBatch:
    """The round's updates, sorted by client id: benign users train honestly, malicious ones (ids
    ``N..``) get the adversary's updates. With ``matrix`` (the runner's, reused every round) the
    updates are written straight into their rows of it: no fresh ``[K, D]`` matrix, no merge copy;
    the result is then valid until the next call. With ``pool`` (whose matrix ``matrix`` is) the
    benign updates are computed by its processes, bit for bit as one 1-thread process would."""
    ds = s.dataset
    users = np.asarray(users, dtype=np.int64)
    is_mal = users >= ds.num_users
    benign, mal = users[~is_mal], users[is_mal]
    if len(mal) and adversary is None:
        raise ValueError(f"clients {mal.tolist()} are not benign users but the run has no attack")
    if matrix is not None and len(users) and bool(np.all(np.diff(users) > 0)):
        M = matrix.take(len(users))
        n_samples, losses = np.zeros(len(users), dtype=np.int64), np.zeros(len(users))
        if pool is not None:
            n_samples[~is_mal] = [len(ds.train[u]) for u in benign]
            losses[~is_mal] = pool.compute(params, benign, np.flatnonzero(~is_mal), round_key, local)
        else:
            ub = compute_updates(s.model, params, [ds.train[u] for u in benign], benign, s.cfg.seed, round_key,
                                 local, into=(matrix, np.flatnonzero(~is_mal)))
            n_samples[~is_mal], losses[~is_mal] = ub.num_samples, ub.losses
        if len(mal):
            assert adversary is not None
            bad = adversary.updates(s, params, mal, round_key)
            where = {int(u): j for j, u in enumerate(bad.users)}
            for row in np.flatnonzero(is_mal).tolist():
                j = where[int(users[row])]
                matrix.put(row, bad.updates[j])
                n_samples[row], losses[row] = bad.num_samples[j], bad.losses[j]
        return UpdateBatch(users, M, n_samples, losses)
    batches = []
    if len(benign) or not len(mal):
        batches.append(compute_updates(s.model, params, [ds.train[u] for u in benign], benign, s.cfg.seed,
                                       round_key, local))
    if len(mal):
        assert adversary is not None
        batches.append(adversary.updates(s, params, mal, round_key))
    return merge_updates(batches)


def train_round(s: Setup, adversary: Adversary | None, params: torch.Tensor, rp: RoundPlan,
                local: LocalConfig, matrix: UpdateMatrix | None = None,
                pool: ComputePool | None = None) -> UpdateBatch:
    """The updates of round ``rp``: adversarial-training updates of its benign users at the
    current weights (Yue et al., RecSys 2022; fedseq/adv_train.py), or the users' ordinary ones."""
    if rp.adversarial:
        ds, cfg = s.dataset, s.cfg
        return adversarial_updates(s.model, params, [ds.train[u] for u in rp.users], rp.users, cfg.seed, rp.round_id,
                                   local, cfg.adv_config())
    return round_updates(s, adversary, params, rp.users, rp.round_id, local, matrix, pool)


class InProcessFederation:
    """The in-process runner's parts of the run loop (fedseq/runloop.py): updates computed here
    (a compute pool with ``procs > 1``), the rule applied here with the round engine's step
    (fedseq/engine.py ``aggregate_round``), the benign users evaluated here."""

    def __init__(self, cfg: ExperimentConfig, p: Prepared, plan: list[RoundPlan], out_dir: str | Path | None,
                 summary: dict[str, Any], on_round: Callable[[RoundPlan, torch.Tensor], None] | None,
                 progress: Progress) -> None:
        self.cfg, self.s, self.rule, self.adversary = cfg, p.setup, p.rule, p.adversary
        self.out_dir, self.summary, self.on_round = out_dir, summary, on_round
        s, ds = self.s, self.s.dataset
        self.params = s.initial_params()
        self.rule_state: Mapping[str, Any] | None = None  # what the rule's last round left it (fedseq/engine.py RoundContext.state)
        ev_users = s.eval_users  # every benign user unless cfg.eval_users samples them
        self.evaluator = Evaluator(s.model, [ds.train[u] for u in ev_users] if cfg.eval_users else ds.train,
                                   ds.test[ev_users] if cfg.eval_users else ds.test, ev_users, s.targets,
                                   s.eval_config())
        self.local = cfg.local()
        self.aggregation = Aggregation(self.rule, root_source(self.rule, cfg, s.model), s.layout,
                                       cfg.compat.literal_step)
        self.malicious = set(s.malicious_users.tolist())
        self.pool: ComputePool | None = None
        if cfg.procs > 1:  # children forked now: they inherit the model and the data set
            if resolve(self.local.device).type != "cpu":
                raise ConfigError(f"procs {cfg.procs} computes on the CPU; the run's device is {self.local.device}")
            self.pool = ComputePool(s.model, ds.train, cfg.seed, cfg.procs, max((len(rp.users) for rp in plan),
                                                                                  default=1))
            # the runner's own work (attacks, adversarial training, aggregation, evaluation) keeps
            # --threads: it runs while the compute processes wait, and with --threads 1 every number
            # is the 1-thread run's (more threads may change float summation order)
            progress(f"benign updates computed by {cfg.procs} processes of 1 torch thread; attacks, aggregation "
                     f"and evaluation here with {cfg.threads or torch.get_num_threads()} (--threads)")
        # every round's updates are written into one matrix (warm pages; the pool's is shared with its processes)
        self.matrix = self.pool.matrix if self.pool is not None else UpdateMatrix.of(s.model)
        self.epochs: list[dict[str, Any]] = []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def resume(self) -> tuple[int, list[dict[str, Any]]]:
        return 0, []

    def train(self, rp: RoundPlan) -> tuple[UpdateBatch, float]:
        t = time.perf_counter()
        return train_round(self.s, self.adversary, self.params, rp, self.local, self.matrix, self.pool), t

    def aggregate(self, rp: RoundPlan, trained: tuple[UpdateBatch, float]) -> RoundTally:
        ub, ta = trained
        tb = time.perf_counter()
        # the sanity bound checks the rows this runner did not compute with its own training code
        out = aggregate_round(self.aggregation, self.params, ub.updates,
                              torch.as_tensor(ub.num_samples, dtype=torch.float32), ub.users.tolist(), rp.lr,
                              rp.round_id, bound_rows=np.flatnonzero(ub.users >= self.s.dataset.num_users).tolist(),
                              state=self.rule_state)
        self.params, self.rule_state = out.params, out.rule_state(self.rule_state)
        if self.on_round is not None:
            self.on_round(rp, self.params)
        counts: dict[str, float] = {"accepted": len(out.users), "rejected": len(out.refused)}
        if self.adversary is not None:
            counts["malicious_updates"], counts["malicious_kept"] = malicious_kept(out.users, out.kept_users,
                                                                                   self.malicious)
        counts.update(compute_seconds=tb - ta, aggregate_seconds=time.perf_counter() - tb)
        # the round's updates live in ``matrix``, which the next round writes again
        return RoundTally(counts, float(np.mean(ub.losses)) if len(ub.users) else None)

    def recover(self, rp: RoundPlan) -> RoundTally | None:
        raise AssertionError("the in-process runner has no transport to fail")

    def evaluate(self, epoch: int, version: int) -> dict[str, Any]:
        return self.evaluator(self.params).means()

    def record_epoch(self, row: dict[str, Any]) -> None:
        self.epochs.append(row)
        if "warning" in row:
            self.summary.setdefault("warnings", []).append(row["warning"])
        if self.out_dir is not None:
            write_results(self.out_dir, self.cfg.to_dict(), self.epochs, self.summary)

    def rule_name(self) -> str:
        return self.rule.name

    def rule_scale(self) -> str:
        return rule_scale(self.rule)


def run_inprocess(cfg: ExperimentConfig, out_dir: str | Path | None = None,
                  progress: Progress = stderr_progress, prepared: Setup | None = None,
                  on_round: Callable[[RoundPlan, torch.Tensor], None] | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end with the round engine's loop (fedseq/runloop.py) and this process's
    parts (:class:`InProcessFederation`) and return the results dict (also written to
    ``out_dir``). ``on_round(plan, params)`` sees the weights after each round (model version
    ``plan.round_id + 1``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_setup = time.perf_counter()
    p = prepare(cfg, prepared)
    s, adversary = p.setup, p.adversary
    ds = s.dataset
    summary: dict[str, Any] = {"runner": "inprocess"}
    if adversary is not None:
        summary.update(attack=cfg.attack, malicious_clients=adversary.population.size,
                       population=adversary.population.note)
    progress(f"fedseq sim: {ds.name} ({ds.num_users} users, {ds.num_items} items), {cfg.model}, "
             f"{cfg.epochs} epochs, rule {cfg.defense}, targets {list(s.targets)} "
             f"(setup {time.perf_counter() - t_setup:.1f}s)")
    if adversary is not None:
        progress(f"attack {cfg.attack} {dict(cfg.attack_opts)}: {adversary.population.note}")
    plan = plan_run(cfg, all_clients(s), ds.num_users)
    private = privacy_summary(s.privacy, plan, len(all_clients(s)))
    if private is not None:
        summary["privacy"] = private
    fed = InProcessFederation(cfg, p, plan, out_dir, summary, on_round, progress)
    try:
        outcome = run_rounds(cfg, plan, fed, progress)
    finally:
        fed.close()
    results = {"config": cfg.to_dict(), "epochs": outcome.epochs, "summary": summary}
    extra = [k for k in ("malicious_updates", "malicious_kept") if any(k in e for e in outcome.epochs)]
    progress(format_table(outcome.epochs, extra))
    line = privacy_line(summary.get("privacy"))
    if line:
        progress(line)
    return results
