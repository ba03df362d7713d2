"""The communication ledger against the real components: orchestrated runs (real gRPC servers on
port 0, a real Redis server process, real model computations), sizes checked against what the
servicers and a TCP proxy measure independently, and the report built from the bundles."""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import threading
import time
from collections import Counter, defaultdict
from dataclasses import replace

import pytest
from _federation import CountingAggregator, Federation
from _proxy import TcpProxy

from client.service import benign_population
from client.worker import ModelSource, WorkerTasks
from fedseq import ledger
from fedseq.config import ExperimentConfig
from fedseq.report import report
from fedseq.rpc import Service, channel
from fedseq.store import RedisStore
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2, worker_pb2

# 30 users, 4 rounds of at most 8 per epoch, 2 epochs: the cost of a run is its user updates (encode,
# upload, decode), so few users, and still several rounds per epoch and more than one epoch
USERS, EPOCHS = 30, 2
TINY = ExperimentConfig(run_id="led", dataset=f"synthetic:users={USERS},items=80", epochs=EPOCHS, clients_per_round=8,
                        lr=0.01, num_negatives=50, eval_every=1, codec="sparse-fp32")


def _run(redis_url: str, cfg: ExperimentConfig, out) -> tuple[Federation, dict]:
    fed = Federation(redis_url, cfg, workers=2, out_dir=out)
    try:
        orch = fed.run(180)
        assert orch.state == "done", orch.message
    finally:
        fed.close()
    return fed, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(redis_server, tmp_path_factory):
    """Three finished runs of the same experiment: sparse-fp32 uncompressed, dense-fp32 with gzip,
    and sparse-fp32 with model deltas."""
    base = tmp_path_factory.mktemp("ledger-runs")
    sparse = _run(redis_server.url, replace(TINY, run_id="led-sparse"), base / "sparse")
    dense = _run(redis_server.url, replace(TINY, run_id="led-dense-gz", codec="dense-fp32", compression="gzip"),
                 base / "dense-gz")
    delta = _run(redis_server.url, replace(TINY, run_id="led-delta", model_delta=True), base / "delta")
    return {"sparse": (*sparse, base / "sparse"), "dense-gz": (*dense, base / "dense-gz"),
            "delta": (*delta, base / "delta")}


# ---------------------------------------------------------------------------- sizes


def test_wire_size_follows_grpc_message_compression():
    # Prepare
    compressible = b"fedseq " * 2000
    incompressible = os.urandom(5000)
    # Execute / Assert: gzip of the body, kept only when smaller (else gRPC sends it uncompressed)
    assert ledger.wire_size(compressible, "gzip") == len(gzip.compress(compressible, compresslevel=6, mtime=0))
    assert ledger.wire_size(compressible, "gzip") < len(compressible) // 10
    assert ledger.wire_size(incompressible, "gzip") == len(incompressible)
    assert ledger.wire_size(compressible, "none") == len(compressible)
    assert ledger.wire_size(b"", "gzip") == 0
    with pytest.raises(ValueError, match="unknown compression"):
        ledger.wire_size(b"x", "brotli")


