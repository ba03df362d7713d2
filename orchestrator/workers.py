"""The orchestrator's worker pool: who registered, which users each worker hosts (a shard the
orchestrator decides from its own configuration, never what a worker claims), who is alive and
ready, and the wait for a lost worker's shard. Registration refusals are counted by reason; each
stream's hello and welcome, the Describe tasks sent while no round records, and the heartbeats are
noted for the communication ledger of the next round.

Nothing a worker says about itself is trusted beyond its own updates (README "Security model"):
under mutual TLS its identity is its certificate's common name and the roster (fedseq/roster.py)
says what that identity is: the worker id must be the identity, the ``kind`` a hello
claims must be the roster's, the shard is the roster's (a hint in the hello is ignored), one
identity holds one live registration (one stream), and a lost shard goes back only to its own identity or to a rostered spare. Without TLS (``--insecure``,
a private network only) there is no identity and the claims are taken as they come. A live
worker's id cannot be taken over, a worker must host exactly the users it was given, and store
credentials are never handed out."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from fedseq import ledger as ledger_mod
from fedseq import observe
from fedseq.experiment import WORKER_KINDS, Setup, worker_users
from fedseq.ledger import Ledger
from fedseq.roster import Roster
from fedseq.tls import Identity

from .link import WorkerLink

log = logging.getLogger(__name__)


class UserSet:
    """The user ids a worker hosts, as one sorted int64 array (8 bytes a user, not a Python int
    and a set slot each: a million users cost 8 MB). Reads like the frozenset it replaces:
    ``in``, ``len``, iteration, equality with any collection of ids."""

    __slots__ = ("ids",)

    def __init__(self, ids=()) -> None:
        arr = np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64))
        arr.flags.writeable = False
        self.ids = arr

    def __contains__(self, u: object) -> bool:
        try:
            v = int(u)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        i = int(np.searchsorted(self.ids, v))
        return i < len(self.ids) and int(self.ids[i]) == v

    def isin(self, users: np.ndarray) -> np.ndarray:
        """``[len(users)]`` bool: which of ``users`` are hosted."""
        users = np.asarray(users, dtype=np.int64)
        if not len(self.ids):
            return np.zeros(len(users), dtype=bool)
        i = np.minimum(np.searchsorted(self.ids, users), len(self.ids) - 1)
        return self.ids[i] == users

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UserSet):
            return bool(np.array_equal(self.ids, other.ids))
        if isinstance(other, (set, frozenset)):
            return len(other) == len(self.ids) and all(u in other for u in self.ids.tolist())
        return NotImplemented

    def same_as(self, claimed) -> bool:
        """Whether ``claimed`` (ids, any order, possibly repeated) is exactly this set."""
        return bool(np.array_equal(np.unique(np.asarray(list(claimed), dtype=np.int64)), self.ids))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"UserSet({len(self.ids)} users)"


@dataclass
class WorkerInfo:
    worker_id: str
    address: str  # where its stream came from (for the logs; nothing dials it)
    device: str
    link: WorkerLink  # its Connect stream: tasks go down it
    users: UserSet = field(default_factory=UserSet)  # decided by the orchestrator (kind and shard), not claimed
    ready: bool = False
    alive: bool = True
    registered_at: float = field(default_factory=time.time)
    kind: str = "client"
    shard: tuple[int, int] | None = None
    peer: str = ""  # the common name of its certificate ('' without TLS)


class Refused(Exception):
    """A worker's hello the orchestrator refuses: (status code, reason, and a word for the count)."""

    def __init__(self, code: grpc.StatusCode, reason: str, word: str = "") -> None:
        super().__init__(reason)
        self.code, self.reason, self.word = code, reason, word or code.name


