"""Model store and run state in Redis.

Keys of run ``R`` (all under ``fedseq:R:``)::

    fedseq:R:model:V        safetensors blob of model version V (never pickle)
    fedseq:R:modelinfo:V    hash: sha256, nbytes, created (unix time), meta (JSON of the blob's metadata)
    fedseq:R:patch:V        patch turning version V-1 into V (fedseq.delta; only with model_delta)
    fedseq:R:summary:V      the summary of the round that made version V, as the aggregation server
                            wrote it with the version (protobuf bytes of fedseq.v1 RoundSummary):
                            an orchestrator that crashed before it got the reply reads it back;
                            the worker role cannot read it (which updates a defense kept is
                            nothing a worker should learn)
    fedseq:R:versions       sorted set of the stored versions (score = version)
    fedseq:R:head           newest version written (only ever moves forward)
    fedseq:R:config         JSON of the run config
    fedseq:R:log:S          list of JSON records of stream S (e.g. rounds, epochs, ledger)
    fedseq:R:once:T         one-time key of an append (a day): its retry appends nothing
    fedseq:runs             set of run ids that have written anything

Writing a version is one atomic server-side step (a Lua script): store blob, info and round
summary, add to the version set, move the head if the version is newer: a head at V means V's
summary is there (when the server wrote one). Re-writing an existing version is accepted only
with identical bytes (an idempotent retry); anything else raises :class:`StoreError`.
Retention then deletes versions that are neither among the ``keep_last`` newest, nor
checkpoints (``v % checkpoint_every == 0``), nor the head.

A run resumes from its config, its head and its record streams (e.g. ``rounds``). Blobs are
serialized by :mod:`fedseq.codec` (:func:`model_to_bytes` / :func:`model_from_bytes`, re-exported
here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import torch
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .codec import CodecError, model_from_bytes, model_to_bytes, read_model_header

__all__ = [
    "RedisStore",
    "Retention",
    "StoreArgumentError",
    "StoreError",
    "model_from_bytes",
    "model_to_bytes",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


# redis-py options for long-running services: reconnect and retry each command for about 30 s, so
# a Redis that restarts (from its append-only file) is waited for instead of failing the run
def patient() -> dict[str, Any]:
    return {"retry": Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), 18)}


def redact(url: str) -> str:
    """A Redis URL without its password (for logs, errors and reprs)."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


class StoreError(RuntimeError):
    """The model store cannot do what was asked (missing version, conflict, unreachable Redis...)."""


class StoreArgumentError(StoreError, ValueError):
    """An argument is invalid (bad run id or name, negative version, non-tensor value...)."""


# ---------------------------------------------------------------------------- store
@dataclass(frozen=True)
class Retention:
    """Which model versions to keep.

    keep_last: the newest ``keep_last`` versions are kept (>= 1).
    checkpoint_every: 0 for none, else versions with ``v % checkpoint_every == 0`` are kept forever.
    The head is never deleted.
    """

    keep_last: int = 3
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise StoreArgumentError(f"Retention.keep_last must be an int >= 1, got {self.keep_last!r}")
        if (
            isinstance(self.checkpoint_every, bool)
            or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 0
        ):
            raise StoreArgumentError(
                f"Retention.checkpoint_every must be an int >= 0 (0 = none), got {self.checkpoint_every!r}"
            )

    def to_delete(self, versions: list[int], head: int | None) -> list[int]:
        """The versions this policy removes from ``versions`` (pure; used by the store and tests)."""
        ordered = sorted(set(versions))
        keep = set(ordered[-self.keep_last :])
        if self.checkpoint_every:
            keep.update(v for v in ordered if v % self.checkpoint_every == 0)
        if head is not None:
            keep.add(head)
        return [v for v in ordered if v not in keep]


# KEYS: model, info, versions, head, runs, summary
# ARGV: version, blob, sha256, nbytes, created, run_id, meta_json, summary ('' for none)
# Returns {status, head}: status 1 = written, 0 = identical version already there, -1 = conflict.
# An append applied once per one-time key (KEYS[2], kept a day): KEYS[1] the stream's list, KEYS[3]
# the set of runs; ARGV[1] the run id, then the records (pushed 1,000 at a time: Lua's unpack limit)
_APPEND_ONCE_SCRIPT = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', 86400) then
  redis.call('SADD', KEYS[3], ARGV[1])
  for i = 2, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
