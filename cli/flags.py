"""The experiment flags every runner of the ``fedseq`` command shares (``run``, ``sim``,
``serve-orchestrator``, ``reproduce``): one flag per config key, over ``FEDSEQ_<KEY>`` variables
and ``--config FILE``, and the quick synthetic preset of ``run``/``sim`` without a dataset."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from fedseq.config import ExperimentConfig, build_config, parse_opts

# A small synthetic experiment that finishes in about a minute: the no-flag default of run/sim.
QUICKSTART: dict[str, Any] = {
    "dataset": "synthetic",
    "epochs": 8,
    "clients_per_round": 64,
    "lr": 0.01,
    "num_negatives": 100,
}

EXPERIMENT_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--run-id", {"help": "run id (model store keys fedseq:{run}:...)"}),
    ("--dataset", {"help": "synthetic | steam | ml-1m | a file path (sequence, ratings.dat or CSV format)"}),
    ("--data-root", {"help": "folder with steam/ and ml-1m/ (default: $FEDSEQ_DATA_ROOT or ../shared/data)"}),
    ("--model", {"choices": ["sasrec", "bert4rec"]}),
    ("--mode", {"choices": ["paper", "fedavg"], "help": "paper: FedSGD gradients; fedavg: local epochs"}),
    ("--epochs", {"type": int}),
    ("--clients-per-round", {"type": int}),
    ("--fraction", {"type": float, "help": "fedavg sampling: share of users per round"}),
    ("--lr", {"type": float}),
    ("--lr-decay", {"type": float}),
    ("--lr-decay-every", {"type": int}),
    ("--local-epochs", {"type": int}),
    ("--local-lr", {"type": float}),
    ("--eval-every", {"type": int}),
    ("--protocol", {"choices": ["sampled", "full"]}),
    ("--num-negatives", {"type": int}),
    ("--targets", {"help": "comma-separated target item ids (default: the items of --target-preset)"}),
    ("--target-preset", {"choices": ["least-popular", "popular", "mid-tail", "several"],
                         "help": "named targets by training popularity (default least-popular, the paper's)"}),
    ("--seed", {"type": int}),
    ("--compat", {"help": "reference-compatibility switches: off | reference | comma list"}),
    ("--defense", {"help": "aggregation rule (fedavg = the paper's 'common' sum; dp-fixed, dp-adaptive: central DP), "
                           "or a client-side defense (adv-train, pieck-reg, ldp:clip=C,noise=Z); options as NAME:K=V,K=V "
                           "(README 'Defenses')"}),
    ("--defense-opt", {"dest": "defense_opts", "action": "append", "metavar": "K=V"}),
    ("--attack", {"help": "none | an attack name"}),
    ("--malicious-ratio", {"type": float}),
    ("--attack-opt", {"dest": "attack_opts", "action": "append", "metavar": "K=V"}),
    ("--codec", {"help": "update codec (dense-fp32, sparse-fp32, sparse-fp16, ...)"}),
    ("--compression", {"choices": ["none", "gzip"], "help": "gRPC message compression of the run's calls"}),
    ("--model-delta", {"action": "store_true", "help": "download version v as a row patch against v-1 when held"}),
    ("--threads", {"type": int, "help": "torch threads per process"}),
    ("--procs", {"type": int, "help": "fedseq sim: processes computing the updates, 1 torch thread each "
                                      "(default 1: in the runner's process with --threads threads)"}),
    ("--device", {"help": "auto | cpu | cuda | cuda:N: where updates and evaluation run (default auto: a GPU if "
                          "torch sees one)"}),
]


class DeprecatedAlias(argparse.Action):
    """A flag kept as the old name of another (``new``) with the same ``dest``: it stores its value
    as the new flag would, and says on stderr that it is deprecated."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_experiment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file of experiment keys (flags override it)")
    g = p.add_argument_group("experiment (also FEDSEQ_<KEY> environment variables)")
    for flag, kw in EXPERIMENT_FLAGS:
        g.add_argument(flag, default=None, **kw)


def experiment_config(args: argparse.Namespace, quickstart: bool) -> ExperimentConfig:
    overrides: dict[str, Any] = {}
    for flag, kw in EXPERIMENT_FLAGS:
        dest = kw.get("dest", flag[2:].replace("-", "_"))
        v = getattr(args, dest, None)
        if v is not None:
            overrides[dest] = parse_opts(v) if dest.endswith("_opts") else v
    base: dict[str, Any] = {}
    env_keys = {k for k in os.environ if k.startswith("FEDSEQ_")}
    if quickstart and not args.config and "dataset" not in overrides and "FEDSEQ_DATASET" not in env_keys:
        base = dict(QUICKSTART)
    return build_config(args.config, {**base, **overrides})
