"""The orchestrator's roster: which certificate identity is a client worker and which an attacker
worker, and which shard of its kind's users each may hold.

A worker's certificate proves *who* it is (its common name, signed by the run's CA: fedseq/tls.py);
every worker holds the same ``worker`` role, so the aggregation server, which never sees the
roster, still cannot tell a client from an attacker. The roster is the operator's word on what
each identity is; a worker's Register ``kind`` is a claim checked against it, never believed
(README "Security model"):

- an identity not on the roster is refused (``PERMISSION_DENIED``);
- a ``kind`` other than the roster's is refused (``PERMISSION_DENIED``, counted);
- a sharded identity holds exactly its own shard, and only it may take that shard again after a
  crash; a ``spare`` client identity may take a client shard whose holder is gone, when the
  operator rostered one;
- an unsharded kind (``shard`` null everywhere) lets each of its rostered identities host all of
  the kind's users (what a compose deployment with identical workers wants).

File format (``roster.json``, written by ``fedseq certs --clients N --attackers M`` and by
``fedseq run``)::

    {"version": 1,
     "workers": [{"name": "client-0", "kind": "client", "shard": 0},
                 {"name": "client-1", "kind": "client", "shard": 1},
                 {"name": "attacker-0", "kind": "attacker", "shard": 0},
                 {"name": "spare-0", "kind": "client", "spare": true}]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

KINDS = ("client", "attacker")
ROSTER_FILE = "roster.json"
VERSION = 1


class RosterError(ValueError):
    """A roster that cannot be read or is inconsistent (the message names the entry)."""


@dataclass(frozen=True)
class Entry:
    """One rostered identity: its certificate common name, its kind, and its shard index
    (``None``: unsharded, or a spare)."""

    name: str
    kind: str
    shard: int | None = None
    spare: bool = False


@dataclass(frozen=True)
class Roster:
    entries: Mapping[str, Entry]

    def entry(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def shards(self, kind: str) -> int:
        """Shards of ``kind``'s users (0: unsharded: every identity of the kind hosts all)."""
        return sum(1 for e in self.entries.values() if e.kind == kind and e.shard is not None)

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(n for n, e in self.entries.items() if kind is None or e.kind == kind)

    def owner(self, kind: str, shard: int) -> str | None:
        """The identity whose own shard ``shard`` of ``kind`` is."""
        return next((e.name for e in self.entries.values() if e.kind == kind and e.shard == shard), None)

    def to_dict(self) -> dict:
        rows = []
        for n in sorted(self.entries, key=lambda n: (KINDS.index(self.entries[n].kind), self.entries[n].spare,
                                                     self.entries[n].shard or 0, n)):
            e = self.entries[n]
            row: dict = {"name": e.name, "kind": e.kind, "shard": e.shard}
            if e.spare:
                row = {"name": e.name, "kind": e.kind, "spare": True}
            rows.append(row)
        return {"version": VERSION, "workers": rows}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.dumps())
        tmp.replace(p)
        return p


def from_dict(data: object, where: str = "roster") -> Roster:
    """A validated roster from its JSON form; RosterError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        raise RosterError(f"{where}: expected an object with a 'workers' list")
    if data.get("version", VERSION) != VERSION:
        raise RosterError(f"{where}: version {data.get('version')!r} is not {VERSION}")
    entries: dict[str, Entry] = {}
    for i, row in enumerate(data["workers"]):
        if not isinstance(row, dict):
            raise RosterError(f"{where}: workers[{i}] is not an object")
        unknown = set(row) - {"name", "kind", "shard", "spare"}
        if unknown:
            raise RosterError(f"{where}: workers[{i}] has unknown keys {sorted(unknown)}")
        name, kind, shard, spare = row.get("name"), row.get("kind"), row.get("shard"), bool(row.get("spare", False))
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise RosterError(f"{where}: workers[{i}] name {name!r} must be a certificate name "
                              "(letters, digits, '-', '_', '.')")
        if name in entries:
            raise RosterError(f"{where}: identity {name!r} is listed twice")
        if kind not in KINDS:
            raise RosterError(f"{where}: {name}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if spare and (kind != "client" or shard is not None):
            raise RosterError(f"{where}: {name}: only a client identity without a shard can be a spare")
        if shard is not None and (not isinstance(shard, int) or isinstance(shard, bool) or shard < 0):
            raise RosterError(f"{where}: {name}: shard {shard!r} must be an index >= 0 or null")
        entries[name] = Entry(name, kind, shard, spare)
    for kind in KINDS:
        mine = [e for e in entries.values() if e.kind == kind and not e.spare]
        shards = sorted(e.shard for e in mine if e.shard is not None)
        if shards and len(shards) != len(mine):
            raise RosterError(f"{where}: {kind} identities mix sharded and unsharded entries; give every one a "
                              "shard, or none")
        if shards != list(range(len(shards))):
            raise RosterError(f"{where}: {kind} shards {shards} must be 0..{len(shards) - 1}, each once")
    if any(e.spare for e in entries.values()) and not any(e.kind == "client" and e.shard is not None
                                                           for e in entries.values()):
        raise RosterError(f"{where}: a spare needs sharded client identities to stand in for")
    return Roster(entries)


def load(path: str | os.PathLike) -> Roster:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise RosterError(f"roster {p}: {e.strerror or e}") from None
    except ValueError as e:
        raise RosterError(f"roster {p}: not JSON: {e}") from None
    return from_dict(data, f"roster {p}")


def make(clients: int, attackers: int, spares: int = 0, sharded: bool = True,
         client_names: Iterable[str] | None = None, attacker_names: Iterable[str] | None = None) -> Roster:
    """``client-0..`` and ``attacker-0..`` identities, shard i each (or unsharded), and
    ``spare-0..`` client spares."""
    cn = list(client_names) if client_names is not None else [f"client-{i}" for i in range(clients)]
    an = list(attacker_names) if attacker_names is not None else [f"attacker-{i}" for i in range(attackers)]
    rows = [{"name": n, "kind": "client", "shard": i if sharded else None} for i, n in enumerate(cn)]
    rows += [{"name": n, "kind": "attacker", "shard": i if sharded else None} for i, n in enumerate(an)]
    rows += [{"name": f"spare-{i}", "kind": "client", "spare": True} for i in range(spares)]
    return from_dict({"version": VERSION, "workers": rows})
