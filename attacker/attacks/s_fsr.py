"""S-FSR: DV-FSR without the implicit view (no contrastive loss): substitution + the target loss.

Ablation of Yin et al., "DV-FSR: A Dual-View Target Attack Framework for Federated Sequential
Recommendation", AAAI 2025 (public code ``SeqAttackClient_method1_3``). Same code as
:mod:`.dv_fsr` with ``contrastive=False``; the compat switches ``attack_leak`` and
``attack_eval_mode`` apply as for DV-FSR (the code shares the substitution).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import parse_options
from .dv_fsr import OPTIONS, DualViewAttack

S_FSR_OPTIONS = {k: OPTIONS[k] for k in ("tau", "top_t", "num_attack", "repeats", "fill")}


def from_options(options: Mapping[str, str]) -> DualViewAttack:
    v, _ = parse_options("s-fsr", options, S_FSR_OPTIONS)
    return DualViewAttack(name="s-fsr", contrastive=False, **v)