def test_ledger_sums_and_skips_invalid_reported_counts():
    # Prepare: a round's entries measured here and counts reported by a peer, two of them invalid
    led = ledger.Ledger("r", round=3, epoch=1)
    led.add_message(common_pb2.Assignment(user_id=5, token="abcdef"), kind="control", direction="down",
                    link="worker-orchestrator", what="x", worker="w")
    reported = [common_pb2.ByteCount(kind="update", direction="up", user_id=7, bytes=100, wire_bytes=60, messages=2),
                common_pb2.ByteCount(kind="bogus", direction="up", user_id=-1, bytes=5, wire_bytes=5, messages=1),
                common_pb2.ByteCount(kind="update", direction="up", user_id=8, bytes=-4, wire_bytes=0, messages=1)]
    # Execute
    problems = led.add_counts(reported, worker="w")
    t = ledger.totals(led.entries)
    # Assert
    assert len(problems) == 2 and "kind" in problems[0] and ">= 0" in problems[1]
    size = common_pb2.Assignment(user_id=5, token="abcdef").ByteSize()
    assert t["bytes"] == size + 100 and t["wire_bytes"] == size + 60
    assert t["bytes_up"] == 100 and t["bytes_down"] == size and t["updates"] == 1 and t["bytes_per_update"] == 100
    assert ledger.by(led.entries, "worker")["w"]["up"] == 100
    assert ledger.per_round(led.entries) == [{
        "round": 3, "epoch": 1, "bytes_up": 100, "bytes_down": size, "bytes_internal": 0, "wire_up": 60,
        "wire_down": size, "wire_internal": 0, "updates": 1, "update_bytes": 100, "update_wire_bytes": 60,
        "bytes_per_update": 100.0, "wire_per_update": 60.0}]


# ---------------------------------------------------------------------------- orchestrated runs


@pytest.mark.parametrize("which", ["sparse", "dense-gz", "delta"])
def test_ledger_totals_equal_the_sum_of_their_parts(runs, redis_server, which):
    # Prepare
    fed, results, out = runs[which]
    entries = ledger.read_jsonl(out / "ledger.jsonl")
    totals = results["ledger"]["totals"]
    # Assert: the stored stream is the file
    assert RedisStore.from_url(redis_server.url, fed.cfg.run_id).records("ledger") == entries
    # every total is the sum of the entries, and every breakdown sums to the total
    assert totals["bytes"] == sum(e["bytes"] for e in entries)
    assert totals["wire_bytes"] == sum(e["wire_bytes"] for e in entries)
    for split in ("by_kind", "by_direction"):
        assert sum(v["bytes"] for v in totals[split].values()) == totals["bytes"]
        assert sum(v["wire_bytes"] for v in totals[split].values()) == totals["wire_bytes"]
    assert totals["bytes_up"] + totals["bytes_down"] + totals["bytes_internal"] == totals["bytes"]
    assert totals["bytes_up"] == sum(e["bytes"] for e in entries if e["direction"] == "up")
    assert totals["bytes_down"] == sum(e["bytes"] for e in entries if e["direction"] == "down")
    per_round = results["ledger"]["per_round"]
    for key in ("bytes_up", "bytes_down", "bytes_internal", "wire_up", "wire_down"):
        assert sum(r[key] for r in per_round) == totals[key]
    # results.json's per-epoch and summary bytes come from the ledger
    epochs = results["epochs"]
    for e in epochs:
        mine = [x for x in entries if x["epoch"] == e["epoch"]]
        assert e["bytes_up"] == sum(x["bytes"] for x in mine if x["direction"] == "up")
        assert e["bytes_down"] == sum(x["bytes"] for x in mine if x["direction"] == "down")
    assert sum(e["bytes_up"] for e in epochs) == results["summary"]["bytes_up"] == totals["bytes_up"]
    assert sum(e["bytes_down"] for e in epochs) == results["summary"]["bytes_down"] == totals["bytes_down"]
    # one update entry per user per epoch, attributed to a user, a worker and a round
    ups = [e for e in entries if e["kind"] == "update"]
    assert len(ups) == USERS * EPOCHS == totals["updates"]
    assert {e["worker"] for e in ups} == {"w0", "w1"} and all(e["user"] >= 0 for e in ups)
    assert Counter((e["round"], e["user"]) for e in ups).most_common(1)[0][1] == 1
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["bytes_up"] for r in rounds] == [
        sum(e["bytes"] for e in entries if e["round"] == r["round"] and e["direction"] == "up"
            and e["phase"] != "eval" and e["phase"] != "setup") for r in rounds]


