"""Sequential recommenders, one file each, and a registry by name.

Both models share one interface: ``forward(tokens [B, L], drop) -> h [B, L, d]``,
``embed``/``encode`` (so attacks can perturb input embeddings), ``scores(h, items=None)`` and
``dropout_sites()``. ``build_model(name, num_items, **overrides)`` constructs one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .bert4rec import BERT4Rec, BERT4RecConfig
from .sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "sasrec": (SASRecConfig, SASRec),
    "bert4rec": (BERT4RecConfig, BERT4Rec),
}

SeqModel = SASRec | BERT4Rec


def build_model(name: str, num_items: int, **overrides: Any) -> SASRec | BERT4Rec:
    """Build the model registered as ``name`` for a catalogue of ``num_items`` items."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    cfg_cls, model_cls = MODELS[name]
    model = model_cls(cfg_cls(num_items=num_items, **overrides))
    return model  # type: ignore[return-value]


__all__ = ["MODELS", "BERT4Rec", "BERT4RecConfig", "SASRec", "SASRecConfig", "SeqModel", "build_model"]
