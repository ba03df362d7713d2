"""Render deploy/k8s/base (or an overlay of it) for `podman kube play` (podman 4.3, the dev
machines), as kustomize would render it for a cluster, then lower the few kinds and fields that
podman 4.3 lacks. The committed manifests stay complete: only this rendering drops or converts.

    python podman_kube.py KUSTOMIZATION_DIR TLS_DIR OUT.yaml [--image fedseq=IMG] [--image redis=IMG]
                          [--set KEY=VALUE ...] [--replicas NAME=N ...] [--workers KIND=N ...]

What kustomize does here (the subset the base, the overlays and the components use; anything else
is refused, not ignored): `resources` (files, and folders holding a kustomization), `components`,
`labels`, `images`, `replicas`, `patches` with a `target` and a JSON 6902 patch, the
`secretGenerator` (its files from TLS_DIR, below). Then image names (--image, after the
kustomization's `images:`), ConfigMap values (--set) and replicas (--replicas).

--workers client=3 (what an overlay with more worker Deployments would do): the worker Deployments
of that kind become exactly client-0..client-2, one replica each; the ones the base lacks are copies
of client-0 with their own identity (FEDSEQ_TLS_NAME and the Secret fedseq-tls-<name>, which the
caller provides like the generated ones).

What podman 4.3 lacks, and what this script does instead (the pod templates stay as written):
- StatefulSet, Job: not played. Each becomes a Pod with the same pod spec; a volumeClaimTemplate
  becomes a PersistentVolumeClaim `<claim>-<name>-0`.
- The Job's restartPolicy Never (which its podFailurePolicy needs) becomes OnFailure: podman has no
  Job controller to start the next pod, so the pod restarts its own failed container instead.
  backoffLimit, podFailurePolicy, activeDeadlineSeconds and ttlSecondsAfterFinished are Job fields
  with no podman equivalent; they stay behind with the Job.
- Deployment: podman plays one replica. Each replica becomes a Pod `<name>-<i>`; a single replica
  that no Service selects (a worker: client-0, attacker-0) becomes the Pod `<name>`.
- Service: podman has none. A pod's name is its DNS name on podman's kube network, so the Pod of
  the single-replica workload that a Service selects is named after the Service (redis, server,
  orchestrator): the addresses in the manifests resolve unchanged.
- Secret volumes and envFrom/configMapKeyRef: written out (hostPath folders of the Secret's files
  made by the caller, and literal env values). hostPath is what the restricted Pod Security
  Standard forbids on a cluster; here it only stands for the Secret.
- fieldRef status.podIP: unsupported; the value `auto` (the pod's own address).
- containerPort: podman 4.3 publishes each on the host, so two replicas collide; dropped (pods
  reach each other on the kube network without it).
- startupProbe: podman 4.3 has none (it runs the livenessProbe, as its health check, from the
  start); dropped, and the livenessProbe waits as long as the startup probe would have allowed
  (initialDelaySeconds = periodSeconds x failureThreshold of the startup probe).
- fsGroup: podman 4.3 does not apply it. The Secret folders are made owned by the pods' user by the
  caller (play-local.sh), and a new claim's volume starts as a copy of the image's folder it is
  mounted on (/results: owned by uid 10001 in the image; /data: redis's own).
- NetworkPolicy, PodDisruptionBudget: nothing enforces them under podman (one network, no
  evictions); left out.
- The rest of the restricted profile (runAsNonRoot, runAsUser/Group, capabilities drop ALL,
  allowPrivilegeEscalation false, readOnlyRootFilesystem, seccomp RuntimeDefault: podman's default
  profile) and emptyDir volumes are played as written.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


# ------------------------------------------------------------------ a kustomize subset


class KustomizeError(SystemExit):
    """A kustomization this renderer cannot build (a field it does not implement, a patch that
    does not apply): refused rather than rendered differently from kustomize."""


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(doc: dict, ops: list[dict], where: str) -> None:
    """Apply the JSON 6902 operations ``ops`` (add, replace, remove) to ``doc`` in place."""
    for op in ops:
        keys = _pointer(op["path"])
        parent = doc
        for k in keys[:-1]:
            try:
                parent = parent[int(k)] if isinstance(parent, list) else parent[k]
            except (KeyError, IndexError, ValueError):
                raise KustomizeError(f"{where}: {op['op']} {op['path']}: {k!r} is not there") from None
        last = keys[-1]
        kind = op["op"]
        if isinstance(parent, list):
            i = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(i, copy.deepcopy(op["value"]))
            elif kind in ("replace", "remove") and 0 <= i < len(parent):
                if kind == "replace":
                    parent[i] = copy.deepcopy(op["value"])
                else:
                    del parent[i]
            else:
                raise KustomizeError(f"{where}: {kind} {op['path']}: no such item")
        elif isinstance(parent, dict):
            if kind == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif kind in ("replace", "remove") and last in parent:
                if kind == "replace":
                    parent[last] = copy.deepcopy(op["value"])
                else:
                    del parent[last]
            else:
                raise KustomizeError(f"{where}: {kind} {op['path']}: no such key")
        else:
            raise KustomizeError(f"{where}: {kind} {op['path']}: not an object or a list")


def _selected(doc: dict, target: dict) -> bool:
    meta = doc["metadata"]
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], meta["name"]):
        return False
    if "labelSelector" in target:
        labels = meta.get("labels", {})
        for term in target["labelSelector"].split(","):
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def split_image(image: str) -> tuple[str, str]:
    """``REGISTRY/NAME:TAG@DIGEST`` -> (``REGISTRY/NAME``, ``:TAG@DIGEST``): the name kustomize's
    ``images:`` matches, and the rest."""
    head, at, digest = image.partition("@")
    slash, colon = head.rfind("/"), head.rfind(":")
    name, tag = (head[:colon], head[colon:]) if colon > slash else (head, "")
    return name, tag + at + digest


def _image_transform(docs: list[dict], images: list[dict]) -> None:
    for d in docs:
        spec = pod_spec(d)
        for c in (spec.get("initContainers", []) + spec["containers"]) if spec else []:
            name, rest = split_image(c["image"])
            for img in images:
                if img["name"] == name:
                    if "digest" in img:
                        rest = "@" + img["digest"]
                    elif "newTag" in img:
                        rest = ":" + str(img["newTag"])
                    c["image"] = img.get("newName", name) + rest
                    break


KNOWN = {"apiVersion", "kind", "resources", "components", "labels", "images", "replicas", "patches",
         "secretGenerator", "generatorOptions"}


def build(kdir: Path) -> tuple[list[dict], dict[str, list[Path]]]:
    """What ``kustomize build kdir`` makes (the subset above): the objects, and the
    secretGenerator's Secrets (name -> its files) apart, since podman gets those as folders."""
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
    unknown = set(kust) - KNOWN
    if unknown:
        raise KustomizeError(f"{kdir}/kustomization.yaml: {', '.join(sorted(unknown))}: not implemented here")
    docs: list[dict] = []
    secrets: dict[str, list[Path]] = {}
    for name in kust.get("resources", []):
        path = kdir / name
        if path.is_dir():
            sub_docs, sub_secrets = build(path)
            docs += sub_docs
            secrets.update(sub_secrets)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for name in kust.get("components", []):
        docs, secrets = _transform(kdir / name, docs, secrets)
    return _transform(kdir, docs, secrets, kust)


