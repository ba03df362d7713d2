"""A-ra: the model-poisoning attack of Rong et al. in the DV-FSR paper's variant without
user-embedding approximation.

Rong, He, Chen, "Poisoning Deep Learning Based Recommender Model in Federated Learning Scenarios",
IJCAI 2022 (arXiv:2204.13594), cited by the DV-FSR paper (Yin et al., AAAI 2025) as
"Rong, He, and Chen 2022"; public code ``SeqAttackClient_method1``. A sequential model has no user
embedding to approximate, so a malicious user feeds its own sequence and uploads the gradient of

    L = 1/s * sum_{r=1..s} BCE(sigmoid(score of the target at the last position of f(x)), 1)

over s = ``repeats`` (default 10) forwards, each with its own dropout masks (when the run trains
with dropout); no substitution, no contrastive term. Same code as :mod:`.dv_fsr` with
``explicit=False, contrastive=False``. Several targets: the loss is averaged over them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import parse_options
from .dv_fsr import OPTIONS, DualViewAttack


def from_options(options: Mapping[str, str]) -> DualViewAttack:
    v, _ = parse_options("a-ra", options, {"repeats": OPTIONS["repeats"]})
    return DualViewAttack(name="a-ra", explicit=False, contrastive=False, **v)
