"""The in-process runner's benign updates computed by several processes, each writing its users'
rows of one shared round matrix.

Why processes and not threads: on these 2-core machines two 1-thread processes do 2.0x the work
of one, while torch's two intra-op threads do 1.52x on a Steam SASRec epoch
(docs/results/speed.md): the per-user work is many small operators, which one thread runs as fast
as two. A worker of ``fedseq run`` is such a process already; this gives ``fedseq sim`` the same.

How: the children are forked right after the run's setup, so the model, the data set and the
config are inherited, never sent; each runs torch with one thread. Per round the parent writes the
global weights into a shared vector, clears the rows' previous item rows (it keeps the
:class:`~fedseq.training.UpdateMatrix` bookkeeping), groups the round's benign users into the
micro-batches :func:`~fedseq.training.compute_updates` itself makes, hands each child a union of
whole micro-batches (balanced by padded positions) and waits for their losses and touched rows.
:func:`~fedseq.training.micro_batches` groups such a union exactly as it grouped the whole round
(the groups are runs of the length-sorted order, and a group closes on a limit that the next
longer user still breaks), so every user's update is, bit for bit, the one computed by a single
1-thread process (``tests/test_compute_pool.py``).

Linux only (``fork``); the updates must be computed on the CPU.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection

import numpy as np
import torch

from .models import SASRec, SeqModel
from .training import LocalConfig, UpdateMatrix, compute_updates, micro_batches


def _shared_zeros(*shape: int) -> torch.Tensor:
    """A zeroed float32 tensor in anonymous shared memory (``MAP_SHARED``): a child forked after
    it is made writes into the same pages. Not in ``/dev/shm``, so a container's small ``shm``
    limit does not apply; fresh pages cost nothing until written."""
    n = int(np.prod(shape)) * 4
    buf = mmap.mmap(-1, max(n, 1))
    return torch.frombuffer(buf, dtype=torch.float32, count=int(np.prod(shape))).view(*shape)


def group_cost(users: int, length: int) -> float:
    """Relative time of a micro-batch of ``users`` padded to ``length``: a per-user part (the
    per-sample gradient of the dense weights, Python per user), a per-position part and attention's
    per-position-pair part. Fitted on one Steam SASRec round at one thread (5 micro-batches,
    38-162 ms: per user about 15 positions' worth, per position pair 1/333 of a position). It only
    balances the processes' loads; it never changes an update."""
    return users * (15.0 + length + length * length / 333.0)


def split_groups(groups: Sequence[np.ndarray], cost: Sequence[float], parts: int) -> list[np.ndarray]:
    """Whole ``groups`` (index arrays) dealt to ``parts`` bins, the costliest first to the least
    loaded bin; each bin's indices in ascending order (so a stable sort by length within a bin
    keeps the whole round's order). Empty bins are dropped."""
    load = [0.0] * parts
    bins: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for g in sorted(range(len(groups)), key=lambda i: -cost[i]):
        b = min(range(parts), key=load.__getitem__)
        bins[b].append(groups[g])
        load[b] += cost[g]
    return [np.sort(np.concatenate(b)) for b in bins if b]


class ComputePool:
    """``procs`` forked processes computing benign updates into a shared :class:`UpdateMatrix`.

    ``model`` and ``sequences`` (``sequences[u]``: user ``u``'s training sequence) are the run's;
    ``rows``: the most users a round holds (the matrix's fixed size). Use :attr:`matrix` as the
    runner's round matrix and :meth:`compute` in place of ``compute_updates(..., into=...)``;
    :meth:`close` (or ``with``) ends the children. A child that fails or dies fails the round with
    its reason; the pool is then closed."""

    def __init__(self, model: SeqModel, sequences: Sequence[np.ndarray], seed: int, procs: int, rows: int) -> None:
        if procs < 2:
            raise ValueError(f"ComputePool needs procs >= 2, got {procs}")
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("--procs > 1 needs the 'fork' start method (Linux); use --procs 1 here")
        self.model = model
        self.sequences = sequences
        self.seed = seed
        proto = UpdateMatrix.of(model)
        self._shared = _shared_zeros(max(rows, 1), proto.dim)  # the round matrix every process writes
        self.matrix = UpdateMatrix(proto.dim, proto.table, self._shared)
        self._params = _shared_zeros(proto.dim)
        ctx = mp.get_context("fork")
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=self._serve, args=(child, parent), name=f"fedseq-compute-{i}", daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        self._closed = False

    @property
    def procs(self) -> int:
        return len(self._procs)

    # ------------------------------------------------------------------ parent
    def compute(self, params: torch.Tensor, users: np.ndarray, at: np.ndarray, round_key: int,
                cfg: LocalConfig) -> np.ndarray:
        """Write user ``users[i]``'s update at ``params`` into row ``at[i]`` of :attr:`matrix`'s
        current rows (as ``compute_updates(..., into=(matrix, at))`` does); returns the users'
        local losses ``[K]`` in request order."""
        if self._closed:
            raise RuntimeError("ComputePool is closed")
        dead = [c for c, p in zip(self._conns, self._procs, strict=True) if not p.is_alive()]
        if dead:  # found now even if this round would not give it work
            reason = self._death(dead[0])
            self.close()
            raise RuntimeError(f"a compute process failed: {reason}")
        users = np.asarray(users, dtype=np.int64)
        at = np.asarray(at, dtype=np.int64)
        K = len(users)
        if len(at) != K:
            raise ValueError(f"compute: {len(at)} rows for {K} users")
        losses = np.zeros(K)
        if K == 0:
            return losses
        self._params.copy_(params.detach().reshape(-1))
        self.matrix.clear(at.tolist())
        cap = self.model.cfg.max_len
        lengths = [min(len(self.sequences[int(u)]), cap) for u in users]
        groups = micro_batches(lengths, cfg.micro_batch, cfg.max_tokens)
        cost = [group_cost(len(g), max(max(lengths[i] for i in g), 1)) for g in groups]
        parts = split_groups(groups, cost, self.procs)
        busy = []
        for conn, idx in zip(self._conns, parts, strict=False):
            self._send(conn, ("round", users[idx], at[idx], round_key, cfg))
            busy.append((conn, idx))
        failure = None
        for conn, idx in busy:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                kind, payload = "died", self._death(conn)
            if kind != "ok":
                failure = failure or payload
                continue
            part_losses, item_rows = payload
            losses[idx] = part_losses
            if item_rows is not None:
                self.matrix.record(at[idx].tolist(), [torch.from_numpy(r) for r in item_rows])
            else:  # no localised rows: the child wrote the rows whole (local DP noise, or no item table)
                self.matrix.mark_whole(at[idx].tolist())
        if failure is not None:
            self.close()
            raise RuntimeError(f"a compute process failed: {failure}")
        return losses

    def _send(self, conn: Connection, msg: object) -> None:
        try:
            conn.send(msg)
        except (BrokenPipeError, OSError):
            reason = self._death(conn)
            self.close()
            raise RuntimeError(f"a compute process failed: {reason}") from None

    def _death(self, conn: Connection) -> str:
        p = self._procs[self._conns.index(conn)]
        p.join(timeout=5)
        return f"{p.name} (pid {p.pid}) died with exit code {p.exitcode}"

    def close(self) -> None:
        """End the children (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> ComputePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ child
    def _serve(self, conn: Connection, parent_end: Connection) -> None:
        """A child's loop: one round's share at a time, until ``None`` or the parent is gone."""
        parent_end.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        torch.set_num_threads(1)
        local_rows = isinstance(self.model, SASRec)
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg is None:
                break
            _, users, at, round_key, cfg = msg
            try:
                # the parent cleared these rows: a fresh bookkeeping view of the shared matrix
                view = UpdateMatrix(self.matrix.dim, self.matrix.table, self._shared)
                ub = compute_updates(self.model, self._params, [self.sequences[int(u)] for u in users], users,
                                     self.seed, round_key, cfg, into=(view, at))
                rows = [r.numpy() for r in ub.item_rows] if local_rows and ub.item_rows is not None else None
                conn.send(("ok", (ub.losses, rows)))
            except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its reason
                conn.send(("error", f"pid {os.getpid()}: {traceback.format_exc(limit=8)}"))
        conn.close()
        os._exit(0)