def assign(users: np.ndarray, workers: list[WorkerInfo]) -> tuple[dict[str, list[int]], list[int]]:
    """Map each user to one live, ready worker hosting it (spread evenly and deterministically:
    the k-th host of a user, in worker-id order, with k = user id mod the number of hosts).
    Returns (worker_id -> users, users no worker hosts)."""
    hosts = sorted((w for w in workers if w.ready and w.alive), key=lambda w: w.worker_id)
    users = np.asarray(users, dtype=np.int64)
    out: dict[str, list[int]] = {}
    if not hosts:
        return out, users.tolist()
    # one numpy pass per host (a million users take milliseconds, not a Python loop of set lookups)
    masks = np.stack([w.users.isin(users) if isinstance(w.users, UserSet) else
                      np.fromiter((int(u) in w.users for u in users), dtype=bool, count=len(users)) for w in hosts])
    ncand = masks.sum(axis=0)
    hosted = ncand > 0
    k = np.zeros(len(users), dtype=np.int64)
    k[hosted] = users[hosted] % ncand[hosted]  # the k-th host (0-based) among the user's hosts
    rank = np.cumsum(masks, axis=0) - 1
    pick = np.argmax(masks & (rank == k[None, :]), axis=0)
    for h, w in enumerate(hosts):
        mine = users[hosted & (pick == h)]
        if len(mine):
            out[w.worker_id] = mine.tolist()
    # keep the first-appearance order of workers that the per-user loop gave
    first = {w.worker_id: int(np.flatnonzero(hosted & (pick == h))[0]) for h, w in enumerate(hosts) if w.worker_id in out}
    out = {wid: out[wid] for wid in sorted(out, key=first.__getitem__)}
    return out, users[~hosted].tolist()



