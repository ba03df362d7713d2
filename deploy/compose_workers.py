"""Write a compose override with more named worker services than deploy/compose.yaml has
(client-0, client-1, attacker-0): client-2, client-3, ... and attacker-1, ..., each a copy of
client-0 / attacker-0 with its own identity.

    python compose_workers.py OUT.yaml --clients N [--attackers M] [--tls]

With --tls (the services run with compose.tls.yaml), each new worker gets its own certificate
volume ``tls-<name>`` (``FEDSEQ_TLS_NAME=<name>``), and ``prepare`` mounts it at ``/tls/<name>``
to fill it from ``FEDSEQ_CERTS`` with ``<name>.pem``/``<name>.key``: make those first
(``fedseq certs DIR --clients N --attackers M --unsharded``, or ``--name <name>:worker`` and an entry in
roster.json). Pass OUT.yaml after the other files: ``-f compose.yaml -f compose.tls.yaml -f OUT.yaml``.
deploy/run-local.sh does this for FEDSEQ_CLIENTS / FEDSEQ_ATTACKERS. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TEMPLATES = {"client": "client-0", "attacker": "attacker-0"}


def worker_services(counts: dict[str, int], tls: bool, base: Path = HERE / "compose.yaml",
                    overlay: Path = HERE / "compose.tls.yaml") -> dict:
    """The override document: the services ``<kind>-<i>`` for i < counts[kind] that ``base`` lacks."""
    svcs = yaml.safe_load(base.read_text())["services"]
    over = yaml.safe_load(overlay.read_text())["services"] if tls else {}
    out: dict = {"services": {}}
    volumes: dict = {}
    prepare: list[str] = []
    for kind, n in counts.items():
        template = TEMPLATES[kind]
        for i in range(n):
            name = f"{kind}-{i}"
            if name in svcs:
                continue
            svc = copy.deepcopy(svcs[template])
            svc.pop("build", None)  # the image of the other services; a build context would be relative
            if tls:
                o = over[template]
                svc["environment"] = {**svc.get("environment", {}), **o["environment"], "FEDSEQ_TLS_NAME": name}
                svc["volumes"] = [*svc.get("volumes", []), f"tls-{name}:/tls:ro"]
                prepare.append(f"tls-{name}:/tls/{name}")
                volumes[f"tls-{name}"] = None
            out["services"][name] = svc
    if prepare:
        out["services"]["prepare"] = {"volumes": prepare}
    if volumes:
        out["volumes"] = volumes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--attackers", type=int, default=0)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args(argv)
    doc = worker_services({"client": a.clients, "attacker": a.attackers}, a.tls)
    a.out.write_text("# written by deploy/compose_workers.py: extra worker services, one identity each\n"
                     + yaml.safe_dump(doc, sort_keys=False))
    print(" ".join(n for n in doc["services"] if n != "prepare"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
