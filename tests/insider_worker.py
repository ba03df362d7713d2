"""A hostile *insider*: a real ``fedseq serve-attacker`` process, with the run's legitimate
certificate of its own identity (``attacker-0``), whose behaviour was replaced. Run by
tests/test_insider.py as its own process; it tries what README "Security model" says an attacker
worker cannot do, then behaves as the honest attacker worker would, and prints one JSON object per
line on stdout: ``{"act", "code", "detail", ...}`` (gRPC status of a refused call, or the per-update
statuses of an upload).

Usage: ``python tests/insider_worker.py SPEC_JSON serve-attacker FLAGS...``. SPEC keys:

``register``
    acts before the honest registration: ``claim-client`` (kind client), ``claim-shard`` (kind client
    with a client shard as the held hint), ``claim-id`` (a live benign worker's id, ``victim``).
``train``
    one act per Train call the orchestrator makes, in order (then the honest upload of the round):
    ``weight`` (num_samples 1e9), ``huge`` (every value 3e38: finite), ``nan``, ``oversize`` (declares
    60 MiB; then one that sends more than it declares), ``forged-token``, ``forged-id`` (a benign
    user's id under one of its own tokens), ``replay`` (a token of an earlier round), ``duplicate``
    (a second update of a user already accepted), ``ledger`` (50,000 fake ledger entries and absurd
    timings in the Train reply).
``takeover``
    ``{"trigger": PATH, "victim": ID, "shard": [i, n]}``: once PATH exists, register as the lost
    benign worker (kind client, its id and shard hint), then under its id as an attacker; writes
    ``PATH.done``.
``starve``
    ``{"watch": N, "drip": N, "garbage": N, "seconds": S}``: at its first Train call, while the round is
    open, N upload streams that drip one byte a second (until the server cuts them, at most S
    seconds), then N concurrent uploads of 60 MiB of garbage under the round's valid tokens, then N
    Health.Watch streams to the aggregation server held S seconds while the next rounds run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import client.app
from client import worker as worker_mod
from fedseq import codec
from fedseq.rpc import CONTROL_TIMEOUT, GRPC_OPTIONS, chunks, deadline_left
from fedseq.tls import channel_options
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_pb_grpc
from fedseq.v1 import common_pb2
from fedseq.v1 import orchestrator_pb2 as orch_pb
from fedseq.v1 import orchestrator_pb2_grpc as orch_grpc

SPEC = json.loads(sys.argv[1])
_out_lock = threading.Lock()


def emit(act: str, code: str, detail: str = "", **extra) -> None:
    with _out_lock:
        print(json.dumps({"act": act, "code": code, "detail": detail[:300], **extra}), flush=True)


def _statuses(reply) -> list[dict]:
    return [{"user": s.user_id, "accepted": s.accepted, "reason": s.reason} for s in reply.statuses]


def upload(stub, act: str, items: list[tuple[agg_pb.UpdateHeader, bytes]], timeout: float) -> None:
    """One SubmitUpdates call with ``items`` (header, data); emits the server's verdicts."""
    def gen():
        for h, data in items:
            for j, piece in enumerate(chunks(data)):
                yield agg_pb.UpdateChunk(header=h, data=piece) if j == 0 else agg_pb.UpdateChunk(data=piece)

    try:
        reply = stub.SubmitUpdates(gen(), timeout=timeout)
        emit(act, "OK", statuses=_statuses(reply))
    except grpc.RpcError as e:
        emit(act, e.code().name, e.details() or "")


# ---------------------------------------------------------------------------- registration acts
_real_connect_loop = worker_mod.connect_loop