@pytest.mark.parametrize("which", ["sparse", "dense-gz"])
def test_update_bytes_match_what_the_server_received(runs, which):
    # Prepare
    fed, _, out = runs[which]
    entries = ledger.read_jsonl(out / "ledger.jsonl")
    # Execute: the aggregator servicer counted the serialized chunks of every update it received
    server_side = dict(fed.agg.update_bytes)
    ledger_side = {(e["round"], e["user"]): e["bytes"] for e in entries if e["kind"] == "update"}
    # Assert
    assert ledger_side == server_side
    assert len(ledger_side) == USERS * EPOCHS  # every user once per epoch: not {} == {}
    assert all(v > 0 for v in ledger_side.values())


def test_update_wire_bytes_are_the_gzip_of_each_chunk(runs):
    # Prepare: recompute the wire size of one user's upload from its own serialized chunks
    _, _, out = runs["dense-gz"]
    ups = [e for e in ledger.read_jsonl(out / "ledger.jsonl") if e["kind"] == "update"]
    # Assert: compression helped, and every upload's wire size is below its serialized size
    assert all(0 < e["wire_bytes"] < e["bytes"] for e in ups)
    sparse_ups = [e for e in ledger.read_jsonl(runs["sparse"][2] / "ledger.jsonl") if e["kind"] == "update"]
    assert all(e["wire_bytes"] == e["bytes"] for e in sparse_ups)  # no compression: wire == serialized


def test_model_downloads_and_writes_match_the_store(runs, redis_server):
    # Prepare
    fed, results, out = runs["sparse"]
    entries = ledger.read_jsonl(out / "ledger.jsonl")
    writes = {int(e["what"].split(":")[1]): e["bytes"] for e in entries if e["kind"] == "model_write"}
    downloads = [e for e in entries if e["kind"] == "model_download"]
    store = RedisStore.from_url(redis_server.url, fed.cfg.run_id)
    # Assert: the aggregator wrote every version once (0 .. rounds) ...
    assert sorted(writes) == list(range(results["summary"]["rounds"] + 1))
    head = store.head()
    assert writes[head] == len(store.get_model_bytes(head)) == store.model_info(head)["nbytes"]
    # ... and each worker read each version it used exactly once (its cache serves the rest),
    # the same number of bytes the aggregator wrote
    per = Counter((e["worker"], e["what"]) for e in downloads)
    assert set(per.values()) == {1}
    for e in downloads:
        assert e["direction"] == "down" and e["link"] == "worker-store"
        assert e["bytes"] == writes[int(e["what"].split(":")[1])]
    # every version but the last trained on is read by both workers (the last one only for evaluation)
    assert {v for _, v in per} == {f"store.get model:{v}" for v in range(head + 1)}


def test_train_messages_match_what_the_workers_saw(runs):
    # Prepare
    fed, _, out = runs["sparse"]
    entries = ledger.read_jsonl(out / "ledger.jsonl")
    # Execute: each worker recorded the serialized size of its Train tasks and results
    for w in fed.workers:
        seen_req = {r: q for r, q, _ in w.train_sizes}
        seen_rep = {r: p for r, _, p in w.train_sizes}
        # Assert
        req = {e["round"]: e["bytes"] for e in entries if e["worker"] == w.worker_id
               and e["what"] == "Orchestrator.Connect train task"}
        rep = {e["round"]: e["bytes"] for e in entries if e["worker"] == w.worker_id
               and e["what"] == "Orchestrator.Connect train result"}
        assert len(req) >= 1 and req == seen_req and rep == seen_rep  # not {} == {}: it trained


