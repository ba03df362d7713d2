"""Update encodings through the real services: lossless sparse-fp32 aggregation, the negotiated
encoding contract (server accept list, worker refusal, fail-fast runs), and bad payloads."""

from __future__ import annotations

import secrets
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from _federation import CountingAggregator, Federation

from cli.main import main as cli_main
from client.worker import SPARSE_TABLES, encode_update
from fedseq import codec
from fedseq.config import ConfigError, ExperimentConfig
from fedseq.experiment import setup
from fedseq.rpc import Service, channel, chunks
from fedseq.store import RedisStore
from fedseq.training import compute_updates
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2
from server.service import AggregatorServicer

TINY = ExperimentConfig(run_id="cs", dataset="synthetic:users=60,items=80", epochs=1, clients_per_round=16,
                        lr=0.01, num_negatives=50, eval_every=1)


@pytest.fixture
def aggregator(redis_url):
    def make(**kw):
        servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id), **kw)
        svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], port=0,
                      host="127.0.0.1").start()
        started.append(svc)
        return agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}")), servicer

    started: list[Service] = []
    yield make
    for svc in started:
        svc.stop(0)


def _open(stub, cfg: ExperimentConfig, users: list[int], lr: float = 0.5,
          weights: dict[int, int] | None = None) -> dict[int, str]:
    """Start the run and open its round 0 of ``users``, each of weight 3 (what :func:`_stream`
    declares) unless ``weights`` names it (a real worker declares its users' training items)."""
    stub.StartRun(agg_pb.StartRunRequest(run_id=cfg.run_id, config_json=cfg.to_json(), num_items=80))
    tokens = {u: secrets.token_hex(4) for u in users}
    stub.OpenRound(agg_pb.OpenRoundRequest(
        run_id=cfg.run_id, round_id=0, model_version=0, deadline_unix=time.time() + 60, lr=lr,
        assignments=[common_pb2.Assignment(user_id=u, token=t, weight=(weights or {}).get(u, 3))
                     for u, t in tokens.items()]))
    return tokens


def _train_weights(hosted, users: list[int]) -> dict[int, int]:
    """The weights the orchestrator assigns ``users``: their training items, which a worker declares."""
    return {u: len(hosted.setup.dataset.train[u]) for u in users}


def _stream(cfg, tokens, payloads: dict[int, bytes], encoding: str, num_samples: int = 3, cut: int | None = None):
    for user, data in payloads.items():
        header = agg_pb.UpdateHeader(run_id=cfg.run_id, round_id=0, user_id=user, token=tokens[user],
                                     num_samples=num_samples, total_bytes=len(data), encoding=encoding)
        body = data if cut is None else data[:cut]
        for i, piece in enumerate(chunks(body)):
            yield agg_pb.UpdateChunk(header=header, data=piece) if i == 0 else agg_pb.UpdateChunk(data=piece)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().view(np.uint32)


# ---------------------------------------------------------------------------- lossless sparse


def test_sparse_fp32_aggregate_equals_dense_fp32_bit_for_bit(aggregator, redis_url):
    # Prepare: real per-user gradients (sparse item-embedding rows) of 12 users at version 0
    stub, _ = aggregator()
    s = setup(TINY)
    params = s.initial_params()
    users = list(range(12))
    ub = compute_updates(s.model, params, [s.dataset.train[u] for u in users], np.array(users), 0, 0, TINY.local())
    updates = {u: s.layout.unflatten(ub.updates[i]) for i, u in enumerate(users)}
    models, sizes = {}, {}
    for enc in ("dense-fp32", "sparse-fp32"):
        cfg = replace(TINY, run_id=f"bits-{enc}", codec=enc)
        tokens = _open(stub, cfg, users)
        payloads = {u: encode_update(updates[u], enc) for u in users}
        # Execute: upload through the Aggregator service, aggregate, step, store version 1
        reply = stub.SubmitUpdates(_stream(cfg, tokens, payloads, enc))
        summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id=cfg.run_id, round_id=0))
        assert all(st.accepted for st in reply.statuses) and summary.accepted == 12
        models[enc] = RedisStore.from_url(redis_url, cfg.run_id).get_model(1)
        sizes[enc] = sum(len(p) for p in payloads.values())
    # Assert: the sparse uploads really were row-sparse and smaller, and the models are bit-identical
    sample = {e.name: e.encoding for e in codec.unpack(encode_update(updates[0], "sparse-fp32"))}
    assert all(sample[n] == "sparse-fp32" for n in SPARSE_TABLES)
    assert sizes["sparse-fp32"] < sizes["dense-fp32"]
    assert models["dense-fp32"].keys() == models["sparse-fp32"].keys()
    for name, t in models["dense-fp32"].items():
        assert np.array_equal(_bits(t), _bits(models["sparse-fp32"][name])), name
    expected = params - 0.5 * ub.updates.sum(0)
    assert not torch.equal(s.layout.flatten(models["sparse-fp32"]), params)
    assert torch.allclose(s.layout.flatten(models["sparse-fp32"]), expected, atol=1e-6)


