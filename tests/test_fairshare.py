"""An insider holding a legitimate worker certificate against the services' resources: the
per-identity fair share of every service's threads (fedseq/fairshare.py), the aggregation server's
upload slots keyed on the certificate alone, the byte-rate idle window, and the memory a flood of
valid-token garbage can make the server hold. Real gRPC servers on port 0, real mutual TLS, real
threads and streams (and, for memory, a real server process)."""

from __future__ import annotations

import functools
import os
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.worker import encode_update
from fedseq import fairshare
from fedseq.config import ExperimentConfig
from fedseq.rpc import Service, channel, chunks
from fedseq.tls import Identity, make_certs
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2
from server.app import ServerSettings, build
from server.intake import StreamLimits

ROOT = Path(__file__).resolve().parents[1]
CFG = ExperimentConfig(run_id="fair", dataset="synthetic:users=60,items=80", epochs=1, clients_per_round=16,
                       lr=0.01, num_negatives=50, codec="dense-fp32")
NAMES = {"server": "server", "orchestrator": "orchestrator", "client-0": "worker",
         **{f"attacker-{i}": "worker" for i in range(4)}}


@functools.cache
def _layout():
    from fedseq.experiment import setup

    return setup(CFG).layout


def _update(seed: int) -> bytes:
    layout = _layout()
    g = torch.Generator().manual_seed(seed)
    return encode_update({n: torch.randn(s, generator=g) for n, s in zip(layout.names, layout.shapes, strict=True)},
                         "dense-fp32")


def _msgs(run_id, user, token, data: bytes, declared: int | None = None, n: int = 3):
    header = agg_pb.UpdateHeader(run_id=run_id, round_id=0, user_id=user, token=token, num_samples=n,
                                 total_bytes=len(data) if declared is None else declared, encoding="dense-fp32")
    return [agg_pb.UpdateChunk(header=header, data=p) if i == 0 else agg_pb.UpdateChunk(data=p)
            for i, p in enumerate(chunks(data))]


class Run:
    """A TLS deployment's certificates and channels to one server, by certificate name."""

    def __init__(self, tls_dir: Path, port: int) -> None:
        self.tls_dir, self.port = tls_dir, port

    def channel(self, name: str) -> grpc.Channel:
        return channel(f"127.0.0.1:{self.port}", identity=Identity.load(self.tls_dir, name), peer="server")

    def agg(self, name: str) -> agg_grpc.AggregatorStub:
        return agg_grpc.AggregatorStub(self.channel(name))

    def open(self, run_id: str, users: list[int], weight: int = 3) -> dict[int, str]:
        """StartRun and round 0 of ``users`` (each of ``weight``), as the orchestrator."""
        orch = self.agg("orchestrator")
        orch.StartRun(agg_pb.StartRunRequest(run_id=run_id, config_json=replace(CFG, run_id=run_id).to_json(),
                                             num_items=80), timeout=30)
        tokens = {u: secrets.token_hex(16) for u in users}
        orch.OpenRound(agg_pb.OpenRoundRequest(
            run_id=run_id, round_id=0, model_version=0, deadline_unix=time.time() + 300, lr=0.5,
            assignments=[common_pb2.Assignment(user_id=u, token=t, weight=weight) for u, t in tokens.items()]),
            timeout=30)
        return tokens


@pytest.fixture
def tls(tmp_path):
    make_certs(tmp_path, NAMES)
    return tmp_path


@pytest.fixture
def server(redis_url, tls):
    """A started aggregation server as ``fedseq serve-server`` wires it (server/app.py), on mTLS;
    ``server(limits)`` -> (the Server, a :class:`Run`)."""
    started = []

    def make(limits: StreamLimits | None = None):
        srv = build(ServerSettings(redis_url, port=0, identity=Identity.load(tls, "server"),
                                   limits=limits or StreamLimits()))
        started.append(srv)
        return srv, Run(tls, srv.service.port)

    yield make
    for srv in started:
        srv.stop(0)


def _settle(share: fairshare.FairShare, who: str, want: int, timeout: float = 5.0) -> int:
    """``who``'s calls in flight once they reach ``want`` (or after ``timeout``)."""
    end = time.time() + timeout
    while share.in_flight().get(who, 0) != want and time.time() < end:
        time.sleep(0.05)
    return share.in_flight().get(who, 0)


# ---------------------------------------------------------------------------- the fair share

def _watch(health, n: int, timeout: float) -> tuple[list, list[str]]:
    """``n`` Health.Watch streams, and how each began: "OK" (its first message came) or the status."""
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout) for _ in range(n)]
    outcomes = []
    for w in watches:
        try:
            next(w)
            outcomes.append("OK")
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
    return watches, outcomes

