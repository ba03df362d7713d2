"""deploy/k8s: every manifest of the kustomize base is valid against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors), the Secrets the base generates from
`fedseq certs` are valid too, and the manifests agree with each other and with the code (Service
names and ports the services dial, fedseq subcommands, FEDSEQ_* variables the code reads).
The run for real is deploy/k8s/play-local.sh (podman kube play, see deploy/README.md)."""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import cli.main as cli
from fedseq import roster
from fedseq.config import build_config
from fedseq.tls import Identity
from tests.test_deploy import EXPERIMENT_ENV, _reads

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "k8s" / "base"
K8S_VERSION = kubernetes_validate.latest_version()  # the newest schemas the package ships
WORKERS = {"client-0": "client", "client-1": "client", "attacker-0": "attacker"}  # one Deployment each


def _kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def _resources() -> list[dict]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]
    return docs


def _generated_secrets(tls: Path) -> list[dict]:
    """What kustomize's secretGenerator makes of the base's entries, with `tls/` at ``tls``."""
    out = []
    for gen in _kustomization()["secretGenerator"]:
        data = {Path(f).name: base64.b64encode((tls / Path(f).name).read_bytes()).decode() for f in gen["files"]}
        out.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "type": "Opaque",
                    "data": data})
    return out


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod_spec(doc: dict) -> dict | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _resources() if d["kind"] == kind}


def consistency_errors(docs: list[dict]) -> list[str]:
    """Cross-manifest mistakes the schemas cannot see: a Service that selects no workload or
    points at a port no container opens, an address in the env that names no Service or port."""
    errors = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = [d for d in docs if _pod_spec(d) is not None]
    for name, svc in services.items():
        sel = svc["spec"]["selector"]
        targets = [w for w in workloads
                   if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        if not targets:
            errors.append(f"Service {name} selects no workload")
        for port in svc["spec"]["ports"]:
            opened = {p["containerPort"] for w in targets for c in _pod_spec(w)["containers"] for p in c.get("ports", [])}
            if port["targetPort"] not in opened:
                errors.append(f"Service {name} targets port {port['targetPort']}, which no selected container opens")
    for w in workloads:
        for c in _pod_spec(w)["containers"]:
            for e in c.get("env", []):
                v = str(e.get("value", ""))
                if e["name"] in ("FEDSEQ_ORCHESTRATOR", "FEDSEQ_AGGREGATOR") or e["name"] == "FEDSEQ_STORE_URL":
                    hostport = v.split("//")[-1].split("/")[0]
                    host, port = hostport.rsplit(":", 1)
                    if host not in services or int(port) not in {p["port"] for p in services[host]["spec"]["ports"]}:
                        errors.append(f"{w['metadata']['name']}: {e['name']}={v} names no Service port")
    return errors


# ------------------------------------------------------------------ schema validation


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    docs = _resources()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Service", "StatefulSet", "Service", "Deployment", "Service",
                            "PersistentVolumeClaim", "Job", "Deployment", "Deployment", "Deployment",
                            "NetworkPolicy"])
    for d in docs:
        _validate(d)


def test_generated_certificate_secrets_are_valid(tmp_path, fedseq_cli):
    # what the kustomization's comment says to run
    rc, _, err = fedseq_cli("certs", tmp_path, "--clients", 2, "--attackers", 1, "--unsharded")
    assert rc == 0, err
    secrets = _generated_secrets(tmp_path)
    assert {s["metadata"]["name"] for s in secrets} == {f"fedseq-tls-{n}" for n in (
        "server", "orchestrator", *WORKERS)}
    for s in secrets:
        _validate(s)
        name = s["metadata"]["name"].removeprefix("fedseq-tls-")
        extra = ["roster.json"] if name == "orchestrator" else []
        assert sorted(s["data"]) == sorted(["ca.pem", f"{name}.pem", f"{name}.key", *extra]), "only its own key"
        role = Identity.load(tmp_path, name).role
        assert role == (name if name in ("server", "orchestrator") else "worker")
    r = roster.load(tmp_path / "roster.json")
    assert {n: r.entry(n).kind for n in WORKERS} == WORKERS
    files = [f for g in _kustomization()["secretGenerator"] for f in g["files"]]
    assert "tls/ca.key" not in files and not any("operator" in f for f in files)
    assert _kustomization()["generatorOptions"]["disableNameSuffixHash"] is True


def test_the_schema_check_catches_broken_manifests():
    """Negative checks: the same validation rejects a misspelt field, a wrong type and a missing
    required field."""
    server = _by_kind("Deployment")["server"]
    bad = copy.deepcopy(server)
    bad["spec"]["replica"] = 1  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(server)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(server)
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    job = copy.deepcopy(_by_kind("Job")["orchestrator"])
    job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50050"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