# ---------------------------------------------------------------------------- negotiation


def test_a_run_asking_for_a_refused_codec_fails_fast_with_a_clear_message(redis_url):
    # Prepare: a server that accepts only dense-fp32 and sparse-fp32; a run that asks for sparse-fp16
    cfg = replace(TINY, run_id="refused", codec="sparse-fp16")
    fed = Federation(redis_url, cfg, workers=1, accept_codecs=("dense-fp32", "sparse-fp32"))
    try:
        # Execute
        t0 = time.perf_counter()
        orch = fed.run(60)
        elapsed = time.perf_counter() - t0
        # Assert: failed before any round, saying what was asked, what is accepted and how to fix it
        assert orch.state == "failed"
        assert "'sparse-fp16' is not accepted" in orch.message
        assert "dense-fp32, sparse-fp32" in orch.message and "--codec" in orch.message
        assert elapsed < 15 and orch.round_id == 0
        assert fed.agg.submit_calls == 0 and RedisStore.from_url(redis_url, "refused").head() is None
    finally:
        fed.close()


class _NarrowingAggregator(CountingAggregator):
    """Accepts every encoding at StartRun, but only dense-fp32 from the first OpenRound on (as a
    server restarted with a narrower --accept-codecs would)."""

    def OpenRound(self, request, context):
        self.accepted_codecs = ("dense-fp32",)
        return super().OpenRound(request, context)


def test_worker_refuses_an_encoding_the_aggregator_did_not_accept(redis_url):
    # Prepare
    cfg = replace(TINY, run_id="narrowed", codec="sparse-fp32")
    fed = Federation(redis_url, cfg, workers=1, aggregator=_NarrowingAggregator)
    try:
        # Execute
        orch = fed.run(60)
        # Assert: the worker refused before uploading anything, and the run failed saying so
        assert orch.state == "failed"
        assert "encoding refused" in orch.message and "'sparse-fp32'" in orch.message
        assert "accepts only ['dense-fp32']" in orch.message
        assert fed.agg.submit_calls == 0 and fed.workers[0].stats["users_trained"] == 0
    finally:
        fed.close()


def test_server_rejects_updates_in_encodings_it_does_not_accept_or_did_not_declare(aggregator):
    # Prepare: a server restricted to two encodings
    stub, servicer = aggregator(accept_codecs="dense-fp32, sparse-fp32")
    s = setup(TINY)
    upd = s.layout.unflatten(torch.randn(s.layout.dim, generator=torch.Generator().manual_seed(1)))
    cfg = replace(TINY, run_id="declared", codec="sparse-fp32")
    tokens = _open(stub, cfg, [1, 2, 3, 4])
    int8 = encode_update(upd, "int8-row")
    # Execute
    reply = stub.SubmitUpdates(_stream(cfg, tokens, {1: int8}, "int8-row"))  # not accepted
    reply2 = stub.SubmitUpdates(_stream(cfg, tokens, {2: int8}, "sparse-fp32"))  # declared one, carries another
    reply3 = stub.SubmitUpdates(_stream(cfg, tokens, {3: encode_update(upd, "sparse-fp32")}, "sparse-fp32"))
    # a dense payload under the sparse label would get dense bytes past a sparse-only accept list
    reply4 = stub.SubmitUpdates(_stream(cfg, tokens, {4: encode_update(upd, "dense-fp32")}, "sparse-fp32"))
    # Assert
    assert servicer.accepted_codecs == ("dense-fp32", "sparse-fp32")
    r1, r2, r3 = reply.statuses[0], reply2.statuses[0], reply3.statuses[0]
    assert not reply4.statuses[0].accepted and reply4.statuses[0].reason.startswith("wrong-encoding:")
    assert not r1.accepted and "'int8-row' not accepted" in r1.reason and "dense-fp32, sparse-fp32" in r1.reason
    assert not r2.accepted and r2.reason.startswith("wrong-encoding:") and "encoded 'int8-row'" in r2.reason
    assert r3.accepted, r3.reason


