"""The aggregation server's intake under hostile uploads (server/intake.py): header checks before
any buffering, schema before decoding, stream caps and idle cancellation, an overflowing aggregate,
and a hypothesis-driven flood of over a thousand malformed uploads during a real round whose
aggregate must stay bit-identical to the undisturbed one."""

from __future__ import annotations

import functools
import secrets
import struct
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.worker import encode_update
from fedseq import codec
from fedseq.config import ExperimentConfig
from fedseq.rpc import Service, channel, chunks
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2
from server.intake import REASONS, StreamLimits, precheck, reason, tensor_encodings
from server.service import AggregatorServicer

CFG = ExperimentConfig(run_id="intake", dataset="synthetic:users=60,items=80", epochs=1, clients_per_round=16,
                       lr=0.01, num_negatives=50, codec="dense-fp32")
NUM_ITEMS = 80


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples this process's resident memory every 20 ms while open."""

    def __enter__(self):
        self.base, self.peak, self._stop = _rss_mb(), _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _server(redis_url, limits: StreamLimits | None = None, accept=("dense-fp32", "sparse-fp32"), max_bytes=64 << 20):
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id), max_bytes, accept, limits)
    svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")],
                  workers=(limits or StreamLimits()).max_streams + 8).start()
    return svc, agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}")), servicer


def _open(stub, run_id: str, round_id: int, users: list[int], weight: int = 3) -> dict[int, str]:
    """Open a round of ``users``, each assigned ``weight`` (what :func:`_header` declares by default)."""
    tokens = {u: secrets.token_hex(16) for u in users}
    stub.OpenRound(agg_pb.OpenRoundRequest(
        run_id=run_id, round_id=round_id, model_version=round_id, deadline_unix=time.time() + 300, lr=0.5,
        assignments=[common_pb2.Assignment(user_id=u, token=t, weight=weight) for u, t in tokens.items()]))
    return tokens


def _header(run_id, round_id, user, token, data_len, encoding="dense-fp32", n=3):
    return agg_pb.UpdateHeader(run_id=run_id, round_id=round_id, user_id=user, token=token, num_samples=n,
                               total_bytes=data_len, encoding=encoding)


def _msgs(header, data: bytes):
    return [agg_pb.UpdateChunk(header=header, data=p) if i == 0 else agg_pb.UpdateChunk(data=p)
            for i, p in enumerate(chunks(data))]


@functools.cache
def _layout():
    """The model's parameter layout (built once: ``setup`` makes the data set and the model)."""
    from fedseq.experiment import setup

    return setup(CFG).layout


def _update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    layout = _layout()
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in zip(layout.names, layout.shapes, strict=True)}


def _start(stub, run_id):
    stub.StartRun(agg_pb.StartRunRequest(run_id=run_id, config_json=replace(CFG, run_id=run_id).to_json(),
                                         num_items=NUM_ITEMS))


def _sparse_bomb() -> bytes:
    """A 3-tensor container of under 200 bytes whose sparse tensors declare 2^28-element shapes."""
    hdr = struct.pack("<B3xI", 1, 0)  # wide indices, k = 0 rows
    return codec.pack([codec.EncodedTensor(name, "float32", (1 << 21, 128), "sparse-fp32", hdr)
                       for name in ("item_emb.weight", "pos_emb.weight", "blocks.0.q.weight")])


# ---------------------------------------------------------------------------- tiny exact cases
def test_every_reason_word_is_documented_and_reasons_are_capped():
    assert reason("stale", "x" * 1000).startswith("stale: ") and len(reason("stale", "x" * 1000)) == 200
    with pytest.raises(ValueError):
        reason("nope", "x")
    assert {"stale", "future", "oversize", "truncated", "wrong-encoding", "busy", "idle"} <= set(REASONS)


