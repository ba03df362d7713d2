"""The plug-ins of a run, built and checked in one place: the aggregation rule (registry
``server.aggregation.RULES``) and the adversary (attack registry ``attacker.attacks.ATTACKS`` and
its malicious population). Every runner of the ``fedseq`` command calls :func:`prepare` first,
so a bad rule, attack, option or ratio fails before any process or round starts."""

from __future__ import annotations

from dataclasses import dataclass

from attacker.population import Adversary, make_adversary, make_attack_checked
from fedseq.config import ConfigError, ExperimentConfig
from fedseq.engine import AggregationRule
from fedseq.experiment import Setup, client_weights, setup
from fedseq.privacy import Mechanism
from server.aggregation import RuleConfigError, make_run_rule


@dataclass(frozen=True, eq=False)
class Prepared:
    setup: Setup
    rule: AggregationRule
    adversary: Adversary | None


def make_rule_checked(cfg: ExperimentConfig) -> AggregationRule:
    """The run's aggregation rule, or :class:`ConfigError` naming the config keys and flags."""
    try:
        return make_run_rule(cfg.defense, dict(cfg.defense_opts), cfg.seed, cfg.clients_per_round)
    except RuleConfigError as e:
        raise ConfigError(f"{e} (config keys 'defense' / 'defense_opts', flags --defense / --defense-opt)") \
            from None


def check_plugins(cfg: ExperimentConfig) -> None:
    """The run's rule and attack (names and options) without its data: :class:`ConfigError` when a
    run of ``cfg`` would fail on them (``fedseq sweep`` checks every cell so before running any)."""
    make_rule_checked(cfg)
    if cfg.attack != "none":
        make_attack_checked(cfg)


def prepare(cfg: ExperimentConfig, prepared: Setup | None = None) -> Prepared:
    """Data, model, rule and adversary of ``cfg`` (deterministic in ``cfg.seed``)."""
    s = prepared or setup(cfg)
    adversary = make_adversary(s)
    if s.weights is None:  # the orchestrator sends these with each round (fedseq/experiment.py client_weights)
        s.weights = client_weights(s, adversary.population.sequences if adversary is not None else ())
    rule = make_rule_checked(cfg)
    ldp = cfg.local().ldp
    s.privacy = Mechanism("ldp", ldp.noise, ldp.clip) if ldp is not None else rule.privacy
    return Prepared(s, rule, adversary)
