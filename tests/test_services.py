"""Integration tests of the gRPC services: real servers on port 0 (in this process, over real
sockets), a real Redis server process, real model computations."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

import grpc
import pytest
import torch
from _federation import Federation
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.worker import encode_update
from fedseq import codec
from fedseq.config import ExperimentConfig
from fedseq.models import build_model
from fedseq.models.common import reference_init
from fedseq.params import Layout, get_vector
from fedseq.rpc import CHUNK_BYTES, Service, channel, chunks
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, orchestrator_pb2
from server.service import AggregatorServicer

TINY = ExperimentConfig(run_id="t", dataset="synthetic:users=60,items=80", epochs=2, clients_per_round=16,
                        lr=0.01, num_negatives=50, eval_every=1)


@pytest.fixture
def aggregator(redis_url):
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id))
    svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], port=0,
                  host="127.0.0.1").start()
    yield svc, agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}")), servicer
    svc.stop(0)


def _start(stub, cfg: ExperimentConfig, num_items: int) -> agg_pb.StartRunReply:
    return stub.StartRun(agg_pb.StartRunRequest(run_id=cfg.run_id, config_json=cfg.to_json(), num_items=num_items))


def _open(stub, run_id: str, round_id: int, users: list[int], version: int | None = None, lr: float = 0.5,
          weights: dict[int, int] | None = None):
    """Open a round of ``users`` (weight 3 each unless ``weights`` says otherwise: the orchestrator's
    weight, which the uploads' num_samples must equal)."""
    tokens = {u: secrets.token_hex(4) for u in users}
    stub.OpenRound(agg_pb.OpenRoundRequest(
        run_id=run_id, round_id=round_id, model_version=round_id if version is None else version,
        deadline_unix=time.time() + 60, lr=lr,
        assignments=[common_pb2.Assignment(user_id=u, token=t, weight=(weights or {}).get(u, 3))
                     for u, t in tokens.items()]))
    return tokens


def _stream(run_id, round_id, items, encoding="dense-fp32"):
    """items: (user, token, tensors or raw bytes, num_samples)."""
    for user, token, payload, n in items:
        data = payload if isinstance(payload, bytes) else encode_update(payload, encoding)
        header = agg_pb.UpdateHeader(run_id=run_id, round_id=round_id, user_id=user, token=token, num_samples=n,
                                     total_bytes=len(data), encoding=encoding)
        for i, piece in enumerate(chunks(data)):
            yield agg_pb.UpdateChunk(header=header, data=piece) if i == 0 else agg_pb.UpdateChunk(data=piece)


def _random_update(layout: Layout, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in zip(layout.names, layout.shapes, strict=True)}


def _initial(num_items: int, seed: int = 0) -> tuple[Layout, torch.Tensor]:
    model = build_model("sasrec", num_items)
    reference_init(model, seed)
    return Layout.of(model), get_vector(model)


def test_round_end_to_end_steps_the_model_and_stores_the_version(aggregator, redis_url):
    # Prepare
    _, stub, _ = aggregator
    layout, w0 = _initial(50)
    _start(stub, TINY, 50)
    tokens = _open(stub, "t", 0, [3, 7], weights={3: 9, 7: 5})
    u3, u7 = _random_update(layout, 1), _random_update(layout, 2)
    # Execute
    reply = stub.SubmitUpdates(_stream("t", 0, [(7, tokens[7], u7, 5), (3, tokens[3], u3, 9)]))
    summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="t", round_id=0))
    # Assert
    assert [s.accepted for s in reply.statuses] == [True, True]
    assert summary.accepted == 2 and summary.new_version == 1 and not summary.rejected and not summary.missing
    store = RedisStore.from_url(redis_url, "t")
    assert store.head() == 1
    expected = w0 - 0.5 * (layout.flatten(u3) + layout.flatten(u7))  # fedavg sum, lr 0.5
    assert torch.allclose(layout.flatten(store.get_model(1)), expected, atol=1e-6)
    assert summary.bytes_received == reply.bytes_received