def test_precheck_order_and_words():
    from server.intake import OpenRound

    rnd = OpenRound(5, time.time() + 60, {1: "t1", 2: "t2"}, frozenset({2}), {1: 1, 2: 1})

    def h(**kw):
        base = {"run_id": "r", "round_id": 5, "user_id": 1, "token": "t1", "num_samples": 1, "total_bytes": 10,
                "encoding": "dense-fp32"}
        return agg_pb.UpdateHeader(**{**base, **kw})

    def check(header, r=rnd):
        out = precheck(header, "r", r, ["dense-fp32"], 100)
        return out if out is None else out.split(":")[0]

    assert check(h()) is None
    assert check(h(run_id="x" * 10_000)) == "unknown-run"
    assert len(precheck(h(run_id="x" * 10_000), "r", rnd, ["dense-fp32"], 100)) <= 200
    assert check(h(round_id=4)) == "stale" and check(h(round_id=6)) == "future" and check(h(), None) == "stale"
    assert check(h(user_id=9)) == "unassigned" and check(h(token="t2")) == "bad-token"
    assert check(h(user_id=2, token="t2")) == "duplicate" and check(h(encoding="int8-row")) == "wrong-encoding"
    assert check(h(total_bytes=101)) == "oversize" and check(h(num_samples=-1)) == "malformed"
    assert check(h(num_samples=10**9)) == "weight" and check(h(num_samples=0)) == "weight"
    assert check(h(num_samples=2, total_bytes=101)) == "weight"  # the claim first, then the size
    assert check(h(), replace(rnd, deadline=time.time() - 1)) == "late"


def test_the_tensor_encodings_an_update_may_carry_come_from_the_codec_registry():
    # Execute: the table server/intake.py derives from fedseq/codec/registry.py
    table = {encoding: tensor_encodings(encoding) for encoding in codec.CODEC_NAMES}
    # Assert: each encoding, its encode_state fallback, dense-fp32 (raw integer tensors) for dense-*
    assert table == {
        "dense-fp32": {"dense-fp32"},
        "dense-fp16": {"dense-fp16", "dense-fp32"},
        "dense-bf16": {"dense-bf16", "dense-fp32"},
        "sparse-fp32": {"sparse-fp32", "dense-fp32"},
        "sparse-fp16": {"sparse-fp16", "dense-fp16"},
        "int8-row": {"int8-row", "dense-fp32"},
    }
    assert tensor_encodings("nope") == set()


# ---------------------------------------------------------------------------- weights and sizes
def test_a_num_samples_other_than_the_assigned_weight_is_refused_and_aggregation_uses_the_orchestrators(redis_url):
    """num_samples was the aggregation weight with no bound: 1e9 gave one update the whole weighted
    mean. The weight is now the orchestrator's; a header that claims another is refused ("weight"),
    counted, and the step uses the assigned weights. Every assigned user's upload is in user_bytes."""
    # Prepare: a weighted mean (fedavg reduce=mean); users 1, 2, 3 of weights 1, 3, 2
    svc, stub, servicer = _server(redis_url)
    try:
        cfg = replace(CFG, run_id="weights", defense_opts=(("reduce", "mean"),))
        stub.StartRun(agg_pb.StartRunRequest(run_id="weights", config_json=cfg.to_json(), num_items=NUM_ITEMS))
        weights = {1: 1, 2: 3, 3: 2}
        tokens = {u: secrets.token_hex(16) for u in weights}
        stub.OpenRound(agg_pb.OpenRoundRequest(
            run_id="weights", round_id=0, model_version=0, deadline_unix=time.time() + 300, lr=0.5,
            assignments=[common_pb2.Assignment(user_id=u, token=tokens[u], weight=w) for u, w in weights.items()]))
        data = {u: encode_update(_update(u), "dense-fp32") for u in weights}
        claims = {1: 1, 2: 3, 3: 10**9}  # user 3 claims a billion samples
        # Execute
        reply = stub.SubmitUpdates(iter([m for u in weights for m in _msgs(
            _header("weights", 0, u, tokens[u], len(data[u]), n=claims[u]), data[u])]))
        summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="weights", round_id=0))
        with pytest.raises(grpc.RpcError) as light:
            stub.OpenRound(agg_pb.OpenRoundRequest(
                run_id="weights", round_id=1, model_version=1, deadline_unix=time.time() + 300, lr=0.5,
                assignments=[common_pb2.Assignment(user_id=1, token="t", weight=4),
                             common_pb2.Assignment(user_id=2, token="u")]))  # no weight: 0
    finally:
        svc.stop(0)
    # Assert
    assert [st.accepted for st in reply.statuses] == [True, True, False]
    assert reply.statuses[2].reason.startswith("weight: ") and "assigned weight 2" in reply.statuses[2].reason
    assert dict(summary.refused) == {"weight": 1} and summary.accepted == 2
    assert [(r.user_id, r.reason.split(":")[0]) for r in summary.rejected] == [(3, "weight")]
    store = RedisStore.from_url(redis_url, "weights")
    layout = _layout()
    w0, w1 = layout.flatten(store.get_model(0)), layout.flatten(store.get_model(1))
    u1, u2 = layout.flatten(_update(1)), layout.flatten(_update(2))
    # mean-scale rule: the step is lr x K (fedseq/engine.py step_lr), K = 2 updates
    assert torch.allclose(w1, w0 - 0.5 * 2 * (1 * u1 + 3 * u2) / 4, atol=1e-5)
    assert dict(summary.user_bytes) == {u: st.bytes for u, st in zip(weights, reply.statuses, strict=True)}
    assert sum(summary.user_bytes.values()) == summary.bytes_received == reply.bytes_received
    assert light.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "weight 0" in light.value.details()


