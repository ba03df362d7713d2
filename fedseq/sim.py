"""The in-process runner: a whole experiment (epochs of rounds, the lr schedule, evaluation) in
one process, with the same functions the services call. Fast experiments, tests, and the
yardstick for what the network costs.

With an attack, every epoch shuffles benign and malicious clients together; a round's benign
users compute honest updates, its malicious users get the attack's updates, the round's updates
are stacked in client-id order and aggregated, and only benign users are evaluated. Each epoch
row reports ``malicious_updates`` (malicious updates in the epoch's rounds) and, when the rule
reports which updates it kept, ``malicious_kept``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.aggregation import make_rule, server_step
from server.aggregation.base import bind_root, needs_root
from server.root import load_root, root_update

from .adv_train import AdvTrainConfig, adversarial_updates, pick_adv_users
from .config import ExperimentConfig
from .experiment import Setup, all_clients, epoch_rounds, setup
from .metrics import Evaluator
from .results import format_table, write_results
from .training import LocalConfig, UpdateBatch, compute_updates

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
    return UpdateBatch(
        users[order],
        torch.cat([b.updates for b in batches])[torch.as_tensor(order)],
        np.concatenate([b.num_samples for b in batches])[order],
        np.concatenate([b.losses for b in batches])[order],
    )


def round_updates(s: Setup, params: torch.Tensor, users: np.ndarray, round_key: int,
                  local: LocalConfig) -> tuple[UpdateBatch, int]:
    """The round's updates, sorted by client id, and how many came from malicious clients:
    benign users train honestly, malicious ones (ids in ``s.population``) run ``s.attack``."""
    cfg, ds = s.cfg, s.dataset
    users = np.asarray(users, dtype=np.int64)
    is_mal = users >= ds.num_users
    benign, mal = users[~is_mal], users[is_mal]
    batches = []
    if len(benign) or not len(mal):
        batches.append(compute_updates(s.model, params, [ds.train[u] for u in benign], benign, cfg.seed,
                                       round_key, local))
    if len(mal):
        if s.attack is None or s.population is None:
            raise ValueError(f"clients {mal.tolist()} are not benign users but the run has no attack")
        batches.append(s.attack.updates(s.model, params, s.population.sequences_of(mal), mal, s.targets,
                                        cfg.seed, round_key, local, cfg.compat))
    return merge_updates(batches), int(len(mal))


def adv_round(s: Setup, params: torch.Tensor, benign: np.ndarray, round_key: int, local: LocalConfig,
              adv: AdvTrainConfig) -> UpdateBatch:
    """Adversarial-training updates of ``adv.users_per_round`` of a round's benign users, at the
    weights after that round's step (Yue et al. 2022; ALGORITHMS.md "adv_train")."""
    users = pick_adv_users(benign, s.cfg.seed, round_key, adv.users_per_round)
    return adversarial_updates(s.model, params, [s.dataset.train[u] for u in users], users, s.cfg.seed,
                               round_key, local, adv)


def run_inprocess(cfg: ExperimentConfig, out_dir: str | Path | None = None,
                  progress: Progress = stderr_progress, prepared: Setup | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end and return the results dict (also written to ``out_dir``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_setup = time.perf_counter()
    s = prepared or setup(cfg)
    params = s.initial_params()
    rule = make_rule(cfg.aggregation, dict(cfg.aggregation_opts))
    ds = s.dataset
    clients = all_clients(s)
    evaluator = Evaluator(s.model, ds.train, ds.test, s.benign_users, s.targets, s.eval_config())
    population = s.population if s.attack is not None else None
    attacked = population is not None
    summary: dict[str, Any] = {"runner": "inprocess"}
    if population is not None:
        summary.update(attack=cfg.attack, malicious_clients=population.size, population=population.note)
    progress(f"fedseq sim: {ds.name} ({ds.num_users} users, {ds.num_items} items), {cfg.model}, "
             f"{cfg.epochs} epochs, rule {cfg.aggregation}, targets {list(s.targets)} "
             f"(setup {time.perf_counter() - t_setup:.1f}s)")
    if population is not None:
        progress(f"attack {cfg.attack} {dict(cfg.attack_opts)}: {population.note}")
    local = cfg.local()
    adv = cfg.adv_config() if cfg.adv_train and not cfg.compat.advtrain_noop else None
    root = load_root(cfg, getattr(rule, "root_users", 10)) if needs_root(rule) else None
    epochs: list[dict[str, Any]] = []
    round_key = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr_at(epoch)
        rounds = epoch_rounds(cfg, clients, epoch)
        t_compute = t_agg = 0.0
        n_mal = n_mal_kept = 0
        kept_reported = False
        for r, users in enumerate(rounds):
            ta = time.perf_counter()
            ub, k_mal = round_updates(s, params, users, round_key, local)
            tb = time.perf_counter()
            rule_r = bind_root(rule, root_update(s.model, params, root, cfg, round_key)) if root else rule
            res = rule_r(ub.updates, torch.as_tensor(ub.num_samples, dtype=torch.float32))
            if k_mal:
                n_mal += k_mal
                mal_rows = np.flatnonzero(ub.users >= ds.num_users)
                if res.kept is None:  # every update contributed
                    n_mal_kept += k_mal
                else:
                    kept_reported = True
                    n_mal_kept += int(np.isin(mal_rows, np.asarray(res.kept, dtype=np.int64)).sum())
            params = server_step(params, res.vector, lr)
            if adv is not None:  # adversarial training: a second step from perturbed benign inputs
                round_key += 1
                aub = adv_round(s, params, ub.users[ub.users < ds.num_users], round_key, local, adv)
                if len(aub.users):
                    ares = rule(aub.updates, torch.as_tensor(aub.num_samples, dtype=torch.float32))
                    params = server_step(params, ares.vector, lr)
            t_compute += tb - ta
            t_agg += time.perf_counter() - tb
            round_key += 1
            progress(f"~epoch {epoch + 1}/{cfg.epochs} round {r + 1}/{len(rounds)} "
                     f"loss {float(np.mean(ub.losses)):.4f}")
        if not torch.isfinite(params).all():
            raise FloatingPointError(f"model diverged (non-finite weights) in epoch {epoch + 1}; "
                                     "lower the lr")
        t_train = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "rounds": len(rounds), "train_seconds": t_train,
                               "compute_seconds": t_compute, "aggregate_seconds": t_agg}
        if attacked:
            row["malicious_updates"] = n_mal
            if kept_reported:
                row["malicious_kept"] = n_mal_kept
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            te = time.perf_counter()
            row.update(evaluator(params).means())
            row["eval_seconds"] = time.perf_counter() - te
        row["seconds"] = time.perf_counter() - t0
        epochs.append(row)
        if "hr@10" in row:
            mal = ""
            if attacked:
                mal = f" malicious updates {row['malicious_updates']}"
                if "malicious_kept" in row:
                    mal += f" (kept {row['malicious_kept']})"
            progress(f"epoch {epoch + 1}/{cfg.epochs}: HR@10 {row['hr@10']:.4f} NDCG@10 {row['ndcg@10']:.4f} "
                     f"ER@5 {row['er@5']:.4f} ER@10 {row['er@10']:.4f}{mal} ({row['seconds']:.1f}s)")
        if out_dir is not None:
            write_results(out_dir, cfg.to_dict(), epochs, summary)
    results = {"config": cfg.to_dict(), "epochs": epochs, "summary": summary}
    extra = [k for k in ("malicious_updates", "malicious_kept") if any(k in e for e in epochs)]
    progress(format_table(epochs, extra))
    return results