# ------------------------------------------------------------------ the manifests agree with each other and the code


def test_services_addresses_and_ports_agree():
    docs = _resources()
    assert consistency_errors(docs) == []
    # and the check does catch a Service pointing at the wrong port, or an address with no Service
    broken = copy.deepcopy(docs)
    next(d for d in broken if d["kind"] == "Service" and d["metadata"]["name"] == "server")["spec"]["ports"][0][
        "targetPort"] = 50052
    client = next(d for d in broken if d["kind"] == "Deployment" and d["metadata"]["name"] == "client-0")
    next(e for e in _pod_spec(client)["containers"][0]["env"] if e["name"] == "FEDSEQ_ORCHESTRATOR")["value"] = "orch:1"
    errs = consistency_errors(broken)
    assert any("Service server targets port 50052" in e for e in errs), errs
    assert any("FEDSEQ_ORCHESTRATOR=orch:1" in e for e in errs), errs


def test_containers_run_fedseq_subcommands_that_read_their_variables(monkeypatch, capsys):
    config = _by_kind("ConfigMap")["fedseq-config"]["data"]
    seen = set()
    for d in _resources():
        spec = _pod_spec(d)
        if spec is None or d["metadata"]["name"] == "redis":
            continue
        c = spec["containers"][0]
        assert c["image"] == "fedseq:latest"
        cmd = c["args"][0]
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0, cmd
        seen.add(cmd)
        for e in c.get("env", []):
            value = e.get("value", "10.0.0.7")  # fieldRef (the pod IP)
            if cmd == "serve-orchestrator" and e["name"] in EXPERIMENT_ENV:
                continue  # read by build_config (checked below)
            assert _reads(cmd, e["name"], value, monkeypatch), f"{d['metadata']['name']}: {cmd} does not read {e['name']}"
        if cmd == "serve-orchestrator":
            assert c["envFrom"] == [{"configMapRef": {"name": "fedseq-config"}}]
            for key, value in config.items():  # an experiment key, or an orchestrator setting
                assert key in EXPERIMENT_ENV or _reads(cmd, key, value, monkeypatch), key
            cfg = build_config(None, {}, environ=dict(config))
            assert cfg.run_id == config["FEDSEQ_RUN_ID"] and cfg.epochs == int(config["FEDSEQ_EPOCHS"])
    assert seen == {"serve-server", "serve-orchestrator", "serve-client", "serve-attacker"}
    capsys.readouterr()