def test_the_update_limit_is_the_runs_largest_honest_update_and_the_cap_still_caps(redis_url):
    """64 MiB per update for a 0.4 MB model let one stream make the server buffer 64 MiB. The limit
    is now the largest update the workers' encoder can write for the run's model (every coordinate
    nonzero, every sparse row stored) x 1.1 + 4 KiB; max_update_bytes stays the upper cap."""
    from server.intake import UPDATE_FRAMING, UPDATE_MARGIN

    # Prepare
    svc, stub, servicer = _server(redis_url)
    small_svc, small_stub, small = _server(redis_url, max_bytes=1000)
    try:
        _start(stub, "limit")
        _start(small_stub, "limit-cap")
        tokens = _open(stub, "limit", 0, [1, 2, 3])
        layout = _layout()
        full = {n: torch.randn(s, generator=torch.Generator().manual_seed(7)) for n, s in
                zip(layout.names, layout.shapes, strict=True)}
        largest = {e: len(encode_update({n: torch.ones(s) for n, s in zip(layout.names, layout.shapes, strict=True)},
                                        e)) for e in ("dense-fp32", "sparse-fp32")}
        limit = servicer.update_limit
        data = encode_update(full, "dense-fp32")
        # Execute: the largest honest update, one that declares a byte over the limit, one that sends more
        reply = stub.SubmitUpdates(iter(_msgs(_header("limit", 0, 1, tokens[1], len(data)), data)
                                        + [agg_pb.UpdateChunk(header=_header("limit", 0, 2, tokens[2], limit + 1),
                                                              data=b"")]
                                        + _msgs(_header("limit", 0, 3, tokens[3], 10), b"x" * 4000)))
    finally:
        svc.stop(0)
        small_svc.stop(0)
    # Assert
    assert servicer.update_limits == {e: int(n * UPDATE_MARGIN) + UPDATE_FRAMING for e, n in largest.items()}
    assert limit == servicer.update_limits["dense-fp32"] and len(data) == largest["dense-fp32"]
    assert limit < 600_000 and small.update_limit == 1000
    assert [st.reason.split(":")[0] for st in reply.statuses] == ["", "oversize", "oversize"]
    assert reply.statuses[0].accepted and f"the limit is {limit}" in reply.statuses[1].reason
    print(f"\nupdate limit of the test model: {limit} bytes (largest dense-fp32 update {largest['dense-fp32']})")


