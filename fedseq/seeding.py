"""Seeded torch generators: one function of a few integers, so that every runner, every process
and a resumed run draw the same numbers (a rule's noise, a user's local DP noise)."""

from __future__ import annotations

import numpy as np
import torch


def torch_generator(seed: int, key: int, a: int, b: int = 0) -> torch.Generator:
    """A CPU generator for the stream ``key`` of ``seed``, at position ``(a, b)`` (e.g. a round and
    a draw, or a round and a user); 32-bit words, as numpy's SeedSequence takes them."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, key, a & 0xFFFFFFFF, int(b)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