def test_forty_health_watch_streams_of_one_certificate_are_capped_and_rounds_stay_fast(server):
    """The reported attack: 40 Health.Watch streams from one worker certificate held all 24
    threads and every round waited 45 s. Now 8 are admitted, 32 refused (counted), and the
    orchestrator's round and another worker's upload go through at once; every other call of the
    capped identity (reflection, GetModel, Check) is refused too, and its share comes back when
    its streams end."""
    # Prepare
    srv, run = server()
    share, refusals = srv.service.fair_share, srv.service.refusals
    health = health_pb2_grpc.HealthStub(run.channel("attacker-0"))
    # Execute: the 40 streams, then a round of the orchestrator and client-0 while they are held
    watches, outcomes = _watch(health, 40, timeout=120)
    t0 = time.perf_counter()
    tokens = run.open("watch", [1])
    reply = run.agg("client-0").SubmitUpdates(iter(_msgs("watch", 1, tokens[1], _update(1))), timeout=30)
    summary = run.agg("orchestrator").CloseRound(agg_pb.CloseRoundRequest(run_id="watch", round_id=0), timeout=30)
    round_seconds = time.perf_counter() - t0
    others, detail = {}, ""
    for what, call in (
            ("reflection", lambda: list(reflection_pb2_grpc.ServerReflectionStub(run.channel("attacker-0"))
                                        .ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                                            list_services="")]), timeout=10))),
            ("GetModel", lambda: list(run.agg("attacker-0").GetModel(agg_pb.GetModelRequest(run_id="watch"),
                                                                     timeout=10))),
            ("Check", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))):
        try:
            call()
            others[what] = "OK"
        except grpc.RpcError as e:
            others[what] = e.code().name
            if what == "Check":
                detail = e.details()
    held = share.in_flight().get("cn:attacker-0", 0)
    for w in watches:
        w.cancel()
    released = _settle(share, "cn:attacker-0", 0)
    after = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    # Assert
    assert Counter(outcomes) == Counter({"OK": 8, "RESOURCE_EXHAUSTED": 32})
    assert reply.statuses[0].accepted and summary.accepted == 1
    assert round_seconds < 5, f"a round took {round_seconds:.1f} s while one identity held its share"
    assert others == {"reflection": "RESOURCE_EXHAUSTED", "GetModel": "RESOURCE_EXHAUSTED",
                      "Check": "RESOURCE_EXHAUSTED"}
    assert "cn:attacker-0 already has 8 calls in flight" in detail and "--max-calls-per-identity" in detail
    counts = refusals.snapshot()
    assert counts[("/grpc.health.v1.Health/Watch", "worker", "RESOURCE_EXHAUSTED")] == 32
    assert counts[("/fedseq.v1.Aggregator/GetModel", "worker", "RESOURCE_EXHAUSTED")] == 1
    assert held == 8 and released == 0 and after == health_pb2.HealthCheckResponse.SERVING
    assert srv.service.workers == 16 + 8 + 8  # threads: every upload slot + one identity's share + control
    print(f"\n40 Watch streams of one certificate: 8 admitted, 32 refused; a round took {round_seconds:.2f} s")


def test_a_stream_request_call_is_released_when_it_ends_or_is_cancelled(server):
    """Upload streams count too, and give their slot back when they end, fail or are cancelled:
    after 8 cancelled silent uploads and 8 finished ones the identity holds nothing."""
    # Prepare
    srv, run = server(StreamLimits(max_streams=16, max_per_peer=16))
    share = srv.service.fair_share
    tokens = run.open("rel", [1, 2])
    gate = threading.Event()

    def silent():
        yield agg_pb.UpdateChunk(header=agg_pb.UpdateHeader(run_id="rel", round_id=0, user_id=9, token="x",
                                                            num_samples=3, total_bytes=10, encoding="dense-fp32"))
        gate.wait(30)

    stub = run.agg("attacker-1")
    # Execute: 8 silent streams (held), a ninth call refused, then all cancelled; then 8 short uploads
    calls = [stub.SubmitUpdates.future(silent(), timeout=60) for _ in range(8)]
    peak = _settle(share, "cn:attacker-1", 8)
    with pytest.raises(grpc.RpcError) as ninth:
        stub.SubmitUpdates(iter(_msgs("rel", 1, tokens[1], b"x")), timeout=10)
    for c in calls:
        c.cancel()
    gate.set()
    after_cancel = _settle(share, "cn:attacker-1", 0)
    for _ in range(8):
        stub.SubmitUpdates(iter(_msgs("rel", 5, "x", b"x")), timeout=10)
    after_done = share.in_flight().get("cn:attacker-1", 0)
    # Assert
    assert peak == 8 and ninth.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after_cancel == 0 and after_done == 0