def test_truncated_update_payloads_are_rejected_with_a_clear_status(aggregator):
    # Prepare
    stub, _ = aggregator()
    s = setup(TINY)
    upd = s.layout.unflatten(torch.randn(s.layout.dim, generator=torch.Generator().manual_seed(2)))
    cfg = replace(TINY, run_id="trunc", codec="dense-fp32")
    tokens = _open(stub, cfg, [1, 2, 3])
    data = encode_update(upd, "dense-fp32")
    # Execute
    # (1) the stream ends halfway through the update it announced
    cut_stream = stub.SubmitUpdates(_stream(cfg, tokens, {1: data}, "dense-fp32", cut=len(data) // 2))
    # (2) a container cut short (its declared length matches what is sent): the codec finds it
    short = data[: len(data) - 1000]
    cut_container = stub.SubmitUpdates(_stream(cfg, tokens, {2: short}, "dense-fp32"))
    # (3) a bad shape in an otherwise valid container
    bad = dict(upd)
    bad["item_emb.weight"] = torch.zeros(5, 64)
    bad_shape = stub.SubmitUpdates(_stream(cfg, tokens, {3: encode_update(bad, "dense-fp32")}, "dense-fp32"))
    summary = stub.CloseRound(agg_pb.CloseRoundRequest(run_id=cfg.run_id, round_id=0))
    # Assert
    r1, r2, r3 = cut_stream.statuses[0], cut_container.statuses[0], bad_shape.statuses[0]
    assert not r1.accepted and r1.reason == f"truncated: stream ended after {len(data) // 2} of {len(data)} bytes"
    assert not r2.accepted and r2.reason.startswith("malformed:") and "truncated" in r2.reason
    assert not r3.accepted and r3.reason.startswith("malformed:") and "shape" in r3.reason
    assert summary.accepted == 0 and summary.new_version == 1


def test_serve_server_validates_accept_codecs(redis_url, monkeypatch, capsys):
    # Execute: flag, then environment variable
    monkeypatch.delenv("FEDSEQ_ACCEPT_ENCODINGS", raising=False)
    rc = cli_main(["serve-server", "--accept-codecs", "dense-fp32,bogus", "--store-url", redis_url])
    err = capsys.readouterr().err
    monkeypatch.setenv("FEDSEQ_ACCEPT_CODECS", "zstd-fp8")
    rc_env = cli_main(["serve-server", "--store-url", redis_url])
    err_env = capsys.readouterr().err
    # Assert
    assert rc == 2 and "--accept-codecs" in err and "'bogus'" in err and "sparse-fp16" in err
    assert rc_env == 2 and "FEDSEQ_ACCEPT_CODECS" in err_env and "'zstd-fp8'" in err_env


class _Built(Exception):
    """Raised by the stand-in for server.app.build: the settings serve-server would start a server with."""


def _serve_server(monkeypatch, capsys, argv: list[str], env: dict[str, str]) -> tuple[object, str]:
    """What ``fedseq serve-server ARGV`` under ``env`` makes of the accepted codecs: the settings'
    ``accept_codecs`` (or the exit code when it refuses) and its stderr; it starts no server."""
    import server.app

    def build(settings):
        raise _Built(settings)

    monkeypatch.setattr(server.app, "build", build)
    for var in ("FEDSEQ_ACCEPT_CODECS", "FEDSEQ_ACCEPT_ENCODINGS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    try:
        got: object = cli_main(["serve-server", "--insecure", *argv])
    except _Built as built:
        got = built.args[0].accept_codecs
    return got, capsys.readouterr().err


@pytest.mark.parametrize("argv, env, accepted, warned", [
    # the new names, and neither (all codecs): no warning
    (["--accept-codecs", "dense-fp32"], {}, ("dense-fp32",), None),
    ([], {"FEDSEQ_ACCEPT_CODECS": "sparse-fp32"}, ("sparse-fp32",), None),
    ([], {}, codec.CODEC_NAMES, None),
    # the old names still work, and say they are deprecated
    (["--accept-encodings", "dense-fp32"], {}, ("dense-fp32",), "--accept-encodings is deprecated; use --accept-codecs"),
    ([], {"FEDSEQ_ACCEPT_ENCODINGS": "sparse-fp32,dense-fp32"}, ("sparse-fp32", "dense-fp32"),
     "FEDSEQ_ACCEPT_ENCODINGS is deprecated; use FEDSEQ_ACCEPT_CODECS"),
    # both names with the same codecs, or a flag over the old variable (flags win)
    (["--accept-codecs", "dense-fp32,sparse-fp32", "--accept-encodings", "sparse-fp32, dense-fp32"], {},
     ("dense-fp32", "sparse-fp32"), "--accept-encodings is deprecated"),
    ([], {"FEDSEQ_ACCEPT_CODECS": "int8-row", "FEDSEQ_ACCEPT_ENCODINGS": "int8-row"}, ("int8-row",),
     "FEDSEQ_ACCEPT_ENCODINGS is deprecated"),
    (["--accept-codecs", "dense-fp32"], {"FEDSEQ_ACCEPT_ENCODINGS": "sparse-fp32"}, ("dense-fp32",),
     "FEDSEQ_ACCEPT_ENCODINGS is deprecated"),
], ids=["new-flag", "new-env", "default", "old-flag", "old-env", "both-flags-agree", "both-envs-agree",
        "flag-over-old-env"])
def test_serve_server_reads_the_deprecated_accept_encodings_names(redis_url, monkeypatch, capsys, argv, env,
                                                                   accepted, warned):
    # Execute
    got, err = _serve_server(monkeypatch, capsys, [*argv, "--store-url", redis_url], env)
    # Assert: the codecs the server would accept, and one deprecation line when an old name was given
    assert got == accepted, err
    if warned:
        assert warned in err and len([line for line in err.splitlines() if "deprecated" in line]) == 1, err
    else:
        assert "deprecated" not in err, err


@pytest.mark.parametrize("argv, env, names", [
    (["--accept-codecs", "dense-fp32", "--accept-encodings", "sparse-fp32"], {},
     ("--accept-codecs 'dense-fp32'", "--accept-encodings 'sparse-fp32'")),
    ([], {"FEDSEQ_ACCEPT_CODECS": "dense-fp32", "FEDSEQ_ACCEPT_ENCODINGS": "dense-fp32,sparse-fp32"},
     ("FEDSEQ_ACCEPT_CODECS 'dense-fp32'", "FEDSEQ_ACCEPT_ENCODINGS 'dense-fp32,sparse-fp32'")),
], ids=["flags", "envs"])
def test_serve_server_refuses_old_and_new_accept_names_that_disagree(redis_url, monkeypatch, capsys, argv, env,
                                                                      names):
    # Execute
    rc, err = _serve_server(monkeypatch, capsys, [*argv, "--store-url", redis_url], env)
    # Assert: a configuration error naming both, and which one to keep
    assert rc == 2 and "configuration error" in err and "disagree" in err, err
    assert all(n in err for n in names) and "give only " + names[0].split()[0] in err, err


def test_config_rejects_unknown_codec_and_compression():
    with pytest.raises(ConfigError, match="codec must be one of"):
        replace(TINY, codec="sparse-fp8")
    with pytest.raises(ConfigError, match="compression must be one of"):
        replace(TINY, compression="brotli")


def test_refused_train_request_uploads_nothing(aggregator, redis_url):
    """A Train task whose encoding is not in its accepted list (or whose list is empty), run as the
    worker's stream runs it."""
    from client.service import benign_population
    from client.worker import ModelSource, WorkerTasks, run_task
    from fedseq.v1 import worker_pb2

    # Prepare
    stub, servicer = aggregator()
    cfg = replace(TINY, run_id="direct", codec="dense-fp32")
    tokens = _open(stub, cfg, [0, 1])
    w = WorkerTasks("w")
    w.attach(cfg.run_id, benign_population(cfg, None), ModelSource(cfg.run_id, redis_url, ""), "127.0.0.1:1")
    errors = []
    for accepted in (["sparse-fp32"], []):
        # Execute
        result = run_task(w, worker_pb2.Task(task_id=7, train=worker_pb2.TrainRequest(
            run_id=cfg.run_id, round_id=0, model_version=0,
            deadline_unix=time.time() + 60, encoding="dense-fp32", accepted_encodings=accepted,
            assignments=[common_pb2.Assignment(user_id=u, token=t) for u, t in tokens.items()])))
        errors.append(result)
    # Assert
    assert all(r.task_id == 7 and r.WhichOneof("reply") == "error" for r in errors)
    assert all(r.error.code == "INVALID_ARGUMENT" for r in errors)
    assert "encoding refused" in errors[0].error.details and "['sparse-fp32']" in errors[0].error.details
    assert "accepted_encodings is empty" in errors[1].error.details
    assert w.stats["users_trained"] == 0 and servicer.round is not None and not servicer.round.updates


def test_a_worker_sends_pieces_as_they_come_and_a_failed_piece_fails_the_call(redis_url):
    """A worker sends each computed piece while the next is computed; when a later piece fails,
    the users sent before are in the round, the call fails with the error, and the worker is free
    for the next call."""
    from dataclasses import replace as dc_replace

    from client.service import benign_population
    from client.worker import ModelSource, WorkerTasks, run_task
    from fedseq.v1 import worker_pb2

    # Prepare: a population whose pieces are its users' real updates, in pieces of 2; the third
    # piece fails (the first call only)
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id))
    agg = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], port=0,
                  host="127.0.0.1").start()
    stub = agg_grpc.AggregatorStub(channel(f"127.0.0.1:{agg.port}"))
    cfg = replace(TINY, run_id="pieces", codec="sparse-fp32")
    users = [0, 1, 2, 3, 4, 5, 6]
    hosted = benign_population(cfg, None)
    weights = _train_weights(hosted, users)
    tokens = _open(stub, cfg, users, weights=weights)
    calls = []

    def pieces(params, ids, round_id):
        calls.append(list(ids))
        for k, i in enumerate(range(0, len(ids), 2)):
            if k == 2 and len(calls) == 1:
                raise RuntimeError("piece 3 failed")
            yield hosted.compute(params, ids[i:i + 2], round_id)

    w = WorkerTasks("w")
    w.attach(cfg.run_id, dc_replace(hosted, compute_pieces=pieces), ModelSource(cfg.run_id, redis_url, ""),
             f"127.0.0.1:{agg.port}")

    def train(ids):  # the task as the worker's stream runs it
        return run_task(w, worker_pb2.Task(task_id=1, train=worker_pb2.TrainRequest(
            run_id=cfg.run_id, round_id=0, model_version=0, deadline_unix=time.time() + 60,
            encoding="sparse-fp32", accepted_encodings=["sparse-fp32"],
            assignments=[common_pb2.Assignment(user_id=u, token=tokens[u], weight=weights[u]) for u in ids])))

    try:
        # Execute: the failing call, then the users it did not send
        failed = train(users)
        landed = set(servicer.round.updates)
        reply = train([u for u in users if u not in landed]).train
    finally:
        agg.stop(0)
    # Assert: the first two pieces landed, the error names the failure, the retry sent the rest
    assert failed.WhichOneof("reply") == "error" and failed.error.code == "INTERNAL"
    assert landed == {0, 1, 2, 3} and "piece 3 failed" in failed.error.details
    assert all(s.accepted for s in reply.statuses) and len(reply.statuses) == 3
    assert set(servicer.round.updates) == set(users)
    assert {"compute", "encode", "upload", "model"} <= set(reply.timings)


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_a_failed_upload_leaves_no_thread_waiting_for_pieces(redis_url, monkeypatch):
    """The aggregator cannot be reached while the worker is still computing: the call fails
    (UNAVAILABLE, after the deadline's floor), the computation stops at its next piece, and no
    gRPC thread stays blocked waiting for pieces that will never come."""
    import threading
    from dataclasses import replace as dc_replace

    from client import worker as worker_mod
    from client.service import benign_population
    from client.worker import ModelSource, TaskError, WorkerTasks
    from fedseq.v1 import worker_pb2

    monkeypatch.setattr(worker_mod, "UPLOAD_FLOOR_S", 1.0)  # 5 s in service: the same path, sooner

    # Prepare: a model in the store, an aggregator address nobody listens on, slow pieces
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id))
    agg = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], port=0,
                  host="127.0.0.1").start()
    cfg = replace(TINY, run_id="gone", codec="sparse-fp32")
    tokens = _open(agg_grpc.AggregatorStub(channel(f"127.0.0.1:{agg.port}")), cfg, [0, 1, 2])
    dead = f"127.0.0.1:{agg.port}"
    agg.stop(0)  # the round's model stays in Redis; the aggregator is gone
    hosted = benign_population(cfg, None)
    computed = []

    def pieces(params, ids, round_id):
        for u in ids:
            time.sleep(2.0)  # the call's deadline (its floor, 1 s here) passes while the first piece is computed
            computed.append(u)
            yield hosted.compute(params, [u], round_id)

    w = WorkerTasks("w")
    w.attach(cfg.run_id, dc_replace(hosted, compute_pieces=pieces), ModelSource(cfg.run_id, redis_url, ""), dead)
    before = set(threading.enumerate())
    # Execute
    with pytest.raises(TaskError) as e:
        w.Train(worker_pb2.TrainRequest(
            run_id=cfg.run_id, round_id=0, model_version=0, deadline_unix=time.time() + 1,
            encoding="sparse-fp32", accepted_encodings=["sparse-fp32"],
            assignments=[common_pb2.Assignment(user_id=u, token=t) for u, t in tokens.items()]))

    def waiting():  # threads the call started that are still there (the pools' own threads stay by design)
        return [t.name for t in threading.enumerate() if t not in before and not t.name.startswith("ThreadPool")]

    deadline = time.time() + 5
    while waiting() and time.time() < deadline:
        time.sleep(0.1)
    left = waiting()
    # Assert: the upload failed, the computation stopped early, and the threads it used are gone
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "upload to the aggregator" in e.value.details
    assert len(computed) == 1  # the piece in progress ends; no other starts
    assert left == []