# ---------------------------------------------------------------------------- single attacks
def test_uploads_of_unassigned_users_are_never_buffered(redis_url):
    # Prepare: a round of two users; 6 concurrent uploads of 40 MB each from users nobody assigned
    svc, stub, servicer = _server(redis_url, StreamLimits(max_per_peer=8))
    try:
        _start(stub, "nobuf")
        _open(stub, "nobuf", 0, [1, 2])
        big = b"\0" * (40 << 20)

        def lazy(i):  # the client side streams 1 MiB at a time, so memory growth is the server's
            for j, piece in enumerate(chunks(big)):
                yield agg_pb.UpdateChunk(header=_header("nobuf", 0, 100 + i, "x", len(big)), data=piece) if j == 0 \
                    else agg_pb.UpdateChunk(data=piece)

        def flood(i):
            return stub.SubmitUpdates(lazy(i), timeout=120)

        # Execute
        with PeakRSS() as mem:
            threads = [threading.Thread(target=flood, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="nobuf", round_id=0))
        # Assert: refused from the header, counted, and not held in memory (240 MB were sent)
        assert dict(summary.refused) == {"unassigned": 6}
        assert summary.bytes_received == 0 and summary.bytes_refused > 6 * (40 << 20)
        assert sorted(summary.missing) == [1, 2] and not summary.rejected
        assert mem.growth < 120, f"server memory grew {mem.growth:.0f} MB"
        print(f"\nunassigned 6 x 40 MB: peak memory growth {mem.growth:.0f} MB")
    finally:
        svc.stop(0)


def test_a_sparse_bomb_is_refused_before_decoding(redis_url):
    svc, stub, _ = _server(redis_url)
    try:
        _start(stub, "bomb")
        tokens = _open(stub, "bomb", 0, [1])
        bomb = _sparse_bomb()
        assert len(bomb) < 250
        with PeakRSS() as mem:
            reply = stub.SubmitUpdates(iter(_msgs(_header("bomb", 0, 1, tokens[1], len(bomb), "sparse-fp32"), bomb)))
        s = reply.statuses[0]
        assert not s.accepted and s.reason.startswith("malformed:") and "tensor names differ" in s.reason
        assert mem.growth < 50
        print(f"\nsparse bomb of {len(bomb)} bytes: peak memory growth {mem.growth:.0f} MB")
    finally:
        svc.stop(0)


def test_updates_beyond_the_sanity_bound_are_refused_as_they_arrive(redis_url):
    # Prepare: two assigned users send finite updates of 3e38 (one alone would have made every later
    # step overflow), one a normal update
    svc, stub, _ = _server(redis_url)
    try:
        _start(stub, "ovf")
        tokens = _open(stub, "ovf", 0, [1, 2, 3])
        huge = {n: torch.full_like(t, 3e38) for n, t in _update(1).items()}
        replies = []
        for u, upd in ((1, huge), (2, huge), (3, _update(3))):
            data = encode_update(upd, "dense-fp32")
            replies.append(stub.SubmitUpdates(iter(_msgs(_header("ovf", 0, u, tokens[u], len(data)), data))))
        # Execute
        summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="ovf", round_id=0))
        # Assert: refused at intake with their reason, counted; the round goes on with the normal one
        assert [r.statuses[0].reason.split(":")[0] for r in replies[:2]] == ["out-of-bounds"] * 2
        assert replies[2].statuses[0].accepted
        assert summary.new_version == 1 and summary.accepted == 1 and summary.refused["out-of-bounds"] == 2
        assert [r.user_id for r in summary.rejected] == [1, 2]
    finally:
        svc.stop(0)


