"""deploy/k8s: every manifest of the kustomize base, of its overlays (gpu, attack) and of the
namespace is valid against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are
errors), the Secrets the base generates from `fedseq certs` are valid too, and the manifests agree
with each other and with the code (Service names and ports the services dial, fedseq subcommands,
FEDSEQ_* variables the code reads, the health check's arguments, the orchestrator's exit codes).

Hardening checks (each also shown to fail on a manifest with the field taken out): the restricted
Pod Security Standard on every pod and container, probes on every long-running container, the
orchestrator Job's failure handling, the NetworkPolicy flows (evaluated pod to pod), the
PodDisruptionBudgets, resource requests that fit a small cluster, workers with no port and no
Service, versioned image tags.

The overlays are rendered by deploy/k8s/podman_kube.py's kustomize subset, which refuses what it
does not implement and fails on a patch whose target or path is missing; where `kubectl` or
`kustomize` is installed, its rendering must equal theirs. The run for real is
deploy/k8s/play-local.sh (podman kube play, see deploy/k8s/README.md)."""

from __future__ import annotations

import base64
import copy
import functools
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import cli.main as cli
from fedseq import healthcheck, roster
from fedseq.config import build_config
from fedseq.tls import Identity
from tests.test_deploy import EXPERIMENT_ENV, _reads

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {"gpu": K8S / "overlays" / "gpu", "attack": K8S / "overlays" / "attack"}
RENDERINGS = ["base", *OVERLAYS]
K8S_VERSION = kubernetes_validate.latest_version()  # the newest schemas the package ships
WORKERS = {"client-0": "client", "client-1": "client", "attacker-0": "attacker"}  # one Deployment each
# pyproject.toml's [project] version (read without tomllib, which Python 3.10 lacks)
VERSION = re.search(r'^\[project\]$[^\[]*?^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                    re.M | re.S).group(1)
HEALTH_FILE = "/tmp/fedseq/health.json"
GRPC_PROBE = ["python", "-m", "fedseq.healthcheck"]
FILE_PROBE = [*GRPC_PROBE, "--file", HEALTH_FILE, "--max-age", "60"]


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when the wheel has it: the same documents


def _podman_kube():
    spec = importlib.util.spec_from_file_location("podman_kube", K8S / "podman_kube.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


@functools.cache
def _parsed_resources() -> tuple[dict, ...]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.load_all((BASE / name).read_text(), Loader=_LOADER) if d]
    return tuple(docs)


def _resources() -> list[dict]:
    """The base's manifests as written (before kustomize's transformers); a fresh copy each call
    (parsed once: the tests edit what they get)."""
    return copy.deepcopy(list(_parsed_resources()))


@functools.cache
def _built(name: str) -> tuple[dict, ...]:
    return tuple(_podman_kube().build(BASE if name == "base" else OVERLAYS[name])[0])


def _rendered(name: str) -> list[dict]:
    """What `kustomize build` makes of the base or an overlay (generated Secrets aside)."""
    return copy.deepcopy(list(_built(name)))


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if _pod_spec(d) is not None]


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def _is_worker(doc: dict) -> bool:
    return doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"


def _replicas(doc: dict) -> int:
    return 1 if doc["kind"] == "Job" else doc["spec"].get("replicas", 1)


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


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
                            *["NetworkPolicy"] * 7, "PodDisruptionBudget", "PodDisruptionBudget"])
    for d in docs:
        _validate(d)
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())
    _validate(namespace)
    # the namespace admits restricted pods only
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_rendered_manifest_is_valid(name):
    """The base and each overlay as kustomize renders them (patches, images, replicas applied)."""
    docs = _rendered(name)
    assert len(docs) == len(_resources())  # overlays change objects, they add none
    for d in docs:
        _validate(d)
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedseq"


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


