"""Decoded model versions read from a :class:`fedseq.store.RedisStore`, cached by version (LRU):
what a worker keeps so that a round's users share one download and one decode."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .store import RedisStore, StoreArgumentError, StoreError, check_version, model_from_bytes


class CachedModelReader:
    """Decoded model versions from a store, cached by version (LRU). Thread-safe.

    The returned dict is new on every call but its tensors are shared with the cache: treat
    them as read-only (``module.load_state_dict`` copies, which is the intended use).
    """

    def __init__(self, store: RedisStore, capacity: int = 2) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise StoreArgumentError(f"cache capacity must be an int >= 1, got {capacity!r}")
        self.store = store
        self.capacity = capacity
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.bytes_fetched = 0

    def get(self, version: int | None = None) -> dict[str, torch.Tensor]:
        """Model ``version`` (None = the current head)."""
        if version is None:
            version = self.store.head()
            if version is None:
                raise StoreError(f"run {self.store.run_id} has no model yet")
        version = check_version(version)
        # One lock for lookup and fetch: concurrent first readers of a version fetch it once.
        with self._lock:
            cached = self._cache.get(version)
            if cached is not None:
                self._cache.move_to_end(version)
                self.hits += 1
                return dict(cached)
            self.misses += 1
            blob = self.store.get_model_bytes(version)
            self.bytes_fetched += len(blob)
            try:
                tensors, _ = model_from_bytes(blob)
            except ValueError as exc:
                raise StoreError(
                    f"model version {version} of run {self.store.run_id} is corrupt: {exc}"
                ) from exc
            self._cache[version] = tensors
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return dict(tensors)

    def cached(self, version: int) -> dict[str, torch.Tensor] | None:
        """Model ``version`` if it is in the cache (no store access), else None."""
        with self._lock:
            hit = self._cache.get(version)
            return dict(hit) if hit is not None else None

    def put(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add a version obtained another way (e.g. by applying a patch) to the cache."""
        version = check_version(version)
        with self._lock:
            self._cache[version] = dict(tensors)
            self._cache.move_to_end(version)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def cached_versions(self) -> list[int]:
        with self._lock:
            return list(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes_fetched": self.bytes_fetched}