def test_a_step_that_would_explode_the_model_refuses_the_largest_update_instead_of_failing_the_round(redis_url):
    # Prepare: updates within the sanity bound whose step (lr 0.5, the sum) leaves weights past 1e4
    svc, stub, _ = _server(redis_url)
    try:
        _start(stub, "boom")
        tokens = _open(stub, "boom", 0, [1, 2, 3])
        for u, upd in ((1, {n: torch.full_like(t, 6e4) for n, t in _update(1).items()}),
                       (2, {n: torch.full_like(t, 5e4) for n, t in _update(2).items()}), (3, _update(3))):
            data = encode_update(upd, "dense-fp32")
            assert stub.SubmitUpdates(iter(_msgs(_header("boom", 0, u, tokens[u], len(data)), data))).statuses[0].accepted
        # Execute
        summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="boom", round_id=0))
        # Assert: refused one at a time from the largest norm, the rule run again without them
        assert summary.new_version == 1 and summary.accepted == 1 and summary.refused_by_engine == 2
        assert [r.user_id for r in summary.rejected] == [1, 2]
        assert all(r.reason.startswith("non-finite:") for r in summary.rejected)
        from fedseq.engine import model_sane
        from fedseq.experiment import setup

        assert model_sane(setup(CFG).layout.flatten(RedisStore.from_url(redis_url, "boom").get_model(1)))
    finally:
        svc.stop(0)


def test_silent_streams_are_capped_and_cancelled_and_control_calls_still_answer(redis_url, tmp_path):
    # Prepare: a server on mTLS that allows 4 streams, 2 per peer, 1 s of silence; two worker certificates
    from fedseq.tls import Identity, make_certs

    make_certs(tmp_path, {"server": "server", "loris": "worker", "honest": "worker", "orchestrator": "orchestrator"})
    limits = StreamLimits(max_streams=4, max_per_peer=2, idle_timeout=1.0)
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id), limits=limits)
    svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], workers=12,
                  identity=Identity.load(tmp_path, "server")).start()

    def stub(name):
        return agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}", identity=Identity.load(tmp_path, name),
                                               peer="server"))

    try:
        control, loris, honest = stub("orchestrator"), stub("loris"), stub("honest")
        _start(control, "loris")
        tokens = _open(control, "loris", 0, [1])
        gate = threading.Event()
        outcomes: list[str] = []

        def silent():  # a header, then nothing
            yield agg_pb.UpdateChunk(header=_header("loris", 0, 7, "x", 1000), data=b"")
            gate.wait(30)

        def hold():
            try:
                loris.SubmitUpdates(silent(), timeout=30)
                outcomes.append("OK")
            except grpc.RpcError as e:
                outcomes.append(e.code().name)

        # Execute: 8 silent streams from one peer, then a control call and an honest peer's upload
        threads = [threading.Thread(target=hold) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        t0 = time.time()
        health = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{svc.port}", identity=Identity.load(
            tmp_path, "orchestrator"), peer="server")).Check(health_pb2.HealthCheckRequest(), timeout=5)
        data = encode_update(_update(1), "dense-fp32")
        legit = honest.SubmitUpdates(iter(_msgs(_header("loris", 0, 1, tokens[1], len(data)), data)), timeout=10)
        control_latency = time.time() - t0
        for t in threads:
            t.join(20)
        gate.set()
        summary = control.CloseRound(agg_pb.CloseRoundRequest(run_id="loris", round_id=0), timeout=10)
        # Assert
        assert health.status == health_pb2.HealthCheckResponse.SERVING and control_latency < 3
        assert legit.statuses[0].accepted, legit.statuses[0].reason
        assert Counter(outcomes) == Counter({"RESOURCE_EXHAUSTED": 6, "CANCELLED": 2})
        assert summary.refused["busy"] == 6 and summary.refused["idle"] == 2 and summary.accepted == 1
    finally:
        gate.set()
        svc.stop(0)


# ---------------------------------------------------------------------------- the flood
KINDS = ("bad-token", "unassigned", "stale", "future", "unknown-run", "oversize-declared", "longer-than-declared",
         "truncated-next-header", "wrong-encoding", "dense-as-sparse", "sparse-bomb", "random-bytes", "nan",
         "bad-shape", "data-before-header", "negative-samples")
