"""EB, explicit boosting: the knowledge-free component of PipAttack.

Zhang, Yin, Chen, Huang, Nguyen, Cui, "PipAttack: Poisoning Federated Recommender Systems for
Manipulating Item Promotion", WSDM 2022 (as the DV-FSR baseline; public code
``SeqAttackClient_method_pipattack``). A malicious user uploads the gradient of

    L = -log sigmoid(score of the target at the last position of f(x))

on its own sequence x, one forward (dropout on when the run trains with dropout). With several
targets the loss is averaged over them. It is the target-loss term of :mod:`.dv_fsr` alone
(``explicit=False, contrastive=False, repeats=1``).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import parse_options
from .dv_fsr import DualViewAttack


def from_options(options: Mapping[str, str]) -> DualViewAttack:
    parse_options("eb", options, {})
    return DualViewAttack(name="eb", explicit=False, contrastive=False, repeats=1)
