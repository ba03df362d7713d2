"""`fedseq certs DIR --clients N --attackers M [--spares K] [--unsharded]`: one certificate of role
worker per worker identity (its own common name), the service certificates, no shared `worker`
certificate, and the orchestrator's roster (fedseq/roster.py) in DIR/roster.json. Runs the real
command (the ``fedseq_cli`` fixture)."""

from __future__ import annotations

import stat

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedseq import roster
from fedseq.tls import Identity


def _cn(path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_certs_with_workers_write_a_roster_and_one_certificate_per_worker(tmp_path, fedseq_cli):
    rc, out, err = fedseq_cli("certs", tmp_path, "--clients", 2, "--attackers", 1)
    assert rc == 0, err
    workers = {"client-0": ("client", 0), "client-1": ("client", 1), "attacker-0": ("attacker", 0)}
    for name in workers:
        ident = Identity.load(tmp_path, name)
        assert ident.role == "worker", name
        assert _cn(tmp_path / f"{name}.pem") == name, "common name = the identity"
        assert f"{name}.pem  role worker" in out
        assert stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode) == 0o600
    keys = {(tmp_path / f"{n}.key").read_bytes() for n in workers}
    assert len(keys) == len(workers), "no two workers share a key"
    for name in ("server", "orchestrator", "operator"):
        assert Identity.load(tmp_path, name).role == name
    assert not (tmp_path / "worker.pem").exists(), "no shared worker certificate"
    r = roster.load(tmp_path / "roster.json")
    assert {n: (r.entry(n).kind, r.entry(n).shard) for n in r.names()} == workers
    assert r.shards("client") == 2 and r.shards("attacker") == 1
    assert "roster: " in out and "roster.json" in out


def test_certs_unsharded_with_spares_and_extra_names(tmp_path, fedseq_cli):
    rc, out, err = fedseq_cli("certs", tmp_path, "--clients", 3, "--attackers", 0, "--unsharded")
    assert rc == 0, err
    r = roster.load(tmp_path / "roster.json")
    assert r.names() == ["client-0", "client-1", "client-2"]
    assert all(r.entry(n).shard is None for n in r.names()) and r.shards("client") == 0
    assert r.dumps() == roster.make(3, 0, sharded=False).dumps()

    d = tmp_path / "spares"
    rc, out, err = fedseq_cli("certs", d, "--clients", 2, "--attackers", 1, "--spares", 1,
                              "--name", "server", "--name", "hostb:worker")
    assert rc == 0, err
    r = roster.load(d / "roster.json")
    assert r.entry("spare-0").spare and r.entry("spare-0").kind == "client"
    assert Identity.load(d, "spare-0").role == "worker" and _cn(d / "spare-0.pem") == "spare-0"
    # --name replaces the service certificates, as without a roster; hostb is made, not rostered
    assert (d / "server.pem").exists() and not (d / "orchestrator.pem").exists()
    assert Identity.load(d, "hostb").role == "worker" and r.entry("hostb") is None
    assert "not on the roster: hostb" in out


def test_certs_refuses_a_bad_roster_before_writing_anything(tmp_path, fedseq_cli):
    d = tmp_path / "x"
    rc, _, err = fedseq_cli("certs", d, "--clients", 2, "--spares", 1, "--unsharded")
    assert rc == 2 and "spare needs sharded client identities" in err
    assert not d.exists(), "nothing written for a roster that cannot be"
    rc, _, err = fedseq_cli("certs", d, "--unsharded")
    assert rc == 2 and "--clients" in err
    rc, _, err = fedseq_cli("certs", d, "--clients", -1)
    assert rc == 2 and "0 or more" in err
    rc, _, err = fedseq_cli("certs", d, "--clients", 1, "--name", "client-0:server")
    assert rc == 2 and "worker identity of the roster" in err
    assert not d.exists()


def test_certs_without_workers_keeps_the_shared_certificate_and_says_what_is_missing(tmp_path, fedseq_cli):
    rc, out, err = fedseq_cli("certs", tmp_path)
    assert rc == 0, err
    assert Identity.load(tmp_path, "worker").role == "worker"
    assert not (tmp_path / "roster.json").exists()
    assert "own certificate" in err and "roster" in err
    # adding a worker later: the same CA, its own certificate (README: add it to roster.json)
    ca = (tmp_path / "ca.pem").read_bytes()
    rc, out, err = fedseq_cli("certs", tmp_path, "--name", "client-5:worker")
    assert rc == 0, err
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert Identity.load(tmp_path, "client-5").role == "worker" and _cn(tmp_path / "client-5.pem") == "client-5"