@pytest.mark.parametrize("name", RENDERINGS)
def test_containers_run_fedseq_subcommands_that_read_their_variables(name, monkeypatch, capsys):
    docs = _rendered(name)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    seen = set()
    for d in docs:
        spec = _pod_spec(d)
        if spec is None or d["metadata"]["name"] == "redis":
            continue
        c = spec["containers"][0]
        assert c["image"] == (f"fedseq:{VERSION}-cu126" if name == "gpu" and _is_worker(d) else f"fedseq:{VERSION}")
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
        # gRPC health for the services that listen; the worker's own health file for the workers
        probe = FILE_PROBE if name in WORKERS else GRPC_PROBE
        assert c["livenessProbe"]["exec"]["command"] == probe, name
        assert spec["securityContext"]["runAsNonRoot"] is True
    redis = _by_kind("StatefulSet")["redis"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert _by_kind("Job")["orchestrator"]["spec"]["backoffLimit"] <= 10


def _secret_folders(tmp_path: Path) -> None:
    for gen in _kustomization()["secretGenerator"]:
        (tmp_path / gen["name"]).mkdir()
        for f in gen["files"]:
            (tmp_path / gen["name"] / Path(f).name).write_text("x")


def test_podman_rendering_keeps_the_pod_templates_and_stays_valid(tmp_path):
    """deploy/k8s/podman_kube.py (what play-local.sh feeds to `podman kube play`): every Pod it
    makes is valid, named so that the Service names resolve, and keeps the manifest's containers;
    what podman 4.3 cannot play is converted as its docstring says."""
    mod = _podman_kube()
    _secret_folders(tmp_path)
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
    assert {d["kind"] for d in docs} == {"Pod", "PersistentVolumeClaim"}  # no NetworkPolicy, PDB, Job...
    orch = pods["orchestrator"]["spec"]
    # no Job controller under podman: the pod restarts a failed orchestrator itself
    assert orch["restartPolicy"] == "OnFailure" and orch["initContainers"][0]["name"] == "prepare"
    env = {e["name"]: e["value"] for e in orch["containers"][0]["env"]}
    assert env["FEDSEQ_EPOCHS"] == "2" and env["FEDSEQ_TLS_NAME"] == "orchestrator"
    assert orch["containers"][0]["image"] == "localhost/fedseq:latest"  # --image over the kustomization's
    assert orch["initContainers"][0]["image"] == "localhost/fedseq:latest"
    assert pods["redis"]["spec"]["containers"][0]["image"] == "redis:7"  # the kustomization's images:
    assert pods["redis"]["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "data-redis-0"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"} == {"data-redis-0",
                                                                                              "fedseq-results"}
    manifests = {d["metadata"]["name"]: d for d in _workloads(_rendered("base"))}
    for name, pod in pods.items():
        source = manifests.get(name, manifests["client-0"])
        for c, orig in zip(_containers(pod["spec"]), _containers(_pod_spec(source)), strict=True):
            assert "ports" not in c and "startupProbe" not in c  # podman 4.3: published on the host; none
            assert c["securityContext"] == orig["securityContext"]  # the restricted profile, played as written
            if "startupProbe" in orig:  # liveness waits as long as the startup probe allowed
                s = orig["startupProbe"]
                assert c["livenessProbe"]["initialDelaySeconds"] == s["periodSeconds"] * s["failureThreshold"]
                assert c["livenessProbe"]["exec"] == orig["livenessProbe"]["exec"]
        assert pod["spec"]["securityContext"] == _pod_spec(source)["securityContext"]
        assert pod["metadata"].get("annotations") == source["spec"]["template"]["metadata"].get("annotations")
    # the overlays render too: the attack overlay plays attacker-0, the gpu one the CUDA image
    attack = {d["metadata"]["name"]: d for d in mod.render(OVERLAYS["attack"], tmp_path, {}, {}, {})
              if d["kind"] == "Pod"}
    assert "attacker-0" in attack
    assert _env(attack["orchestrator"]["spec"]["containers"][0])["FEDSEQ_ATTACK"] == "dv-fsr"
    gpu = {d["metadata"]["name"]: d for d in mod.render(OVERLAYS["gpu"], tmp_path, {}, {}, {}) if d["kind"] == "Pod"}
    assert gpu["client-0"]["spec"]["containers"][0]["image"] == f"fedseq:{VERSION}-cu126"
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


# ------------------------------------------------------------------ the overlays render as kustomize renders them


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _tree_with_certificates(tmp_path: Path) -> Path:
    """A copy of deploy/k8s whose base/tls holds placeholder files for the secretGenerator."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("tls", "__pycache__"))
    (tree / "base" / "tls").mkdir()
    for gen in _kustomization()["secretGenerator"]:
        for f in gen["files"]:
            (tree / "base" / f).write_text(f"placeholder {f}\n")
    return tree


def _key(d: dict) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


@pytest.mark.parametrize("name", [*RENDERINGS, "gpu+attack"])
def test_rendering_agrees_with_kustomize(name, tmp_path):
    """podman_kube.build (the kustomize subset the tests and play-local.sh use) against the real
    kustomize, where installed: the same objects, field for field, and the same generated Secrets.
    "gpu+attack" is an overlay of both components, as a user would write it."""
    tree = _tree_with_certificates(tmp_path)
    if name == "gpu+attack":
        (tree / "overlays" / name).mkdir()
        (tree / "overlays" / name / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"],
            "components": ["../../components/gpu", "../../components/attack"]}))
    kdir = tree / ("base" if name == "base" else f"overlays/{name}")
    ours, secrets = _podman_kube().build(kdir)
    if name == "gpu+attack":  # both components took effect
        by = {_key(d): d for d in ours}
        assert by["Deployment", "attacker-0"]["spec"]["replicas"] == 1
        assert _pod_spec(by["Deployment", "attacker-0"])["containers"][0]["image"] == f"fedseq:{VERSION}-cu126"
    tool = _kustomize_cli()
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed: the structural rendering above is the check")
    out = subprocess.run([*tool, str(kdir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    their_secrets = {d["metadata"]["name"]: d for d in theirs if d["kind"] == "Secret"}
    theirs = {_key(d): d for d in theirs if d["kind"] != "Secret"}
    assert {_key(d): d for d in ours} == theirs
    assert set(their_secrets) == set(secrets)
    for sname, files in secrets.items():
        assert set(their_secrets[sname]["data"]) == {f.name for f in files}


def test_the_renderer_refuses_what_it_cannot_render(tmp_path):
    """A patch whose target or path is missing fails the rendering, as it fails kustomize; a field
    the subset does not implement is refused, not skipped."""
    mod = _podman_kube()
    tree = _tree_with_certificates(tmp_path)
    comp = tree / "components" / "attack" / "kustomization.yaml"
    text = comp.read_text()
    comp.write_text(text.replace("/data/FEDSEQ_ATTACK\n", "/data/FEDSEQ_ATTAK\n"))
    with pytest.raises(SystemExit, match="FEDSEQ_ATTAK"):
        mod.build(tree / "overlays" / "attack")
    comp.write_text(text.replace("name: fedseq-config", "name: fedseq-conf"))
    with pytest.raises(SystemExit, match="selects nothing"):
        mod.build(tree / "overlays" / "attack")
    comp.write_text(text.replace("name: attacker-0", "name: attacker-9"))
    with pytest.raises(SystemExit, match="attacker-9"):
        mod.build(tree / "overlays" / "attack")
    comp.write_text(text + "namePrefix: x-\n")
    with pytest.raises(SystemExit, match="namePrefix: not implemented"):
        mod.build(tree / "overlays" / "attack")
    overlay = tree / "overlays" / "gpu" / "kustomization.yaml"
    overlay.write_text(overlay.read_text().replace("../../base", "../../bass"))
    with pytest.raises((SystemExit, OSError)):
        mod.build(tree / "overlays" / "gpu")


# ------------------------------------------------------------------ restricted Pod Security Standard

# volume types the restricted profile allows
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def pss_violations(doc: dict) -> list[str]:
    """What keeps the pod template of ``doc`` from the restricted Pod Security Standard (and from
    this deployment's own rules on top of it: every container sets runAsNonRoot and a read-only root
    filesystem, no service account token)."""
    spec = _pod_spec(doc)
    where = f"{doc['kind']} {doc['metadata']['name']}"
    errors = []
    if spec.get("automountServiceAccountToken") is not False:
        errors.append(f"{where}: automountServiceAccountToken must be false")
    for host in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        if spec.get(host) and host != "hostUsers":
            errors.append(f"{where}: {host}")
    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        errors.append(f"{where}: pod runAsNonRoot must be true")
    for key in ("runAsUser", "runAsGroup"):
        if not isinstance(psc.get(key), int) or psc[key] <= 0:
            errors.append(f"{where}: pod {key} must be a non-zero uid/gid")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errors.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    for v in spec.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            errors.append(f"{where}: volume {v['name']} of type {kind}")
    for c in _containers(spec):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{cw}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            errors.append(f"{cw}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            errors.append(f"{cw}: adds capabilities")
        if sc.get("runAsNonRoot") is not True:
            errors.append(f"{cw}: runAsNonRoot must be true")
        if sc.get("runAsUser", 1) == 0 or sc.get("runAsGroup", 1) == 0:
            errors.append(f"{cw}: runs as root")
        if sc.get("privileged"):
            errors.append(f"{cw}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{cw}: readOnlyRootFilesystem must be true")
        if sc.get("seccompProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{cw}: seccompProfile")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            errors.append(f"{cw}: hostPort")
    return errors


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_pod_meets_the_restricted_pod_security_standard(name):
    workloads = _workloads(_rendered(name))
    assert {d["metadata"]["name"] for d in workloads} == {"redis", "server", "orchestrator", *WORKERS}
    for d in workloads:
        assert pss_violations(d) == []
    # the one-shot step is checked like the rest: it exists and runs as the orchestrator's user
    job = next(d for d in workloads if d["kind"] == "Job")
    assert [c["name"] for c in _pod_spec(job)["initContainers"]] == ["prepare"]


FIELDS_TO_BREAK = [
    ("pod", ["automountServiceAccountToken"]),
    ("pod", ["securityContext", "runAsNonRoot"]),
    ("pod", ["securityContext", "runAsUser"]),
    ("pod", ["securityContext", "runAsGroup"]),
    ("pod", ["securityContext", "seccompProfile"]),
    ("container", ["securityContext", "allowPrivilegeEscalation"]),
    ("container", ["securityContext", "capabilities"]),
    ("container", ["securityContext", "runAsNonRoot"]),
    ("container", ["securityContext", "readOnlyRootFilesystem"]),
    ("init", ["securityContext", "runAsNonRoot"]),
    ("init", ["securityContext", "capabilities"]),
]


@pytest.mark.parametrize("where,path", FIELDS_TO_BREAK, ids=lambda x: x if isinstance(x, str) else ".".join(x))
def test_the_pod_security_check_catches_a_missing_field(where, path):
    job = copy.deepcopy(_by_kind("Job")["orchestrator"])
    spec = _pod_spec(job)
    obj = {"pod": spec, "container": spec["containers"][0], "init": spec["initContainers"][0]}[where]
    for key in path[:-1]:
        obj = obj[key]
    del obj[path[-1]]
    assert pss_violations(job), f"removing {where} {'.'.join(path)} went unnoticed"
    # and the other ways to break it: root, a host path, host networking
    for breaking in ({"runAsUser": 0}, {"privileged": True}):
        bad = copy.deepcopy(_by_kind("Job")["orchestrator"])
        _pod_spec(bad)["initContainers"][0]["securityContext"].update(breaking)
        assert pss_violations(bad)
    bad = copy.deepcopy(_by_kind("Deployment")["client-0"])
    _pod_spec(bad)["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    _pod_spec(bad)["hostNetwork"] = True
    assert len(pss_violations(bad)) == 2


# ------------------------------------------------------------------ probes


def _long_running(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, c) for d in _workloads(docs) for c in _pod_spec(d)["containers"]]


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_long_running_container_has_startup_liveness_and_readiness_probes(name):
    for d, c in _long_running(_rendered(name)):
        where = f"{d['metadata']['name']}/{c['name']}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{where}: no {probe}"
        cmds = {p: c[p].get("exec", {}).get("command") for p in ("startupProbe", "livenessProbe", "readinessProbe")}
        if d["metadata"]["name"] == "redis":
            for p in cmds.values():
                assert p and "redis-cli ping" in " ".join(p)
        elif _is_worker(d):
            # the worker listens on nothing: its health file, fresh (alive) and --ready (connected,
            # holding its users); the file is where the worker writes it, on a writable emptyDir
            assert cmds["startupProbe"] == cmds["livenessProbe"] == FILE_PROBE, where
            assert cmds["readinessProbe"] == [*FILE_PROBE, "--ready"], where
            assert _env(c)["FEDSEQ_HEALTH_FILE"] == HEALTH_FILE
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            vol = next(m for m in ("/tmp/fedseq", "/tmp") if m in mounts)
            assert "emptyDir" in next(v for v in _pod_spec(d)["volumes"] if v["name"] == mounts[vol])
        else:  # server, orchestrator: gRPC health over mTLS on their own port
            assert set(map(tuple, cmds.values())) == {tuple(GRPC_PROBE)}, where
            assert _env(c)["FEDSEQ_PORT"] == str(c["ports"][0]["containerPort"])
        # a start of a few minutes before liveness counts (torch import, AOF load)
        s = c["startupProbe"]
        assert s["periodSeconds"] * s["failureThreshold"] >= 120, where
        assert c["livenessProbe"].get("failureThreshold", 3) >= 3


def test_the_worker_probes_mean_what_the_health_check_says(tmp_path, capsys):
    """The workers' probe commands, run against health files as the worker writes them
    (client/session.py HealthFile): alive and connected but not ready yet, ready, and stale."""
    worker = _pod_spec(_by_kind("Deployment")["client-0"])["containers"][0]
    health = tmp_path / "health.json"

    def probe(kind: str) -> int:
        cmd = worker[kind]["exec"]["command"]
        assert cmd[:3] == GRPC_PROBE
        args = [str(health) if a == HEALTH_FILE else a for a in cmd[3:]]
        return healthcheck.main(args)

    health.write_text(json.dumps({"time": time.time(), "worker": "client-0", "connected": True, "ready": False}))
    assert (probe("startupProbe"), probe("livenessProbe"), probe("readinessProbe")) == (0, 0, 1)
    health.write_text(json.dumps({"time": time.time(), "worker": "client-0", "connected": True, "ready": True}))
    assert (probe("livenessProbe"), probe("readinessProbe")) == (0, 0)
    health.write_text(json.dumps({"time": time.time() - 120, "worker": "client-0", "connected": True, "ready": True}))
    assert (probe("livenessProbe"), probe("readinessProbe")) == (1, 1)  # the loop stopped: restart it
    health.unlink()
    assert probe("startupProbe") == 1
    capsys.readouterr()


# ------------------------------------------------------------------ the orchestrator Job


def job_errors(job: dict) -> list[str]:
    spec = job["spec"]
    errors = []
    pod = _pod_spec(job)
    if pod.get("restartPolicy") != "Never":
        errors.append("restartPolicy must be Never (podFailurePolicy needs it)")
    if not 1 <= spec.get("backoffLimit", -1) <= 10:
        errors.append("backoffLimit must be 1..10")
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if not isinstance(spec.get(key), int) or spec[key] <= 0:
            errors.append(f"{key} must be set")
    if spec.get("podReplacementPolicy") != "Failed":
        errors.append("podReplacementPolicy must be Failed (never two orchestrators at once)")
    rules = spec.get("podFailurePolicy", {}).get("rules", [])
    ignore = [r for r in rules if r["action"] == "Ignore"]
    if not any({"type": "DisruptionTarget"} in [{"type": c["type"]} for c in r.get("onPodConditions", [])]
               for r in ignore) or rules[:1] != ignore[:1]:
        errors.append("the first rule must Ignore DisruptionTarget (evictions, preemption, node loss)")
    names = {c["name"] for c in _containers(pod)}
    fail = {}
    for r in rules:
        codes = r.get("onExitCodes")
        if codes and codes.get("containerName") and codes["containerName"] not in names:
            errors.append(f"rule names the container {codes['containerName']}, which the pod lacks")
        if codes and r["action"] == "FailJob" and codes["operator"] == "In":
            fail.setdefault(codes.get("containerName"), set()).update(codes["values"])
    if 4 not in fail.get("orchestrator", set()):
        errors.append("exit 4 (the operator stopped the run) of the orchestrator must FailJob")
    if fail.get("orchestrator", set()) & {0, 1, 2, 75, 137, 143}:
        errors.append("a restartable exit (failed run, store unreachable, signalled mid-run, killed) must not FailJob")
    return errors


def test_the_orchestrator_job_restarts_on_failure_and_stops_when_the_operator_stopped_it():
    job = _by_kind("Job")["orchestrator"]
    assert job_errors(job) == []
    c = _pod_spec(job)["containers"][0]
    assert _env(c)["FEDSEQ_EXIT_WHEN_DONE"] == "1"
    # the exit codes the policy names are the ones the code uses
    from cli import services

    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = {v for r in rules if r["action"] == "FailJob" and r["onExitCodes"].get("containerName") == "orchestrator"
            for v in r["onExitCodes"]["values"]}
    assert services.orchestrator_exit("done") == 0
    assert services.orchestrator_exit("stopped", stopped_by_operator=True) in fail
    assert services.orchestrator_exit("failed") not in fail
    assert services.orchestrator_exit("running") not in fail  # signalled mid-run: a restart resumes
    assert cli.main(["serve-orchestrator", "--port", "nope"]) == 2  # a configuration error exits 2: counted
    for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "podFailurePolicy",
                  "podReplacementPolicy"):
        bad = copy.deepcopy(job)
        del bad["spec"][field]
        assert job_errors(bad), field
    bad = copy.deepcopy(job)
    _pod_spec(bad)["restartPolicy"] = "OnFailure"
    assert job_errors(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"].append(75)
    assert job_errors(bad)


def _prepare_script() -> str:
    init = _pod_spec(_by_kind("Job")["orchestrator"])["initContainers"][0]
    assert init["command"] == ["python", "-c"]
    return init["args"][0]


def test_the_prepare_step_checks_the_results_volume_and_waits_for_redis(tmp_path):
    """The Job's non-root init container, run here: exit 2 (FailJob) when /results cannot be
    written, else it waits for the store's address (the one in FEDSEQ_STORE_URL) and exits 0."""
    script = _prepare_script()
    orch = _pod_spec(_by_kind("Job")["orchestrator"])["containers"][0]
    store = _env(orch)["FEDSEQ_STORE_URL"].split("//")[1].split("/")[0]
    host, port = store.rsplit(":", 1)
    assert f'("{host}", {port})' in script, "prepare waits for another address than FEDSEQ_STORE_URL's"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        local = script.replace(f'("{host}", {port})', f'("127.0.0.1", {listener.getsockname()[1]})')
        run = lambda s: subprocess.run([sys.executable, "-c", s], capture_output=True, text=True, timeout=60)  # noqa: E731
        ok = run(local.replace('"/results/', f'"{tmp_path}/'))
        assert ok.returncode == 0, ok.stderr
        assert list(tmp_path.iterdir()) == []  # it leaves nothing behind
        bad = run(local.replace('"/results/', f'"{tmp_path}/missing/'))
        assert bad.returncode == 2 and "not writable" in bad.stderr
    finally:
        listener.close()


# ------------------------------------------------------------------ network policy


def _matches(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        v = labels.get(e["key"])
        ok = {"In": v in e.get("values", []), "NotIn": v not in e.get("values", []),
              "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}[e["operator"]]
        if not ok:
            return False
    return True


def _peer_allows(peers: list[dict] | None, labels: dict, namespace: dict | None) -> bool:
    """Whether one of ``peers`` admits a pod with ``labels``: in this namespace (``namespace`` None)
    or in another namespace with labels ``namespace``."""
    if peers is None:
        return True
    for p in peers:
        if "ipBlock" in p:
            continue
        if "namespaceSelector" in p:
            if namespace is not None and _matches(p["namespaceSelector"], namespace) and \
                    _matches(p.get("podSelector", {}), labels):
                return True
        elif namespace is None and _matches(p["podSelector"], labels):
            return True
    return False


def _port_allows(ports: list[dict] | None, port: int, protocol: str) -> bool:
    return ports is None or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def allowed(policies: list[dict], src: dict, dst: dict, port: int, protocol: str = "TCP",
            src_ns: dict | None = None, dst_ns: dict | None = None) -> bool:
    """NetworkPolicy semantics for pods of this namespace (labels ``src``/``dst``; a peer in another
    namespace has labels ``*_ns`` and is governed by no policy here): a pod selected by a policy of
    a direction is isolated in that direction, and then only a rule of such a policy lets traffic
    through; traffic passes when the source's egress and the destination's ingress both let it."""
    return (src_ns is not None or one_side(policies, src, "Egress", dst, dst_ns, port, protocol)) and \
        (dst_ns is not None or one_side(policies, dst, "Ingress", src, src_ns, port, protocol))


def one_side(policies: list[dict], pod: dict, kind: str, peer: dict, peer_ns: dict | None, port: int,
             protocol: str = "TCP") -> bool:
    """Whether the policies selecting ``pod`` let ``kind`` (Ingress or Egress) traffic with ``peer``
    on ``port`` through, whatever the other side's policies say."""
    rules, isolated = [], False
    for pol in policies:
        if kind in pol["spec"]["policyTypes"] and _matches(pol["spec"]["podSelector"], pod):
            isolated = True
            rules += pol["spec"].get(kind.lower(), [])
    key = "from" if kind == "Ingress" else "to"
    return not isolated or any(_peer_allows(r.get(key), peer, peer_ns) and _port_allows(r.get("ports"), port, protocol)
                               for r in rules)


def worker_egress_errors(docs: list[dict]) -> list[str]:
    """The workers' own egress, apart from what the other side admits: in the namespace only the
    orchestrator's 50050 and the server's 50051, outside it only cluster DNS on 53."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = _pods(docs)
    want = {("orchestrator", 50050), ("server", 50051)}
    errors = []
    for w in WORKER_PODS:
        for t, labels in pods.items():
            for port in (53, 443, 6379, 9464, 50050, 50051):
                if (t, port) not in want and one_side(policies, pods[w], "Egress", labels, None, port):
                    errors.append(f"{w} may dial {t}:{port}")
        for ns, labels, port, proto in (("kube-system", {"k8s-app": "kube-dns"}, 53, "UDP"),
                                        ("kube-system", {"k8s-app": "kube-dns"}, 53, "TCP"),
                                        ("kube-system", {"k8s-app": "kube-dns"}, 443, "TCP"),
                                        ("kube-system", {}, 53, "UDP"), ("anywhere", {}, 443, "TCP"),
                                        ("anywhere", {}, 6379, "TCP")):
            ok = one_side(policies, pods[w], "Egress", labels, {"kubernetes.io/metadata.name": ns}, port, proto)
            if ok != (labels == {"k8s-app": "kube-dns"} and port == 53):
                errors.append(f"{w} -> {ns} {labels} {port}/{proto}: {'allowed' if ok else 'refused'}")
    return errors


def _pods(docs: list[dict]) -> dict[str, dict]:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in _workloads(docs)}
    pods["operator"] = {"app.kubernetes.io/component": "operator"}  # a pod with the operator certificate
    pods["stranger"] = {"app": "something-else"}  # any other pod of the namespace
    return pods


def flows(docs: list[dict]) -> set[tuple[str, str, int]]:
    """Every (source pod, destination pod, TCP port) the policies of ``docs`` let through."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = _pods(docs)
    ports = {p["containerPort"] for d in _workloads(docs) for c in _pod_spec(d)["containers"] for p in c.get("ports", [])}
    ports |= {53, 80, 443, 50061, 50071}  # and what nothing should open
    return {(s, t, port) for s, sl in pods.items() for t, tl in pods.items() if s != t for port in ports
            if allowed(policies, sl, tl, port)}


WORKER_PODS = ("client-0", "client-1", "attacker-0")
EXPECTED_FLOWS = {
    *{(w, "orchestrator", 50050) for w in WORKER_PODS},
    *{(w, "server", 50051) for w in WORKER_PODS},
    ("operator", "orchestrator", 50050),
    ("orchestrator", "server", 50051),
    ("orchestrator", "redis", 6379),
    ("server", "redis", 6379),
}


@pytest.mark.parametrize("name", RENDERINGS)
def test_network_policy_allows_exactly_the_federation_flows(name):
    docs = _rendered(name)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and sorted(deny[0]["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    assert flows(docs) == EXPECTED_FLOWS
    assert worker_egress_errors(docs) == []
    pods = _pods(docs)
    # no ingress to a worker from anywhere, and no rule that could admit any
    for w in WORKER_PODS:
        assert not any(_matches(p["spec"]["podSelector"], pods[w]) and p["spec"].get("ingress") for p in policies)
        for port in (50061, 50071, 9464, 8080):
            assert not allowed(policies, {}, pods[w], port, src_ns={"fedseq.io/monitoring": "true"})
    # DNS: the fedseq pods reach kube-dns in kube-system on 53, UDP and TCP; Redis reaches nothing
    kube_system = {"kubernetes.io/metadata.name": "kube-system"}
    dns = {"k8s-app": "kube-dns"}
    for pod in ("server", "orchestrator", *WORKER_PODS):
        for proto in ("UDP", "TCP"):
            assert allowed(policies, pods[pod], dns, 53, proto, dst_ns=kube_system), (pod, proto)
        assert not allowed(policies, pods[pod], dns, 53, "UDP", dst_ns={"kubernetes.io/metadata.name": "other"})
        assert not allowed(policies, pods[pod], {}, 443, dst_ns=kube_system)  # nothing else outside
    assert not allowed(policies, pods["redis"], dns, 53, "UDP", dst_ns=kube_system)
    # metrics: from a namespace labelled for monitoring, to the pods that announce them, on their port
    monitoring = {"fedseq.io/monitoring": "true"}
    scraped = {d["metadata"]["name"]: int(d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
               for d in _workloads(docs) if d["spec"]["template"]["metadata"].get("annotations", {}).get(
                   "prometheus.io/scrape") == "true"}
    assert set(scraped) == {"server", "orchestrator"}
    for pod, labels in pods.items():
        for port in (9464, 50050, 50051, 6379):
            assert allowed(policies, {}, labels, port, src_ns=monitoring) == (scraped.get(pod) == port), (pod, port)
            assert not allowed(policies, {}, labels, port, src_ns={"kubernetes.io/metadata.name": "default"})


def test_the_network_policy_check_catches_a_widened_policy():
    docs = _rendered("base")
    by = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    # an ingress rule on the workers (and the orchestrator allowed to dial them)
    broken = copy.deepcopy(docs)
    next(d for d in broken if d["metadata"]["name"] == "fedseq-workers")["spec"]["ingress"] = [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "orchestrator"}}},
                  {"namespaceSelector": {"matchLabels": {"fedseq.io/monitoring": "true"}}}]}]
    next(d for d in broken if d["metadata"]["name"] == "fedseq-orchestrator")["spec"]["egress"].append(
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}}}]})
    assert ("orchestrator", "client-0", 50050) in flows(broken)
    policies = [d for d in broken if d["kind"] == "NetworkPolicy"]
    assert allowed(policies, {}, _pods(broken)["client-0"], 9464, src_ns={"fedseq.io/monitoring": "true"})
    # the workers' egress widened, even where the other side still refuses
    broken = copy.deepcopy(docs)
    next(d for d in broken if d["metadata"]["name"] == "fedseq-workers")["spec"]["egress"].append({"ports": [{"port": 6379}]})
    assert flows(broken) == EXPECTED_FLOWS and worker_egress_errors(broken)
    # workers reaching Redis
    broken = copy.deepcopy(docs)
    redis = next(d for d in broken if d["metadata"]["name"] == "redis-store-only")
    redis["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}}})
    next(d for d in broken if d["metadata"]["name"] == "fedseq-workers")["spec"]["egress"].append({"ports": [{"port": 6379}]})
    assert ("client-0", "redis", 6379) in flows(broken)
    # without the default deny, a pod no policy selects talks to anyone who listens
    stranger, internet = _pods(docs)["stranger"], {"kubernetes.io/metadata.name": "anywhere"}
    assert not allowed([d for d in docs if d["kind"] == "NetworkPolicy"], stranger, {}, 443, dst_ns=internet)
    broken = [d for d in copy.deepcopy(docs) if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] != "default-deny"]
    assert allowed(broken, stranger, {}, 443, dst_ns=internet)
    # without the workers' policy they could dial anything (egress is no longer isolated)
    broken = [d for d in copy.deepcopy(docs) if d["metadata"]["name"] != "fedseq-workers"] + [by["default-deny"]]
    assert flows(broken) != EXPECTED_FLOWS