def _transform(kdir: Path, docs: list[dict], secrets: dict[str, list[Path]],
               kust: dict | None = None) -> tuple[list[dict], dict[str, list[Path]]]:
    """A kustomization's (or a component's) generators and transformers applied to ``docs``."""
    if kust is None:  # a component
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
        unknown = set(kust) - KNOWN
        if unknown:
            raise KustomizeError(f"{kdir}/kustomization.yaml: {', '.join(sorted(unknown))}: not implemented here")
        if kust.get("resources") or kust.get("components"):
            raise KustomizeError(f"{kdir}: resources in a component are not implemented here")
    docs = copy.deepcopy(docs)
    secrets = dict(secrets)
    for gen in kust.get("secretGenerator", []):
        secrets[gen["name"]] = [kdir / f for f in gen["files"]]
    # kustomize's order: patches, labels, replicas, images
    for patch in kust.get("patches", []):
        if "target" not in patch:
            raise KustomizeError(f"{kdir}: a patch without a target (strategic merge) is not implemented here")
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (kdir / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise KustomizeError(f"{kdir}: only JSON 6902 patches (a list of operations) are implemented here")
        hits = [d for d in docs if _selected(d, patch["target"])]
        if not hits:
            raise KustomizeError(f"{kdir}: patch target {patch['target']} selects nothing")
        for d in hits:
            json6902(d, ops, f"{kdir}: {d['kind']} {d['metadata']['name']}")
    for entry in kust.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError(f"{kdir}: labels with includeSelectors/includeTemplates are not implemented here")
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for r in kust.get("replicas", []):
        hits = [d for d in docs if d["metadata"]["name"] == r["name"] and d["kind"] in WORKLOADS]
        if not hits:
            raise KustomizeError(f"{kdir}: replicas: no workload {r['name']}")
        for d in hits:
            d["spec"]["replicas"] = int(r["count"])
    _image_transform(docs, kust.get("images", []))
    return docs, secrets


def pod_spec(d: dict) -> dict | None:
    if d["kind"] in ("Deployment", "StatefulSet", "Job"):
        return d["spec"]["template"]["spec"]
    return d["spec"] if d["kind"] == "Pod" else None


def worker_deployment(template: dict, name: str) -> dict:
    """A copy of the worker Deployment ``template`` (client-0) as the worker ``name`` (client-2):
    its own instance label, FEDSEQ_TLS_NAME and certificate Secret."""
    d = copy.deepcopy(template)
    old = d["metadata"]["name"]
    d["metadata"]["name"] = name
    for labels in (d["metadata"]["labels"], d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]):
        if "app.kubernetes.io/instance" in labels:
            labels["app.kubernetes.io/instance"] = name
    spec = d["spec"]["template"]["spec"]
    for c in spec["containers"]:
        for e in c.get("env", []):
            if e["name"] == "FEDSEQ_TLS_NAME":
                e["value"] = name
    for v in spec.get("volumes", []):
        if v.get("secret", {}).get("secretName") == f"fedseq-tls-{old}":
            v["secret"]["secretName"] = f"fedseq-tls-{name}"
    return d