def test_without_tls_the_share_is_per_host():
    """--insecure proves nothing about the peer: its host is the identity."""
    # Prepare
    svc = Service([], max_calls_per_identity=3).start()
    try:
        health = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{svc.port}"))
        # Execute
        watches, outcomes = _watch(health, 6, timeout=60)
        held = svc.fair_share.in_flight()
        for w in watches:
            w.cancel()
    finally:
        svc.stop(0)
    # Assert
    assert Counter(outcomes) == Counter({"OK": 3, "RESOURCE_EXHAUSTED": 3})
    assert held == {"host:ipv4:127.0.0.1": 3}
    assert svc.refusals.snapshot() == {("/grpc.health.v1.Health/Watch", "none", "RESOURCE_EXHAUSTED"): 3}


def test_the_identity_is_the_certificate_name_alone_never_the_address():
    """The drip attack came from 127.0.0.2-5 with one certificate: every address counts as one."""
    def ctx(peer: str, cn: bytes | None):
        auth = {"x509_common_name": [cn]} if cn else {}
        return SimpleNamespace(peer=lambda: peer, auth_context=lambda: auth)

    # Execute
    with_cert = {fairshare.identity(ctx(f"ipv4:127.0.0.{i}:{4000 + i}", b"attacker-0")) for i in range(2, 6)}
    without = [fairshare.identity(ctx(p, None)) for p in ("ipv4:127.0.0.2:1", "ipv4:127.0.0.2:2", "ipv6:[::1]:3")]
    # Assert
    assert with_cert == {"cn:attacker-0"}
    assert without == ["host:ipv4:127.0.0.2", "host:ipv4:127.0.0.2", "host:ipv6:[::1]"]


def test_the_share_must_leave_threads_to_others_and_reads_its_environment_variable(monkeypatch):
    # Prepare / Execute / Assert: a share as large as the pool is refused; the variable sets the default
    with pytest.raises(ValueError, match="never holds them all"):
        Service([], workers=8, max_calls_per_identity=8)
    monkeypatch.setenv(fairshare.ENV, "5")
    assert fairshare.default_limit() == 5
    svc = Service([])
    assert svc.fair_share.limit == 5
    svc.stop(0)
    monkeypatch.setenv(fairshare.ENV, "lots")
    with pytest.raises(ValueError, match="FEDSEQ_MAX_CALLS_PER_IDENTITY must be an integer"):
        fairshare.default_limit()
    monkeypatch.delenv(fairshare.ENV)
    assert fairshare.default_limit() == fairshare.DEFAULT_MAX_CALLS == 8