# ------------------------------------------------------------------ disruption budgets


def test_the_singletons_have_disruption_budgets():
    docs = _rendered("base")
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"server", "orchestrator"}
    for name, spec in pdbs.items():
        # a singleton: no voluntary eviction while it runs
        assert spec.get("maxUnavailable") == 0 or spec.get("minAvailable") == 1, name
        selected = [d["metadata"]["name"] for d in _workloads(docs)
                    if _matches(spec["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert selected == [name], f"PDB {name} selects {selected}"
        w = next(d for d in _workloads(docs) if d["metadata"]["name"] == name)
        assert _replicas(w) == 1
        if w["kind"] == "Job":  # no scale subresource: only an integer minAvailable works there
            assert spec.get("minAvailable") == 1 and "maxUnavailable" not in spec


# ------------------------------------------------------------------ resources


def _quantity(q: str | int) -> float:
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q)


def requests_total(docs: list[dict]) -> tuple[float, float]:
    """(CPU, bytes) the scheduler reserves for ``docs`` at their replica counts: per pod the larger
    of its largest init container and the sum of its containers."""
    cpu = mem = 0.0
    for d in _workloads(docs):
        spec = _pod_spec(d)

        def req(cs: list[dict], what: str) -> list[float]:
            return [_quantity(c["resources"]["requests"][what]) for c in cs]

        for what in ("cpu", "memory"):
            need = max([sum(req(spec["containers"], what)), *req(spec.get("initContainers", []), what)])
            if what == "cpu":
                cpu += need * _replicas(d)
            else:
                mem += need * _replicas(d)
    return cpu, mem


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_container_requests_resources_that_fit_a_small_cluster(name):
    docs = _rendered(name)
    for d in _workloads(docs):
        for c in _containers(_pod_spec(d)):
            r = c["resources"]
            assert {"cpu", "memory"} <= set(r["requests"]), f"{d['metadata']['name']}/{c['name']}"
            assert _quantity(r["limits"]["memory"]) >= _quantity(r["requests"]["memory"]), c["name"]
    cpu, mem = requests_total(docs)
    assert cpu <= 3.0 and mem <= 6 * 2**30, (cpu, mem / 2**30)  # well under 4 CPU / 8 Gi
    assert requests_total(docs) == requests_total(_rendered("base")) or name == "attack"


def test_the_gpu_overlay_gives_each_worker_a_gpu_and_nothing_else_one():
    for d in _workloads(_rendered("gpu")):
        spec = _pod_spec(d)
        c = spec["containers"][0]
        gpu = c["resources"]["limits"].get("nvidia.com/gpu")
        if _is_worker(d):
            assert gpu == 1
            assert _env(c)["FEDSEQ_DEVICE"] == "cuda"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        else:
            assert gpu is None and "tolerations" not in spec and "FEDSEQ_DEVICE" not in _env(c)


def test_the_attack_overlay_runs_dv_fsr_with_its_attacker():
    docs = _rendered("attack")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    cfg = build_config(None, {}, environ=dict(config))
    assert cfg.attack == "dv-fsr" and cfg.malicious_ratio > 0
    assert config["FEDSEQ_RUN_ID"] != next(d for d in _rendered("base") if d["kind"] == "ConfigMap")["data"][
        "FEDSEQ_RUN_ID"], "an attacked run must not resume the clean run's state"
    replicas = {d["metadata"]["name"]: _replicas(d) for d in _workloads(docs) if _is_worker(d)}
    assert replicas == {"client-0": 1, "client-1": 1, "attacker-0": 1}


@pytest.mark.parametrize("name", RENDERINGS)
def test_round_one_waits_for_the_workers_the_rendering_runs(name):
    docs = _rendered(name)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    workers = sum(_replicas(d) for d in _workloads(docs) if _is_worker(d))
    assert int(config["FEDSEQ_MIN_WORKERS"]) == workers


# ------------------------------------------------------------------ workers listen on nothing


@pytest.mark.parametrize("name", RENDERINGS)
def test_workers_have_no_service_and_no_port_and_metrics_are_announced(name):
    docs = _rendered(name)
    services = [d for d in docs if d["kind"] == "Service"]
    for d in _workloads(docs):
        labels = d["spec"]["template"]["metadata"]["labels"]
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        c = _pod_spec(d)["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if _is_worker(d):
            assert not [s for s in services if s["spec"]["selector"].items() <= labels.items()], "a worker Service"
            assert set(ports) <= {"metrics"}, f"{d['metadata']['name']} opens {ports}"
            env = _env(c)
            assert not {"FEDSEQ_PORT", "FEDSEQ_HOST", "FEDSEQ_ADVERTISE_HOST"} & set(env)
            assert env["FEDSEQ_ORCHESTRATOR"] == "orchestrator:50050"
        # a metrics port is served on all interfaces and announced to Prometheus, and only then
        if "metrics" in ports:
            assert _env(c)["FEDSEQ_METRICS_PORT"] == str(ports["metrics"])
            assert _env(c)["FEDSEQ_METRICS_HOST"] == "0.0.0.0"
            assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(ports["metrics"]),
                                   "prometheus.io/path": "/metrics"}
        else:
            assert "prometheus.io/scrape" not in annotations and "FEDSEQ_METRICS_PORT" not in _env(c)


# ------------------------------------------------------------------ images


def image_errors(docs: list[dict]) -> list[str]:
    errors = []
    for d in _workloads(docs):
        for c in _containers(_pod_spec(d)):
            name, _, tag = c["image"].rpartition(":")
            if not name or "/" in tag or tag in ("", "latest"):
                errors.append(f"{d['metadata']['name']}/{c['name']}: {c['image']} has no version tag")
            elif name.endswith("fedseq") and tag != VERSION and not tag.startswith(f"{VERSION}-"):
                errors.append(f"{d['metadata']['name']}/{c['name']}: {c['image']} is not version {VERSION}")
    return errors


@pytest.mark.parametrize("name", RENDERINGS)
def test_images_carry_the_project_version(name):
    assert image_errors(_rendered(name)) == []
    assert image_errors(_resources()) == []  # the manifests as written too
    images = {i["name"]: i for i in _kustomization()["images"]}
    assert images["fedseq"]["newTag"] == VERSION  # the one place that sets it
    gpu = yaml.safe_load((K8S / "components" / "gpu" / "kustomization.yaml").read_text())["images"][0]
    assert gpu["newTag"].startswith(f"{VERSION}-")
    broken = copy.deepcopy(_resources())
    _pod_spec(next(d for d in broken if d["kind"] == "Deployment" and d["metadata"]["name"] == "server"))[
        "containers"][0]["image"] = "fedseq:latest"
    _pod_spec(next(d for d in broken if d["kind"] == "Job"))["initContainers"][0]["image"] = "fedseq"
    assert len(image_errors(broken)) == 2


# ------------------------------------------------------------------ monitoring: the Grafana dashboard and the scrape job

MONITORING = K8S / "monitoring"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedseq.json"


def _monitoring() -> dict[str, dict]:
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    docs = [d for name in kust["resources"] for d in yaml.safe_load_all((MONITORING / name).read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs}


def _configmap_script():
    spec = importlib.util.spec_from_file_location("grafana_configmap", ROOT / "deploy" / "grafana" / "configmap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_monitoring_manifests_are_valid_and_the_dashboard_configmap_is_the_json_file():
    # Prepare
    docs = _monitoring()
    script = _configmap_script()
    committed = (MONITORING / "grafana-dashboard.yaml").read_text()
    # Assert: two valid ConfigMaps
    assert {(d["kind"], n) for n, d in docs.items()} == {("ConfigMap", "fedseq-grafana-dashboard"),
                                                         ("ConfigMap", "fedseq-prometheus-scrape")}
    for d in docs.values():
        _validate(d)
    board = docs["fedseq-grafana-dashboard"]
    assert board["metadata"]["labels"] == {"grafana_dashboard": "1"}  # the Grafana chart's sidecar label
    # the JSON file byte for byte, and exactly what the generator writes (no hand edits to drift)
    assert board["data"]["fedseq.json"].encode() == DASHBOARD.read_bytes()
    assert script.render(DASHBOARD.read_text()) == committed
    assert json.loads(board["data"]["fedseq.json"])["uid"] == "fedseq"
    assert len(committed.encode()) < 262144  # fits kubectl apply's last-applied annotation
    # Execute + Assert: a changed dashboard no longer matches the committed ConfigMap
    drifted = DASHBOARD.read_text().replace('"refresh": "10s"', '"refresh": "30s"')
    assert drifted != DASHBOARD.read_text() and script.render(drifted) != committed
    with pytest.raises(ValueError):
        script.render(DASHBOARD.read_text() + "\n")  # a blank last line a literal block would not keep


def _relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabeling (keep and replace, the actions the fedseq job uses) of one target."""
    out = dict(labels)
    for r in rules:
        value = r.get("separator", ";").join(out.get(s, "") for s in r["source_labels"])
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        action = r.get("action", "replace")
        if action == "keep":
            if not m:
                return None
        elif action == "replace":
            if m:
                groups = (m.group(0), *m.groups())
                repl = re.sub(r"\$\{?(\d+)\}?", lambda g, gs=groups: gs[int(g.group(1))] or "", r.get("replacement", "$1"))
                out[r["target_label"]] = repl
        else:
            raise AssertionError(f"unexpected relabel action {action}")
    return out


def _pod_target(doc: dict, ip: str) -> dict[str, str]:
    """The labels Kubernetes service discovery (role pod) gives a target of ``doc``'s pod."""
    meta = doc["spec"]["template"]["metadata"]
    san = functools.partial(re.sub, r"[^A-Za-z0-9_]", "_")
    out = {"__address__": ip, "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_name": f"{doc['metadata']['name']}-0",
           "__metrics_path__": "/metrics"}
    out.update({f"__meta_kubernetes_pod_label_{san(k)}": v for k, v in meta.get("labels", {}).items()})
    out.update({f"__meta_kubernetes_pod_annotation_{san(k)}": v for k, v in meta.get("annotations", {}).items()})
    return out


def test_the_scrape_job_finds_the_pods_that_announce_metrics():
    """The scrape job, applied to the base's pods as Kubernetes discovery labels them: it keeps the
    server and the orchestrator (and nothing else), at their announced port and path, named after
    the pod, in the namespace of namespace.yaml."""
    # Prepare
    scrape = yaml.safe_load(_monitoring()["fedseq-prometheus-scrape"]["data"]["fedseq-scrape.yml"])
    job = scrape["scrape_configs"][0]
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())["metadata"]["name"]
    docs = _workloads(_rendered("base"))
    # Execute
    kept = {}
    for ip in ("10.1.2.3", "fd00::7"):
        for d in docs:
            t = _relabel(_pod_target(d, ip), job["relabel_configs"])
            if t is not None:
                kept[d["metadata"]["name"], ip] = t
    # Assert
    assert job["job_name"] == "fedseq"
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [namespace]}}]
    assert {name for name, _ in kept} == {"server", "orchestrator"}
    for (name, ip), t in kept.items():
        host = f"[{ip}]" if ":" in ip else ip
        assert t["__address__"] == f"{host}:9464" and t["__metrics_path__"] == "/metrics", t
        assert t["instance"] == f"{name}-0" and t["service"] == name
    # and the job drops a pod that stops announcing its endpoint
    server = next(d for d in docs if d["metadata"]["name"] == "server")
    server["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] = "false"
    assert _relabel(_pod_target(server, "10.1.2.3"), job["relabel_configs"]) is None