def hostile_connect_loop(orchestrator, tasks, kind, on_config, stop, identity=None, **kw):
    stub = orch_grpc.OrchestratorStub(worker_mod.channel(orchestrator, identity=identity, peer="orchestrator"))

    def register(act: str, **fields) -> None:
        """A stream opened with a hello of ``fields``: the orchestrator's first answer, then closed."""
        req = orch_pb.RegisterRequest(worker_id=tasks.worker_id, device=tasks.device, kind=kind)
        for k, v in fields.items():
            setattr(req, k, v)
        for _ in range(60):  # the orchestrator may not listen yet
            call = stub.Connect(iter([orch_pb.WorkerMessage(hello=req)]), timeout=CONTROL_TIMEOUT)
            try:
                first = next(call)
                emit(act, "OK", shard=[first.welcome.shard_index, first.welcome.shard_count])
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    emit(act, e.code().name, e.details() or "")
                    return
                time.sleep(0.5)
            finally:
                call.cancel()

    for act in SPEC.get("register", []):
        if act == "claim-client":
            register(act, kind="client")
        elif act == "claim-shard":
            register(act, kind="client", held_index=0, held_count=int(SPEC.get("client_shards", 2)))
        elif act == "claim-id":
            register(act, worker_id=SPEC["victim"])
    take = SPEC.get("takeover")
    if take:
        def watch() -> None:
            trigger = Path(take["trigger"])
            while not trigger.exists():
                time.sleep(0.1)
            register("takeover-as-client", worker_id=take["victim"], kind="client", held_index=take["shard"][0],
                     held_count=take["shard"][1])
            register("takeover-id-as-attacker", worker_id=take["victim"], kind="attacker")
            Path(str(trigger) + ".done").write_text("done")

        threading.Thread(target=watch, daemon=True).start()
    return _real_connect_loop(orchestrator, tasks, kind, on_config, stop, identity, **kw)


client.app.connect_loop = hostile_connect_loop


# ---------------------------------------------------------------------------- Train acts
_real_train = worker_mod.WorkerTasks.Train
_acts = list(SPEC.get("train", []))
_seen: list[tuple[int, int, str]] = []  # (round, user, token) of earlier Train calls
_starved = threading.Event()


