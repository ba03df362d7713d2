"""What a worker hosts, and the types its tasks and populations share: the :class:`Hosted`
population (client/service.py for benign users, attacker/service.py for an attacker's), the
:class:`ShardSequences` of a shard, how every worker writes an update in its codec (:func:`encode_update`)
and :class:`TaskError`, a task the worker refuses or cannot do."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from fedseq import codec
from fedseq.experiment import Setup
from fedseq.training import UpdateBatch

SPARSE_TABLES = codec.SPARSE_TABLES  # row-sparse candidates for sparse codecs


class ShardSequences(Mapping[int, np.ndarray]):
    """The training sequences of the users a worker hosts, by user id, without a dict entry per
    user: a sorted id array and the data set's ``train`` (a tuple or a :class:`Ragged`) it indexes
    (``train[u]`` for user ``u``; benign ids are data set indices)."""

    def __init__(self, users: np.ndarray, train: Sequence[np.ndarray]) -> None:
        self.users = np.unique(np.asarray(users, dtype=np.int64))
        self.train = train

    def __contains__(self, u: object) -> bool:
        if not isinstance(u, (int, np.integer)) or not len(self.users):
            return False
        i = int(np.searchsorted(self.users, int(u)))
        return i < len(self.users) and int(self.users[i]) == int(u)

    def __getitem__(self, u: int) -> np.ndarray:
        if u not in self:
            raise KeyError(u)
        return self.train[int(u)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.users.tolist())

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Hosted:
    """A worker's population: user ids, their data, and how their updates are computed."""

    setup: Setup
    users: np.ndarray
    sequences: Mapping[int, np.ndarray]
    compute: Callable[[torch.Tensor, list[int], int], UpdateBatch]  # (params, users, round_id)
    evaluate_users: np.ndarray  # users this worker may evaluate (benign hosted users)
    # adversarial-training updates (params, users, round_id); None: this worker does not do them
    compute_adversarial: Callable[[torch.Tensor, list[int], int], UpdateBatch] | None = None
    # ``compute`` a piece at a time (fedseq.training.iter_updates): each piece's updates are sent
    # while the next is computed, and the worker never holds the whole [K, D] matrix. None: one
    # piece, ``compute``'s
    compute_pieces: Callable[[torch.Tensor, list[int], int], Iterable[UpdateBatch]] | None = None


def encode_update(tensors: dict[str, torch.Tensor], codec_name: str) -> bytes:
    """One user's update in the codec ``codec_name`` as a checked pack() container (sparse
    codecs sparse only on the embedding tables)."""
    return codec.pack(codec.encode_state(tensors, codec_name, sparse_ok=lambda n: n in SPARSE_TABLES))


class TaskError(Exception):
    """A task the worker refuses or cannot do: a gRPC status code and the reason (sent back as the
    task's :class:`TaskError` result)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details
