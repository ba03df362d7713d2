"""Render deploy/k8s/base for `podman kube play` (podman 4.3, the dev machines), as kustomize
would render it for a cluster, then lower the few kinds and fields that podman 4.3 lacks.

    python podman_kube.py BASE TLS_DIR OUT.yaml [--image fedseq=IMG] [--image redis=IMG]
                          [--set KEY=VALUE ...] [--replicas NAME=N ...] [--workers KIND=N ...]

What kustomize does here: the resources, the `labels`, the secretGenerator (from TLS_DIR), image
names, ConfigMap values (--set) and replicas (--replicas).

--workers client=3 (what an overlay with more worker Deployments would do): the worker Deployments
of that kind become exactly client-0..client-2, one replica each; the ones the base lacks are copies
of client-0 with their own identity (FEDSEQ_TLS_NAME and the Secret fedseq-tls-<name>, which the
caller provides like the generated ones).

What podman 4.3 lacks, and what this script does instead (the pod templates stay as written):
- StatefulSet, Job: not played. Each becomes a Pod with the same pod spec (the Job's restartPolicy
  OnFailure kept); a volumeClaimTemplate becomes a PersistentVolumeClaim `<claim>-<name>-0`.
- Deployment: podman plays one replica. Each replica becomes a Pod `<name>-<i>`; a single replica
  that no Service selects (a worker: client-0, attacker-0) becomes the Pod `<name>`.
- Service: podman has none. A pod's name is its DNS name on podman's kube network, so the Pod of
  the single-replica workload that a Service selects is named after the Service (redis, server,
  orchestrator): the addresses in the manifests resolve unchanged.
- Secret volumes and envFrom/configMapKeyRef: written out (hostPath folders of the Secret's files
  made by the caller, and literal env values).
- fieldRef status.podIP: unsupported; FEDSEQ_ADVERTISE_HOST=auto (the pod's own address).
- containerPort: podman 4.3 publishes each on the host, so two replicas collide; dropped (pods
  reach each other on the kube network without it).
- NetworkPolicy: not enforced by podman; left out.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml


def load(base: Path) -> tuple[dict, list[dict]]:
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((base / name).read_text()) if d]
    labels = {}
    for entry in kust.get("labels", []):
        labels.update(entry["pairs"])
    for d in docs:
        d["metadata"].setdefault("labels", {}).update(labels)
    return kust, docs


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
    kust, docs = load(base)
    if workers:
        docs = set_workers(docs, workers)
    config = {d["metadata"]["name"]: dict(d["data"]) for d in docs if d["kind"] == "ConfigMap"}
    for cm in config.values():
        for k, v in sets.items():
            if k not in cm:
                raise SystemExit(f"--set {k}: not a key of the ConfigMap (keys: {', '.join(sorted(cm))})")
            cm[k] = v
    generated = {gen["name"]: [Path(f).name for f in gen["files"]] for gen in kust.get("secretGenerator", [])}

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
            continue  # ConfigMap (inlined), Service (pod names), NetworkPolicy (not enforced)
        spec = copy.deepcopy(spec)
        for c in spec.get("initContainers", []) + spec["containers"]:
            c.pop("ports", None)
            name, _, tag = c["image"].partition(":")
            c["image"] = images.get(name, c["image"])
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
        labels = d["spec"]["template"]["metadata"]["labels"] if d["kind"] != "Pod" else d["metadata"]["labels"]
        selected = [s for s, svc in services.items() if svc["spec"]["selector"].items() <= labels.items()]
        if d["kind"] == "Job":
            spec["restartPolicy"] = spec.get("restartPolicy", "OnFailure")
        for claim in d["spec"].get("volumeClaimTemplates", []) if d["kind"] == "StatefulSet" else []:
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": f"{claim['metadata']['name']}-{d['metadata']['name']}-0",
                                "labels": d["metadata"]["labels"]}, "spec": claim["spec"]}
            out.append(pvc)
            spec.setdefault("volumes", []).append({"name": claim["metadata"]["name"],
                                                   "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}})
        for i in range(n):
            name = (selected[0] if selected else d["metadata"]["name"]) if n == 1 else f"{d['metadata']['name']}-{i}"
            out.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "labels": {**d["metadata"]["labels"], **labels}},
                        "spec": copy.deepcopy(spec)})
    return out


def v_name(v: dict, d: dict, spec: dict) -> str:
    """The Secret name of a secret volume (read before the volume was rewritten)."""
    original = pod_spec(d)
    return next(o["secret"]["secretName"] for o in original["volumes"] if o["name"] == v["name"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
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
