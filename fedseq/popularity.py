"""Popular-item mining from how far item embeddings moved, shared by the PIECK attack
(attacker/attacks/pieck.py) and PIECK's client-side defense (fedseq/training.py ``PieckReg``).

Zhang, Li, Rong, Zhao, Chen, Shou, "Preventing the Popular Item Embedding Based Attack in Federated
Recommendations", ICDE 2024: in federated recommendation the embeddings of popular items get the
largest updates, so anyone holding two versions of the global model can tell which items are
popular. fedseq's reading is stateless: the distance each item row has moved since version 0, which
every participant can compute because version 0 is the run's seeded initialisation
(:func:`fedseq.models.common.reference_init` with the run seed). So both runners, every attacker and
every benign worker mine the same set from the same version, whichever rounds they took part in.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import numpy as np
import torch

from .models import SeqModel
from .models.common import reference_init
from .params import Layout, get_vector

ITEM_TABLE = "item_emb.weight"


def item_table_slice(model: SeqModel) -> tuple[int, int, int]:
    """``(offset, rows, width)`` of the item table in the model's flat layout."""
    layout = Layout.of(model)
    i = layout.names.index(ITEM_TABLE)
    rows, width = layout.shapes[i]
    return sum(layout.sizes[:i]), int(rows), int(width)


def initial_params(model: SeqModel, seed: int) -> torch.Tensor:
    """Version 0 of a run with ``seed`` (the seeded reference initialisation), ``[D]``; ``model`` is
    not changed. Cached per (model config, seed): the models of one run share it."""
    return _initial_params(model, model.cfg, seed).clone()


@functools.lru_cache(maxsize=8)
def _initial_params(model: SeqModel, model_cfg, seed: int) -> torch.Tensor:  # model_cfg: the cache key
    fresh = copy.deepcopy(model)
    reference_init(fresh, seed)
    return get_vector(fresh)


def mine_popular(params: torch.Tensor, init: torch.Tensor, model: SeqModel, k: int,
                 exclude: Sequence[int] = ()) -> np.ndarray:
    """The ``k`` item ids (1..M, not in ``exclude``) whose embedding rows moved the most from
    ``init`` to ``params``, most moved first (ties to the lower id)."""
    offset, rows, width = item_table_slice(model)
    num_items = int(model.cfg.num_items)
    moved = (params[offset:offset + rows * width] - init[offset:offset + rows * width]).view(rows, width).norm(dim=1)
    ids = np.arange(1, num_items + 1)
    ids = ids[~np.isin(ids, np.asarray(exclude, dtype=np.int64))]
    dist = moved[torch.as_tensor(ids)].double().numpy()
    order = np.lexsort((ids, -dist))
    return ids[order[:k]]
