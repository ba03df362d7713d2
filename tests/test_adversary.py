"""The trust boundary (README "Security model"), tried by a real hostile peer: its own process
(tests/rogue_peer.py) with no certificate, a certificate of another CA, or an ordinary worker
certificate (what an attacker worker holds), against real services on mutual TLS and a real Redis
with per-role users. Every action outside the Worker contract must be refused with the right
status, counted, and leave the run's results exactly as an undisturbed run's."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from _federation import CountingAggregator, Federation

from client.worker import WorkerTasks
from fedseq.authz import POLICY
from fedseq.config import ExperimentConfig
from fedseq.metrics import KS, MetricSums
from fedseq.metrics import sums_to_proto as to_proto
from fedseq.redis_server import RedisServer
from fedseq.rpc import Service, channel
from fedseq.tls import Identity, TLSError, cert_role, make_certs
from fedseq.v1 import aggregator_pb2, orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2
from orchestrator.service import check_eval_sums

ROOT = Path(__file__).resolve().parents[1]
# 30 users in 4 rounds of at most 8: a run's cost is its user updates, and 4 rounds are what the
# rogue peer needs (an earlier round to replay, the round it acts in, a later one to forge)
USERS = 30
TINY = ExperimentConfig(run_id="t", dataset=f"synthetic:users={USERS},items=80", epochs=1, clients_per_round=8,
                        lr=0.01, num_negatives=50, eval_every=1)
METRICS = ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30")


@pytest.fixture(scope="module")
def acl_redis():
    server = RedisServer(acl=True).start()
    try:
        yield server
    finally:
        server.stop()


def _urls(server: RedisServer) -> dict[str, str]:
    return {r: server.url_for(r) for r in ("server", "orchestrator", "worker")}


class HoldingAggregator(CountingAggregator):
    """Records each round's tokens, and holds CloseRound of round ``hold`` until ``release`` is set,
    so that the hostile peer acts while a round is open."""

    hold = 2

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.tokens: dict[int, dict[int, str]] = {}
        self.holding = threading.Event()
        self.release = threading.Event()

    def OpenRound(self, request, context):
        self.tokens[request.round_id] = {a.user_id: a.token for a in request.assignments}
        return super().OpenRound(request, context)

    def CloseRound(self, request, context):
        if request.round_id == self.hold:
            self.holding.set()
            self.release.wait(120)
        return super().CloseRound(request, context)


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_a_rogue_peer_is_refused_everything_and_the_run_is_undisturbed(tmp_path, acl_redis):
    # Prepare: an undisturbed run, then the same run (same seed) with a rogue peer acting mid-round
    calm = Federation(_urls(acl_redis), replace(TINY, run_id="calm"), workers=2, tls_dir=tmp_path / "calm-tls")
    try:
        calm.run()
        assert calm.orch.state == "done", calm.orch.message
        want = [{k: e[k] for k in METRICS} for e in calm.orch.epochs]
    finally:
        calm.close()
    fed = Federation(_urls(acl_redis), replace(TINY, run_id="storm"), workers=2, tls_dir=tmp_path / "tls",
                     aggregator=HoldingAggregator)
    try:
        fed.identity("rogue", "worker")  # the ordinary worker certificate an attacker worker holds
        make_certs(tmp_path / "other-ca", {"rogue": "worker"})
        agg: HoldingAggregator = fed.agg  # type: ignore[assignment]
        fed.orch.start()
        assert agg.holding.wait(60), "round 2 never closed"
        spec = {"aggregator": fed.aggregator, "orchestrator": fed.orchestrator,
                "victim_id": "w0", "tls_dir": str(tmp_path / "tls"), "other_ca_dir": str(tmp_path / "other-ca"),
                "run_id": "storm", "rounds": 4, "redis": f"127.0.0.1:{acl_redis.port}",
                "redis_worker_url": acl_redis.url_for("worker"),
                "replay": {"round": 0, "user": next(iter(agg.tokens[0])), "token": next(iter(agg.tokens[0].values()))}}
        # Execute: the hostile peer in its own process
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "rogue_peer.py"), json.dumps(spec)],
                              capture_output=True, text=True, timeout=400, cwd=ROOT)
        agg.release.set()
        fed.orch.join(120)
        # Assert: the rogue got nothing
        assert proc.returncode == 0, proc.stderr[-3000:]
        tried = [json.loads(line) for line in proc.stdout.splitlines()]
        got = {(t["action"], t["as"]): t for t in tried}
        for who in ("plaintext", "no-cert", "other-ca"):
            for action in ("Aggregator.CloseRound", "Orchestrator.Stop", "Orchestrator.Connect"):
                assert got[(action, who)]["code"] == "UNAVAILABLE", (action, who)
        denied = [t for t in tried if t["code"] == "PERMISSION_DENIED"]
        assert {(t["action"], t["as"]) for t in denied} == {
            ("Aggregator.CloseRound", "rogue"), ("Aggregator.OpenRound", "rogue"), ("Aggregator.StartRun", "rogue"),
            ("Orchestrator.Stop", "rogue"), ("Orchestrator.GetStatus", "rogue"), ("Orchestrator.Connect", "operator"),
            ("Aggregator.SubmitUpdates", "operator"),
            # a worker certificate that is not on the run's roster connects as nothing (tests/test_roster.py)
            ("Orchestrator.Connect", "rogue"), ("Orchestrator.Connect:stolen-id", "rogue")}
        assert all("may not call" in t["detail"] for t in denied if not t["action"].startswith("Orchestrator.Connect")
                   or t["as"] != "rogue")
        assert "not on this run's roster" in got[("Orchestrator.Connect", "rogue")]["detail"]
        assert "not on this run's roster" in got[("Orchestrator.Connect:stolen-id", "rogue")]["detail"]
        for action in ("Aggregator.SubmitUpdates:forged", "Aggregator.SubmitUpdates:replayed"):
            statuses = got[(action, "rogue")]["statuses"]
            assert statuses and not any(s["accepted"] for s in statuses), action
        replayed = got[("Aggregator.SubmitUpdates:replayed", "rogue")]["statuses"]
        assert replayed[0]["reason"].startswith("stale:")  # its own round is closed
        assert got[("redis.set", "no-credentials")]["code"] in ("AuthenticationError", "ResponseError")
        for action in ("redis.set", "redis.get-config", "redis.flushall"):
            assert got[(action, "worker")]["code"] == "NoPermissionError", action
        # ...every refusal was counted where it happened...
        assert fed.agg_svc.refusals.total() == 3 + 2 + 1  # CloseRound x3, OpenRound, StartRun; operator's upload
        assert fed.orch_svc.refusals.total() == 3  # Stop, GetStatus (worker); Connect (operator)
        assert fed.orch.refused == {"register: roster": 2}
        held = fed.orch.store.records("rounds")[HoldingAggregator.hold]  # the round open while the rogue acted
        assert held["rejected"] == 0 and held["accepted"] == held["users"]
        assert not held["rejections"]  # forged tokens never count against an assigned user
        # every forged and replayed upload is counted in the record of the round open when it came
        uploads = got[("Aggregator.SubmitUpdates:forged", "rogue")]["statuses"] + replayed
        assert sum(held["refused"].values()) == len(uploads) == 12
        assert {"stale", "future"} <= set(held["refused"]) <= {"stale", "future", "bad-token", "unassigned"}
        # ...and the run is exactly the undisturbed one
        assert fed.orch.state == "done", fed.orch.message
        assert [{k: e[k] for k in METRICS} for e in fed.orch.epochs] == want
        assert fed.orch.results is not None and fed.orch.results["summary"]["transport"] == "mtls"
    finally:
        fed.agg.release.set()  # type: ignore[attr-defined]
        fed.close()


class LyingWorker(WorkerTasks):
    """A worker (it could be an attacker's) that reports perfect HR@10 for the users it evaluates."""

    def Evaluate(self, request):
        reply = super().Evaluate(request)
        reply.sums.CopyFrom(to_proto(MetricSums(len(request.users) * 3, 3.0 * len(request.users),
                                                1.0 * len(request.users), {k: 0.0 for k in KS})))
        return reply


def test_implausible_evaluation_sums_are_refused_and_recorded(redis_url):
    # Prepare: two workers, the first of which inflates its evaluation sums
    fed = Federation(redis_url, replace(TINY, run_id="liar"), workers=2, worker_classes=(LyingWorker,))
    try:
        # Execute
        fed.run()
        # Assert: the liar's share is refused, named and left out; the honest share is the metric
        assert fed.orch.state == "done", fed.orch.message
        row = fed.orch.epochs[-1]
        assert [r["worker"] for r in row["eval_refused"]] == ["w0"]
        assert "reports" in row["eval_refused"][0]["reason"]
        assert row["eval_users"] == USERS // 2 and row["eval_workers"] == {"w1": USERS // 2}
        assert row["hr@10"] <= 1.0
        assert fed.orch.refused["evaluation: implausible sums"] == 1
    finally:
        fed.close()


@pytest.mark.parametrize("sums, problem", [
    (MetricSums(4, 2.0, 1.0, {k: 1.0 for k in KS}), None),
    (MetricSums(5, 2.0, 1.0, {k: 1.0 for k in KS}), "reports 5 users"),
    (MetricSums(4, 4.5, 1.0, {k: 1.0 for k in KS}), "hr@10 sum 4.5"),
    (MetricSums(4, 2.0, -0.1, {k: 1.0 for k in KS}), "ndcg@10 sum -0.1"),
    (MetricSums(4, 2.0, 1.0, {k: float("nan") for k in KS}), "er@5 sum nan"),
    (MetricSums(4, 2.0, 1.0, {5: 1.0}), "ER@K for K in [5]"),
])
def test_check_eval_sums(sums, problem):
    got = check_eval_sums(sums, 4, set(KS))
    assert (got is None) if problem is None else (problem in got)


def test_every_rpc_of_the_protos_has_a_role_policy():
    from fedseq.v1 import aggregator_pb2, orchestrator_pb2

    methods = {f"/{s.full_name}/{m.name}" for mod in (aggregator_pb2, orchestrator_pb2, worker_pb2)
               for s in mod.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert "/fedseq.v1.Orchestrator/Connect" in methods
    assert methods <= set(POLICY)
    assert all(POLICY[m] for m in methods)
    # a worker offers no service: nothing dials it (its tasks come down the stream it opens)
    assert not worker_pb2.DESCRIPTOR.services_by_name


def test_certificates_carry_exactly_one_role_and_reserved_names_are_refused(tmp_path):
    made = make_certs(tmp_path, {"client-0": "worker", "server": "server"})
    assert cert_role(made["client-0"].read_bytes()) == "worker"
    assert Identity.load(tmp_path, "server").role == "server"
    assert oct((tmp_path / "client-0.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(TLSError, match="reserved"):
        make_certs(tmp_path, {"x": "worker"}, hosts=["server.fedseq"])
    with pytest.raises(TLSError, match="unknown role"):
        make_certs(tmp_path, {"x": "admin"})
    with pytest.raises(TLSError, match="fedseq certs"):
        Identity.load(tmp_path, "missing")


def test_a_worker_uploads_only_to_its_own_aggregator_and_checks_its_role(tmp_path, redis_url, monkeypatch):
    """A worker's uploads go where it was configured; a listener without a server certificate
    (here: another worker's) gets no connection, so no gradient leaves the worker."""
    import client.worker
    from fedseq import rpc

    # the worker keeps trying (wait_for_ready) until the round's deadline, but at least 5 s; 1 s
    # here: each refused TLS handshake takes milliseconds, an accepted upload as little
    monkeypatch.setattr(client.worker, "deadline_left", lambda deadline, floor=5.0: rpc.deadline_left(deadline, 1.0))
    make_certs(tmp_path, {"orchestrator": "orchestrator", "w": "worker", "impostor": "worker"})
    from fedseq.v1 import aggregator_pb2_grpc

    got_uploads: list[int] = []

    class Impostor(aggregator_pb2_grpc.AggregatorServicer):
        def SubmitUpdates(self, request_iterator, context):
            got_uploads.extend(c.header.user_id for c in request_iterator if c.HasField("header"))
            return aggregator_pb2.SubmitReply()

    impostor = Service([(aggregator_pb2_grpc.add_AggregatorServicer_to_server, Impostor(), "fedseq.v1.Aggregator")],
                       identity=Identity.load(tmp_path, "impostor"), policy={
                           "/fedseq.v1.Aggregator/SubmitUpdates": frozenset({"worker"})}).start()
    from client.service import benign_population
    from client.worker import ModelSource, TaskError
    from fedseq.v1 import common_pb2

    cfg = replace(TINY, run_id="impostor", codec="dense-fp32")
    from fedseq.experiment import setup
    from fedseq.store import RedisStore

    s = setup(cfg)
    RedisStore.from_url(redis_url, cfg.run_id).put_model(0, s.layout.unflatten(s.initial_params()))
    ident = Identity.load(tmp_path, "w")
    w = WorkerTasks("w", identity=ident)
    w.attach(cfg.run_id, benign_population(cfg, None), ModelSource(cfg.run_id, redis_url, ""),
             f"127.0.0.1:{impostor.port}")
    try:
        # Execute
        with pytest.raises(TaskError) as err:
            w.Train(worker_pb2.TrainRequest(
                run_id=cfg.run_id, round_id=0, model_version=0, deadline_unix=time.time() + 1, encoding="dense-fp32",
                accepted_encodings=["dense-fp32"], assignments=[common_pb2.Assignment(user_id=0, token="t", weight=1)]))
        # Assert: the worker's upload channel refused the impostor's certificate (until the round's
        # deadline: it waits for a real server); nothing arrived
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"upload to the aggregator 127.0.0.1:{impostor.port} failed" in err.value.details
        assert got_uploads == []
    finally:
        impostor.stop(0)


def test_services_listen_on_loopback_and_refuse_a_port_in_use():
    from fedseq.v1 import aggregator_pb2_grpc

    def service(**kw) -> Service:
        return Service([(aggregator_pb2_grpc.add_AggregatorServicer_to_server, aggregator_pb2_grpc.AggregatorServicer(),
                         "fedseq.v1.Aggregator")], **kw)

    first = service().start()
    try:
        assert first.host == "127.0.0.1"
        with pytest.raises(OSError, match="in use"):
            service(port=first.port)
    finally:
        first.stop(0)


@pytest.mark.parametrize("cmd", ["serve-server", "serve-client", "serve-orchestrator"])
def test_a_service_without_certificates_or_insecure_fails_fast(cmd, tmp_path, fedseq_cli):
    args = {"serve-server": ["--store-url", "redis://127.0.0.1:1/0"],
            "serve-client": ["--orchestrator", "127.0.0.1:1"],
            "serve-orchestrator": ["--aggregator", "127.0.0.1:1", "--store-url", "redis://127.0.0.1:1/0"]}[cmd]
    # in this process (cli.main.main's return value is the command's exit status)...
    rc, _, err = fedseq_cli(cmd, *args)
    assert rc == 2
    assert "mutual TLS needs --tls-dir" in err and "Traceback" not in err
    make_certs(tmp_path, {"server": "server"})
    if cmd != "serve-server":  # a certificate of another role is refused
        rc, _, err = fedseq_cli(cmd, *args, "--tls-dir", tmp_path, "--tls-name", "server")
        assert rc == 2 and "has role 'server'" in err


@pytest.mark.slow  # seconds of a new interpreter's imports
def test_the_real_serve_server_command_without_certificates_fails_fast():
    """The check above, once as the real command in a clean environment: exit status 2, the reason."""
    proc = subprocess.run([sys.executable, "-m", "cli.entry", "serve-server", "--store-url", "redis://127.0.0.1:1/0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "mutual TLS needs --tls-dir" in proc.stderr and "Traceback" not in proc.stderr


def test_fedseq_certs_command(tmp_path, fedseq_cli):
    rc, out, err = fedseq_cli("certs", tmp_path, "--name", "client-0:worker", "--name", "server",
                              "--hosts", "fedseq-server,10.0.0.5")
    assert rc == 0, err
    assert "client-0.pem  role worker" in out and "server.pem  role server" in out
    assert Identity.load(tmp_path, "client-0").role == "worker"
    rc, _, err = fedseq_cli("certs", tmp_path, "--name", "x:root")
    assert rc == 2 and "unknown role 'root'" in err


def test_describe_and_status_with_the_right_roles_work(tmp_path, redis_url):
    fed = Federation(redis_url, replace(TINY, run_id="roles"), workers=1, tls_dir=tmp_path)
    try:
        d = fed.orch.pool.refresh()
        assert d and d[0].ready  # a Describe down the worker's own stream
        status = fed.orch_stub.GetStatus(orchestrator_pb2.StatusRequest(), timeout=10)  # the operator's may poll
        assert status.run_id == "roles"
        # the operator's certificate may not open a worker's stream
        hello = orchestrator_pb2.WorkerMessage(hello=orchestrator_pb2.RegisterRequest(worker_id="w0"))
        with pytest.raises(grpc.RpcError) as err:
            next(fed.orch_stub.Connect(iter([hello]), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert fed.orch_svc.refusals.snapshot() == {
            ("/fedseq.v1.Orchestrator/Connect", "operator", "PERMISSION_DENIED"): 1}
    finally:
        fed.close()


def test_worker_streams_are_bounded_per_identity(tmp_path, redis_url):
    """``Connect`` holds a thread per stream and is outside the fair share, so the orchestrator
    bounds it itself: a worker certificate that opens more streams than its live one and one
    reconnect (here without ever sending a hello) is refused RESOURCE_EXHAUSTED, and the live
    worker keeps its stream."""
    import queue as queue_mod

    fed = Federation(redis_url, replace(TINY, run_id="streams"), workers=1, tls_dir=tmp_path)
    stub = orchestrator_pb2_grpc.OrchestratorStub(channel(fed.orchestrator, identity=fed.identity("w0"),
                                                          peer="orchestrator"))
    silent: queue_mod.Queue = queue_mod.Queue()

    def never():  # a request stream that sends nothing until the test ends
        silent.get()
        return
        yield

    try:
        # Prepare: w0 holds its live stream; it opens a second one and says nothing on it
        second = stub.Connect(never(), timeout=30)
        time.sleep(0.5)
        # Execute: a third
        with pytest.raises(grpc.RpcError) as err:
            next(stub.Connect(never(), timeout=30))
        # Assert
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "worker streams" in err.value.details()
        assert fed.orch.refused["register: streams"] == 1
        assert fed.orch.pool.refresh()[0].alive  # the live worker's stream is untouched
        second.cancel()
    finally:
        silent.put(None)
        silent.put(None)
        fed.close()


class RefusingWorker(WorkerTasks):
    """A worker (it could be an attacker's) that answers every Train task INVALID_ARGUMENT, the
    code of a contract error."""

    def Train(self, request):
        from client.worker import TaskError

        raise TaskError(grpc.StatusCode.INVALID_ARGUMENT, "I refuse")


def test_one_worker_refusing_its_tasks_cannot_end_the_run(redis_url):
    # Prepare: two sharded workers, the first refuses every Train task
    fed = Federation(redis_url, replace(TINY, run_id="refuser"), workers=2, worker_classes=(RefusingWorker,))
    try:
        # Execute
        fed.run()
        # Assert: the run is done; each round lost the refuser's users and names it
        assert fed.orch.state == "done", fed.orch.message
        rounds = fed.orch.store.records("rounds")
        assert rounds and all(r["failed_workers"] == ["w0"] and r["train_refused"] == ["worker w0: I refuse"]
                              for r in rounds if r["missing"])
        assert sum(r["missing"] for r in rounds) > 0
        assert all(r["accepted"] + r["rejected"] + r["missing"] == r["users"] for r in rounds)
    finally:
        fed.close()
