"""Model deltas for downloads (config key ``model_delta``): version ``v`` as a patch against
version ``v - 1``, so a worker that holds ``v - 1`` reads the patch instead of the whole model.

What a patch holds: for the embedding tables (``ROW_TABLES``), only the rows whose bits changed,
with their *new* values; every other tensor whole (a FedSGD step changes all of them). New values
rather than differences, because ``old + (new - old)`` is not always ``new`` in float arithmetic:
applying a patch gives the new version bit for bit, and the reader checks that against the
version's sha256 in the store. A step changes only the rows some user's gradient touched, but
with the sampled negatives that is most rows at the paper's setting: on Steam SASRec with 256
users per round 4,219 of 5,136 item rows change per round (``bench/bench_codecs_epoch.py``), so a
patch is about 88 % of a full version (1.54 of 1.74 MB), and the aggregator writes it in addition
to the version. Patches pay with small rounds (32 users: 1,191 changed rows, about 41 %) or large
catalogues; off by default.

Format: a :func:`fedseq.codec.pack` container (CRC32 per record, never pickle) of records

    "#base"         int64 scalar: the version the patch applies to
    "<table>#rows"  int64 [k]: the changed rows of a row table, strictly increasing
    "<table>"       float32 [k, C]: their new values
    "<tensor>"      float32, the tensor's shape: the new tensor (tensors that are not row tables)

The aggregator writes the patch of every new version next to it (``fedseq:{run}:patch:{v}``,
same retention as the version); the store-reading :class:`client.worker.ModelSource` uses it. Models
served by the aggregator's GetModel (workers without ``--store-url``) are always sent whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import codec

ROW_TABLES = ("item_emb.weight", "pos_emb.weight")
_BASE = "#base"
_ROWS = "#rows"


class PatchError(ValueError):
    """A patch does not apply: corrupted, for another base version, or of another model layout."""


def make_patch(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], base_version: int,
               row_tables: tuple[str, ...] = ROW_TABLES) -> bytes:
    """The patch turning ``old`` (version ``base_version``) into ``new``."""
    if list(old) != list(new):
        raise PatchError("old and new models have different tensor names")
    recs = [codec.encode(_BASE, torch.tensor(int(base_version), dtype=torch.int64), "dense-fp32")]
    for name, t in new.items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        o = old[name].detach().to("cpu", torch.float32).contiguous()
        if o.shape != t.shape:
            raise PatchError(f"tensor {name!r}: shape {tuple(o.shape)} -> {tuple(t.shape)}")
        if name in row_tables and t.dim() == 2:
            changed = (o.view(torch.int32) != t.view(torch.int32)).any(dim=1)  # bits: -0.0 vs +0.0 counts
            idx = torch.nonzero(changed).squeeze(1)
            recs.append(codec.encode(name + _ROWS, idx.to(torch.int64), "dense-fp32"))
            recs.append(codec.encode(name, t.index_select(0, idx), "dense-fp32"))
        else:
            recs.append(codec.encode(name, t, "dense-fp32"))
    return codec.pack(recs)


def apply_patch(base: Mapping[str, torch.Tensor], blob: bytes, base_version: int) -> dict[str, torch.Tensor]:
    """``base`` (version ``base_version``) patched: new tensors, ``base`` is not modified.
    :class:`PatchError` on a corrupted patch or one made for another base or layout."""
    try:
        recs = {e.name: e for e in codec.unpack(blob)}
        got_base = int(codec.decode(recs.pop(_BASE)).item()) if _BASE in recs else None
        if got_base != base_version:
            raise PatchError(f"patch applies to version {got_base}, not {base_version}")
        out: dict[str, torch.Tensor] = {}
        for name, t in base.items():
            if name + _ROWS in recs:
                idx = codec.decode(recs.pop(name + _ROWS))
                vals = codec.decode(recs.pop(name))
                if (t.dim() != 2 or idx.dtype != torch.int64 or idx.dim() != 1 or vals.shape != (len(idx), t.shape[1])
                        or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= t.shape[0]))):
                    raise PatchError(f"row patch of {name!r} does not fit its shape {tuple(t.shape)}")
                x = t.detach().to(torch.float32).clone()
                x[idx] = vals
                out[name] = x
            elif name in recs:
                x = codec.decode(recs.pop(name))
                if x.shape != t.shape:
                    raise PatchError(f"tensor {name!r}: patch shape {tuple(x.shape)}, model {tuple(t.shape)}")
                out[name] = x
            else:
                raise PatchError(f"patch has no tensor {name!r}")
        if recs:
            raise PatchError(f"patch has tensors the model lacks: {sorted(recs)[:5]}")
        return out
    except (codec.CodecError, KeyError) as e:
        raise PatchError(f"corrupted model patch: {e}") from None