def test_update_larger_than_4mb_is_chunked_and_accepted(aggregator, redis_url):
    # Prepare: 20,000 items -> item table alone is 20,002 x 64 x 4 B = 5.1 MB
    _, stub, _ = aggregator
    layout, w0 = _initial(20_000)
    _start(stub, replace(TINY, run_id="big"), 20_000)
    tokens = _open(stub, "big", 0, [1], weights={1: 4})
    upd = _random_update(layout, 3)
    msgs = list(_stream("big", 0, [(1, tokens[1], upd, 4)]))
    # Execute
    reply = stub.SubmitUpdates(iter(msgs))
    stub.CloseRound(agg_pb.CloseRoundRequest(run_id="big", round_id=0))
    # Assert
    assert sum(len(m.data) for m in msgs) > 4 * 1024 * 1024
    assert len(msgs) > 4 and max(m.ByteSize() for m in msgs) <= CHUNK_BYTES + 1024
    assert reply.statuses[0].accepted, reply.statuses[0].reason
    got = layout.flatten(RedisStore.from_url(redis_url, "big").get_model(1))
    assert torch.allclose(got, w0 - 0.5 * layout.flatten(upd), atol=1e-6)


def test_stale_round_duplicate_and_bad_updates_are_rejected_with_reasons(aggregator):
    # Prepare
    _, stub, _ = aggregator
    layout, _ = _initial(50)
    _start(stub, replace(TINY, run_id="r"), 50)
    t0 = _open(stub, "r", 0, [1])
    stub.SubmitUpdates(_stream("r", 0, [(1, t0[1], _random_update(layout, 1), 3)]))
    stub.CloseRound(agg_pb.CloseRoundRequest(run_id="r", round_id=0))
    t1 = _open(stub, "r", 1, [1, 2, 3, 4])
    good = encode_update(_random_update(layout, 2), "dense-fp32")
    corrupted = bytearray(good)
    corrupted[len(corrupted) // 2] ^= 0xFF
    bad_shape = _random_update(layout, 5)
    bad_shape["pos_emb.weight"] = torch.zeros(3, 64)
    nonfinite = _random_update(layout, 6)
    nonfinite["blocks.0.q.bias"][0] = float("nan")
    # the codec refuses to encode NaN, so write the raw bytes as a misbehaving client would
    nan_payload = codec.pack([codec.EncodedTensor(n, "float32", tuple(t.shape), "dense-fp32", t.numpy().tobytes())
                              for n, t in nonfinite.items()])
    # Execute
    reply = stub.SubmitUpdates(_stream("r", 0, [(1, t0[1], good, 3)]))  # round 0 is closed
    reply2 = stub.SubmitUpdates(_stream("r", 1, [
        (1, t1[1], good, 3), (1, t1[1], good, 3),  # duplicate
        (2, "wrong-token", good, 3), (9, "x", good, 3),  # bad token, unassigned user
        (3, t1[3], bytes(corrupted), 3), (4, t1[4], bad_shape, 3),
    ]))
    reply3 = stub.SubmitUpdates(_stream("r", 1, [(2, t1[2], nan_payload, 3)]))
    summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="r", round_id=1))
    # Assert
    assert not reply.statuses[0].accepted and reply.statuses[0].reason.startswith("stale: round 0")
    reasons = [(s.accepted, s.reason.split(":")[0]) for s in reply2.statuses]
    assert reasons == [(True, ""), (False, "duplicate"), (False, "bad-token"), (False, "unassigned"),
                       (False, "malformed"), (False, "malformed")]
    assert "shape" in reply2.statuses[5].reason  # the schema is checked before decoding
    assert not reply3.statuses[0].accepted and reply3.statuses[0].reason.startswith("non-finite:")
    # exact accounting: the assigned users 1..4 are accepted (1) or rejected under their own
    # token (3: corrupted, 4: bad shape, 2: NaN); the forged and foreign uploads are only refused
    assert summary.accepted == 1 and {r.user_id for r in summary.rejected} == {2, 3, 4} and not summary.missing
    assert dict(summary.refused) == {"stale": 1, "duplicate": 1, "bad-token": 1, "unassigned": 1, "malformed": 2,
                                     "non-finite": 1}
    assert summary.bytes_refused > 0 and {r.user_id for r in summary.refused_sample} == {1, 2, 9}


