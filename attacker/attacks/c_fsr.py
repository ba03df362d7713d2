"""C-FSR: DV-FSR without the explicit view (no substitution): the target loss on the user's own
sequence plus the implicit view's contrastive loss L_con.

Ablation of Yin et al., "DV-FSR: A Dual-View Target Attack Framework for Federated Sequential
Recommendation", AAAI 2025 (public code ``SeqAttackClient_method2_1``). Same code as
:mod:`.dv_fsr` with ``explicit=False``; its forwards run with dropout on (when the run trains with
dropout). Compat ``cfsr_label_index``: the code puts the contrastive label on index 1, so its first
random negative is treated as the positive.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import parse_options
from .dv_fsr import OPTIONS, DualViewAttack

C_FSR_OPTIONS = {k: OPTIONS[k] for k in ("num_negatives", "repeats", "con_weight")}


def from_options(options: Mapping[str, str]) -> DualViewAttack:
    v, _ = parse_options("c-fsr", options, C_FSR_OPTIONS)
    return DualViewAttack(name="c-fsr", explicit=False, cfsr_label=True, **v)