return redis.call('LLEN', KEYS[1])
"""
_PUT_SCRIPT = """
local v = tonumber(ARGV[1])
local existing = redis.call('HGET', KEYS[2], 'sha256')
if existing and redis.call('EXISTS', KEYS[1]) == 1 then
  if existing ~= ARGV[3] then
    return {-1, existing}
  end
  return {0, redis.call('GET', KEYS[4]) or ''}
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'sha256', ARGV[3], 'nbytes', ARGV[4], 'created', ARGV[5], 'meta', ARGV[7])
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[6], ARGV[8])
end
redis.call('ZADD', KEYS[3], v, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[6])
local h = redis.call('GET', KEYS[4])
if (not h) or tonumber(h) < v then
  redis.call('SET', KEYS[4], ARGV[1])
  h = ARGV[1]
end
return {1, h}
"""

_CONNECT_HINT = (
    "is a Redis server running there? `fedseq run` starts one itself; for a manual setup start "
    "one with fedseq.redis_server.RedisServer, `redis-server --port PORT`, or the compose file"
)


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise StoreArgumentError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '-', '_' or '.' (no ':' or spaces)"
        )
    return value


def check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise StoreArgumentError(f"model version must be an int >= 0, got {version!r}")
    return version


def _to_json(what: str, value: Mapping[str, Any]) -> bytes:
    if not isinstance(value, Mapping):
        raise StoreArgumentError(f"{what} must be a mapping (dict), got {type(value).__name__}")
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise StoreArgumentError(f"{what} is not JSON-serializable: {exc}") from exc


class RedisStore:
    """Model versions and run state of one run, in Redis. Thread-safe (one connection pool)."""

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        run_id: str,
        retention: Retention = Retention(),  # noqa: B008 - frozen, immutable default
    ) -> None:
        self.run_id = _check_name("run id", run_id)
        if not isinstance(retention, Retention):
            raise StoreArgumentError(f"retention must be a Retention, got {type(retention).__name__}")
        self.retention = retention
        # Any: redis-py types every reply as bytes | str; this client always returns bytes.
        self._client: Any
        if isinstance(url_or_client, str):
            self.url = redact(url_or_client)
            self._client = self._connect(url_or_client)
        elif isinstance(url_or_client, redis.Redis):
            kwargs = url_or_client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise StoreArgumentError("the redis client must use decode_responses=False (blobs are bytes)")
            self.url = f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
            self._client = url_or_client
        else:
            raise StoreArgumentError(
                f"url_or_client must be a redis:// URL or a redis.Redis, got {type(url_or_client).__name__}"
            )
        self._prefix = f"fedseq:{self.run_id}:"
        self._put_script = self._client.register_script(_PUT_SCRIPT)
        self._append_script = self._client.register_script(_APPEND_ONCE_SCRIPT)
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        run_id: str,
        retention: Retention = Retention(),  # noqa: B008
        **redis_kwargs: Any,
    ) -> RedisStore:
        """Connect to ``url`` and check it answers; StoreError with the URL and a hint if not.

        ``redis_kwargs`` go to ``redis.Redis.from_url`` (defaults: 3 s connect timeout,
        60 s socket timeout, TCP keepalive, health check every 30 s, 3 quick retries).
        """
        _check_name("run id", run_id)
        client = cls._connect(url, **redis_kwargs)
        return cls(client, run_id, retention)._with_url(url)

    def _with_url(self, url: str) -> RedisStore:
        self.url = redact(url)
        return self

    @staticmethod
    def _connect(url: str, **redis_kwargs: Any) -> redis.Redis:
        opts: dict[str, Any] = {
            "socket_connect_timeout": 3.0,
            "socket_timeout": 60.0,
            "socket_keepalive": True,
            "health_check_interval": 30,
            # A few quick retries on a dropped connection; redis-py's default backoff
            # (seconds) would make a dead Redis slow to report.
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
        }
        opts.update(redis_kwargs)
        opts["decode_responses"] = False
        try:
            client = redis.Redis.from_url(url, **opts)
        except ValueError as exc:
            raise StoreArgumentError(f"invalid Redis URL {redact(url)!r}: {exc}") from exc
        try:
            client.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            client.close()
            raise StoreError(f"cannot reach Redis at {redact(url)}: {exc}; {_CONNECT_HINT}") from exc
        except redis.exceptions.RedisError as exc:
            client.close()
            raise StoreError(f"Redis at {redact(url)} refused PING: {exc}") from exc
        return client

    @property
    def client(self) -> Any:
        return self._client

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore(url={self.url!r}, run_id={self.run_id!r}, retention={self.retention!r})"

    # ------------------------------------------------------------------ helpers
    def _key(self, *parts: object) -> str:
        return self._prefix + ":".join(str(p) for p in parts)

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise StoreError(
                f"{what}: lost the Redis connection at {self.url}: {exc}; {_CONNECT_HINT}"
            ) from exc
        except redis.exceptions.ResponseError as exc:
            raise StoreError(f"{what}: Redis at {self.url} answered an error: {exc}") from exc

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written

    def io_counters(self) -> dict[str, int]:
        """Payload bytes (blobs and JSON) this instance has read from and written to Redis."""
        with self._lock:
            return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written}

    last_io_bytes = property(io_counters)

    # ------------------------------------------------------------------ model versions
    def put_model(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, str] | None = None,
        summary: bytes = b"",
    ) -> int:
        """Store model ``version``; returns its size in bytes (also on an idempotent retry).

        The head moves to ``version`` if it is newer. Re-putting an existing version is a no-op
        when the bytes are identical and a StoreError otherwise. ``summary`` (the round's, see
        :meth:`round_summary`) is written in the same atomic step. Retention runs afterwards.
        """
        try:
            blob = model_to_bytes(tensors, meta)
        except CodecError as exc:
            raise StoreArgumentError(str(exc)) from exc
        return self.put_model_bytes(version, blob, summary)

    def put_model_bytes(self, version: int, blob: bytes, summary: bytes = b"") -> int:
        """Like :meth:`put_model` for an already serialized safetensors blob (validated)."""
        version = check_version(version)
        blob = bytes(blob)
        try:
            header = read_model_header(blob)
        except CodecError as exc:
            raise StoreArgumentError(f"model version {version} of run {self.run_id}: {exc}") from exc
        meta_json = json.dumps(header.get("__metadata__") or {}, sort_keys=True)
        sha = hashlib.sha256(blob).hexdigest()
        keys = [
            self._key("model", version),
            self._key("modelinfo", version),
            self._key("versions"),
            self._key("head"),
            "fedseq:runs",
            self._key("summary", version),
        ]
        args = [version, blob, sha, len(blob), f"{time.time():.6f}", self.run_id, meta_json, bytes(summary)]
        with self._io(f"writing model version {version} of run {self.run_id}"):
            status, detail = self._put_script(keys=keys, args=args)
        self._count(written=len(blob) + len(summary))
        if int(status) < 0:
            existing = detail.decode() if isinstance(detail, bytes) else str(detail)
            raise StoreError(
                f"run {self.run_id} already has model version {version} with different content "
                f"(stored sha256 {existing[:12]}..., new {sha[:12]}...); versions are immutable"
            )
        self.apply_retention()
        return len(blob)

    def apply_retention(self) -> list[int]:
        """Delete the versions the retention policy drops; returns them."""
        with self._io(f"applying retention to run {self.run_id}"):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrange(self._key("versions"), 0, -1)
            pipe.get(self._key("head"))
            raw_versions, raw_head = pipe.execute()
            versions = [int(v) for v in raw_versions]
            head = int(raw_head) if raw_head is not None else None
            drop = self.retention.to_delete(versions, head)
            if drop:
                pipe = self._client.pipeline(transaction=True)
                for v in drop:
                    pipe.delete(self._key("model", v), self._key("modelinfo", v), self._key("patch", v),
                                self._key("summary", v))
                pipe.zrem(self._key("versions"), *drop)
                pipe.execute()
        return drop

    def get_model_bytes(self, version: int) -> bytes:
        """The raw safetensors blob of ``version``; StoreError if the run does not have it."""
        version = check_version(version)
        with self._io(f"reading model version {version} of run {self.run_id}"):
            blob = self._client.get(self._key("model", version))
        if blob is None:
            available = self.versions()
            raise StoreError(
                f"run {self.run_id} has no model version {version} "
                f"(available: {', '.join(map(str, available)) if available else 'none'})"
            )
        self._count(read=len(blob))
        return bytes(blob)

    def put_patch_bytes(self, version: int, blob: bytes) -> int:
        """Store the patch turning ``version - 1`` into ``version`` (fedseq.delta); returns its size.
        Deleted with the version by retention."""
        version = check_version(version)
        blob = bytes(blob)
        with self._io(f"writing the patch of model version {version} of run {self.run_id}"):
            self._client.set(self._key("patch", version), blob)
        self._count(written=len(blob))
        return len(blob)

    def get_patch_bytes(self, version: int) -> bytes | None:
        """The patch turning ``version - 1`` into ``version``, or None when there is none."""
        return self._version_bytes("patch", version, "the patch")

    def round_summary(self, version: int) -> bytes | None:
        """The summary the server wrote with ``version`` (None: written without one, or dropped by
        retention with the version)."""
        return self._version_bytes("summary", version, "the round summary")

    def _version_bytes(self, kind: str, version: int, what: str) -> bytes | None:
        """The bytes under ``kind:version`` (counted as read), or None when there are none."""
        version = check_version(version)
        with self._io(f"reading {what} of model version {version} of run {self.run_id}"):
            blob = self._client.get(self._key(kind, version))
        if blob is None:
            return None
        self._count(read=len(blob))
        return bytes(blob)

    def get_model(self, version: int) -> dict[str, torch.Tensor]:
        """Model ``version`` as named CPU tensors (fresh, writable copies)."""
        return self.get_model_with_meta(version)[0]

    def get_model_with_meta(self, version: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        blob = self.get_model_bytes(version)
        try:
            return model_from_bytes(blob)
        except ValueError as exc:
            raise StoreError(f"model version {version} of run {self.run_id} is corrupt: {exc}") from exc

    def model_info(self, version: int) -> dict[str, Any] | None:
        """``{version, nbytes, sha256, created, meta}`` of a stored version, without its blob."""
        version = check_version(version)
        with self._io(f"reading info of model version {version} of run {self.run_id}"):
            raw = self._client.hgetall(self._key("modelinfo", version))
        if not raw:
            return None
        info = {k.decode(): v.decode() for k, v in raw.items()}
        return {
            "version": version,
            "nbytes": int(info.get("nbytes", 0)),
            "sha256": info.get("sha256", ""),
            "created": float(info.get("created", 0.0)),
            "meta": json.loads(info.get("meta", "{}")),
        }

    def head(self) -> int | None:
        """The newest version written, or None for a run without models."""
        with self._io(f"reading the head of run {self.run_id}"):
            raw = self._client.get(self._key("head"))
        return int(raw) if raw is not None else None

    def versions(self) -> list[int]:
        """Stored versions, ascending."""
        with self._io(f"listing model versions of run {self.run_id}"):
            raw = self._client.zrange(self._key("versions"), 0, -1)
        return sorted(int(v) for v in raw)

    # ------------------------------------------------------------------ run state
    def _put_json(self, key: str, what: str, value: Mapping[str, Any]) -> None:
        data = _to_json(what, value)
        with self._io(f"writing {what} of run {self.run_id}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(key, data)
            pipe.sadd("fedseq:runs", self.run_id)
            pipe.execute()
        self._count(written=len(data))

    def _get_json(self, key: str, what: str) -> dict[str, Any] | None:
        with self._io(f"reading {what} of run {self.run_id}"):
            raw = self._client.get(key)
        if raw is None:
            return None
        self._count(read=len(raw))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{what} of run {self.run_id} is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise StoreError(f"{what} of run {self.run_id} is not a JSON object")
        return value

    def put_config(self, config: Mapping[str, Any]) -> None:
        self._put_json(self._key("config"), "config", config)

    def get_config(self) -> dict[str, Any] | None:
        return self._get_json(self._key("config"), "config")

    def append_record(self, stream: str, record: Mapping[str, Any]) -> int:
        """Append a JSON record to ``stream`` (e.g. "rounds", "metrics", "ledger"); returns its new length."""
        return self.append_records(stream, [record])

    def append_records(self, stream: str, records: Sequence[Mapping[str, Any]]) -> int:
        """Append JSON records to ``stream`` in one round trip, exactly once: the client retries a
        call whose reply was lost (Redis killed after it applied the append), and the call's
        one-time key makes the retry a no-op. Returns the stream's new length."""
        _check_name("stream", stream)
        if not records:
            return self.record_count(stream)
        data = [_to_json(f"record of stream {stream!r}", r) for r in records]
        once = self._key("once", secrets.token_hex(16))
        with self._io(f"appending to stream {stream!r} of run {self.run_id}"):
            length = self._append_script(keys=[self._key("log", stream), once, "fedseq:runs"],
                                         args=[self.run_id, *data])
        self._count(written=sum(len(d) for d in data))
        return int(length)

    def records(self, stream: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        """Records ``start..end`` (inclusive, negative counts from the end, like LRANGE) of ``stream``."""
        _check_name("stream", stream)
        with self._io(f"reading stream {stream!r} of run {self.run_id}"):
            raw = self._client.lrange(self._key("log", stream), start, end)
        self._count(read=sum(len(r) for r in raw))
        return [json.loads(r) for r in raw]

    def record_count(self, stream: str) -> int:
        _check_name("stream", stream)
        with self._io(f"counting stream {stream!r} of run {self.run_id}"):
            return int(self._client.llen(self._key("log", stream)))

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[str]:
        """Run ids with anything stored in this Redis database, sorted."""
        with self._io("listing runs"):
            raw = self._client.smembers("fedseq:runs")
        return sorted(r.decode() for r in raw)

    def delete_run(self) -> int:
        """Delete every key of this run; returns how many keys were removed."""
        removed = 0
        with self._io(f"deleting run {self.run_id}"):
            batch: list[bytes] = []
            for key in self._client.scan_iter(match=self._prefix + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(self._client.delete(*batch))
                    batch.clear()
            if batch:
                removed += int(self._client.delete(*batch))
            self._client.srem("fedseq:runs", self.run_id)
        return removed