def set_workers(docs: list[dict], workers: dict[str, int]) -> list[dict]:
    """The worker Deployments of each kind in ``workers`` become exactly ``<kind>-0..<kind>-<n-1>``,
    one replica each (copies of ``<kind>-0`` where the base has no such Deployment)."""
    out = list(docs)
    for kind, n in workers.items():
        mine = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"
                and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
                and d["metadata"]["labels"].get("app.kubernetes.io/name") == kind}
        template = mine.get(f"{kind}-0")
        if template is None:
            raise SystemExit(f"--workers {kind}={n}: the base has no worker Deployment {kind}-0 to copy")
        at = out.index(template)
        out = [d for d in out if not any(d is m for m in mine.values())]
        new = []
        for i in range(n):
            d = copy.deepcopy(mine[f"{kind}-{i}"]) if f"{kind}-{i}" in mine else worker_deployment(template, f"{kind}-{i}")
            d["spec"]["replicas"] = 1
            new.append(d)
        out[at:at] = new
    return out


def render(base: Path, tls: Path, images: dict[str, str], sets: dict[str, str], replicas: dict[str, int],
           workers: dict[str, int] | None = None) -> list[dict]:
    """The Pods and claims for `podman kube play` of the kustomization in ``base`` (the base or an
    overlay), each generated Secret as the folder ``tls/<secret name>``."""
    docs, secrets = build(base)
    if workers:
        docs = set_workers(docs, workers)
    config = {d["metadata"]["name"]: dict(d["data"]) for d in docs if d["kind"] == "ConfigMap"}
    for cm in config.values():
        for k, v in sets.items():
            if k not in cm:
                raise SystemExit(f"--set {k}: not a key of the ConfigMap (keys: {', '.join(sorted(cm))})")
            cm[k] = v
    generated = {name: [f.name for f in files] for name, files in secrets.items()}

    def secret_folder(name: str) -> str:
        """The folder standing for the Secret ``name``: the generator's files (or, for a copied
        worker's Secret, at least the folder) must be there."""
        folder = tls / name
        if not folder.is_dir():
            raise SystemExit(f"{folder} missing (the caller copies the Secret's files there)")
        for f in generated.get(name, []):
            if not (folder / f).is_file():
                raise SystemExit(f"{folder / f} missing (the caller copies the Secret's files there)")
        return str(folder.resolve())

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    out: list[dict] = []
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            if d["kind"] == "PersistentVolumeClaim":
                out.append(d)
            # ConfigMap (inlined), Service (pod names), NetworkPolicy and PodDisruptionBudget (nothing
            # enforces them under podman)
            continue
        spec = copy.deepcopy(spec)
        for c in spec.get("initContainers", []) + spec["containers"]:
            c.pop("ports", None)  # podman 4.3 would publish them on the host
            c["image"] = images.get(split_image(c["image"])[0], c["image"])
            startup = c.pop("startupProbe", None)  # podman 4.3 has no startup probe
            if startup and "livenessProbe" in c:  # liveness waits as long as startup would have
                c["livenessProbe"]["initialDelaySeconds"] = max(
                    c["livenessProbe"].get("initialDelaySeconds", 0),
                    startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3))
            env = []
            for ef in c.pop("envFrom", []):
                env += [{"name": k, "value": v} for k, v in config[ef["configMapRef"]["name"]].items()]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    e = {"name": e["name"], "value": config[r["name"]][r["key"]]}
                elif ref.get("fieldRef", {}).get("fieldPath") == "status.podIP":
                    e = {"name": e["name"], "value": "auto"}
                env.append(e)
            if env:
                c["env"] = env
        n = replicas.get(d["metadata"]["name"], d["spec"].get("replicas", 1) if d["kind"] == "Deployment" else 1)
        for v in spec.get("volumes", []):
            if "secret" in v:
                v.pop("secret")
                if n:  # a workload with no replica needs no files
                    v["hostPath"] = {"path": secret_folder(v_name(v, d, spec)), "type": "Directory"}
        template = d["spec"]["template"]["metadata"] if d["kind"] != "Pod" else d["metadata"]
        labels = template["labels"]
        selected = [s for s, svc in services.items() if svc["spec"]["selector"].items() <= labels.items()]
        if d["kind"] == "Job":
            # no Job controller to start the next pod after a failure: the pod restarts the
            # container itself (the cluster's Job runs restartPolicy Never, for its podFailurePolicy)
            spec["restartPolicy"] = "OnFailure"
        for claim in d["spec"].get("volumeClaimTemplates", []) if d["kind"] == "StatefulSet" else []:
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": f"{claim['metadata']['name']}-{d['metadata']['name']}-0",
                                "labels": d["metadata"]["labels"]}, "spec": claim["spec"]}
            out.append(pvc)
            spec.setdefault("volumes", []).append({"name": claim["metadata"]["name"],
                                                   "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}})
        for i in range(n):
            name = (selected[0] if selected else d["metadata"]["name"]) if n == 1 else f"{d['metadata']['name']}-{i}"
            meta = {"name": name, "labels": {**d["metadata"]["labels"], **labels}}
            if template.get("annotations"):  # the Prometheus ones: harmless, nothing scrapes here
                meta["annotations"] = dict(template["annotations"])
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(spec)})
    return out