def _dense(servicer, value: float, encoding: str) -> bytes:
    """An update with every value ``value``: through the workers' encoder, or for a non-finite value
    (which the encoder refuses) dense-fp32 records whose bytes are written by hand."""
    layout = servicer.hosted.setup.layout
    vec = torch.full((layout.dim,), value if np.isfinite(value) else 1.0, dtype=torch.float32)
    if np.isfinite(value):
        return worker_mod.encode_update(layout.unflatten(vec), encoding)
    records = codec.encode_state(layout.unflatten(vec), "dense-fp32")
    return codec.pack([dataclasses.replace(r, data=np.full(len(r.data) // 4, value, dtype=np.float32).tobytes())
                       if r.dtype == "float32" else r for r in records])


def hostile_train(self, request):
    stub = self._aggregator("none")
    timeout = deadline_left(request.deadline_unix, floor=5.0)
    enc = request.encoding
    a = request.assignments[0] if request.assignments else None
    starve = SPEC.get("starve")
    if starve and not _starved.is_set() and a is not None:
        # while this round is open (the benign workers upload now): drip streams until they are cut,
        # then garbage under this round's valid tokens, then Health.Watch streams held for the next rounds
        _starved.set()
        starve_server(self.aggregator, self.identity, {"drip": starve.get("drip", 0), "seconds": 15})
        garbage(self, stub, request, int(starve.get("garbage", 0)), timeout)
        threading.Thread(target=starve_server, args=(self.aggregator, self.identity,
                                                     {"watch": starve.get("watch", 0), "seconds": starve["seconds"]}),
                         daemon=True).start()
    act = _acts.pop(0) if _acts and a is not None else None

    def header(**kw) -> agg_pb.UpdateHeader:
        fields = dict(run_id=request.run_id, round_id=request.round_id, user_id=a.user_id, token=a.token,
                      num_samples=a.weight, total_bytes=0, encoding=enc)
        fields.update(kw)
        return agg_pb.UpdateHeader(**fields)

    junk = b"\0" * 1000
    if act == "weight":
        upload(stub, act, [(header(num_samples=10**9, total_bytes=len(junk)), junk)], timeout)
    elif act in ("huge", "nan"):
        data = _dense(self, 3e38 if act == "huge" else float("nan"), enc)
        upload(stub, act, [(header(total_bytes=len(data), encoding=enc if act == "huge" else "dense-fp32"), data)],
               timeout)
    elif act == "oversize":
        upload(stub, act, [(header(total_bytes=60 << 20), junk)], timeout)
        upload(stub, act + "-sent", [(header(total_bytes=len(junk)), junk * 3)], timeout)
    elif act == "forged-token":
        upload(stub, act, [(header(token="f" * 32, total_bytes=len(junk)), junk)], timeout)
    elif act == "forged-id":
        upload(stub, act, [(header(user_id=0, total_bytes=len(junk)), junk)], timeout)
    elif act == "replay":
        if _seen:
            r, u, t = _seen[-1]
            upload(stub, act + "-stale", [(header(round_id=r, user_id=u, token=t, total_bytes=len(junk)), junk)],
                   timeout)
            upload(stub, act, [(header(user_id=u, token=t, total_bytes=len(junk)), junk)], timeout)
        else:
            _acts.insert(0, act)  # nothing seen yet: try again next call
    _seen.extend((request.round_id, x.user_id, x.token) for x in request.assignments)
    reply = _real_train(self, request)
    if act == "duplicate":
        data = _dense(self, 0.0, enc)
        upload(stub, act, [(header(total_bytes=len(data)), data)], timeout)
    if act == "ledger":
        fake = [common_pb2.ByteCount(kind=k, what="fake", direction=d, user_id=i % 50, bytes=3 * 10**12,
                                     wire_bytes=3 * 10**12, messages=1, link="worker-aggregator")
                for i, (k, d) in enumerate([("update", "up"), ("model_download", "down"), ("control", "up"),
                                            ("model_write", "internal")] * 12_500)]
        reply.ledger.extend(fake)
        reply.timings["compute"] = 1e9
        reply.timings["x" * 1000] = 5.0
        emit(act, "SENT", entries=len(fake))
    return reply


def garbage(servicer, stub, request, n: int, timeout: float) -> None:
    """``n`` concurrent uploads of 60 MiB of garbage under valid tokens of this round."""
    def one(i: int) -> None:
        a = request.assignments[i % len(request.assignments)]
        size = 60 << 20
        h = agg_pb.UpdateHeader(run_id=request.run_id, round_id=request.round_id, user_id=a.user_id, token=a.token,
                                num_samples=a.weight, total_bytes=size, encoding=request.encoding)
        small = agg_pb.UpdateHeader(run_id=request.run_id, round_id=request.round_id, user_id=a.user_id,
                                    token=a.token, num_samples=a.weight, total_bytes=1 << 20,
                                    encoding=request.encoding)
        piece = os.urandom(1 << 20)

        def gen():
            yield agg_pb.UpdateChunk(header=h if i % 2 else small, data=piece)
            for _ in range(59):
                yield agg_pb.UpdateChunk(data=piece)

        try:
            reply = stub.SubmitUpdates(gen(), timeout=timeout)
            emit("garbage", "OK", statuses=_statuses(reply)[:2])
        except grpc.RpcError as e:
            emit("garbage", e.code().name, e.details() or "")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


worker_mod.WorkerTasks.Train = hostile_train


# ---------------------------------------------------------------------------- starvation from the start
def starve_server(aggregator: str, identity, spec: dict) -> None:
    """Watch streams and drip uploads against the aggregation server, held ``seconds``."""
    end = time.time() + float(spec.get("seconds", 30))
    results: dict[str, list[str]] = {"watch": [], "drip": []}
    lock = threading.Lock()

    def watch(i: int) -> None:
        ch = worker_mod.channel(aggregator, identity=identity, peer="server")
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            for _ in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=end - time.time()):
                pass
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with lock:
            results["watch"].append(code)

    def drip(i: int) -> None:
        # its own connection (one channel each, a distinct option so none is shared)
        ch = grpc.secure_channel(aggregator, identity.channel_credentials(),
                                 options=[*GRPC_OPTIONS, *channel_options("server"), ("fedseq.insider", i)])
        stub = agg_pb_grpc.AggregatorStub(ch)

        def gen():
            yield agg_pb.UpdateChunk(header=agg_pb.UpdateHeader(run_id="drip", round_id=0, user_id=i, token="x",
                                                                total_bytes=10**6, encoding="dense-fp32"),
                                     data=b"x")
            while time.time() < end:
                time.sleep(1.0)
                yield agg_pb.UpdateChunk(data=b"x")

        try:
            stub.SubmitUpdates(gen(), timeout=end - time.time() + 5)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with lock:
            results["drip"].append(code)

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(int(spec.get("watch", 0)))]
    threads += [threading.Thread(target=drip, args=(i,), daemon=True) for i in range(int(spec.get("drip", 0)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind, codes in results.items():
        if codes:
            emit(kind, "DONE", codes=sorted(codes))


if __name__ == "__main__":
    np.seterr(all="ignore")
    from cli.main import main

    sys.exit(main(sys.argv[2:]))