# ---------------------------------------------------------------------------- upload slots and drips
@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_drip_streams_are_cut_by_the_byte_rate_window_and_honest_slow_uploads_are_not(server):
    """A byte every 0.25 s beats a 1 s time-since-last-chunk timer forever; the byte-rate window
    (16 KiB per 1 s window here) cuts such a stream after one window. One certificate holds at most
    4 upload slots, from however many connections; an honest worker that computes between its
    updates (0.7 s pauses, several windows in all) is never cut."""
    # Prepare
    srv, run = server(StreamLimits(max_streams=16, max_per_peer=4, idle_timeout=1.0))
    bait, honest = [20, 21, 22, 23, 24, 25, 26, 27], [1, 2, 3, 4]
    tokens = run.open("drip", bait + honest)
    gate = threading.Event()
    outcomes: list[tuple[str, float]] = []

    def drip(user):
        yield agg_pb.UpdateChunk(header=agg_pb.UpdateHeader(run_id="drip", round_id=0, user_id=user,
                                                            token=tokens[user], num_samples=3, total_bytes=1000,
                                                            encoding="dense-fp32"))
        while not gate.wait(0.25):
            yield agg_pb.UpdateChunk(data=b"x")

    def attack(stub, user):
        t0 = time.monotonic()
        try:
            stub.SubmitUpdates(drip(user), timeout=30)
            outcomes.append(("OK", time.monotonic() - t0))
        except grpc.RpcError as e:
            outcomes.append((e.code().name, time.monotonic() - t0))

    def slow_honest():
        for u in honest:
            yield from _msgs("drip", u, tokens[u], _update(u))
            time.sleep(0.7)

    stubs = [run.agg("attacker-0"), run.agg("attacker-0")]  # two connections, one certificate
    # Execute: 8 drip streams, then an honest upload spread over about 3 s
    threads = [threading.Thread(target=attack, args=(stubs[i % 2], u)) for i, u in enumerate(bait)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    reply = run.agg("client-0").SubmitUpdates(slow_honest(), timeout=30)
    honest_seconds = time.monotonic() - t0
    for t in threads:
        t.join(20)
    gate.set()
    summary = run.agg("orchestrator").CloseRound(agg_pb.CloseRoundRequest(run_id="drip", round_id=0), timeout=30)
    # Assert
    codes = Counter(code for code, _ in outcomes)
    assert codes == Counter({"RESOURCE_EXHAUSTED": 4, "CANCELLED": 4}), outcomes
    assert all(seconds < 3.5 for code, seconds in outcomes if code == "CANCELLED"), outcomes
    assert honest_seconds > 2.5 and [s.accepted for s in reply.statuses] == [True] * 4
    assert summary.refused["busy"] == 4 and summary.refused["idle"] == 4 and summary.accepted == 4
    print(f"\ndrip: cut after {max(s for c, s in outcomes if c == 'CANCELLED'):.1f} s; honest upload of "
          f"{honest_seconds:.1f} s accepted")


# ---------------------------------------------------------------------------- memory
def _vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _serve(zygote, redis_url: str, tls: Path, port_file: Path):
    """A real ``fedseq serve-server`` process on mTLS (its port goes to ``port_file``, its log next
    to it), forked by the session's zygote as ``fedseq run`` forks it (cli/zygote.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    return zygote.spawn(port_file.stem, ["serve-server", "--port", "0", "--store-url", redis_url, "--tls-dir",
                                         str(tls), "--port-file", str(port_file)], env,
                        port_file.with_suffix(".log"))


def _flood(proc, port_file: Path, tls: Path, run_id: str, valid: bool, size: int):
    """16 concurrent uploads of ``size`` bytes of garbage from 4 attacker certificates against the
    server ``proc``, under the valid tokens of 16 assigned users (``valid``) or as unassigned users
    (refused from the header: nothing of them is ever buffered). Half declare ``size``, half the
    run's limit. -> (replies, round summary, resident MB before, peak resident MB after)."""
    end = time.time() + 120
    while not port_file.exists() and proc.poll() is None and time.time() < end:
        time.sleep(0.1)
    assert port_file.exists(), port_file.with_suffix(".log").read_text()
    run = Run(tls, int(port_file.read_text()))
    users = list(range(16))
    tokens = run.open(run_id, users + [99])
    warm = run.agg("client-0").SubmitUpdates(iter(_msgs(run_id, 99, tokens[99], _update(99))), timeout=30)
    assert warm.statuses[0].accepted
    limit, garbage = _limit(), os.urandom(1 << 20)
    channels = [run.channel(f"attacker-{i}") for i in range(4)]  # connected before the flood: 4 streams each
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)
    stubs = [agg_grpc.AggregatorStub(ch) for ch in channels]

    def upload(u):
        user, token = (u, tokens[u]) if valid else (1000 + u, "x")
        header = _msgs(run_id, user, token, b"", size if u % 2 else limit)[0].header

        def stream():  # paced (160 MB/s in all), as the server reads: what grows is held, not queued in transit
            for i in range(size >> 20):
                yield agg_pb.UpdateChunk(header=header, data=garbage) if i == 0 else agg_pb.UpdateChunk(data=garbage)
                time.sleep(0.1)

        return stubs[u % 4].SubmitUpdates(stream(), timeout=120)

    base = _vm(proc.pid, "VmHWM")
    replies: list = [None] * 16
    threads = [threading.Thread(target=lambda u=u: replies.__setitem__(u, upload(u))) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    peak = _vm(proc.pid, "VmHWM")
    summary = run.agg("orchestrator").CloseRound(agg_pb.CloseRoundRequest(run_id=run_id, round_id=0), timeout=30)
    return replies, summary, base, peak


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_valid_token_garbage_costs_a_real_server_no_more_memory_than_garbage_it_never_buffers(redis_url, tls,
                                                                                               tmp_path, zygote):
    """The reported attack: 16 x 60 MiB of garbage under valid tokens grew the server by 1.66 GB
    (a 64 MiB limit for a 0.4 MB update, every update buffered whole, pieces joined). Now the
    limit is the run's largest honest update (+10 %): here half of 16 uploads of 24 MiB (the old
    server would have held 384 MB of them) declare 24 MiB (refused from the header), half declare
    the limit and send 24 MiB (refused at the first byte beyond it). The two floods run at once,
    each against its own server.
    The server process's peak resident memory grows by less than 50 MB more than under the same
    flood from unassigned users, whose data no code of the server ever holds: what remains is
    gRPC's own receive path (it grows with the volume and concurrency of any stream, measured in
    the report below), not update buffers."""
    # Prepare: two real server processes, one per flood
    size = 24 << 20
    files = {kind: tmp_path / f"{kind}.port" for kind in ("valid", "never")}
    procs = {kind: _serve(zygote, redis_url, tls, f) for kind, f in files.items()}
    try:
        # Execute: both floods at once (each server's peak is its own process's)
        with ThreadPoolExecutor(2) as pool:
            futures = {kind: pool.submit(_flood, procs[kind], files[kind], tls, f"mem-{kind}", kind == "valid", size)
                       for kind in procs}
            results = {kind: f.result() for kind, f in futures.items()}
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
    # Assert: every garbage upload refused, all of it read; the valid-token flood cost no more memory
    replies, summary, base, peak = results["valid"]
    assert all(r is not None and [s.reason.split(":")[0] for s in r.statuses] == ["oversize"] for r in replies)
    assert all(r.bytes_received > size for r in replies)
    assert summary.refused["oversize"] == 16 and summary.accepted == 1
    never = results["never"]
    assert never[1].refused["unassigned"] == 16 and all(r is not None for r in never[0])
    growth, baseline = peak - base, never[3] - never[2]
    assert growth - baseline < 50, f"valid-token garbage grew the server {growth:.0f} MB, unassigned {baseline:.0f} MB"
    print(f"\n16 x {size >> 20} MiB of garbage: the server's peak RSS grew {growth:.0f} MB under valid tokens, {baseline:.0f} MB "
          f"from unassigned users (never buffered); update limit {_limit()} bytes")


def test_sixteen_valid_token_uploads_hold_at_most_sixteen_limits(redis_url):
    """What the server itself buffers for 16 concurrent valid-token uploads of garbage three times
    the run's limit: one buffer each, of at most the limit, dropped at the first byte beyond it."""
    from fedseq.store import RedisStore
    from server.service import AggregatorServicer

    # Prepare: an insecure server (one host: one identity) that admits all 16 streams
    servicer = AggregatorServicer(lambda run_id: RedisStore.from_url(redis_url, run_id),
                                  limits=StreamLimits(max_streams=16, max_per_peer=16))
    svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], workers=40,
                  max_calls_per_identity=20).start()
    try:
        stub = agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}"))
        stub.StartRun(agg_pb.StartRunRequest(run_id="held", config_json=replace(CFG, run_id="held").to_json(),
                                             num_items=80))
        tokens = {u: secrets.token_hex(16) for u in range(16)}
        stub.OpenRound(agg_pb.OpenRoundRequest(
            run_id="held", round_id=0, model_version=0, deadline_unix=time.time() + 300, lr=0.5,
            assignments=[common_pb2.Assignment(user_id=u, token=t, weight=3) for u, t in tokens.items()]))
        limit = servicer.update_limit
        garbage = os.urandom(3 * limit)
        gate = threading.Barrier(16)

        def upload(u):
            msgs = _msgs("held", u, tokens[u], garbage, declared=limit)
            for m in msgs:  # 64 KiB pieces: every stream holds a partly filled buffer at once
                for i in range(0, len(m.data), 64 << 10):
                    yield agg_pb.UpdateChunk(header=m.header, data=m.data[i:i + (64 << 10)]) if i == 0 and \
                        m.HasField("header") else agg_pb.UpdateChunk(data=m.data[i:i + (64 << 10)])
                    if i == 4 * (64 << 10):
                        gate.wait(30)

        # Execute
        replies = []
        threads = [threading.Thread(target=lambda u=u: replies.append(stub.SubmitUpdates(upload(u), timeout=60)))
                   for u in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        svc.stop(0)
    # Assert: all refused "oversize"; at most 16 buffers of the limit were ever held, none is left
    assert len(replies) == 16 and all(r.statuses[0].reason.startswith("oversize:") for r in replies)
    assert 0 < servicer.peak_buffered <= 16 * limit and servicer.buffered == 0
    print(f"\nheld at most {servicer.peak_buffered} bytes ({servicer.peak_buffered / limit:.1f} limits of {limit})")
    assert limit < 600_000  # the run's limit, not the 64 MiB cap


def _limit() -> int:
    from server.intake import update_limit

    return update_limit(_layout(), "dense-fp32", 64 << 20)