def test_model_delta_reads_patches_and_trains_the_same_models(runs):
    # Prepare
    _, plain, plain_out = runs["sparse"]
    fed, delta, delta_out = runs["delta"]
    e_plain = ledger.read_jsonl(plain_out / "ledger.jsonl")
    e_delta = ledger.read_jsonl(delta_out / "ledger.jsonl")
    reads = [e for e in e_delta if e["what"].startswith("store.get patch:")]
    writes = {e["what"].split(":")[1]: e["bytes"] for e in e_delta if e["what"].startswith("store.put patch:")}
    full = {e["what"].split(":")[1]: e["bytes"] for e in e_delta if e["what"].startswith("store.put model:")}
    # Assert: every version after 0 has a patch, smaller than the version; workers read patches
    # (checked against each version's sha256) and ended with the very same models and metrics
    assert sorted(writes, key=int) == [str(v) for v in range(1, delta["summary"]["rounds"] + 1)]
    assert all(writes[v] < full[v] for v in writes)
    assert reads and sum(w.models.patches_applied for w in fed.workers) == len(reads)
    assert all(e["bytes"] == writes[e["what"].split(":")[1]] for e in reads)
    for a, b in zip(plain["epochs"], delta["epochs"], strict=True):
        for k in ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30"):
            assert a[k] == b[k], k

    def down(es):
        return sum(e["bytes"] for e in es if e["kind"] == "model_download")

    assert down(e_delta) < down(e_plain)


# ---------------------------------------------------------------------------- compression on the wire


class _CountingProxy(TcpProxy):
    """A TCP proxy that counts the bytes it forwards in each direction (the real wire)."""

    def __init__(self, target_port: int) -> None:
        self.up = self.down = 0
        self._lock = threading.Lock()
        super().__init__(target_port)

    def forward(self, conn, direction: str, data: bytes) -> bool:
        with self._lock:
            setattr(self, direction, getattr(self, direction) + len(data))
        return True


def test_gzip_upload_wire_bytes_match_a_tcp_proxy(redis_url):
    """The ledger's wire sizes are computed, not read from gRPC; a proxy between a worker and the
    aggregator shows they are what crosses the socket (plus HTTP/2 framing), with and without gzip."""
    servicer = CountingAggregator(lambda run_id: RedisStore.from_url(redis_url, run_id))
    svc = Service([(agg_grpc.add_AggregatorServicer_to_server, servicer, "fedseq.v1.Aggregator")], port=0,
                  host="127.0.0.1").start()
    agg = agg_grpc.AggregatorStub(channel(f"127.0.0.1:{svc.port}"))
    measured = {}
    try:
        for comp in ("none", "gzip"):
            # Prepare: a run, an open round of 6 users, a worker hosting them, a proxy to the aggregator
            cfg = replace(TINY, run_id=f"proxy-{comp}", codec="dense-fp32", compression=comp)
            agg.StartRun(agg_pb.StartRunRequest(run_id=cfg.run_id, config_json=cfg.to_json(), num_items=80))
            users = list(range(6))
            tokens = {u: secrets.token_hex(4) for u in users}
            hosted = benign_population(cfg, None)
            weights = {u: len(hosted.setup.dataset.train[u]) for u in users}  # the orchestrator's: training items
            agg.OpenRound(agg_pb.OpenRoundRequest(
                run_id=cfg.run_id, round_id=0, model_version=0, deadline_unix=time.time() + 60, lr=0.1,
                assignments=[common_pb2.Assignment(user_id=u, token=t, weight=weights[u]) for u, t in tokens.items()]))
            proxy = _CountingProxy(svc.port)
            w = WorkerTasks("w")
            w.attach(cfg.run_id, hosted, ModelSource(cfg.run_id, redis_url, "", comp),
                     f"127.0.0.1:{proxy.port}")
            try:
                # Execute
                reply = w.Train(worker_pb2.TrainRequest(
                    run_id=cfg.run_id, round_id=0, model_version=0,
                    deadline_unix=time.time() + 60, encoding="dense-fp32", accepted_encodings=["dense-fp32"],
                    assignments=[common_pb2.Assignment(user_id=u, token=t, weight=weights[u])
                                 for u, t in tokens.items()]))
                time.sleep(0.2)
            finally:
                proxy.close()
            ups = [c for c in reply.ledger if c.kind == "update"]
            measured[comp] = (sum(c.bytes for c in ups), sum(c.wire_bytes for c in ups), sum(c.messages for c in ups),
                              proxy.up)
            # Assert: every update accepted, and the socket carried the ledger's wire bytes plus framing
            assert all(s.accepted for s in reply.statuses) and len(ups) == 6
            raw, wire, msgs, on_socket = measured[comp]
            assert {(0, c.user_id): c.bytes for c in ups} == dict(servicer.update_bytes)
            # HTTP/2 adds a 9-byte header per (at most 16 KiB) DATA frame, plus a few headers and settings
            assert wire + 5 * msgs <= on_socket <= wire + 5 * msgs + 0.002 * wire + 2048, measured[comp]
            servicer.update_bytes.clear()
            agg.CloseRound(agg_pb.CloseRoundRequest(run_id=cfg.run_id, round_id=0))
    finally:
        svc.stop(0)
    # gzip really went over the wire: the same updates took fewer socket bytes
    assert measured["gzip"][0] == measured["none"][0]
    assert measured["gzip"][3] < 0.9 * measured["none"][3]