class WorkerPool:
    """The registered workers of one run (thread-safe: the Connect handlers and the run loop
    share it)."""

    def __init__(self, setup: Setup, run_id: str, shards: dict[str, int], identity: Identity | None = None,
                 shard_grace: float = 30.0, stop: threading.Event | None = None, roster: Roster | None = None,
                 max_workers: int = 64, probe_timeout: float = 3.0) -> None:
        self.setup, self.run_id, self.identity, self.shard_grace = setup, run_id, identity, shard_grace
        self.probe_timeout = probe_timeout  # seconds a live worker has to answer a Describe (_answers)
        self.roster = roster
        self.max_workers = max_workers  # live streams at most (each holds one of the service's threads)
        self._shards = dict(shards)  # kind -> number of shards (0: unsharded)
        self.stop = stop or threading.Event()
        self.workers: dict[str, WorkerInfo] = {}
        self.lock = threading.Lock()
        self.refused: Counter[str] = Counter()  # what the orchestrator refused from workers, by reason
        self._pending: list[tuple[str, Any]] = []  # (worker, ByteCount) of hellos, welcomes, Describes
        self._lost_since: dict[tuple[str, tuple[int, int]], float] = {}  # unheld shard -> first seen
        self._disconnected: list[str] = []  # workers whose stream ended since the last take_lost()

    def live(self) -> int:
        with self.lock:
            return sum(1 for w in self.workers.values() if w.alive)

    def count_refusal(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] += 1
        observe.REFUSED.labels(reason).inc()

    def admit(self, request, peer: str, link: WorkerLink, address: str = "") -> WorkerInfo:
        """The admission of a worker whose Connect stream is ``link`` (its hello is ``request``),
        with the users the orchestrator gives it (its roster shard, or a free shard of its kind
        without a roster). A worker that reconnects (same id, or same identity) replaces its
        earlier registration once that one no longer answers. Refused: bad fields, an identity not
        on the roster or a kind other than its roster kind, a kind the run does not have, a worker
        id or an identity held by another live worker, no free shard, more live workers than
        ``max_workers``."""
        if not request.worker_id or len(request.worker_id) > 128:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "worker_id (1-128 chars) is required")
        kind = request.kind or "client"
        if kind not in WORKER_KINDS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown worker kind {kind[:32]!r}; kinds: {WORKER_KINDS}")
        entry = None
        if self.roster is not None:
            entry = self.roster.entry(peer)
            if entry is None:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                              f"identity {peer[:64]!r} is not on this run's roster (README 'Security model')",
                              "roster")
            if request.worker_id != peer:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                              f"worker id {request.worker_id[:64]!r} is not this worker's identity {peer[:64]!r}: under "
                              "a roster a worker registers under its certificate's name", "id")
            if kind != entry.kind:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                              f"identity {peer[:64]!r} is rostered as kind {entry.kind!r}; it may not register as "
                              f"kind {kind!r}", "kind")
        if kind == "attacker" and self.setup.num_malicious == 0:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this run has no attack: no users for an attacker worker")
        with self.lock:
            w = self.workers.get(request.worker_id)
            # one live registration per identity: another worker id of the same certificate
            twin = next((x for x in self.workers.values() if entry is not None and x.peer == peer and x.alive
                         and x.worker_id != request.worker_id), None)
        if w is not None and w.alive and not w.link.closed and self._answers(w):
            raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                          f"worker id {request.worker_id!r} is held by a live worker (a second stream of one worker, "
                          "or another worker under its id)")
        if twin is not None:
            if not twin.link.closed and self._answers(twin):
                raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                              f"identity {peer[:64]!r} is registered already, as live worker {twin.worker_id!r}",
                              "twin")
            self._lost(twin, "its identity reconnected")
        if w is not None:
            self._lost(w, "it reconnected")
        with self.lock:
            if sum(1 for x in self.workers.values() if x.alive) >= self.max_workers:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this orchestrator holds {self.max_workers} live workers, its most (--max-workers)",
                              "full")
            if entry is not None:
                shard = self._roster_shard(entry, kind)
            else:
                shard = self._free_shard(kind, (int(request.held_index), int(request.held_count)))
            users = UserSet(worker_users(self.setup, kind, shard))
            info = WorkerInfo(request.worker_id, address[:256], request.device[:32], link, users=users, kind=kind,
                              shard=shard, peer=peer)
            self.workers[request.worker_id] = info
        log.info("%s worker %s connected from %s (shard %s, %d users)", kind, request.worker_id, address or "?",
                 "all" if shard is None else f"{shard[0]}/{shard[1]}", len(users))
        return info

    def _lost(self, w: WorkerInfo, why: str) -> None:
        w.alive = False
        w.link.close(why)

    def gone(self, info: WorkerInfo) -> None:
        """``info``'s stream ended: the worker is dead (its shard waits for it, README "Faults and
        observability"); the next round's record names it (:meth:`take_lost`)."""
        info.alive = False
        with self.lock:
            self._disconnected.append(info.worker_id)
        log.warning("%s worker %s disconnected: %s", info.kind, info.worker_id, info.link.reason)

    def close_all(self, reason: str) -> None:
        """End every worker's stream (the service is shutting down): the streams end now rather
        than at the end of the server's grace."""
        with self.lock:
            links = [w.link for w in self.workers.values()]
        for link in links:
            link.close(reason)

    def take_lost(self) -> list[str]:
        """The workers whose stream ended since the last call, in order."""
        with self.lock:
            lost, self._disconnected = self._disconnected, []
        return lost

    def _roster_shard(self, entry, kind: str) -> tuple[int, int] | None:
        """The shard a rostered identity holds: its own (None when its kind is unsharded), or, for
        a spare, a client shard no live worker holds and whose owner has been gone for
        ``shard_grace`` seconds. Raises :class:`Refused`. Call with the lock held."""
        n = self._shards[kind]
        if n == 0:
            return None
        held = {w.shard: w for w in self.workers.values() if w.alive and w.kind == kind and w.shard is not None}
        if not entry.spare:
            shard = (entry.shard, n)
            if shard in held:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"shard {entry.shard}/{n} of identity {entry.name!r} is held by live worker "
                              f"{held[shard].worker_id!r} (a spare that took it while {entry.name!r} was gone)",
                              "held")
            return shard
        now = time.time()
        for i in range(n):
            key = (kind, (i, n))
            if (i, n) not in held and now - self._lost_since.get(key, now) >= self.shard_grace:
                return (i, n)
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"spare {entry.name!r}: no client shard has been without its worker for {self.shard_grace:.0f} s",
                      "no-shard")

    def _free_shard(self, kind: str, hint: tuple[int, int] = (0, 0)) -> tuple[int, int] | None:
        """The shard ``hint`` the worker held before, if no live worker holds it now, else the
        lowest free shard of ``kind`` (None when the kind is unsharded). Raises :class:`Refused`
        when every shard is held. Call with the lock held."""
        n = self._shards[kind]
        if n == 0:
            return None
        held = {w.shard for w in self.workers.values() if w.alive and w.kind == kind}
        if hint[1] == n and 0 <= hint[0] < n and hint not in held:
            return hint
        for i in range(n):
            if (i, n) not in held:
                return (i, n)
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"all {n} {kind} shards are held by live workers; this run takes no more {kind} workers")

    def _answers(self, w: WorkerInfo) -> bool:
        """Whether ``w``'s stream still carries a Describe and its result within ``probe_timeout``."""
        try:
            w.link.describe(timeout=self.probe_timeout)
            return True
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def note(self, worker: str, msg: Any, direction: str, what: str) -> None:
        """Count a registration-time message (uncompressed: the worker has no config yet); it goes
        into the ledger with the next round."""
        c = ledger_mod.count(msg, kind="control", direction=direction, link="worker-orchestrator", what=what)
        with self.lock:
            self._pending.append((worker, c))

    def note_count(self, worker: str, c: Any) -> None:
        with self.lock:
            self._pending.append((worker, c))

    def flush_notes(self, led: Ledger) -> None:
        """The noted registration-time messages and every stream's heartbeats since the last
        flush, into ``led`` (phase "register")."""
        with self.lock:
            pending, self._pending = self._pending, []
            workers = list(self.workers.values())
        for w in workers:
            pending += [(w.worker_id, c) for c in w.link.take_heartbeats()]
        for worker, c in pending:
            led.add_count(c, worker=worker, phase="register")

    def refresh(self) -> list[WorkerInfo]:
        """Every registered worker, after asking the ones not known ready and alive to Describe
        themselves (a worker is ready when it hosts exactly the users it was given)."""
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            if w.link.closed:  # its stream is gone: so is the worker (a reconnect is a new registration)
                w.alive = False
                continue
            if w.ready and w.alive:
                continue
            try:
                d = w.link.describe(timeout=5.0)  # accounted by the link
                w.alive = True
                if d.ready and d.run_id == self.run_id:
                    if not w.users.same_as(d.users):  # it must host exactly what it was given
                        log.warning("worker %s hosts %d users, not the %d of its shard: not used", w.worker_id,
                                    len(d.users), len(w.users))
                        continue
                    w.ready = True
                    log.info("worker %s ready with %d users", w.worker_id, len(d.users))
            except grpc.RpcError:
                w.alive = False
        for kind in WORKER_KINDS:
            observe.WORKERS.labels(kind, "live").set(sum(w.alive and w.ready for w in workers if w.kind == kind))
            observe.WORKERS.labels(kind, "dead").set(sum(not w.alive for w in workers if w.kind == kind))
        return workers

    def await_lost_shards(self, say: Callable[[str], None]) -> list[WorkerInfo]:
        """The workers for the next round. A shard whose worker died gets ``shard_grace`` seconds,
        counted from when it was first found unheld, for a (restarted) worker to take it again
        before rounds go on without its users; a shard lost for good costs that wait once."""
        while True:
            workers = self.refresh()
            held = {(w.kind, w.shard) for w in workers if w.alive and w.ready and w.shard is not None}
            now = time.time()
            lost = [(k, (i, n)) for k, n in self._shards.items() for i in range(n) if (k, (i, n)) not in held]
            for key in list(self._lost_since):
                if key not in lost:
                    del self._lost_since[key]
            waiting = [key for key in lost if now - self._lost_since.setdefault(key, now) < self.shard_grace]
            if not waiting or self.stop.is_set():
                return workers
            say(f"waiting up to {self.shard_grace:.0f}s for a worker to take shard(s) {waiting}")
            time.sleep(0.2)

    def wait_for(self, min_workers: int, timeout: float, say: Callable[[str], None]) -> None:
        """Block until ``min_workers`` workers are ready (TimeoutError after ``timeout`` seconds)."""
        deadline = time.time() + timeout
        while not self.stop.is_set():
            ready = [w for w in self.refresh() if w.ready and w.alive]
            if len(ready) >= min_workers:
                # a worker that was ready and has died since (killed before the run started) must not
                # count: ask each once more before the first round goes to it
                for w in ready:
                    if not self._answers(w):
                        w.alive = False
                ready = [w for w in ready if w.alive]
            if len(ready) >= min_workers:
                return
            if time.time() > deadline:
                raise TimeoutError(f"only {len(ready)} of {min_workers} workers became ready within "
                                   f"{timeout:.0f}s")
            say(f"waiting for workers ({len(ready)}/{min_workers} ready)")
            time.sleep(0.2)