def test_open_round_on_wrong_version_and_close_of_unknown_round_fail_clearly(aggregator):
    _, stub, _ = aggregator
    _start(stub, replace(TINY, run_id="v"), 50)
    with pytest.raises(grpc.RpcError) as e:
        _open(stub, "v", 0, [1], version=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "head is 0" in e.value.details()
    with pytest.raises(grpc.RpcError) as e2:
        stub.CloseRound(agg_pb.CloseRoundRequest(run_id="v", round_id=3))
    assert e2.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_get_model_streams_the_stored_version(aggregator, redis_url):
    _, stub, _ = aggregator
    _start(stub, replace(TINY, run_id="g"), 50)
    blob = b"".join(c.data for c in stub.GetModel(agg_pb.GetModelRequest(run_id="g", version=0)))
    assert blob == RedisStore.from_url(redis_url, "g").get_model_bytes(0)


def test_health_and_reflection_answer(aggregator):
    svc, _, _ = aggregator
    ch = channel(f"127.0.0.1:{svc.port}")
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest(service="fedseq.v1.Aggregator")).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"fedseq.v1.Aggregator", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------------------- orchestrated runs
# (whole federations in this process: tests/_federation.py)


def test_worker_registering_mid_run_gets_users(redis_url):
    # Prepare: a slow-ish run with one worker; a second registers after the first round
    cfg = replace(TINY, run_id="mid", epochs=3, clients_per_round=10)
    fed = Federation(redis_url, cfg, workers=0)
    try:
        first = fed.add_worker("w1")
        fed.orch.start()
        deadline = time.time() + 60
        while fed.orch.round_id < 1 and time.time() < deadline:
            time.sleep(0.05)
        # Execute
        second = fed.add_worker("w2")
        fed.orch.join(120)
        # Assert
        assert fed.orch.state == "done", fed.orch.message
        assert second.stats["users_trained"] > 0 and first.stats["users_trained"] > 0
        status = fed.orch_stub.GetStatus(orchestrator_pb2.StatusRequest())
        assert status.workers == 2 and status.round_id == len(fed.orch.plan)
        assert RedisStore.from_url(redis_url, "mid").head() == status.round_id
    finally:
        fed.close()


def test_orchestrated_run_matches_the_inprocess_runner(redis_url):
    from cli.sim import run_inprocess

    # Prepare
    cfg = replace(TINY, run_id="parity")
    fed = Federation(redis_url, cfg, workers=0, min_workers=2)
    try:
        fed.add_worker("a")
        fed.add_worker("b")
        # Execute
        fed.orch.start()
        fed.orch.join(120)
        sim = run_inprocess(cfg, None, progress=lambda _line: None)
        # Assert
        assert fed.orch.state == "done", fed.orch.message
        for got, want in zip(fed.orch.epochs, sim["epochs"], strict=True):
            for k in ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30"):
                assert got[k] == pytest.approx(want[k], abs=1e-9), k
    finally:
        fed.close()


