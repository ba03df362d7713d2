"""Render deploy/k8s/base for `podman kube play` (podman 4.3, the dev machines), as kustomize
would render it for a cluster, then lower the few kinds and fields that podman 4.3 lacks.

    python podman_kube.py BASE TLS_DIR OUT.yaml [--image fedseq=IMG] [--image redis=IMG]
                          [--set KEY=VALUE ...] [--replicas NAME=N ...]

What kustomize does here: the resources, the `labels`, the secretGenerator (from TLS_DIR), image
names, ConfigMap values (--set) and replicas (--replicas).

What podman 4.3 lacks, and what this script does instead (the pod templates stay as written):
- StatefulSet, Job: not played. Each becomes a Pod with the same pod spec (the Job's restartPolicy
  OnFailure kept); a volumeClaimTemplate becomes a PersistentVolumeClaim `<claim>-<name>-0`.
- Deployment: podman plays one replica. Each replica becomes a Pod `<name>-<i>`.
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


def render(base: Path, tls: Path, images: dict[str, str], sets: dict[str, str], replicas: dict[str, int]) -> list[dict]:
    kust, docs = load(base)
    config = {d["metadata"]["name"]: dict(d["data"]) for d in docs if d["kind"] == "ConfigMap"}
    for cm in config.values():
        for k, v in sets.items():
            if k not in cm:
                raise SystemExit(f"--set {k}: not a key of the ConfigMap (keys: {', '.join(sorted(cm))})")
            cm[k] = v
    secrets = {}
    for gen in kust.get("secretGenerator", []):
        folder = tls / gen["name"]
        for f in gen["files"]:
            if not (folder / Path(f).name).is_file():
                raise SystemExit(f"{folder / Path(f).name} missing (the caller copies the Secret's files there)")
        secrets[gen["name"]] = str(folder.resolve())
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
        for v in spec.get("volumes", []):
            if "secret" in v:
                v.pop("secret")
                v["hostPath"] = {"path": secrets[v_name(v, d, spec)], "type": "Directory"}
        labels = d["spec"]["template"]["metadata"]["labels"] if d["kind"] != "Pod" else d["metadata"]["labels"]
        selected = [s for s, svc in services.items() if svc["spec"]["selector"].items() <= labels.items()]
        n = replicas.get(d["metadata"]["name"], d["spec"].get("replicas", 1) if d["kind"] == "Deployment" else 1)
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
            name = selected[0] if selected and n == 1 else f"{d['metadata']['name']}-{i}"
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
    a = ap.parse_args(argv)
    kv = lambda items: dict(i.split("=", 1) for i in items)  # noqa: E731
    docs = render(a.base, a.tls, kv(a.image), kv(a.set), {k: int(v) for k, v in kv(a.replicas).items()})
    # claims first, then the store, the server, the orchestrator, the workers
    order = {"PersistentVolumeClaim": 0}
    docs.sort(key=lambda d: order.get(d["kind"], 1))
    a.out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    for d in docs:
        print(f"{d['kind']} {d['metadata']['name']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