EXPECTED = {"bad-token": "bad-token", "unassigned": "unassigned", "stale": "stale", "future": "future",
            "unknown-run": "unknown-run", "oversize-declared": "oversize", "longer-than-declared": "oversize",
            "truncated-next-header": "truncated", "wrong-encoding": "wrong-encoding",
            "dense-as-sparse": "wrong-encoding", "sparse-bomb": "malformed", "random-bytes": "malformed",
            "nan": "non-finite", "bad-shape": "malformed", "data-before-header": "malformed",
            "negative-samples": "malformed"}


def _hostile(kind: str, rnd: int, tokens: dict[int, str], bait: list[int], blob: bytes, rng_bytes: bytes):
    """The messages of one hostile upload of ``kind`` (``bait``: assigned users that never send a
    real update, whose valid tokens the hostile payloads use to reach the later checks)."""
    user = bait[len(rng_bytes) % len(bait)]
    tok = tokens[user]
    small = rng_bytes or b"\1"
    if kind == "bad-token":
        return _msgs(_header("flood", rnd, user, secrets.token_hex(16), len(small)), small)
    if kind == "unassigned":
        return _msgs(_header("flood", rnd, 10_000 + len(small), tok, len(small)), small)
    if kind == "stale":
        return _msgs(_header("flood", rnd - 1, user, tok, len(small)), small)
    if kind == "future":
        return _msgs(_header("flood", rnd + 1 + len(small), user, tok, len(small)), small)
    if kind == "unknown-run":
        return _msgs(_header("x" * (1 + 1000 * len(small)), rnd, user, tok, len(small)), small)
    if kind == "oversize-declared":
        return _msgs(_header("flood", rnd, user, tok, (64 << 20) + 1), small)
    if kind == "longer-than-declared":
        return _msgs(_header("flood", rnd, user, tok, 1), b"ab" + small)
    if kind == "truncated-next-header":
        return _msgs(_header("flood", rnd, user, tok, 10 + len(blob)), small[:5])
    if kind == "wrong-encoding":
        return _msgs(_header("flood", rnd, user, tok, len(blob), "int8-row"), blob)
    if kind == "dense-as-sparse":
        return _msgs(_header("flood", rnd, user, tok, len(blob), "sparse-fp32"), blob)
    if kind == "sparse-bomb":
        bomb = _sparse_bomb()
        return _msgs(_header("flood", rnd, user, tok, len(bomb), "sparse-fp32"), bomb)
    if kind == "random-bytes":
        return _msgs(_header("flood", rnd, user, tok, len(small)), small)
    if kind == "nan":
        data = _nan_payload(len(small) % 7)
        return _msgs(_header("flood", rnd, user, tok, len(data)), data)
    if kind == "bad-shape":
        data = _bad_shape_payload()
        return _msgs(_header("flood", rnd, user, tok, len(data)), data)
    if kind == "data-before-header":
        return [agg_pb.UpdateChunk(data=small)]
    if kind == "negative-samples":
        return _msgs(_header("flood", rnd, user, tok, len(blob), n=-5), blob)
    raise AssertionError(kind)


@functools.cache
def _bad_shape_payload() -> bytes:
    """A well-formed dense container whose position table has the wrong shape."""
    upd = _update(5)
    upd["pos_emb.weight"] = torch.zeros(3, 64)
    return encode_update(upd, "dense-fp32")


_NAN: dict[int, bytes] = {}


def _nan_payload(seed: int) -> bytes:
    """A well-formed container (valid CRCs) with one NaN, as a misbehaving client would write it."""
    if seed not in _NAN:
        upd = _update(seed)
        upd["blocks.0.q.bias"][seed] = float("nan")
        _NAN[seed] = codec.pack([codec.EncodedTensor(n, "float32", tuple(t.shape), "dense-fp32", t.numpy().tobytes())
                                 for n, t in upd.items()])
    return _NAN[seed]


