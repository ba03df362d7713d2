"""Local differential privacy on a user's update (:class:`fedseq.local.LocalDP`): clip, add noise.

The training functions (fedseq/training.py) call :func:`privatise` on the rows they have just
written, in both runners and in the compute processes, so an update is noised exactly once, where
it is computed: user u of round r draws from ``(seed, LDP_KEY, r, u)`` only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .local import LocalDP
from .seeding import torch_generator

LDP_KEY = 0x1D9  # stream of the users' local noise


def user_generator(seed: int, round_key: int, user: int) -> torch.Generator:
    """The CPU generator of user ``user``'s noise in round ``round_key``."""
    return torch_generator(seed, LDP_KEY, round_key, int(user))


def privatise(out: torch.Tensor, rows: Sequence[int], users: Sequence[int], round_key: int, ldp: LocalDP) -> None:
    """In place: row ``rows[i]`` of ``out [*, D]`` (user ``users[i]``'s update) clipped to L2 norm
    ``ldp.clip``, then ``N(0, (ldp.noise * ldp.clip)^2)`` added to each of its coordinates."""
    sigma = ldp.noise * ldp.clip
    d = out.shape[1]
    for r, u in zip(rows, users, strict=True):
        row = out[r]
        norm = float(torch.linalg.vector_norm(row.to(torch.float64)))
        if norm > ldp.clip:
            row.mul_(ldp.clip / norm)
        if sigma > 0:
            noise = torch.randn(d, generator=user_generator(ldp.seed, round_key, int(u)), dtype=torch.float64)
            row.add_((noise * sigma).to(row.dtype))
