"""The roster (fedseq/roster.py) and the orchestrator's registration decisions under it
(orchestrator/workers.py): identity comes from the certificate, the kind and the shard from the
roster, never from the Register request (README "Security model")."""

from __future__ import annotations

import json

import grpc
import pytest

from fedseq import roster as roster_mod
from fedseq.config import ExperimentConfig
from fedseq.experiment import setup
from fedseq.v1 import orchestrator_pb2
from orchestrator.link import WorkerLink
from orchestrator.settings import OrchestratorSettings
from orchestrator.workers import Refused, WorkerPool

CFG = ExperimentConfig(run_id="r", dataset="synthetic:users=30,items=80", epochs=1, attack="dv-fsr",
                       malicious_ratio=0.1)


@pytest.fixture(scope="module")
def prepared():
    return setup(CFG)


def _pool(prepared, roster, grace: float = 30.0) -> WorkerPool:
    shards = {k: roster.shards(k) for k in roster_mod.KINDS}
    return WorkerPool(prepared, "r", shards, identity=None, shard_grace=grace, roster=roster)


def _req(worker_id: str, kind: str = "client", held=(0, 0)):
    return orchestrator_pb2.RegisterRequest(worker_id=worker_id, kind=kind, held_index=held[0], held_count=held[1])


def _admit(pool, req, peer):
    """``req``'s admission on a stream of its own (a link no worker answers: it only carries the admission)."""
    return pool.admit(req, peer, WorkerLink(req.worker_id, peer))


def _refused(pool, req, peer) -> Refused:
    with pytest.raises(Refused) as e:
        _admit(pool, req, peer)
    return e.value


# ---------------------------------------------------------------------------- the file
def test_make_writes_one_shard_per_identity_and_reads_back(tmp_path):
    r = roster_mod.make(2, 1, spares=1)
    path = r.write(tmp_path / "roster.json")
    back = roster_mod.load(path)
    assert back == r and back.shards("client") == 2 and back.shards("attacker") == 1
    assert back.entry("attacker-0") == roster_mod.Entry("attacker-0", "attacker", 0)
    assert back.entry("spare-0").spare and back.owner("client", 1) == "client-1"