def v_name(v: dict, d: dict, spec: dict) -> str:
    """The Secret name of a secret volume (read before the volume was rewritten)."""
    original = pod_spec(d)
    return next(o["secret"]["secretName"] for o in original["volumes"] if o["name"] == v["name"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="a folder with a kustomization.yaml: deploy/k8s/base or an overlay")
    ap.add_argument("tls", type=Path, help="folder with one subfolder per generated Secret, holding its files")
    ap.add_argument("out", type=Path)
    ap.add_argument("--image", action="append", default=[], help="NAME=IMAGE (kustomize's images)")
    ap.add_argument("--set", action="append", default=[], help="ConfigMap KEY=VALUE")
    ap.add_argument("--replicas", action="append", default=[], help="WORKLOAD=N")
    ap.add_argument("--workers", action="append", default=[],
                    help="KIND=N: worker Deployments KIND-0..KIND-N-1, one replica each (client=3, attacker=0)")
    a = ap.parse_args(argv)
    kv = lambda items: dict(i.split("=", 1) for i in items)  # noqa: E731
    docs = render(a.base, a.tls, kv(a.image), kv(a.set), {k: int(v) for k, v in kv(a.replicas).items()},
                  {k: int(v) for k, v in kv(a.workers).items()})
    # claims first, then the store, the server, the orchestrator, the workers
    order = {"PersistentVolumeClaim": 0}
    docs.sort(key=lambda d: order.get(d["kind"], 1))
    a.out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    for d in docs:
        print(f"{d['kind']} {d['metadata']['name']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
