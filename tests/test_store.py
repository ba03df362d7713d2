"""RedisStore and CachedModelReader against a real Redis server (fixture ``redis_url``)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from _proxy import TcpProxy

from fedseq import codec
from fedseq.modelcache import CachedModelReader
from fedseq.redis_server import RedisServer
from fedseq.store import (
    RedisStore,
    Retention,
    StoreArgumentError,
    StoreError,
    model_from_bytes,
    model_to_bytes,
)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(17, 8, generator=g),
        "attn.in_proj": torch.randn(3, 8, 8, generator=g),
        "ln.bias": torch.randn(8, generator=g),
        "scalar": torch.randn((), generator=g),
        "empty": torch.zeros(0, 4),
    }


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))
        for k in a
    )


def test_put_get_round_trip_is_bit_exact(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")
    tensors = _model(0)
    tensors["special"] = torch.tensor([-0.0, float("inf"), float("nan"), 1e-45, -3.4e38])

    # Execute
    written = store.put_model(0, tensors, meta={"model": "sasrec"})
    loaded, meta = store.get_model_with_meta(0)

    # Assert
    assert written == len(store.get_model_bytes(0))
    assert _bitwise_equal(tensors, loaded)
    assert meta == {"model": "sasrec"}
    info = store.model_info(0)
    assert info is not None and info["nbytes"] == written and info["meta"] == {"model": "sasrec"}
    assert store.io_counters()["bytes_written"] == written


def test_blob_is_safetensors_not_pickle(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")
    store.put_model(3, _model(1), meta={"k": "v"})

    # Execute
    blob = store.client.get("fedseq:r1:model:3")

    # Assert
    assert blob is not None and blob[:1] != b"\x80"  # pickle protocol >= 2 starts with PROTO 0x80
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    assert header["__metadata__"] == {"k": "v"}
    assert header["emb.weight"]["dtype"] == "F32" and header["emb.weight"]["shape"] == [17, 8]


def test_head_moves_only_forward(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1", Retention(keep_last=10))
    heads = [store.head()]

    # Execute
    for version in (0, 2, 1, 5, 4):
        store.put_model(version, _model(version))
        heads.append(store.head())

    # Assert
    assert heads == [None, 0, 2, 2, 5, 5]
    assert store.versions() == [0, 1, 2, 4, 5]


def test_retention_keeps_last_two_and_checkpoints(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1", Retention(keep_last=2, checkpoint_every=5))
    after_each = []

    # Execute
    for version in range(12):
        store.put_model(version, {"w": torch.full((2,), float(version))})
        after_each.append(store.versions())

    # Assert
    assert after_each[0] == [0]
    assert after_each[1] == [0, 1]
    assert after_each[2] == [0, 1, 2]  # 0 is a checkpoint
    assert after_each[3] == [0, 2, 3]
    assert after_each[6] == [0, 5, 6]
    assert after_each[11] == [0, 5, 10, 11]
    assert store.head() == 11
    keys = sorted(redis.Redis.from_url(redis_url).keys("fedseq:r1:model*"))
    assert keys == sorted(
        f"fedseq:r1:{kind}:{v}".encode() for kind in ("model", "modelinfo") for v in (0, 5, 10, 11)
    )
    assert store.get_model(5)["w"].tolist() == [5.0, 5.0]


def test_a_round_summary_is_written_with_its_version_and_dropped_with_it(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r-sum", Retention(keep_last=2, checkpoint_every=0))

    # Execute
    store.put_model(0, {"w": torch.zeros(2)})
    for version in (1, 2, 3):
        store.put_model(version, {"w": torch.full((2,), float(version))}, summary=f"round {version - 1}".encode())
    retry = store.put_model(3, {"w": torch.full((2,), 3.0)}, summary=b"another")  # an idempotent retry

    # Assert: version 1 left with its summary; a retry of a written version rewrites nothing
    assert retry > 0 and store.versions() == [2, 3]
    assert [store.round_summary(v) for v in range(4)] == [None, None, b"round 1", b"round 2"]
    assert sorted(redis.Redis.from_url(redis_url).keys("fedseq:r-sum:summary:*")) == [
        b"fedseq:r-sum:summary:2", b"fedseq:r-sum:summary:3"]


def test_retention_never_deletes_the_head() -> None:
    # Prepare
    policy = Retention(keep_last=1, checkpoint_every=0)

    # Execute
    dropped = policy.to_delete([1, 2, 3, 4], head=2)

    # Assert
    assert dropped == [1, 3]


def test_run_resumes_after_a_persistent_redis_restart(tmp_path: Path) -> None:
    # Prepare
    with RedisServer(data_dir=tmp_path / "redis") as server:
        store = RedisStore.from_url(server.url, "resume")
        store.put_config({"model": "sasrec", "rounds": 4})
        store.put_model(0, _model(0))
        store.put_model(1, _model(1))
        store.append_records("rounds", [{"round": 0}, {"round": 1}])
        store.append_record("epochs", {"epoch": 0, "hr": 0.25})
        store.close()

    # Execute: what an orchestrator reads to resume (config, head, round and epoch streams)
    with RedisServer(data_dir=tmp_path / "redis") as server:
        store = RedisStore.from_url(server.url, "resume")
        state = (store.get_config(), store.head(), store.versions(), store.records("rounds"), store.records("epochs"))
        model = store.get_model(1)
        store.close()

    # Assert
    assert state == (
        {"model": "sasrec", "rounds": 4},
        1,
        [0, 1],
        [{"round": 0}, {"round": 1}],
        [{"epoch": 0, "hr": 0.25}],
    )
    assert _bitwise_equal(model, _model(1))


def test_retention_policy_is_validated() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="keep_last"):
        Retention(keep_last=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        Retention(checkpoint_every=-1)


def test_identical_re_put_is_idempotent_and_conflicting_re_put_rejected(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")
    first = store.put_model(1, _model(1), meta={"round": "1"})

    # Execute
    again = store.put_model(1, _model(1), meta={"round": "1"})
    with pytest.raises(StoreError, match="different content"):
        store.put_model(1, _model(2), meta={"round": "1"})
    with pytest.raises(StoreError, match="different content"):
        store.put_model(1, _model(1), meta={"round": "other"})

    # Assert
    assert again == first
    assert _bitwise_equal(store.get_model(1), _model(1))
    assert store.versions() == [1]


def test_missing_version_error_lists_available_versions(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")
    store.put_model(0, _model(0))
    store.put_model(1, _model(1))
    empty = RedisStore.from_url(redis_url, "r2")

    # Execute / Assert
    with pytest.raises(StoreError, match=r"run r1 has no model version 7 \(available: 0, 1\)"):
        store.get_model(7)
    with pytest.raises(StoreError, match=r"run r2 has no model version 0 \(available: none\)"):
        empty.get_model(0)


def test_config_and_records_round_trip(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")
    config = {"model": "sasrec", "lr": 0.001, "clients_per_round": 256, "nested": {"a": [1, 2]}}
    before = store.get_config()

    # Execute
    store.put_config({"model": "bert4rec"})
    store.put_config(config)  # the last write wins
    lengths = [store.append_record("rounds", {"round": r, "bytes": r * 10}) for r in range(4)]

    # Assert
    assert before is None
    assert store.get_config() == config
    assert lengths == [1, 2, 3, 4]
    assert store.record_count("rounds") == 4
    assert store.records("rounds") == [{"round": r, "bytes": r * 10} for r in range(4)]
    assert store.records("rounds", 2) == [{"round": 2, "bytes": 20}, {"round": 3, "bytes": 30}]
    assert store.records("rounds", -1) == [{"round": 3, "bytes": 30}]
    assert store.records("metrics") == []
    assert store.runs() == ["r1"]


def test_non_json_values_are_rejected(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")

    # Execute / Assert
    with pytest.raises(StoreArgumentError, match="config is not JSON-serializable"):
        store.put_config({"t": torch.zeros(1)})
    with pytest.raises(StoreArgumentError, match="mapping"):
        store.append_record("rounds", [1, 2])  # type: ignore[arg-type]


def test_two_runs_are_isolated_and_delete_run_removes_only_one(redis_url: str) -> None:
    # Prepare
    a = RedisStore.from_url(redis_url, "run-a")
    b = RedisStore.from_url(redis_url, "run-a.b_2")
    a.put_model(4, _model(4))
    a.put_config({"who": "a"})
    a.append_record("metrics", {"hr": 0.1})
    b.put_model(9, _model(9))
    b.put_config({"who": "b"})

    # Execute
    before = (a.versions(), b.versions(), a.get_config(), b.get_config(), b.records("metrics"), a.runs())
    removed = a.delete_run()

    # Assert
    assert before == ([4], [9], {"who": "a"}, {"who": "b"}, [], ["run-a", "run-a.b_2"])
    assert removed == 7  # model, modelinfo, versions, head, config, log:metrics, the append's one-time key
    assert a.versions() == [] and a.head() is None and a.get_config() is None
    assert b.versions() == [9] and b.get_config() == {"who": "b"}
    assert a.runs() == ["run-a.b_2"]


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "a*", "ü", "x" * 129, None])
def test_bad_run_id_is_rejected(redis_url: str, bad: object) -> None:
    # Execute / Assert
    with pytest.raises(StoreArgumentError, match="invalid run id"):
        RedisStore.from_url(redis_url, bad)  # type: ignore[arg-type]


def test_bad_versions_and_names_are_rejected(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")

    # Execute / Assert
    with pytest.raises(StoreArgumentError, match="version"):
        store.put_model(-1, _model(0))
    with pytest.raises(StoreArgumentError, match="version"):
        store.get_model(True)  # type: ignore[arg-type]
    with pytest.raises(StoreArgumentError, match="invalid stream"):
        store.append_record("a:b", {})
    with pytest.raises(StoreArgumentError, match="not a torch.Tensor"):
        store.put_model(0, {"w": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(StoreArgumentError, match="not a safetensors blob"):
        store.put_model_bytes(0, b"\x80\x04\x95 pickle")


def test_dead_port_raises_store_error_quickly() -> None:
    # Prepare: a port nobody listens on
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"

    # Execute
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        RedisStore.from_url(url, "r1")
    elapsed = time.monotonic() - t0

    # Assert
    assert url in str(err.value) and "Redis server running" in str(err.value)
    assert elapsed < 3.0


def test_cached_reader_counts_hits_misses_and_evicts_lru(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1", Retention(keep_last=5))
    for v in range(3):
        store.put_model(v, _model(v))
    reader = CachedModelReader(store, capacity=2)
    size = len(store.get_model_bytes(0))

    # Execute
    reader.get(0)  # miss
    reader.get(0)  # hit
    reader.get(1)  # miss
    reader.get(0)  # hit, 0 most recent
    reader.get(2)  # miss, evicts 1
    got = reader.get(1)  # miss again, evicts 0
    head = reader.get()  # head = 2: hit

    # Assert
    assert reader.stats() == {"hits": 3, "misses": 4, "bytes_fetched": 4 * size}
    assert reader.cached_versions() == [1, 2]
    assert _bitwise_equal(got, _model(1)) and _bitwise_equal(head, _model(2))


def test_serializer_is_the_codecs_and_stored_blobs_are_its_bytes(redis_url: str) -> None:
    # Prepare
    store = RedisStore.from_url(redis_url, "r1")
    tensors = _model(3)

    # Execute
    store.put_model(0, tensors, meta={"round": "0"})
    blob = store.get_model_bytes(0)

    # Assert: fedseq.store re-exports the codec's serializer (other modules import it from here)
    assert model_to_bytes is codec.model_to_bytes and model_from_bytes is codec.model_from_bytes
    assert blob == codec.model_to_bytes(tensors, {"round": "0"})
    assert _bitwise_equal(model_from_bytes(blob)[0], tensors)


class _LoseOneReply(TcpProxy):
    """A proxy in front of Redis that forwards everything, except that it swallows the reply to the
    first append (EVALSHA of the append script, or an RPUSH) once ``active`` and cuts that
    connection: Redis applied the call, the client never heard, as when Redis is killed between the two."""

    def __init__(self, upstream_port: int) -> None:
        self.dropped, self.active = threading.Event(), threading.Event()
        super().__init__(upstream_port)

    def forward(self, conn, direction: str, data: bytes) -> bool:
        if self.dropped.is_set() or not self.active.is_set():
            return True
        if direction == "up" and (b"EVALSHA" in data.upper() or b"RPUSH" in data.upper()):
            conn["armed"] = True
        elif direction == "down" and conn.get("armed"):
            self.dropped.set()  # the reply is lost with the connection
            return False
        return True


def test_an_append_whose_reply_was_lost_is_applied_once(redis_url: str) -> None:
    # Prepare: the store reaches Redis through a proxy that loses the reply of the first append
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = _LoseOneReply(port)
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0", "once")
    store.append_record("ledger", {"n": 0})  # the script loaded, before the proxy loses anything
    proxy.active.set()
    # Execute: the client retries the append on a new connection
    length = store.append_records("ledger", [{"n": 1}, {"n": 2}])
    # Assert: the reply was lost, the retry appended nothing more
    assert proxy.dropped.is_set()
    assert length == 3 and store.records("ledger") == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_large_append_keeps_every_record_in_order(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, "big-append")
    assert store.append_records("ledger", [{"i": i} for i in range(2500)]) == 2500  # > Lua's unpack batch
    assert [r["i"] for r in store.records("ledger")] == list(range(2500))
