"""One round engine: the in-process runner and the networked services (orchestrator + aggregation
server + client and attacker workers over real gRPC, real Redis) compute the same run.

Both runners walk the plan with the same loop (fedseq/runloop.py) and step with the same
function (fedseq/engine.py ``aggregate_round``, which hands every rule its RoundContext); what
differs is injected: where updates are computed and how they travel, where the rule runs, the
weights (the orchestrator's versus the sample counts), the FLTrust root (the server's versus the
runner's), the layout, the round id, the attacker worker versus the in-process adversary, the
adversarial-training rounds and PIECK's client-side regularisers. Each of those seams is crossed
by one networked case below (SEAMS): the weights after every round, the epoch's metrics and the
malicious accounting must be equal. The full rule x adversarial training x attack matrix runs in
process through the one loop, which checks that every combination schedules, steps and accounts
(test_every_rule_adv_and_attack_runs_the_one_loop)."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from _federation import Federation

from cli.plugins import prepare
from cli.sim import run_inprocess
from fedseq.config import ExperimentConfig
from fedseq.engine import WEIGHT_BOUND, plan_run
from fedseq.experiment import Setup
from server.aggregation import RULES
from server.service import AggregatorServicer

BASE = ExperimentConfig(run_id="eq", dataset="synthetic:users=24,items=40,max_length=20", epochs=1, clients_per_round=8, lr=0.05,
                        num_negatives=20, eval_every=1, threads=1, adv_train_opts=(("users_per_round", "3"),))
OPTS = {"krum": (("m", "3"),), "norm-clip": (("bound", "0.05"), ("inner", "fltrust")), "trimmed-mean": (("beta", "0.2"),), "fltrust": (("root_users", "4"),),
        "sparse": (("inner", "trimmed-mean"), ("inner.beta", "0.2")), "dnc": (("b", "200"),),
        "dp-fixed": (("clip", "0.5"), ("noise", "0.3")), "dp-adaptive": (("clip", "0.5"), ("noise", "0.3"))}
CASES = [(rule, adv, attack) for rule in sorted(RULES) for adv in (False, True) for attack in ("none", "dv-fsr")]
# the seams: the root update (fltrust) with adversarial training and the attacker worker; the
# weights under a rule that reads them, with an attack (mixed-rfa); a selecting rule's kept users
# with adversarial training (krum); the layout (sparse); the round id (flame)
SEAMS = {("fltrust", True, "dv-fsr"), ("mixed-rfa", False, "dv-fsr"), ("krum", True, "none"),
         ("sparse", False, "dv-fsr"), ("flame", False, "none")}


class ParamsRecorder(AggregatorServicer):
    """The real aggregation server, noting its weights after every round it closes."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.after: dict[int, torch.Tensor] = {}
        self._rec = threading.Lock()

    def CloseRound(self, request, context):
        reply = super().CloseRound(request, context)
        with self._rec:
            assert self.params is not None
            self.after[reply.round_id] = self.params.clone()
        return reply


def _cfg(rule: str, adv: bool, attack: str) -> ExperimentConfig:
    return replace(BASE, run_id=f"eq-{rule}-{int(adv)}-{attack}", defense=rule, defense_opts=OPTS.get(rule, ()),
                   adv_train=adv, attack=attack, malicious_ratio=0.1 if attack != "none" else 0.0)


def _services(redis_url: str, cfg: ExperimentConfig) -> tuple[dict[int, torch.Tensor], dict, list[dict]]:
    fed = Federation(redis_url, cfg, workers=0, aggregator=ParamsRecorder, min_workers=2 if cfg.attack != "none" else 1)
    try:
        fed.add_worker("client")
        if cfg.attack != "none":
            fed.add_worker("attacker", kind="attacker")
        fed.orch.start()
        fed.orch.join(120)
        assert fed.orch.state == "done", fed.orch.message
        assert isinstance(fed.agg, ParamsRecorder)
        return dict(fed.agg.after), fed.orch.epochs[-1], fed.orch.store.records("rounds")
    finally:
        fed.close()