# ---------------------------------------------------------------------------- report


def test_report_prints_the_ledger_totals_and_plots_each_codec(runs, tmp_path):
    # Prepare
    dirs = [runs["sparse"][2], runs["dense-gz"][2]]
    totals = {k: runs[k][1]["ledger"]["totals"] for k in ("sparse", "dense-gz")}
    png = tmp_path / "cmp.png"
    buf = io.StringIO()
    # Execute
    rc = report([str(d) for d in dirs], plot=True, out=png, stream=buf)
    # Assert
    text = buf.getvalue()
    assert rc == 0
    for t in totals.values():
        for key in ("bytes", "bytes_up", "bytes_down", "bytes_internal", "wire_bytes"):
            assert f"{t[key]:,}" in text, key
        assert f"{t['bytes_per_update']:,.1f}" in text
        for kind, v in t["by_kind"].items():
            assert f"{kind}" in text and f"{v['bytes']:,}" in text
    assert "sparse-fp32" in text and "dense-fp32 + gzip" in text and "comparison:" in text
    assert "per worker:" in text and "w0" in text and "per round" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_report_cli_takes_several_dirs_or_their_parent_and_fails_clearly(runs, tmp_path, fedseq_cli):
    # Prepare
    parent = runs["sparse"][2].parent
    # Execute
    rc, out, _ = fedseq_cli("report", parent, "--out", tmp_path / "p.png")
    rc_missing, _, err = fedseq_cli("report", tmp_path / "nope", "--no-plot")
    # Assert
    assert rc == 0 and out.count("== led-") == 3 and (tmp_path / "p.png").exists()
    assert rc_missing == 1 and "does not exist" in err


def test_fedseq_run_summary_prints_bytes_per_user_update(runs):
    from cli.launcher import update_line

    _, results, _ = runs["dense-gz"]
    line = update_line(results)
    assert line.startswith("bytes per user update: ") and "dense-fp32" in line and "after gzip" in line
    assert f"{USERS * EPOCHS} updates" in line


def test_resumed_run_keeps_its_ledger(redis_url, tmp_path):
    # Prepare: one epoch, then a new orchestrator continues the same run for a second epoch
    cfg = replace(TINY, run_id="led-resume", epochs=1)
    fed, first = _run(redis_url, cfg, tmp_path / "a")
    # Execute
    _, second = _run(redis_url, replace(cfg, epochs=2), tmp_path / "b")
    # Assert: the second bundle's ledger holds both orchestrators' entries, and epoch 1's bytes stayed
    entries = ledger.read_jsonl(tmp_path / "b" / "ledger.jsonl")
    assert second["epochs"][0]["bytes_up"] == first["epochs"][0]["bytes_up"]
    assert second["summary"]["bytes_up"] == sum(e["bytes"] for e in entries if e["direction"] == "up")
    per_epoch = defaultdict(int)
    for e in entries:
        if e["kind"] == "update":
            per_epoch[e["epoch"]] += 1
    assert dict(per_epoch) == {1: USERS, 2: USERS}