# ---------------------------------------------------------------------------- model deltas


def test_model_patch_rebuilds_the_new_version_bit_for_bit():
    from fedseq.delta import PatchError, apply_patch, make_patch

    # Prepare: a step that changes a few item rows (one only in the sign of a zero) and every dense tensor
    s = setup(TINY)
    old = {k: v.clone() for k, v in s.layout.unflatten(s.initial_params()).items()}
    new = {k: v.clone() for k, v in old.items()}
    new["item_emb.weight"][[3, 17, 40]] += 0.25
    new["item_emb.weight"][5] = 0.0
    old["item_emb.weight"][5] = -0.0
    for k in new:
        if k not in ("item_emb.weight", "pos_emb.weight"):
            new[k] = new[k] * 1.5 + 1e-3
    # Execute
    blob = make_patch(old, new, base_version=7)
    got = apply_patch(old, blob, base_version=7)
    # Assert: bit-identical, far smaller than the whole model, and misuse fails clearly
    for k in new:
        assert np.array_equal(_bits(got[k]), _bits(new[k])), k
    full = sum(t.numel() * 4 for t in new.values())
    rows = new["item_emb.weight"].shape[0] - 4
    assert len(blob) < full - rows * 64 * 4
    with pytest.raises(PatchError, match="applies to version 7, not 6"):
        apply_patch(old, blob, base_version=6)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(PatchError, match="corrupted"):
        apply_patch(old, bytes(bad), base_version=7)