def test_every_fedseq_container_has_its_own_certificate_and_a_health_probe():
    secrets = {g["name"] for g in _kustomization()["secretGenerator"]}
    want = {"server": "server", "orchestrator": "orchestrator", **{w: w for w in WORKERS}}
    for d in _resources():
        spec = _pod_spec(d)
        name = d["metadata"]["name"]
        if spec is None or name == "redis":
            continue
        c = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["FEDSEQ_TLS_NAME"] == want[name] and env["FEDSEQ_TLS_DIR"] == "/tls"
        assert "FEDSEQ_INSECURE" not in env
        tls = next(v for v in spec["volumes"] if v["name"] == "tls")
        assert tls["secret"]["secretName"] == f"fedseq-tls-{want[name]}" in secrets
        assert c["readinessProbe"]["exec"]["command"] == ["python", "-m", "fedseq.healthcheck"]
        assert spec["securityContext"]["runAsNonRoot"] is True
    redis = _by_kind("StatefulSet")["redis"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert _by_kind("Job")["orchestrator"]["spec"]["backoffLimit"] <= 10


def test_podman_rendering_keeps_the_pod_templates_and_stays_valid(tmp_path):
    """deploy/k8s/podman_kube.py (what play-local.sh feeds to `podman kube play`): every Pod it
    makes is valid, named so that the Service names resolve, and keeps the manifest's containers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("podman_kube", ROOT / "deploy" / "k8s" / "podman_kube.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for gen in _kustomization()["secretGenerator"]:
        (tmp_path / gen["name"]).mkdir()
        for f in gen["files"]:
            (tmp_path / gen["name"] / Path(f).name).write_text("x")
    (tmp_path / "fedseq-tls-client-2").mkdir()  # a copied worker's Secret: the caller makes its folder too
    docs = mod.render(BASE, tmp_path, {"fedseq": "localhost/fedseq:latest"}, {"FEDSEQ_EPOCHS": "2"}, {},
                      {"client": 3, "attacker": 1})
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    assert set(pods) == {"redis", "server", "orchestrator", "client-0", "client-1", "client-2", "attacker-0"}
    for name in ("client-0", "client-1", "client-2", "attacker-0"):  # each worker its own identity
        c = pods[name]["spec"]["containers"][0]
        assert {e["name"]: e["value"] for e in c["env"]}["FEDSEQ_TLS_NAME"] == name
        tls = next(v for v in pods[name]["spec"]["volumes"] if v["name"] == "tls")
        assert tls["hostPath"]["path"] == str((tmp_path / f"fedseq-tls-{name}").resolve())
    assert pods["client-2"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "client-2"
    # the base as it is: client-0, client-1; attacker-0 has no replica
    plain = {d["metadata"]["name"] for d in mod.render(BASE, tmp_path, {}, {}, {}) if d["kind"] == "Pod"}
    assert plain == {"redis", "server", "orchestrator", "client-0", "client-1"}
    one = {d["metadata"]["name"] for d in mod.render(BASE, tmp_path, {}, {}, {}, {"client": 1, "attacker": 0})
           if d["kind"] == "Pod"}
    assert one == {"redis", "server", "orchestrator", "client-0"}
    for d in docs:
        _validate(d)
    orch = pods["orchestrator"]["spec"]
    assert orch["restartPolicy"] == "OnFailure" and orch["initContainers"][0]["name"] == "prepare"
    env = {e["name"]: e["value"] for e in orch["containers"][0]["env"]}
    assert env["FEDSEQ_EPOCHS"] == "2" and env["FEDSEQ_TLS_NAME"] == "orchestrator"
    assert orch["containers"][0]["image"] == "localhost/fedseq:latest"
    assert pods["redis"]["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "data-redis-0"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"} == {"data-redis-0",
                                                                                              "fedseq-results"}
    with pytest.raises(SystemExit, match="not a key of the ConfigMap"):
        mod.render(BASE, tmp_path, {}, {"FEDSEQ_NOPE": "1"}, {})


def test_every_worker_has_its_own_identity_and_only_the_orchestrator_gets_the_roster():
    """(a) every worker Deployment runs with its own certificate name, one replica at most, (b) no
    two pods share a certificate Secret, and each Secret holds only its own certificate's key, (c)
    the roster is in the orchestrator's Secret only, mounted in the orchestrator's pod and in no other
    (never the server's)."""
    docs = _resources()
    gens = {g["name"]: [Path(f).name for f in g["files"]] for g in _kustomization()["secretGenerator"]}
    mounted: dict[str, list[str]] = {}
    workers = {}
    for d in docs:
        spec = _pod_spec(d)
        if spec is None:
            continue
        name = d["metadata"]["name"]
        for v in spec.get("volumes", []):
            for src in [v] + [s for s in v.get("projected", {}).get("sources", [])]:
                ref = src.get("secret", {}).get("secretName") or src.get("configMap", {}).get("name")
                if ref:
                    mounted.setdefault(ref, []).append(name)
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
            c = spec["containers"][0]
            env = {e["name"]: e.get("value") for e in c["env"]}
            workers[name] = (c["args"][0], env["FEDSEQ_TLS_NAME"], d["spec"]["replicas"])
    assert {n: w[0] for n, w in workers.items()} == {n: f"serve-{k}" for n, k in WORKERS.items()}
    for name, (_, tls_name, replicas) in workers.items():
        assert tls_name == name != "worker", f"{name} must use its own certificate"
        assert replicas <= 1, f"{name}: {replicas} pods would share one identity"
        assert gens[f"fedseq-tls-{name}"] == ["ca.pem", f"{name}.pem", f"{name}.key"]
    for secret, users in mounted.items():
        if secret.startswith("fedseq-tls-"):
            assert len(users) == 1, f"{secret} is mounted by {users}: no two workloads share a certificate"
    holders = [g for g, files in gens.items() if "roster.json" in files]
    assert holders == ["fedseq-tls-orchestrator"]
    assert mounted["fedseq-tls-orchestrator"] == ["orchestrator"]
    for cm in _kustomization().get("configMapGenerator", []):
        assert not any("roster" in str(f) for f in cm.get("files", [])), "the roster stays out of ConfigMaps"
    assert not any("roster" in str(v) for d in docs if d["kind"] == "ConfigMap" for v in d["data"].values())
    server = _pod_spec(_by_kind("Deployment")["server"])
    assert [v["secret"]["secretName"] for v in server["volumes"] if "secret" in v] == ["fedseq-tls-server"]
    assert "roster.json" not in gens["fedseq-tls-server"]
    assert not any(e["name"] == "FEDSEQ_ROSTER" for e in server["containers"][0]["env"])
