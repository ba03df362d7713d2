"""Tiny models for the attack tests (tests/test_attacks.py, test_spattack.py, test_hidattack.py,
test_poisonfrs.py): a catalogue of ``M`` items and a model small enough that a test's updates take
milliseconds."""

from __future__ import annotations

import torch

from fedseq.models import build_model
from fedseq.models.common import reference_init
from fedseq.params import get_vector

M = 30  # tiny catalogue


def tiny(name: str = "sasrec", seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny ``name`` model with its seeded initialisation, and its flat weights."""
    kw = dict(hidden=8, heads=2, ffn=16, max_len=12)
    if name == "bert4rec":
        kw["input_len"] = 10
    model = build_model(name, M, **kw)
    reference_init(model, seed)
    return model, get_vector(model)