# ---------------------------------------------------------------------------- fast decode path


@pytest.mark.parametrize("encoding", codec.CODEC_NAMES)
def test_server_rows_equal_the_general_decode_on_both_paths(aggregator, encoding, monkeypatch):
    # Prepare: real updates, half in the workers' form (the server's fast path) and half with the
    # records reversed (valid, but only the general path decodes them)
    stub, servicer = aggregator()
    s = setup(TINY)
    users = list(range(8))
    ub = compute_updates(s.model, s.initial_params(), [s.dataset.train[u] for u in users], np.array(users), 0, 0,
                         TINY.local())
    cfg = replace(TINY, run_id=f"fast-{encoding}", codec=encoding)
    tokens = _open(stub, cfg, users)
    flat = codec.FlatCodec.of(s.layout.names, s.layout.shapes, encoding, frozenset(SPARSE_TABLES))
    payloads = {}
    for i, u in enumerate(users):
        if u % 2:
            payloads[u] = codec.pack(codec.encode_state(dict(reversed(s.layout.unflatten(ub.updates[i]).items())),
                                                        encoding, sparse_ok=lambda n: n in SPARSE_TABLES))
        else:
            payloads[u] = flat.encode(ub.updates[i], {"item_emb.weight": ub.item_rows[i]})
    fast_answers = []
    decode_into = codec.FlatCodec.decode_into

    def spy(self, buf, out, dirty=None):
        fast_answers.append(decode_into(self, buf, out, dirty))
        return fast_answers[-1]

    monkeypatch.setattr(codec.FlatCodec, "decode_into", spy)
    # Execute
    reply = stub.SubmitUpdates(_stream(cfg, tokens, payloads, encoding))
    # Assert: the workers' form took the fast path, the other the general one, and every row holds
    # exactly the general decode of its payload
    assert all(st.accepted for st in reply.statuses)
    assert fast_answers == [u % 2 == 0 for u in users]
    rnd = servicer.round
    for u, data in payloads.items():
        want = s.layout.flatten(codec.decode_state(codec.unpack(data)))
        assert np.array_equal(_bits(rnd.matrix[rnd.rows[u]]), _bits(want)), u