@pytest.mark.parametrize("rows, message", [
    ([{"name": "a", "kind": "client", "shard": 0}, {"name": "a", "kind": "client", "shard": 1}], "listed twice"),
    ([{"name": "a", "kind": "boss"}], "kind 'boss'"),
    ([{"name": "a", "kind": "client", "shard": 1}], "shards [1] must be 0..0"),
    ([{"name": "a", "kind": "client", "shard": 0}, {"name": "b", "kind": "client"}], "mix sharded"),
    ([{"name": "s", "kind": "attacker", "spare": True}], "only a client identity"),
    ([{"name": "bad name", "kind": "client"}], "certificate name"),
    ([{"name": "a", "kind": "client", "role": "x"}], "unknown keys"),
])
def test_a_bad_roster_is_refused_with_its_entry_named(tmp_path, rows, message):
    p = tmp_path / "roster.json"
    p.write_text(json.dumps({"version": 1, "workers": rows}))
    with pytest.raises(roster_mod.RosterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        roster_mod.load(p)


def test_settings_need_a_roster_under_tls_and_none_without(tmp_path):
    from fedseq.tls import Identity, make_certs

    make_certs(tmp_path, {"orchestrator": "orchestrator"})
    ident = Identity.load(tmp_path, "orchestrator")
    with pytest.raises(ValueError, match="needs a roster"):
        OrchestratorSettings("a:1", "redis://x", identity=ident)
    with pytest.raises(ValueError, match="needs mutual TLS"):
        OrchestratorSettings("a:1", "redis://x", roster=roster_mod.make(1, 0))
    with pytest.raises(ValueError, match="disagrees with the roster"):
        OrchestratorSettings("a:1", "redis://x", identity=ident, roster=roster_mod.make(2, 0), client_shards=3)
    s = OrchestratorSettings("a:1", "redis://x", identity=ident, roster=roster_mod.make(2, 1))
    assert s.shards() == {"client": 2, "attacker": 1}


# ---------------------------------------------------------------------------- registration
def test_each_identity_gets_its_roster_kind_and_shard_whatever_it_claims(prepared):
    pool = _pool(prepared, roster_mod.make(2, 1))
    w = _admit(pool, _req("client-1", held=(0, 2)), "client-1")  # a hint for another shard is ignored
    a = _admit(pool, _req("attacker-0", kind="attacker"), "attacker-0")
    assert (w.kind, w.shard) == ("client", (1, 2)) and (a.kind, a.shard) == ("attacker", (0, 1))
    assert len(a.users) == prepared.num_malicious and min(a.users) >= prepared.dataset.num_users


def test_an_attacker_identity_claiming_the_client_kind_is_refused(prepared):
    pool = _pool(prepared, roster_mod.make(2, 1))
    e = _refused(pool, _req("attacker-0", kind="client", held=(0, 2)), "attacker-0")
    assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.word == "kind"
    assert "rostered as kind 'attacker'" in e.reason
    assert not pool.workers


def test_an_identity_not_on_the_roster_is_refused(prepared):
    pool = _pool(prepared, roster_mod.make(2, 1))
    e = _refused(pool, _req("worker"), "worker")  # the old shared certificate
    assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.word == "roster"


def test_a_worker_id_other_than_the_identity_is_refused(prepared):
    pool = _pool(prepared, roster_mod.make(2, 1))
    e = _refused(pool, _req("client-0", kind="attacker"), "attacker-0")
    assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.word == "id"


def test_a_lost_shard_goes_back_only_to_its_own_identity(prepared):
    # Prepare: client-0 registered, then died (its stream ended)
    pool = _pool(prepared, roster_mod.make(2, 1))
    first = _admit(pool, _req("client-0"), "client-0")
    first.link.close("killed")
    pool.gone(first)  # as the servicer does when a stream ends
    # Execute / Assert: client-1 cannot take shard 0 (it gets its own), the attacker cannot either
    other = _admit(pool, _req("client-1", held=(0, 2)), "client-1")
    assert other.shard == (1, 2)
    assert _refused(pool, _req("attacker-0", kind="client", held=(0, 2)), "attacker-0").word == "kind"
    back = _admit(pool, _req("client-0"), "client-0")
    assert back.shard == (0, 2) and back.users == first.users


def test_a_spare_takes_a_lost_client_shard_only_after_the_grace(prepared):
    pool = _pool(prepared, roster_mod.make(2, 0, spares=1), grace=0.0)
    _admit(pool, _req("client-0"), "client-0")
    _admit(pool, _req("client-1"), "client-1")
    assert _refused(pool, _req("spare-0"), "spare-0").code == grpc.StatusCode.RESOURCE_EXHAUSTED
    pool.workers["client-1"].link.close("killed")
    pool.gone(pool.workers["client-1"])
    spare = _admit(pool, _req("spare-0"), "spare-0")
    assert spare.shard == (1, 2) and spare.kind == "client"


def test_an_unsharded_roster_admits_only_rostered_identities_with_every_user(prepared):
    pool = _pool(prepared, roster_mod.make(2, 1, sharded=False))
    w = _admit(pool, _req("client-0"), "client-0")
    assert w.shard is None and len(w.users) == prepared.dataset.num_users
    assert _refused(pool, _req("client-9"), "client-9").word == "roster"


def test_a_ready_worker_that_died_before_the_run_does_not_count(prepared):
    # Prepare: a worker registered and ready, then killed before the run starts (its stream is open
    # but nothing answers on it)
    pool = _pool(prepared, roster_mod.make(2, 1))
    pool.probe_timeout = 0.5  # (3 s in a service) the time it has to answer
    w = _admit(pool, _req("client-0"), "client-0")
    w.ready = True
    # Execute / Assert: the run does not start on it
    with pytest.raises(TimeoutError, match="only 0 of 1"):
        pool.wait_for(1, timeout=0.5, say=lambda _m: None)
    assert not w.alive