def test_a_flood_of_hostile_uploads_is_refused_counted_and_leaves_the_aggregate_bit_identical(redis_url):
    # Prepare: two servers run the same round; one also receives the flood
    legit_users, bait = [1, 2, 3, 4], [20, 21, 22]
    updates = {u: encode_update(_update(u), "dense-fp32") for u in legit_users}
    blob = encode_update(_update(99), "dense-fp32")
    calm_svc, calm, _ = _server(redis_url)
    svc, stub, servicer = _server(redis_url)
    sent: Counter[str] = Counter()
    try:
        for s, run in ((calm, "calm-flood"), (stub, "flood")):
            _start(s, run)
            s.OpenRound(agg_pb.OpenRoundRequest(run_id=run, round_id=0, model_version=0, lr=0.5,
                                                deadline_unix=time.time() + 600,
                                                assignments=[common_pb2.Assignment(user_id=u, token="w", weight=3)
                                                             for u in legit_users + bait]))
            s.CloseRound(agg_pb.CloseRoundRequest(run_id=run, round_id=0))
        tokens = {u: secrets.token_hex(16) for u in legit_users + bait}
        for s, run in ((calm, "calm-flood"), (stub, "flood")):
            s.OpenRound(agg_pb.OpenRoundRequest(run_id=run, round_id=1, model_version=1, lr=0.5,
                                                deadline_unix=time.time() + 600,
                                                assignments=[common_pb2.Assignment(user_id=u, token=t, weight=3)
                                                             for u, t in tokens.items()]))

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(st.lists(st.tuples(st.sampled_from(KINDS), st.binary(max_size=64)), min_size=4, max_size=14))
        def flood(batch):
            msgs, kinds = [], []
            for kind, raw in batch:
                if kind == "data-before-header" and msgs:
                    continue  # only meaningful as the first message of a stream
                if kind == "truncated-next-header" and (kinds and kinds[-1] == kind):
                    continue
                msgs += _hostile(kind, 1, tokens, bait, blob, raw)
                kinds.append(kind)
            if kinds and kinds[-1] == "truncated-next-header":
                kinds[-1] = "truncated-end"
            reply = stub.SubmitUpdates(iter(msgs), timeout=60)
            assert len(reply.statuses) == len(kinds)
            for kind, status in zip(kinds, reply.statuses, strict=True):
                want = "truncated" if kind == "truncated-end" else EXPECTED[kind]
                assert not status.accepted and status.reason.split(":")[0] == want, (kind, status.reason)
                assert len(status.reason) <= 200
                sent[want] += 1

        # Execute: the flood, then the real updates, on one server; only the real ones on the other
        with PeakRSS() as mem:
            flood()
        for s, run in ((stub, "flood"), (calm, "calm-flood")):
            for u in legit_users:
                s.SubmitUpdates(iter(_msgs(_header(run, 1, u, tokens[u], len(updates[u])), updates[u])))
        got = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="flood", round_id=1))
        want = calm.CloseRound(agg_pb.CloseRoundRequest(run_id="calm-flood", round_id=1))
        # Assert: over a thousand refused, each counted under its reason; the aggregate is untouched
        assert sum(sent.values()) >= 1000, sent
        assert dict(got.refused) == dict(sent)
        assert got.accepted == want.accepted == 4
        assert got.accepted + len(got.rejected) + len(got.missing) == len(tokens)
        a = RedisStore.from_url(redis_url, "flood").get_model_bytes(2)
        b = RedisStore.from_url(redis_url, "calm-flood").get_model_bytes(2)
        assert a == b
        assert mem.growth < 300, f"server memory grew {mem.growth:.0f} MB under the flood"
        print(f"\nflood: {sum(sent.values())} hostile uploads refused {dict(sent)}; peak memory growth "
              f"{mem.growth:.0f} MB (base {mem.base:.0f} MB)")
    finally:
        svc.stop(0)
        calm_svc.stop(0)