def _inprocess(cfg: ExperimentConfig, prepared: Setup | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    after: dict[int, torch.Tensor] = {}
    res = run_inprocess(cfg, None, progress=lambda _line: None, prepared=prepared,
                        on_round=lambda rp, params: after.__setitem__(rp.round_id, params.clone()))
    return after, res["epochs"][-1]


def _same_run(net_after: dict[int, torch.Tensor], net_epoch: dict, sim_after: dict[int, torch.Tensor],
              sim_epoch: dict) -> None:
    """The networked run's weights after every round and its final metrics equal the in-process run's."""
    assert sorted(net_after) == sorted(sim_after)
    for rid in sorted(sim_after):
        assert torch.equal(net_after[rid], sim_after[rid]), f"round {rid}: weights differ"
    assert net_epoch["hr@10"] == sim_epoch["hr@10"] and net_epoch["er@10"] == sim_epoch["er@10"]


def _id(c: tuple[str, bool, str]) -> str:
    return f"{c[0]}-{'adv' if c[1] else 'plain'}-{c[2]}"


@pytest.mark.slow  # a networked federation each (make test-fast keeps the in-process matrix and tests/test_services.py's parity runs)
@pytest.mark.parametrize("rule,adv,attack", sorted(SEAMS), ids=[_id(c) for c in sorted(SEAMS)])
def test_inprocess_and_services_compute_the_same_run(redis_url, rule, adv, attack):
    # Prepare: one torch thread for both (the sim sets cfg.threads; a worker process sets --threads)
    cfg = _cfg(rule, adv, attack)
    torch.set_num_threads(1)
    # Execute
    net_after, net_epoch, rounds = _services(redis_url, cfg)
    sim_after, sim_epoch = _inprocess(cfg)
    # Assert: every round's weights, the metrics and the accounting
    n_clients = 24 + (2 if attack != "none" else 0)
    rounds_per_epoch = -(-n_clients // 8)
    assert sorted(net_after) == sorted(sim_after) == list(range(rounds_per_epoch * (2 if adv else 1)))
    for rid in sorted(sim_after):
        assert torch.equal(net_after[rid], sim_after[rid]), f"round {rid}: weights differ " \
            f"(max |diff| {float((net_after[rid] - sim_after[rid]).abs().max()):.3g})"
    for k in ("hr@10", "ndcg@10", "er@5", "er@10", "er@20"):
        assert net_epoch[k] == sim_epoch[k], k
    for k in ("rounds", "accepted", "rejected"):
        assert net_epoch[k] == sim_epoch[k], k
    if attack != "none":
        assert net_epoch["malicious_updates"] == sim_epoch["malicious_updates"] == 2  # m = floor(24 * 0.1)
        assert net_epoch["malicious_kept"] == sim_epoch["malicious_kept"]
    assert all(r["defense"] == rule for r in rounds)


def test_the_matrix_covers_every_rule_both_adv_settings_and_an_attack():
    assert {c[0] for c in CASES} == set(RULES) and len(CASES) == 4 * len(RULES)
    assert SEAMS <= set(CASES)


@pytest.mark.parametrize("rule,adv,attack", [pytest.param(*c, marks=() if c in SEAMS else pytest.mark.slow)
                                             for c in CASES], ids=[_id(c) for c in CASES])
def test_every_rule_adv_and_attack_runs_the_one_loop(rule, adv, attack):
    # Prepare
    cfg = _cfg(rule, adv, attack)
    torch.set_num_threads(1)
    s = prepare(cfg).setup
    params0 = s.initial_params()
    plan = plan_run(cfg, np.arange(24 + (2 if attack != "none" else 0)), 24)
    # Execute (on the same set-up: its data and model are the run's)
    after, epoch = _inprocess(cfg, s)
    # Assert: every planned round stepped once, to finite weights within the model bound, and the
    # model moved; the epoch accounts for every update of every round; the attack's two clients
    assert sorted(after) == [rp.round_id for rp in plan]
    assert all(bool(torch.isfinite(w).all()) and float(w.abs().max()) <= WEIGHT_BOUND for w in after.values())
    assert not torch.equal(after[max(after)], params0)
    assert epoch["rounds"] == sum(1 for rp in plan if not rp.adversarial)
    assert epoch["accepted"] + epoch["rejected"] == sum(len(rp.users) for rp in plan)
    if attack != "none":
        assert epoch["malicious_updates"] == 2 and 0 <= epoch["malicious_kept"] <= 2
    assert all(0.0 <= epoch[k] <= 1.0 for k in ("hr@10", "ndcg@10", "er@5", "er@10"))


WRAPPED = {  # wrapped inner rules whose bindings compose (layout + root, layout + round id), and the
    # attack built against sparse aggregation (its popularity bound when each runner builds the adversary)
    "sparse-fltrust": ((("inner", "fltrust"), ("inner.root_users", "4")), "dv-fsr", ()),
    "sparse-dnc": ((("inner", "dnc"), ("inner.b", "50"), ("inner.seed", "3")), "dv-fsr", ()),
    "sparse-median-spattack": ((("inner", "median"),), "spattack", (("factor", "5"), ("rows", "4"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sparse-fltrust"])  # the root through the wrapper; the others in process below
def test_sparse_with_a_bound_inner_rule_is_the_same_run_in_both_runners(redis_url, name):
    # Prepare
    opts, attack, attack_opts = WRAPPED[name]
    cfg = replace(BASE, run_id=f"eq-{name}", defense="sparse", defense_opts=opts, attack=attack,
                  attack_opts=attack_opts, malicious_ratio=0.1)
    torch.set_num_threads(1)
    # Execute
    net_after, net_epoch, _ = _services(redis_url, cfg)
    sim_after, sim_epoch = _inprocess(cfg)
    # Assert
    _same_run(net_after, net_epoch, sim_after, sim_epoch)


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_sparse_with_a_bound_inner_rule_runs_the_one_loop(name):
    # Prepare
    opts, attack, attack_opts = WRAPPED[name]
    cfg = replace(BASE, run_id=f"eq-{name}", defense="sparse", defense_opts=opts, attack=attack,
                  attack_opts=attack_opts, malicious_ratio=0.1)
    torch.set_num_threads(1)
    # Execute: twice, the second time with the rule's seeded draws and the adversary built afresh
    first, epoch = _inprocess(cfg)
    again, _ = _inprocess(cfg)
    # Assert: the run is a function of its configuration, and it trained
    assert sorted(first) == sorted(again) and all(torch.equal(first[r], again[r]) for r in first)
    assert epoch["malicious_updates"] == 2 and 0.0 <= epoch["er@10"] <= 1.0


@pytest.mark.slow
def test_pieck_client_regularisers_are_the_same_run_in_both_runners(redis_url):
    # Prepare: PIECK's client-side defense on the benign workers, the PIECK attack on the attacker
    cfg = replace(BASE, run_id="eq-pieck-reg", pieck_reg=True, pieck_reg_opts=(("size", "4"),), attack="pieck",
                  attack_opts=(("popular", "4"),), malicious_ratio=0.1)
    torch.set_num_threads(1)
    # Execute
    net_after, net_epoch, _ = _services(redis_url, cfg)
    sim_after, sim_epoch = _inprocess(cfg)
    plain_after, _ = _inprocess(replace(cfg, pieck_reg=False, run_id="eq-pieck-plain"))
    # Assert: equal runs, and the regularisers change what is learned
    _same_run(net_after, net_epoch, sim_after, sim_epoch)
    assert not torch.equal(plain_after[max(plain_after)], sim_after[max(sim_after)])


# the attacks that size their update by the round's learning rate (ctx.lr), which each runner's
# adversary reads from the run's plan (the attacker worker knows a round only by its id): two
# epochs, the second at half the rate, so that a round's rate is not the configured one
LR_SIZED = {"poisonfrs": (("items_limit", "8"),), "hidattack": (("epsilon", "0.5"),)}


def _lr_sized(attack: str) -> ExperimentConfig:
    return replace(BASE, run_id=f"eq-{attack}", attack=attack, attack_opts=LR_SIZED[attack], malicious_ratio=0.1,
                   epochs=2, lr_decay=0.5, lr_decay_every=1)


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(LR_SIZED))
def test_lr_sized_attacks_are_the_same_run_in_both_runners(redis_url, attack):
    # Prepare
    cfg = _lr_sized(attack)
    torch.set_num_threads(1)
    # Execute
    net_after, net_epoch, _ = _services(redis_url, cfg)
    sim_after, sim_epoch = _inprocess(cfg)
    # Assert
    _same_run(net_after, net_epoch, sim_after, sim_epoch)
    assert net_epoch["malicious_updates"] == sim_epoch["malicious_updates"] == 2  # per epoch


@pytest.mark.parametrize("attack", sorted(LR_SIZED))
def test_lr_sized_attacks_run_the_one_loop(attack):
    # Prepare
    cfg = _lr_sized(attack)
    torch.set_num_threads(1)
    # Execute: twice, the adversary built afresh
    first, epoch = _inprocess(cfg)
    again, _ = _inprocess(cfg)
    # Assert: the run is a function of its configuration, every malicious update was aggregated
    assert sorted(first) == sorted(again) and all(torch.equal(first[r], again[r]) for r in first)
    assert epoch["malicious_updates"] == epoch["malicious_kept"] == 2 and epoch["rejected"] == 0
    assert all(bool(torch.isfinite(w).all()) and float(w.abs().max()) <= WEIGHT_BOUND for w in first.values())
