"""A hostile peer, run as its own process by tests/test_adversary.py: it tries every action the
trust model forbids (README "Security model"; issue "Trust boundary") against real services and
prints one JSON object per line: ``{"action", "as", "code", "detail", ...}``.

Input (argv[1], JSON): ``aggregator``, ``orchestrator`` (addresses; workers listen on no port, so
there is no worker to call), ``tls_dir`` (the
run's certificates: the peer uses only the ones it is given, by name), ``other_ca_dir`` (a second
CA with its own worker certificate), ``run_id``, ``replay`` (a token seen in an earlier round:
``{"round", "user", "token"}``), ``redis`` (``host:port``) and ``redis_worker_url`` (the worker
role's read-only credentials, which an attacker worker may legitimately hold).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc

from fedseq.rpc import GRPC_OPTIONS
from fedseq.tls import Identity, channel_options
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc


def emit(action: str, who: str, code: str, detail: str = "", **extra) -> None:
    print(json.dumps({"action": action, "as": who, "code": code, "detail": detail[:300], **extra}), flush=True)


def attempt(action: str, who: str, fn) -> None:
    try:
        out = fn()
    except grpc.RpcError as e:
        emit(action, who, e.code().name, e.details() or "")
        return
    extra = {}
    if isinstance(out, agg_pb.SubmitReply):
        extra = {"statuses": [{"user": s.user_id, "accepted": s.accepted, "reason": s.reason} for s in out.statuses]}
    emit(action, who, "OK", "", **extra)


def channels(spec: dict, who: str, address: str, peer_role: str) -> grpc.Channel:
    d = Path(spec["tls_dir"])
    ca = (d / "ca.pem").read_bytes()
    opts = GRPC_OPTIONS + channel_options(peer_role)
    if who == "plaintext":
        return grpc.insecure_channel(address)
    if who == "no-cert":
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=opts)
    if who == "other-ca":
        o = Path(spec["other_ca_dir"])
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(o / "rogue.key").read_bytes(),
                                             certificate_chain=(o / "rogue.pem").read_bytes())
        return grpc.secure_channel(address, creds, options=opts)
    ident = Identity.load(d, who)
    return grpc.secure_channel(address, ident.channel_credentials(), options=opts)


def main() -> int:
    spec = json.loads(sys.argv[1])
    run_id = spec["run_id"]
    t = 30.0  # a refusal is immediate; the deadline only guards a loaded machine (10 s timed out under load 9 on 2 cores)

    def agg(who):
        return agg_grpc.AggregatorStub(channels(spec, who, spec["aggregator"], "server"))

    def orch(who):
        return orchestrator_pb2_grpc.OrchestratorStub(channels(spec, who, spec["orchestrator"], "orchestrator"))

    def connect(who, **hello):
        """A worker's stream opened with ``hello``: the orchestrator's first answer (a welcome),
        or its refusal."""
        def fn():
            msg = orchestrator_pb2.WorkerMessage(hello=orchestrator_pb2.RegisterRequest(**hello))
            call = orch(who).Connect(iter([msg]), timeout=t)
            try:
                return next(call)
            finally:
                call.cancel()
        return fn

    # 1. strangers without a run certificate: refused at the TLS handshake
    for who in ("plaintext", "no-cert", "other-ca"):
        attempt("Aggregator.CloseRound", who, lambda w=who: agg(w).CloseRound(
            agg_pb.CloseRoundRequest(run_id=run_id, round_id=0), timeout=t))
        attempt("Orchestrator.Stop", who, lambda w=who: orch(w).Stop(orchestrator_pb2.StopRequest(), timeout=t))
        attempt("Orchestrator.Connect", who, connect(who, worker_id="rogue", kind="client"))

    # 2. a worker certificate (what an attacker worker holds) calling what only others may
    w = "rogue"
    for rnd in range(3):  # round control: any round id it might guess
        attempt("Aggregator.CloseRound", w, lambda r=rnd: agg(w).CloseRound(
            agg_pb.CloseRoundRequest(run_id=run_id, round_id=r), timeout=t))
    attempt("Aggregator.OpenRound", w, lambda: agg(w).OpenRound(agg_pb.OpenRoundRequest(
        run_id=run_id, round_id=999, model_version=0, lr=1.0,
        assignments=[common_pb2.Assignment(user_id=0, token="mine", weight=1)]), timeout=t))
    attempt("Aggregator.StartRun", w, lambda: agg(w).StartRun(agg_pb.StartRunRequest(
        run_id=run_id, config_json="{}", num_items=1), timeout=t))
    attempt("Orchestrator.Stop", w, lambda: orch(w).Stop(orchestrator_pb2.StopRequest(reason="rogue"), timeout=t))
    attempt("Orchestrator.GetStatus", w, lambda: orch(w).GetStatus(orchestrator_pb2.StatusRequest(), timeout=t))
    # claim users: every client shard is held, and a live worker's id cannot be taken over
    attempt("Orchestrator.Connect", w, connect(w, worker_id="rogue-claims-all", kind="client"))
    attempt("Orchestrator.Connect:stolen-id", w, connect(w, worker_id=spec["victim_id"], kind="client"))
    # uploads for users it was never assigned: forged tokens, and a token replayed from an earlier round
    forged = [agg_pb.UpdateChunk(header=agg_pb.UpdateHeader(
        run_id=run_id, round_id=r, user_id=u, token="0" * 32, num_samples=1, total_bytes=1, encoding="dense-fp32"),
        data=b"x") for r in range(spec["rounds"]) for u in (0, 1)]
    attempt("Aggregator.SubmitUpdates:forged", w, lambda: agg(w).SubmitUpdates(iter(forged), timeout=t))
    rp = spec["replay"]
    replayed = [agg_pb.UpdateChunk(header=agg_pb.UpdateHeader(
        run_id=run_id, round_id=r, user_id=rp["user"], token=rp["token"], num_samples=1, total_bytes=1,
        encoding="dense-fp32"), data=b"x") for r in range(spec["rounds"])]
    attempt("Aggregator.SubmitUpdates:replayed", w, lambda: agg(w).SubmitUpdates(iter(replayed), timeout=t))

    # 3. other roles outside their contract
    attempt("Orchestrator.Connect", "operator", connect("operator", worker_id="op", kind="client"))
    attempt("Aggregator.SubmitUpdates", "operator", lambda: agg("operator").SubmitUpdates(iter(forged[:1]), timeout=t))

    # 4. the model store: no credentials, and the workers' read-only ones
    import redis

    host, port = spec["redis"].split(":")
    try:
        redis.Redis(host=host, port=int(port), socket_timeout=5).set(f"fedseq:{run_id}:head", b"0")
        emit("redis.set", "no-credentials", "OK")
    except redis.exceptions.RedisError as e:
        emit("redis.set", "no-credentials", type(e).__name__, str(e))
    ro = redis.Redis.from_url(spec["redis_worker_url"], socket_timeout=5)
    for action, fn in [("redis.set", lambda: ro.set(f"fedseq:{run_id}:head", b"0")),
                       ("redis.get-config", lambda: ro.get(f"fedseq:{run_id}:config")),
                       ("redis.flushall", lambda: ro.flushall())]:
        try:
            fn()
            emit(action, "worker", "OK")
        except redis.exceptions.RedisError as e:
            emit(action, "worker", type(e).__name__, str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