def test_resumed_orchestrator_continues_from_the_store_head(redis_url):
    # Prepare: run one epoch; its last round's record is lost as in a crash between the server's
    # write and the orchestrator's (the version is there, the record not); then a new orchestrator
    # for the same run id with more epochs
    import json

    import redis

    cfg = replace(TINY, run_id="resume", epochs=1)
    fed = Federation(redis_url, cfg, workers=0)
    try:
        fed.add_worker("w")
        fed.orch.start()
        fed.orch.join(120)
        rounds_first = fed.orch.round_id
    finally:
        fed.close()
    lost = json.loads(redis.Redis.from_url(redis_url).rpop("fedseq:resume:log:rounds"))
    fed2 = Federation(redis_url, replace(cfg, epochs=2), workers=0)
    try:
        w = fed2.add_worker("w")
        # Execute
        fed2.orch.start()
        fed2.orch.join(120)
        # Assert: only the second epoch's rounds ran in the new federation
        assert fed2.orch.state == "done", fed2.orch.message
        assert fed2.orch.round_id == 2 * rounds_first
        assert w.stats["train_calls"] == rounds_first
        assert [e["epoch"] for e in fed2.orch.epochs] == [1, 2]
        # the lost record came back with the counts the server stored with the version
        records = RedisStore.from_url(redis_url, "resume").records("rounds")
        assert sorted(r["round"] for r in records) == list(range(2 * rounds_first))
        back = next(r for r in records if r["round"] == lost["round"])
        assert back["summary_recovered"] and lost["accepted"] > 0
        for k in ("epoch", "users", "accepted", "rejected", "missing", "malicious", "malicious_kept", "defense",
                  "defense_info", "rejections", "bytes_received"):
            assert back[k] == lost[k], k
    finally:
        fed2.close()


def test_describe_reports_hosted_users(redis_url):
    """A Describe task down the worker's own stream (nothing dials a worker)."""
    # Prepare
    fed = Federation(redis_url, replace(TINY, run_id="desc"), workers=0)
    try:
        fed.add_worker("w")
        info = fed.orch.workers["w"]
        # Execute
        d = info.link.describe(timeout=10)
        # Assert
        assert d.ready and d.worker_id == "w" and len(d.users) == 60
        assert not info.link.closed and info.address.startswith("ipv4:127.0.0.1:")
    finally:
        fed.close()




@pytest.mark.parametrize("rule", ["fltrust", "mixed-rfa"])
def test_robust_rules_through_the_services_match_the_inprocess_runner(redis_url, rule):
    """FLTrust needs the server's own root data (fedseq/root.py); mixed-RFA is the paper's defense."""
    from cli.sim import run_inprocess

    cfg = replace(TINY, run_id=f"rule-{rule}", defense=rule, epochs=1)
    fed = Federation(redis_url, cfg, workers=0)
    try:
        fed.add_worker("a")
        fed.orch.start()
        fed.orch.join(120)
        sim = run_inprocess(cfg, None, progress=lambda _line: None)
        assert fed.orch.state == "done", fed.orch.message
        got, want = fed.orch.epochs[-1], sim["epochs"][-1]
        for k in ("hr@10", "ndcg@10", "er@10"):
            assert got[k] == pytest.approx(want[k], abs=1e-9), k
        rounds = fed.orch.store.records("rounds")
        assert rounds[0]["defense"] == rule and rounds[0]["defense_info"]
    finally:
        fed.close()


def test_adversarial_training_rounds_through_the_services_match_the_inprocess_runner(redis_url):
    from cli.sim import run_inprocess

    cfg = replace(TINY, run_id="adv", epochs=1, adv_train=True, adv_train_opts=(("users_per_round", "4"),))
    fed = Federation(redis_url, cfg, workers=0)
    try:
        w = fed.add_worker("a")
        fed.orch.start()
        fed.orch.join(120)
        sim = run_inprocess(cfg, None, progress=lambda _line: None)
        assert fed.orch.state == "done", fed.orch.message
        for k in ("hr@10", "ndcg@10", "er@10"):
            assert fed.orch.epochs[-1][k] == pytest.approx(sim["epochs"][-1][k], abs=1e-9), k
        rounds = fed.orch.store.records("rounds")
        assert len(rounds) == 2 * 4  # 60 users / 16 per round = 4 rounds, each followed by an adversarial one
        assert w.stats["users_trained"] == 60 + 4 * 4
    finally:
        fed.close()
