"""Central differential privacy (``dp-fixed``, server/aggregation/dp.py) and the run's epsilon
(fedseq/privacy.py): the mechanism on tiny exact cases, its options, the accountant's wiring
checked against the RDP formulas written out here, the participation count on real plans, and
both runners computing the same DP run with the same privacy report."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from _federation import Federation

from cli.sim import run_inprocess
from fedseq.config import ExperimentConfig
from fedseq.engine import RoundContext, plan_run, privacy_summary
from fedseq.privacy import Mechanism, default_delta, epsilon, participations, privacy_line, report
from server.aggregation import DPFixed, RuleConfigError, make_rule, make_run_rule
from server.aggregation.base import round_generator
from server.aggregation.dp import DP_KEY

U = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
W = torch.ones(2)


# ---------------------------------------------------------------------------- the mechanism
def test_without_noise_it_is_the_sum_of_the_clipped_updates():
    # Execute
    res = make_rule("dp-fixed", {"clip": "1", "noise": "0"})(U, RoundContext(W))
    # Assert: [3, 4] clipped to norm 1 is [0.6, 0.8]; [0.3, 0.4] is inside the bound
    assert torch.allclose(res.vector, torch.tensor([0.9, 1.2]))
    assert res.info["clipped"] == 1 and res.info["sigma"] == 0 and res.info["max_norm_before"] == 5.0


@pytest.mark.parametrize("inner,sigma", [("none", 0.5 * 10.0), ("mean", 0.5 * 10.0 / 2)])
def test_the_noise_is_z_times_c_on_the_sum_and_over_k_on_the_mean(inner, sigma):
    # Prepare: clip 10 (nothing clipped), z = 0.5, round 7, seed 3
    rule = make_rule("dp-fixed", {"clip": "10", "noise": "0.5", "inner": inner, "seed": "3"})
    clean = make_rule(inner)(U, RoundContext(W)).vector
    # Execute
    res = rule(U, RoundContext(W, round_id=7))
    # Assert: exactly the seeded draw of (seed 3, round 7), scaled by sigma
    draw = torch.randn(2, generator=round_generator(3, DP_KEY, 7), dtype=torch.float64)
    assert res.info["sigma"] == pytest.approx(sigma)
    assert torch.allclose(res.vector, clean + (draw * sigma).float())


def test_the_noise_is_the_rounds_and_the_seeds():
    rule = make_rule("dp-fixed", {"clip": "2", "noise": "1", "seed": "1"})
    a, b = rule(U, RoundContext(W, round_id=1)).vector, rule(U, RoundContext(W, round_id=1)).vector
    c = rule(U, RoundContext(W, round_id=2)).vector
    d = replace(rule, seed=2)(U, RoundContext(W, round_id=1)).vector
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_a_malicious_update_moves_the_aggregate_by_at_most_the_clip():
    # Prepare: a round of small benign updates, then the same round with one scaled by 1e6
    benign = torch.full((4, 3), 0.01)
    poisoned = benign.clone()
    poisoned[0] *= 1e6
    rule = make_rule("dp-fixed", {"clip": "0.5", "noise": "0"})
    # Execute
    moved = rule(poisoned, RoundContext(torch.ones(4))).vector - rule(benign, RoundContext(torch.ones(4))).vector
    # Assert: the sum's sensitivity to one user is the clip
    assert float(torch.linalg.vector_norm(moved)) <= 0.5 + 1e-6


def test_options_are_checked_with_clear_errors():
    with pytest.raises(RuleConfigError, match="needs option clip"):
        make_rule("dp-fixed", {"noise": "1"})
    with pytest.raises(RuleConfigError, match="needs option noise"):
        make_rule("dp-fixed", {"clip": "1"})
    for bad in ({"clip": "0", "noise": "1"}, {"clip": "1", "noise": "-1"}, {"clip": "1", "noise": "nan"},
                {"clip": "1", "noise": "1", "delta": "1"}, {"clip": "1", "noise": "1", "inner": "dp-fixed"}):
        with pytest.raises(RuleConfigError):
            make_rule("dp-fixed", bad)


def test_a_robust_inner_rule_gets_the_noise_but_no_guarantee():
    # Execute: the shorthand names the inner rule, as for sparse: and norm-clip
    rule = make_rule("dp-fixed:median,clip=1,noise=1")
    plain = make_rule("dp-fixed:clip=1,noise=1")
    # Assert
    assert isinstance(rule, DPFixed) and rule.inner == "median" and rule.scale == "mean"
    assert rule.privacy == Mechanism("dp-fixed", 1.0, 1.0, accounted=False)
    assert plain.privacy == Mechanism("dp-fixed", 1.0, 1.0, accounted=True) and plain.scale == "sum"
    assert make_rule("median").privacy is None  # no other rule claims privacy


def test_a_run_seeds_the_noise_with_its_seed_unless_told():
    assert make_run_rule("dp-fixed:clip=1,noise=1", {}, 11).seed == 11
    assert make_run_rule("dp-fixed:clip=1,noise=1,seed=4", {}, 11).seed == 4
    assert make_run_rule("dp-fixed:flame,clip=1,noise=1", {}, 11).inner_rule.seed == 11  # a seeded inner rule too


# ---------------------------------------------------------------------------- the accountant
def _rdp_epsilon(z: float, steps: int, delta: float) -> float:
    """The Gaussian mechanism's RDP, steps * a / (2 z^2), converted to (epsilon, delta) with the
    conversion of Balle et al. 2020 (the one Opacus applies), minimised over the same orders."""
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = steps * orders / (2 * z * z)
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


@pytest.mark.parametrize("z,steps,delta", [(1.0, 1, 1e-5), (1.0, 3, 1e-5), (2.0, 30, 1e-6), (0.7, 8, 1e-5)])
def test_epsilon_without_sampling_is_the_composed_gaussian_mechanism(z, steps, delta):
    assert epsilon(z, steps, delta) == pytest.approx(_rdp_epsilon(z, steps, delta), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    assert epsilon(1.0, 10, 1e-5) > epsilon(1.0, 5, 1e-5) > epsilon(2.0, 5, 1e-5)
    assert epsilon(1.0, 10, 1e-5, sample_rate=0.1) < epsilon(1.0, 10, 1e-5)
    assert epsilon(1.0, 0, 1e-5) == 0.0 and epsilon(0.0, 3, 1e-5) == math.inf


def test_each_client_is_in_one_round_an_epoch_and_adversarial_rounds_count_too():
    # Prepare: 24 benign clients, rounds of 8, 3 epochs; then with adversarial training
    cfg = ExperimentConfig(dataset="synthetic:users=24,items=40", epochs=3, clients_per_round=8,
                           adv_train_opts=(("users_per_round", "8"),))
    clients = np.arange(24)
    # Execute
    plain = participations([rp.users for rp in plan_run(cfg, clients, 24)], 24)
    adv = participations([rp.users for rp in plan_run(replace(cfg, adv_train=True), clients, 24)], 24)
    # Assert: the epochs' rounds partition the clients; an adversarial round reuses its round's users
    assert plain == 3 and adv == 6


def test_the_report_names_its_assumptions_and_refuses_an_unbounded_rule():
    # Prepare: 3 epochs of a 100-client federation, rounds of 16
    cfg = ExperimentConfig(dataset="synthetic:users=100,items=40", epochs=3, clients_per_round=16)
    plan = plan_run(cfg, np.arange(100), 100)
    # Execute
    got = privacy_summary(Mechanism("dp-fixed", 1.0, 0.5), plan, 100)
    robust = report(Mechanism("dp-fixed", 1.0, 0.5, accounted=False), [rp.users for rp in plan], 100, 16)
    # Assert
    assert got is not None and privacy_summary(None, plan, 100) is None
    assert got["participations"] == 3 and got["rounds"] == 21 and got["sample_rate"] == 0.16
    assert got["delta"] == default_delta(100) == 1e-5
    assert got["epsilon"] == pytest.approx(_rdp_epsilon(1.0, 3, 1e-5))
    assert got["epsilon_poisson"] == pytest.approx(epsilon(1.0, 21, 1e-5, 0.16)) and got["epsilon_poisson"] < got["epsilon"]
    assert robust["epsilon"] is None and "not bounded" in robust["note"]
    assert "epsilon 9.01 at delta 1e-05" in (privacy_line(got) or "") and "no epsilon" in (privacy_line(robust) or "")


# ---------------------------------------------------------------------------- both runners
def _networked(redis_url: str, cfg: ExperimentConfig) -> tuple[dict, torch.Tensor]:
    """``cfg`` through the services (the real aggregation server and orchestrator, a client and an
    attacker worker, in this process): the results and the final weights."""
    fed = Federation(redis_url, cfg, workers=0, min_workers=2)
    try:
        fed.add_worker("client")
        fed.add_worker("attacker", kind="attacker")
        fed.orch.start()
        fed.orch.join(120)
        assert fed.orch.state == "done", fed.orch.message
        assert fed.agg.params is not None
        return fed.orch.results, fed.agg.params.clone()
    finally:
        fed.close()


PRIVATE_RUNS = {"dp-fixed": {"defense": "dp-fixed", "defense_opts": (("clip", "0.5"), ("noise", "0.3"))},
                "dp-adaptive": {"defense": "dp-adaptive", "defense_opts": (("clip", "0.5"), ("noise", "0.3"))},
                "ldp": {"defense": "fedavg", "ldp": True, "ldp_opts": (("clip", "0.5"), ("noise", "0.01"))}}


@pytest.mark.parametrize("mechanism", sorted(PRIVATE_RUNS))
def test_both_runners_compute_the_same_private_run_and_report_the_same_privacy(redis_url, mechanism):
    """The services and the in-process runner, with the server's noise (dp-fixed) or the clients'
    (ldp: added in the client worker, not in the attacker worker): the same noisy weights, the same
    metrics, and the same privacy report in the results."""
    cfg = replace(_small(run_id=mechanism, epochs=2, clients_per_round=8, lr=0.05, threads=1, attack="dv-fsr",
                         malicious_ratio=0.1), **PRIVATE_RUNS[mechanism])
    torch.set_num_threads(1)
    # Execute
    net, net_params = _networked(redis_url, cfg)
    after: list[torch.Tensor] = []
    sim = run_inprocess(cfg, None, progress=lambda _line: None, on_round=lambda _rp, p: after.append(p.clone()))
    # Assert
    assert torch.equal(net_params, after[-1])
    assert [e["ndcg@10"] for e in net["epochs"]] == [e["ndcg@10"] for e in sim["epochs"]]
    assert net["summary"]["privacy"] == sim["summary"]["privacy"]
    assert sim["summary"]["privacy"]["mechanism"] == mechanism
    assert sim["summary"]["privacy"]["participations"] == 2  # 26 clients (2 malicious), each once an epoch


# ---------------------------------------------------------------------------- local DP (client side)
def test_privatise_clips_each_row_then_adds_the_users_own_draw():
    from fedseq.ldp import privatise, user_generator
    from fedseq.local import LocalDP

    # Prepare: two users' rows, norms 5 and 0.5; clip 1, z = 0.5, round 4, seed 9
    out = U.clone()
    # Execute
    privatise(out, [0, 1], [11, 12], 4, LocalDP(clip=1.0, noise=0.5, seed=9))
    # Assert
    for row, user, clean in ((0, 11, torch.tensor([0.6, 0.8])), (1, 12, torch.tensor([0.3, 0.4]))):
        draw = torch.randn(2, generator=user_generator(9, 4, user), dtype=torch.float64)
        assert torch.allclose(out[row], clean + (draw * 0.5).float())


def _small(**kw) -> ExperimentConfig:
    return ExperimentConfig(dataset="synthetic:users=24,items=40,max_length=12", num_negatives=20, **kw)


def test_compute_and_iter_updates_send_the_noised_rows_and_a_reused_matrix_keeps_no_noise():
    from cli.plugins import prepare
    from fedseq.ldp import privatise
    from fedseq.local import LocalDP
    from fedseq.training import UpdateMatrix, compute_updates, iter_updates

    # Prepare
    cfg = ExperimentConfig.from_dict({**_small().to_dict(), "defense": "ldp:clip=0.5,noise=0.1"})
    s = prepare(cfg).setup
    local, plain = cfg.local(), replace(cfg.local(), ldp=None)
    params = s.initial_params()
    users = np.arange(6)
    seqs = [s.dataset.train[u] for u in users]
    # Execute
    noised = compute_updates(s.model, params, seqs, users, cfg.seed, 3, local)
    pieces = {int(u): row.clone() for b in iter_updates(s.model, params, seqs, users, cfg.seed, 3, local)
              for u, row in zip(b.users, b.updates, strict=True)}
    want = compute_updates(s.model, params, seqs, users, cfg.seed, 3, plain).updates.clone()
    privatise(want, list(range(6)), users.tolist(), 3, LocalDP(0.5, 0.1, seed=cfg.seed))
    matrix = UpdateMatrix.of(s.model)  # one matrix, as the runners reuse it: a noised round, then a plain one
    matrix.take(6)
    compute_updates(s.model, params, seqs, users, cfg.seed, 3, local, into=(matrix, np.arange(6)))
    matrix.take(6)
    again = compute_updates(s.model, params, seqs, users, cfg.seed, 4, plain, into=(matrix, np.arange(6)))
    fresh = compute_updates(s.model, params, seqs, users, cfg.seed, 4, plain)
    # Assert: the plain rows clipped and noised; dense (no localised rows); nothing left behind
    assert cfg.local().ldp == LocalDP(0.5, 0.1, seed=cfg.seed) and cfg.defense == "fedavg"
    assert torch.equal(noised.updates, want) and noised.item_rows is None
    assert all(torch.equal(pieces[int(u)], want[i]) for i, u in enumerate(users))
    assert torch.equal(again.updates, fresh.updates)


def test_the_ldp_defense_is_parsed_and_checked():
    from fedseq.config import ConfigError, build_config

    # Execute
    cfg = build_config(None, {"defense": "ldp:clip=1,noise=0.5,inner=trimmed-mean,inner.beta=0.2"}, environ={})
    # Assert: the client side, the server's rule, and a round trip through the config file
    assert cfg.ldp and dict(cfg.ldp_opts) == {"clip": "1", "noise": "0.5"}
    assert cfg.defense == "trimmed-mean" and dict(cfg.defense_opts) == {"beta": "0.2"}
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    for bad, words in (("ldp:noise=1", r"needs option\(s\) clip"), ("ldp:clip=1,noise=-1", "noise"),
                       ("ldp:clip=1,noise=1,inner=dp-fixed", "one privacy mechanism"), ("ldp:clip", "key=value"),
                       ("ldp:clip=1,noise=1,bogus=2", "has no option 'bogus'")):
        with pytest.raises(ConfigError, match=words):
            build_config(None, {"defense": bad}, environ={})



# ---------------------------------------------------------------------------- adaptive clipping
def test_the_adaptive_clip_follows_the_quantile_of_the_norms_exactly_without_noise():
    # Prepare: norms 5, 0.5, 0.1414, 2.83; C_0 = 1, quantile 0.5, clip_lr 0.2, no noise
    rule = make_rule("dp-adaptive", {"noise": "0", "clip": "1"})
    norms = torch.linalg.vector_norm(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.1, 0.1], [2.0, 2.0]]), dim=1)
    U = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.1, 0.1], [2.0, 2.0]])
    # Execute: three rounds, each given what the last one left
    state, clips, vectors = None, [], []
    for t in range(3):
        res = rule(U, RoundContext(torch.ones(4), round_id=t, state=state))
        clips.append(res.info["clip"])
        vectors.append(res.vector)
        state = res.info["state"]
    # Assert: C_{t+1} = C_t exp(-0.2 (within / 4 - 0.5)); the sum of the updates clipped to C_t
    want = [1.0]
    for _ in range(2):
        within = int((norms <= want[-1]).sum())
        want.append(want[-1] * math.exp(-0.2 * (within / 4 - 0.5)))
    assert clips == pytest.approx(want, rel=1e-12)
    for c, vec in zip(clips, vectors, strict=True):
        assert torch.allclose(vec, (U * torch.clamp(c / norms, max=1.0)[:, None]).sum(0), atol=1e-6)


def test_the_adaptive_noise_leaves_room_for_the_count_and_is_checked_when_a_run_starts():
    from server.aggregation.dp import value_noise

    # the sum's noise multiplier makes the two noises together a mechanism of multiplier z
    assert value_noise(1.0, 3.2) == pytest.approx((1 - (6.4) ** -2) ** -0.5)
    assert value_noise(0.0, 3.2) == 0.0
    assert make_run_rule("dp-adaptive:noise=1", {}, 0, 64).count_std == pytest.approx(3.2)
    with pytest.raises(RuleConfigError, match="needs count_std > 0.5"):
        make_run_rule("dp-adaptive:noise=1", {}, 0, 8)  # rounds of 8: the count's noise 0.4 is too small
    with pytest.raises(RuleConfigError, match="needs option noise"):
        make_rule("dp-adaptive", {"clip": "1"})
    with pytest.raises(RuleConfigError):
        make_rule("dp-adaptive", {"noise": "1", "inner": "dp-fixed"})
    assert make_rule("dp-adaptive:median,noise=1").privacy == Mechanism("dp-adaptive", 1.0, 0.1, accounted=False)


def test_a_resumed_server_continues_with_the_clip_it_stored(redis_url):
    """A run of two epochs whose aggregation server is replaced after the first (a new keeper
    resuming the store's head): the clip it goes on with is the one stored with the head's summary,
    so the weights equal the in-process run's to the bit (a clip started over would not)."""
    from fedseq.store import RedisStore
    from server.keeper import stored_rule_state

    cfg = replace(_small(run_id="adaptive", epochs=1, clients_per_round=8, lr=0.05, threads=1),
                  **PRIVATE_RUNS["dp-adaptive"])
    torch.set_num_threads(1)
    # Execute: epoch 1 in one federation, epoch 2 in a new one (new server, orchestrator, worker)
    for epochs in (1, 2):
        fed = Federation(redis_url, replace(cfg, epochs=epochs), workers=0)
        try:
            fed.add_worker("w")
            fed.orch.start()
            fed.orch.join(120)
            assert fed.orch.state == "done", fed.orch.message
            assert fed.agg.params is not None
            net_params = fed.agg.params.clone()
        finally:
            fed.close()
    after: list[torch.Tensor] = []
    run_inprocess(replace(cfg, epochs=2), None, progress=lambda _line: None,
                  on_round=lambda _rp, p: after.append(p.clone()))
    store = RedisStore.from_url(redis_url, "adaptive")
    # Assert
    assert torch.equal(net_params, after[-1])
    state = stored_rule_state(store.round_summary(store.head()))
    assert state is not None and set(state) == {"clip"} and state["clip"] != 0.5
