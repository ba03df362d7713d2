"""deploy/k8s/ray: the KubeRay RayJob that runs a fedseq sweep on a Ray cluster
(`fedseq sweep --executor ray`), its spec ConfigMap, its results claim, its namespace and the pod
that reads the results back.

Schemas: the RayJob against KubeRay's RayJob v1 schema, vendored in
deploy/k8s/ray/schema/rayjob-v1.json (jsonschema, strict as `kubectl apply` is: an unknown field is
an error). That excerpt leaves the three embedded PodSpecs open (schema/README.md), so the head,
worker and submitter pod templates are validated with kubernetes-validate (strict), as are the
other manifests, as tests/test_k8s.py does.

Agreement with the code and the image: the entrypoint is a `fedseq sweep` command line that
fedseq's own parser (cli/main.py) accepts, with `--executor ray`, `--out` on the results claim's
mount on the head (where the driver runs) and `--spec` on the ConfigMap's mount; the spec loads with
cli/sweep_spec.py's loader, every cell's config builds, and it is the mission preset's; the image is
`fedseq:<pyproject version>-ray`; `rayVersion` is the Ray pinned in requirements-ray.lock, and that
lock has Ray's dashboard (the job API KubeRay submits through, and the health endpoint the probes
call).

Hardening, with tests/test_k8s.py's own checks: the restricted Pod Security Standard on every pod,
probes on the Ray containers, resource requests that fit a small cluster (and Ray's CPU count equal
to the request). Each check is also shown to fail on a copy with a field taken out or changed."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

import cli.main as cli
from cli import sweep
from cli.flags import QUICKSTART
from cli.sweep_spec import MISSION_DATA, PRESETS, SweepError, spec_from
from tests.test_deploy import _lock
from tests.test_k8s import FIELDS_TO_BREAK, VERSION, _quantity, _validate, pss_violations

ROOT = Path(__file__).resolve().parents[1]
RAY = ROOT / "deploy" / "k8s" / "ray"
SCHEMA = RAY / "schema" / "rayjob-v1.json"
RAY_LOCK = ROOT / "requirements-ray.lock"
IMAGE = f"fedseq:{VERSION}-ray"
NAMESPACE = "fedseq-ray"
HEALTH = {"path": "/api/healthz", "port": 52365}  # Ray's dashboard agent: raylet (and GCS on the head)


def _kustomization() -> dict:
    return yaml.safe_load((RAY / "kustomization.yaml").read_text())


@functools.cache
def _parsed() -> dict[str, dict]:
    docs = [d for name in _kustomization()["resources"] for d in yaml.safe_load_all((RAY / name).read_text()) if d]
    docs.append(yaml.safe_load((RAY / "results-pod.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def _docs() -> dict[str, dict]:
    """The manifests as written, by kind (one of each); a fresh copy each call."""
    return copy.deepcopy(_parsed())


def _templates(job: dict) -> dict[str, dict]:
    """The RayJob's pod templates: the head's, the worker group's, the submitter's."""
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"], "worker": cluster["workerGroupSpecs"][0]["template"],
            "submitter": job["spec"]["submitterPodTemplate"]}


def _as_pod(name: str, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


def _strict(node: object) -> object:
    """KubeRay's schema as the API server applies it under strict field validation (kubectl's
    default): an object that lists its properties takes no others, unless it says it keeps unknown
    fields (x-kubernetes-preserve-unknown-fields, which the excerpt's open PodSpecs say)."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    if "anyOf" in out:
        out["anyOf"] = [_strict(s) for s in out["anyOf"]]
    return out


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(json.loads(SCHEMA.read_text())))


def rayjob_errors(job: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(job)]


def _validate_template(name: str, template: dict) -> None:
    _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


# ------------------------------------------------------------------ schemas


