"""Model versions for a worker's tasks (:class:`ModelSource`): read from the model store (cached,
or patched from the version before, fedseq/delta.py) or, without a store, fetched from the
aggregation server's GetModel; every fetch counted for the ledger."""

from __future__ import annotations

import hashlib
import logging
import threading

import torch

from fedseq import ledger as ledger_mod
from fedseq.delta import PatchError, apply_patch
from fedseq.modelcache import CachedModelReader
from fedseq.rpc import CONTROL_TIMEOUT, channel
from fedseq.store import RedisStore, model_from_bytes, model_to_bytes, patient
from fedseq.tls import Identity
from fedseq.v1 import aggregator_pb2 as agg_pb
from fedseq.v1 import aggregator_pb2_grpc as agg_grpc
from fedseq.v1 import common_pb2

log = logging.getLogger(__name__)


class ModelSource:
    """Model versions by number: from Redis (cached) or, without a store, from the aggregator.

    Only versions this worker does not hold are fetched (a cache hit moves no bytes). With
    ``delta`` (config ``model_delta``), a store reader that holds version ``v - 1`` reads the patch
    to ``v`` (fedseq/delta.py) instead of the whole version, and checks the result against the
    version's sha256 (falling back to the whole version on any mismatch). Every fetch is reported
    as ledger counts: store reads (``worker-store``), or the GetModel request and its chunks
    (``worker-aggregator``, compressed as the run says)."""

    def __init__(self, run_id: str, store_url: str | None, aggregator: str, compression: str = "none",
                 delta: bool = False, identity: Identity | None = None) -> None:
        self.run_id = run_id
        self.compression = compression
        self.delta = delta
        self.patches_applied = 0
        self._reader = CachedModelReader(RedisStore.from_url(store_url, run_id, **patient())) if store_url else None
        self._agg = agg_grpc.AggregatorStub(channel(aggregator, compression, identity, peer="server")) \
            if not store_url else None
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def fetch(self, version: int) -> tuple[dict[str, torch.Tensor], list[common_pb2.ByteCount]]:
        """Tensors of ``version`` and the ledger counts of what was read (empty on a cache hit)."""
        with self._lock:
            if self._reader is not None and self.delta:
                patched = self._from_patch(version)
                if patched is not None:
                    return patched
            if self._reader is not None:
                before = self._reader.stats().get("bytes_fetched", 0)
                tensors = self._reader.get(version)
                n = int(self._reader.stats().get("bytes_fetched", 0) - before)
                counts = [ledger_mod.store_count(n, kind="model_download", direction="down", link="worker-store",
                                                 what=f"store.get model:{version}")] if n else []
                return tensors, counts
            if version in self._cache:
                return self._cache[version], []
            assert self._agg is not None
            req = agg_pb.GetModelRequest(run_id=self.run_id, version=version)
            msgs = list(self._agg.GetModel(req, timeout=CONTROL_TIMEOUT * 4))
            blob = b"".join(c.data for c in msgs)
            tensors, _ = model_from_bytes(blob)
            self._cache = {version: tensors}
            counts = [
                ledger_mod.count(req, kind="control", direction="up", link="worker-aggregator",
                                 what="Aggregator.GetModel request", compression=self.compression),
                ledger_mod.count(msgs, kind="model_download", direction="down", link="worker-aggregator",
                                 what=f"Aggregator.GetModel model:{version}", compression=self.compression),
            ]
            return tensors, counts

    def _from_patch(self, version: int) -> tuple[dict[str, torch.Tensor], list[common_pb2.ByteCount]] | None:
        """``version`` from the cached ``version - 1`` and the stored patch, or None (not cached
        already, no base, no patch, or a result that does not match the version's sha256)."""
        assert self._reader is not None
        if version < 1 or self._reader.cached(version) is not None:
            return None
        base = self._reader.cached(version - 1)
        if base is None:
            return None
        store = self._reader.store
        blob = store.get_patch_bytes(version)
        if blob is None:
            return None
        counts = [ledger_mod.store_count(len(blob), kind="model_download", direction="down", link="worker-store",
                                         what=f"store.get patch:{version}")]
        info = store.model_info(version)
        try:
            tensors = apply_patch(base, blob, version - 1)
            ok = info is not None and hashlib.sha256(model_to_bytes(tensors, info["meta"])).hexdigest() == info["sha256"]
        except PatchError as e:
            log.warning("patch to model version %d does not apply (%s); reading the whole version", version, e)
            ok = False
        if not ok:
            tensors, more = self._full(version)
            return tensors, counts + more
        self._reader.put(version, tensors)
        self.patches_applied += 1
        return dict(tensors), counts

    def _full(self, version: int) -> tuple[dict[str, torch.Tensor], list[common_pb2.ByteCount]]:
        assert self._reader is not None
        blob = self._reader.store.get_model_bytes(version)
        tensors, _ = model_from_bytes(blob)
        self._reader.put(version, tensors)
        return dict(tensors), [ledger_mod.store_count(len(blob), kind="model_download", direction="down",
                                                      link="worker-store", what=f"store.get model:{version}")]