@pytest.mark.parametrize("content, says", [
    ("-3 1 2 3\n", "user id -3 is negative"),
    ("1 2 0 4\n", "item id 0 is reserved for padding"),
])
def test_bad_data_and_unreachable_store_are_one_line_errors_at_the_cli(tmp_path, content, says, fedseq_cli):
    path = tmp_path / "seqs.txt"
    path.write_text(content)
    # in this process: cli.main.main's return value is the command's exit status, and its stderr
    # (what it prints and logs) is captured
    rc, _, err = fedseq_cli("data", path)
    assert rc == 2 and says in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = fedseq_cli("serve-server", "--insecure", "--store-url", "redis://127.0.0.1:1/0")
    assert rc == 2 and "cannot reach Redis" in err and "Traceback" not in err


@pytest.mark.slow  # seconds of a new interpreter's imports
def test_the_real_data_command_reports_bad_data_in_one_line(tmp_path):
    """The check above, once as the real command: its whole stderr is the one line."""
    import subprocess
    import sys

    path = tmp_path / "seqs.txt"
    path.write_text("-3 1 2 3\n")
    proc = subprocess.run([sys.executable, "-m", "cli.entry", "data", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "user id -3 is negative" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_metrics_endpoint_serves_the_fedseq_metrics(redis_url):
    import urllib.request

    from fedseq.observe import NAMES, serve_metrics

    # Prepare: one refused upload so the counters have a sample
    svc, stub, _ = _server(redis_url)
    try:
        _start(stub, "metrics")
        _open(stub, "metrics", 0, [1])
        stub.SubmitUpdates(iter(_msgs(_header("metrics", 0, 5, "x", 1), b"x")))
        # Execute
        port = serve_metrics(0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        svc.stop(0)
    # Assert
    assert 'fedseq_updates_total{outcome="refused",reason="unassigned"}' in text
    assert all(name in text for name in NAMES if name != "fedseq_rpc_refused_total")


def test_json_logs_carry_service_run_and_round():
    import io
    import json
    import logging

    from fedseq.observe import JsonFormatter, _Context, set_context

    # Prepare
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("fedseq.test-json")
    log.addHandler(handler)
    log.propagate = False
    try:
        # Execute
        set_context(service="serve-server", run="r1", round_id=7)
        log.warning("refused %d uploads", 3)
    finally:
        log.removeHandler(handler)
    # Assert
    line = json.loads(buf.getvalue())
    assert (line["service"], line["run"], line["round"], line["message"]) == ("serve-server", "r1", 7,
                                                                              "refused 3 uploads")


class _SlowDecode(AggregatorServicer):
    """Decodes every update slowly: two uploads of one user are then decoded at the same time."""

    @staticmethod
    def _decode(h, data, layout, row, dirty):
        time.sleep(0.5)
        return AggregatorServicer._decode(h, data, layout, row, dirty)


def test_two_concurrent_uploads_of_one_user_get_one_row(redis_url):
    # Prepare: an insider opens two streams for one of its users and finishes both at once, so both
    # pass every header check before either is decoded
    servicer = _SlowDecode(lambda run_id: RedisStore.from_url(redis_url, run_id), 64 << 20, ("dense-fp32",))
    svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], workers=24).start()
    stub = agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}"))
    try:
        _start(stub, "dup2")
        tokens = _open(stub, "dup2", 0, [1, 2])
        data = encode_update(_update(1), "dense-fp32")
        go = threading.Barrier(2)

        def one(out: list) -> None:
            def gen():
                yield agg_pb.UpdateChunk(header=_header("dup2", 0, 1, tokens[1], len(data)), data=data[:100])
                go.wait(10)  # both headers are in: both passed the precheck
                yield agg_pb.UpdateChunk(data=data[100:])

            out.append(stub.SubmitUpdates(gen()))

        replies: list = []
        threads = [threading.Thread(target=one, args=(replies,)) for _ in range(2)]
        # Execute
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id="dup2", round_id=0))
        # Assert: one accepted, the other refused as a duplicate (the row is reserved before decoding)
        verdicts = sorted((s.accepted, s.reason.split(":")[0]) for r in replies for s in r.statuses)
        assert verdicts == [(False, "duplicate"), (True, "")]
        assert summary.accepted == 1 and summary.refused["duplicate"] == 1
    finally:
        svc.stop(0)