def test_the_rayjob_is_valid_against_kuberays_schema():
    # Prepare
    job = _docs()["RayJob"]
    misspelt, wrong_type, no_entrypoint, no_start_params = (copy.deepcopy(job) for _ in range(4))
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    group = misspelt["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")  # and one deep down
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
    del no_entrypoint["spec"]["entrypoint"]
    del no_start_params["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    # Execute + Assert
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert rayjob_errors(job) == []
    assert {e.split(": ", 1)[0] for e in rayjob_errors(misspelt) if "was unexpected" in e} == {
        "spec", "spec/rayClusterSpec/workerGroupSpecs/0"}
    assert any("replicas" in e for e in rayjob_errors(wrong_type))
    assert any("'entrypoint' is a required property" in e for e in rayjob_errors(no_entrypoint))
    assert any("'rayStartParams' is a required property" in e for e in rayjob_errors(no_start_params))


def test_the_pod_templates_and_the_other_manifests_are_valid_against_the_kubernetes_schemas():
    """The excerpt of KubeRay's schema leaves the PodSpecs open: kubernetes-validate checks them."""
    # Prepare
    docs = _docs()
    templates = _templates(docs["RayJob"])
    broken = copy.deepcopy(docs["RayJob"])
    _templates(broken)["worker"]["spec"]["containers"][0]["imagePulPolicy"] = "IfNotPresent"  # misspelt
    # Execute + Assert
    assert set(docs) == {"Namespace", "ConfigMap", "PersistentVolumeClaim", "RayJob", "Pod"}
    for name, template in templates.items():
        _validate_template(name, template)
    for kind, doc in docs.items():
        if kind != "RayJob":
            _validate(doc)
    assert rayjob_errors(broken) == []  # the open PodSpec lets it through...
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_template("worker", _templates(broken)["worker"])  # ...the PodTemplate check does not


def test_the_kustomization_puts_everything_in_a_restricted_namespace_with_one_image():
    # Prepare
    kust = _kustomization()
    namespace = _docs()["Namespace"]
    tool = (["kustomize", "build"] if shutil.which("kustomize") else
            ["kubectl", "kustomize"] if shutil.which("kubectl") else None)
    # Assert: the files it lists are the manifests (the results pod stays out: applied by hand)
    assert kust["namespace"] == namespace["metadata"]["name"] == NAMESPACE
    assert kust["images"] == [{"name": "fedseq", "newTag": f"{VERSION}-ray"}]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert "results-pod.yaml" not in kust["resources"]
    if tool is None:
        pytest.skip("neither kustomize nor kubectl is installed: the checks above are the check")
    # Execute: the real rendering
    out = subprocess.run([*tool, str(RAY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    # Assert
    assert sorted(d["kind"] for d in rendered) == ["ConfigMap", "Namespace", "PersistentVolumeClaim", "RayJob"]
    for d in rendered:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedseq"
        assert d["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    job = next(d for d in rendered if d["kind"] == "RayJob")
    assert rayjob_errors(job) == []
    assert {c["image"] for t in _templates(job).values() for c in t["spec"]["containers"]} == {IMAGE}


# ------------------------------------------------------------------ the RayJob agrees with fedseq


def entrypoint_errors(job: dict) -> list[str]:
    """What keeps the RayJob's entrypoint from being the sweep this deployment means: a `fedseq
    sweep` that fedseq's parser accepts, on the Ray executor (RAY_ADDRESS, no --address), cells as
    large as the workers' Ray CPUs divide, the spec from the ConfigMap's mount and --out on the
    results claim's mount, both on the head, where the driver runs."""
    argv = shlex.split(job["spec"]["entrypoint"])
    if argv[:2] != ["fedseq", "sweep"]:
        return [f"not a fedseq sweep: {argv[:2]}"]
    try:
        args = cli.parser().parse_args(argv[1:])
    except SystemExit as e:
        return [f"fedseq's parser refuses {argv[1:]} (exit {e.code})"]
    errors = []
    if args.fn is not sweep.main:
        errors.append("the parser does not run cli/sweep.py's main")
    if getattr(args, "executor", None) != "ray":
        errors.append(f"--executor is {getattr(args, 'executor', None)!r}, not ray")
    if getattr(args, "address", None) is not None:
        errors.append("--address given: the job's RAY_ADDRESS names the cluster")
    head = _templates(job)["head"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    claim = volumes.get(mounts.get(args.out or ""), {}).get("persistentVolumeClaim", {}).get("claimName")
    if claim != _docs()["PersistentVolumeClaim"]["metadata"]["name"]:
        errors.append(f"--out {args.out} is not the results claim's mount on the head")
    spec = Path(args.spec or "")
    config_map = volumes.get(mounts.get(str(spec.parent), ""), {}).get("configMap", {}).get("name")
    if config_map != _docs()["ConfigMap"]["metadata"]["name"] or spec.name not in _docs()["ConfigMap"]["data"]:
        errors.append(f"--spec {args.spec} is not the spec ConfigMap's file on the head")
    cores = getattr(args, "cell_cores", None) or 1
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        if int(group["rayStartParams"]["num-cpus"]) % cores:
            errors.append(f"--cell-cores {cores} does not divide worker group {group['groupName']}'s CPUs")
    return errors


def test_the_entrypoint_is_a_fedseq_sweep_on_ray_that_fedseqs_parser_accepts():
    # Prepare
    job = _docs()["RayJob"]
    elsewhere, unknown_flag, no_executor, spec_elsewhere = (copy.deepcopy(job) for _ in range(4))
    elsewhere["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("--out /results", "--out /tmp/results")
    unknown_flag["spec"]["entrypoint"] += " --no-such-flag"
    no_executor["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(" --executor ray", "")
    spec_elsewhere["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("/etc/fedseq/", "/etc/")
    # Execute + Assert
    assert entrypoint_errors(job) == []
    assert entrypoint_errors(elsewhere) == ["--out /tmp/results is not the results claim's mount on the head"]
    assert entrypoint_errors(unknown_flag)[0].startswith("fedseq's parser refuses")
    assert any("--executor" in e for e in entrypoint_errors(no_executor))
    assert any("--spec" in e for e in entrypoint_errors(spec_elsewhere))


def test_the_spec_in_the_configmap_loads_and_is_the_missions(tmp_path):
    """cli/sweep_spec.py's loader, as the driver runs it: every cell's config builds; the base and
    the scenarios are the mission preset's, run in process."""
    # Prepare
    (key, text), = _docs()["ConfigMap"]["data"].items()
    (tmp_path / key).write_text(text)
    (tmp_path / "bad.toml").write_text(text.replace("seeds = [0, 1, 2]", "seed = 0"))
    load = lambda name: spec_from(cli.parser().parse_args(["sweep", "--spec", str(tmp_path / name)]))  # noqa: E731
    # Execute
    spec = load(key)
    cells = spec.cells()
    # Assert
    assert key.endswith(".toml") and spec.engine == "inprocess"
    assert spec.base == {**QUICKSTART, "dataset": MISSION_DATA} == PRESETS["mission"]["base"]
    assert list(spec.scenarios) == PRESETS["mission"]["scenarios"]
    assert len(cells) == 3 * len(spec.seeds) == 9
    with pytest.raises(SweepError, match="unknown sweep key"):
        load("bad.toml")


def image_errors(docs: dict[str, dict]) -> list[str]:
    errors = []
    pods = {**_templates(docs["RayJob"]), "results": docs["Pod"]}
    for name, pod in pods.items():
        for c in pod["spec"]["containers"]:
            if c["image"] != IMAGE:
                errors.append(f"{name}/{c['name']}: {c['image']} is not {IMAGE}")
    return errors


def test_images_carry_the_project_version_and_ray_is_the_locked_one():
    # Prepare
    docs = _docs()
    pins = _lock(RAY_LOCK)
    broken = copy.deepcopy(docs)
    _templates(broken["RayJob"])["worker"]["spec"]["containers"][0]["image"] = "fedseq:latest"
    broken["Pod"]["spec"]["containers"][0]["image"] = "fedseq:0.0.1-ray"
    # Execute + Assert
    assert image_errors(docs) == []
    assert len(image_errors(broken)) == 2
    assert docs["RayJob"]["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"][0]


def test_the_ray_image_has_rays_dashboard():
    """KubeRay submits the entrypoint through Ray's job API, served by the dashboard on the head,
    and the probes call the dashboard agent: both are ray[default], not plain ray. Every package of
    Ray's `default` extra must be pinned in requirements-ray.lock (the image's lock)."""
    # Prepare
    pins = set(_lock(RAY_LOCK))
    try:
        requires = importlib.metadata.requires("ray") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ray is not installed here: its extras are read from its metadata")
    extra = [Requirement(r) for r in requires]
    default = {r.name.lower().replace("_", "-") for r in extra  # needed with [default], not without
               if r.marker is not None and r.marker.evaluate({"extra": "default"}) and not r.marker.evaluate({"extra": ""})}
    # Assert
    assert {"aiohttp", "aiohttp-cors"} <= default  # the dashboard's HTTP server
    missing = sorted(default - pins)
    assert not missing, (f"requirements-ray.lock lacks Ray's dashboard ({missing}): lock ray[default] (the ray "
                         "extra of pyproject.toml), or the RayJob can neither submit nor pass its probes")


# ------------------------------------------------------------------ hardening


def test_every_pod_meets_the_restricted_pod_security_standard():
    # Prepare
    docs = _docs()
    pods = [_as_pod(name, t) for name, t in _templates(docs["RayJob"]).items()] + [docs["Pod"]]
    # Execute + Assert
    for pod in pods:
        assert pss_violations(pod) == [], pod["metadata"]["name"]
    for where, path in FIELDS_TO_BREAK:  # tests/test_k8s.py's list; no init container here
        if where == "init":
            continue
        head = _as_pod("head", _templates(_docs()["RayJob"])["head"])
        obj = head["spec"] if where == "pod" else head["spec"]["containers"][0]
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]
        assert pss_violations(head), f"removing {where} {'.'.join(path)} went unnoticed"


def probe_errors(job: dict) -> list[str]:
    errors = []
    for name in ("head", "worker"):
        c = _templates(job)[name]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if c.get(probe, {}).get("httpGet") != HEALTH:
                errors.append(f"{name}: {probe} is not Ray's health check {HEALTH}")
        s = c.get("startupProbe", {})
        if s.get("periodSeconds", 10) * s.get("failureThreshold", 3) < 120:
            errors.append(f"{name}: less than 2 minutes to start")
    return errors


def test_the_ray_containers_have_probes_on_rays_health_check():
    # Prepare
    job = _docs()["RayJob"]
    broken = copy.deepcopy(job)
    del _templates(broken)["worker"]["spec"]["containers"][0]["livenessProbe"]
    _templates(broken)["head"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] = 3
    agent = Path(importlib.util.find_spec("ray").origin).parent if importlib.util.find_spec("ray") else None
    # Execute + Assert
    assert probe_errors(job) == []
    assert len(probe_errors(broken)) == 2
    if agent is not None:  # the endpoint and the port are the installed Ray's (read, not imported: ray is slow to import)
        assert '@routes.get("/api/healthz")' in (agent / "dashboard/modules/reporter/healthz_agent.py").read_text()
        assert f"DEFAULT_DASHBOARD_AGENT_LISTEN_PORT = {HEALTH['port']}" in (
            agent / "_private/ray_constants.py").read_text()


def resource_errors(job: dict) -> list[str]:
    """Requests on every container, memory limits at least the request, Ray's CPU count of each
    group equal to its CPU request (none on the head), and the whole cluster within 3 CPU / 6 GiB
    (the base's budget, tests/test_k8s.py)."""
    errors = []
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"], 1)] + [(g["groupName"], g, g["replicas"])
                                                         for g in cluster["workerGroupSpecs"]]
    cpu = mem = 0.0
    for name, group, replicas in [*groups, ("submitter", {"template": job["spec"]["submitterPodTemplate"]}, 1)]:
        c = group["template"]["spec"]["containers"][0]
        r = c.get("resources", {})
        if not {"cpu", "memory"} <= set(r.get("requests", {})):
            errors.append(f"{name}: no cpu and memory requests")
            continue
        if _quantity(r.get("limits", {}).get("memory", 0)) < _quantity(r["requests"]["memory"]):
            errors.append(f"{name}: memory limit below the request")
        if "rayStartParams" in group:
            want = 0 if name == "head" else _quantity(r["requests"]["cpu"])
            if float(group["rayStartParams"].get("num-cpus", -1)) != want:
                errors.append(f"{name}: Ray's num-cpus is not {want:g}")
        cpu += _quantity(r["requests"]["cpu"]) * replicas
        mem += _quantity(r["requests"]["memory"]) * replicas
    if cpu > 3.0 or mem > 6 * 2**30:
        errors.append(f"{cpu:g} CPU, {mem / 2**30:.1f} GiB in all: more than a small cluster")
    return errors


def test_resource_requests_fit_a_small_cluster_and_match_rays_cpus():
    # Prepare
    job = _docs()["RayJob"]
    bigger, ray_cpus, head_cpus = (copy.deepcopy(job) for _ in range(3))
    bigger["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 4
    ray_cpus["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "2"
    del head_cpus["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]
    # Execute + Assert
    assert resource_errors(job) == []
    assert any("more than a small cluster" in e for e in resource_errors(bigger))
    assert resource_errors(ray_cpus) == ["cells: Ray's num-cpus is not 1"]
    assert resource_errors(head_cpus) == ["head: Ray's num-cpus is not 0"]


def test_the_job_cleans_up_after_itself_and_keeps_the_results():
    # Prepare
    docs = _docs()
    spec = docs["RayJob"]["spec"]
    # Assert: the cluster goes when the sweep ends (and within a deadline); the claim is its own
    # object (no owner: it outlives the cluster), mounted on the head only
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert 0 < spec["activeDeadlineSeconds"] and spec["submissionMode"] == "K8sJobMode"
    assert "ownerReferences" not in docs["PersistentVolumeClaim"]["metadata"]
    claims = {name: [v for v in t["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
              for name, t in _templates(docs["RayJob"]).items()}
    assert [len(v) for v in claims.values()] == [1, 0, 0]
    assert docs["Pod"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": docs["PersistentVolumeClaim"]["metadata"]["name"], "readOnly": True}
