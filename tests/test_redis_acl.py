"""RedisServer(acl=True): per-role users with passwords on a real redis-server, used through RedisStore."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from fedseq.modelcache import CachedModelReader
from fedseq.redis_server import REDIS_ROLES, RedisServer, RedisServerError
from fedseq.store import RedisStore, Retention, StoreError, model_to_bytes

RUN = "acl"


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "b": torch.arange(3, dtype=torch.float32) + value}


def _raw(url: str, **kwargs: object) -> redis.Redis:
    """A plain client without retries (a refused login should fail at once)."""
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=5, **kwargs)


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    server = RedisServer(acl=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    """The admin client, with the database flushed before the test."""
    client = acl_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def published(acl_server: RedisServer, admin: redis.Redis) -> dict[int, dict[str, torch.Tensor]]:
    """Versions 0..2 of run RUN (1 and 2 with their round's summary) and the patch of version 2,
    written with the server role."""
    models = {v: _tensors(float(v)) for v in range(3)}
    with RedisStore.from_url(acl_server.url_for("server"), RUN, Retention(keep_last=5)) as store:
        for v, tensors in models.items():
            store.put_model(v, tensors, {"round": str(v)}, f"summary-{v}".encode() if v else b"")
        store.put_patch_bytes(2, b"patch-2")
        store.put_config({"lr": 0.1})
        store.append_record("rounds", {"round": 0})
    return models


# ---------------------------------------------------------------------------- the interface
def test_url_for_gives_each_role_its_own_password(acl_server: RedisServer) -> None:
    # Execute
    urls = {role: acl_server.url_for(role) for role in REDIS_ROLES}
    passwords = acl_server.passwords

    # Assert
    assert REDIS_ROLES == ("admin", "server", "orchestrator", "worker")
    for role in REDIS_ROLES:
        assert urls[role] == f"redis://{role}:{passwords[role]}@127.0.0.1:{acl_server.port}/0"
        assert len(passwords[role]) >= 32
    assert len(set(passwords.values())) == len(REDIS_ROLES)
    assert acl_server.url == urls["admin"]


def test_url_for_an_unknown_role_is_a_value_error(acl_server: RedisServer) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown Redis role 'root'"):
        acl_server.url_for("root")


def test_without_acl_every_role_gets_the_plain_url() -> None:
    # Prepare
    server = RedisServer(port=6400)

    # Execute
    urls = {role: server.url_for(role) for role in REDIS_ROLES}

    # Assert
    assert set(urls.values()) == {"redis://127.0.0.1:6400/0"} == {server.url}
    assert server.passwords == {} and server.acl_path is None
    with pytest.raises(ValueError):
        server.url_for("nobody")


def test_url_for_before_start_with_acl_raises() -> None:
    # Prepare
    server = RedisServer(acl=True)

    # Execute / Assert
    with pytest.raises(RedisServerError, match="start"):
        server.url_for("worker")


def test_acl_file_is_private_and_switches_the_default_user_off(acl_server: RedisServer, admin: redis.Redis) -> None:
    # Execute
    path = acl_server.acl_path
    users = {line.split()[1]: line for line in admin.acl_list()}

    # Assert
    assert path is not None and path.name == "users.acl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(users) == {"default", *REDIS_ROLES}
    assert " off " in users["default"] and "nopass" not in users["default"]


# ---------------------------------------------------------------------------- authentication
@pytest.mark.parametrize("protocol", [2, 3])
def test_no_credentials_are_refused(acl_server: RedisServer, protocol: int) -> None:
    # Prepare
    client = _raw(f"redis://127.0.0.1:{acl_server.port}/0", protocol=protocol)

    # Execute
    with pytest.raises(redis.exceptions.AuthenticationError) as err:
        client.set(f"fedseq:{RUN}:head", b"0")
    client.close()

    # Assert
    assert "authenticat" in str(err.value).lower()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_wrong_password_is_refused(acl_server: RedisServer, protocol: int) -> None:
    # Prepare
    client = _raw(f"redis://worker:wrong@127.0.0.1:{acl_server.port}/0", protocol=protocol)

    # Execute
    with pytest.raises(redis.exceptions.AuthenticationError) as err:
        client.ping()
    client.close()

    # Assert
    assert "invalid username-password pair" in str(err.value)


def test_a_role_with_another_roles_password_is_refused(acl_server: RedisServer) -> None:
    # Prepare
    url = f"redis://admin:{acl_server.passwords['worker']}@127.0.0.1:{acl_server.port}/0"

    # Execute
    with pytest.raises(StoreError) as err:
        RedisStore.from_url(url, RUN, retry=Retry(NoBackoff(), 0))

    # Assert
    assert "invalid username-password pair" in str(err.value)


@pytest.mark.parametrize("protocol", [2, 3])
def test_connecting_as_each_role_leaves_no_acl_log_entry(
    acl_server: RedisServer, admin: redis.Redis, protocol: int
) -> None:
    # Prepare: redis-py sends CLIENT MAINT_NOTIFICATIONS / CLIENT SETINFO after logging in
    if not str(admin.info("server")["redis_version"]).startswith("6."):
        pytest.skip("the CLIENT handshake rules differ on Redis 7")
    admin.acl_log_reset()

    # Execute
    pongs = []
    for role in ("server", "orchestrator", "worker"):
        client = _raw(acl_server.url_for(role), protocol=protocol)
        pongs.append(client.ping())
        client.close()

    # Assert
    assert pongs == [True, True, True]
    assert admin.acl_log() == []


# ---------------------------------------------------------------------------- server role
def test_server_role_puts_models_and_patches_and_applies_retention(acl_server: RedisServer, admin: redis.Redis) -> None:
    # Prepare
    store = RedisStore.from_url(acl_server.url_for("server"), RUN, Retention(keep_last=2))

    # Execute
    sizes = [store.put_model(v, _tensors(float(v))) for v in range(4)]
    retry_size = store.put_model(3, _tensors(3.0))  # idempotent retry: the Lua script's "identical" branch
    with pytest.raises(StoreError, match="different content"):
        store.put_model(3, _tensors(9.0))
    patch_size = store.put_patch_bytes(3, b"patch-3")
    dropped_now = store.apply_retention()
    versions, head = store.versions(), store.head()
    model, info = store.get_model(3), store.model_info(3)
    counters = store.io_counters()
    runs = store.runs()
    store.close()

    # Assert
    assert versions == [2, 3] and head == 3 and dropped_now == []
    assert retry_size == sizes[3] and patch_size == len(b"patch-3")
    assert torch.equal(model["w"], _tensors(3.0)["w"]) and info is not None and info["nbytes"] == sizes[3]
    assert counters["bytes_written"] >= sum(sizes) and counters["bytes_read"] == sizes[3]
    assert runs == [RUN]
    assert admin.get(f"fedseq:{RUN}:model:0") is None and admin.get(f"fedseq:{RUN}:patch:3") == b"patch-3"


def test_server_role_deletes_a_run_with_scan(
    acl_server: RedisServer, published: dict[int, dict[str, torch.Tensor]], admin: redis.Redis
) -> None:
    # Prepare
    store = RedisStore.from_url(acl_server.url_for("server"), RUN)

    # Execute
    removed = store.delete_run()
    runs = store.runs()
    store.close()

    # Assert
    assert removed > 0 and runs == []
    assert list(admin.scan_iter(match=f"fedseq:{RUN}:*")) == []


@pytest.mark.parametrize("role", ["server", "orchestrator"])
def test_store_roles_are_refused_dangerous_commands_and_foreign_keys(
    acl_server: RedisServer, admin: redis.Redis, role: str
) -> None:
    # Prepare
    admin.set("other:key", b"x")
    client = _raw(acl_server.url_for(role))
    attempts = {
        "flushall": lambda: client.flushall(),
        "flushdb": lambda: client.flushdb(),
        "keys": lambda: client.keys("*"),
        "config": lambda: client.config_get("*"),
        "acl": lambda: client.acl_list(),
        "debug": lambda: client.execute_command("DEBUG", "SLEEP", "0"),
        "shutdown": lambda: client.execute_command("SHUTDOWN", "NOSAVE"),
        "client-kill": lambda: client.execute_command("CLIENT", "KILL", "TYPE", "normal"),
        "get-foreign": lambda: client.get("other:key"),
        "set-foreign": lambda: client.set("other:key", b"y"),
    }

    # Execute
    refused = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            refused[name] = False
        except redis.exceptions.NoPermissionError:
            refused[name] = True
    client.close()

    # Assert
    assert all(refused.values()), [n for n, ok in refused.items() if not ok]
    assert acl_server.is_running() and admin.get("other:key") == b"x"


# ---------------------------------------------------------------------------- orchestrator role
def test_orchestrator_role_writes_config_and_records_and_reads_what_a_resume_needs(
    acl_server: RedisServer, published: dict[int, dict[str, torch.Tensor]]
) -> None:
    # Prepare
    store = RedisStore.from_url(acl_server.url_for("orchestrator"), RUN)

    # Execute
    before = store.get_config()
    store.put_config({"lr": 0.5, "epochs": 2})
    length_one = store.append_record("rounds", {"round": 1})
    length_many = store.append_records("ledger", [{"i": 0}, {"i": 1}])
    config, head, versions = store.get_config(), store.head(), store.versions()
    rounds, ledger, count = store.records("rounds"), store.records("ledger"), store.record_count("ledger")
    summaries = [store.round_summary(v) for v in range(3)]
    store.close()

    # Assert
    assert before == {"lr": 0.1}  # written by the server role in the fixture
    assert config == {"lr": 0.5, "epochs": 2} and head == 2 and versions == [0, 1, 2]
    assert length_one == 2 and rounds == [{"round": 0}, {"round": 1}]
    assert length_many == 2 == count and ledger == [{"i": 0}, {"i": 1}]
    assert summaries == [None, b"summary-1", b"summary-2"]  # a crashed orchestrator's round counts


# ---------------------------------------------------------------------------- worker role
@pytest.mark.parametrize("protocol", [2, 3])
def test_worker_role_reads_models_patches_info_and_head(
    acl_server: RedisServer, published: dict[int, dict[str, torch.Tensor]], protocol: int
) -> None:
    # Prepare
    store = RedisStore.from_url(acl_server.url_for("worker"), RUN, protocol=protocol)
    reader = CachedModelReader(store)

    # Execute
    newest = reader.get()  # head, then the blob
    first = reader.get(0)
    blob = store.get_model_bytes(1)
    patch, no_patch = store.get_patch_bytes(2), store.get_patch_bytes(1)
    info, head, versions = store.model_info(2), store.head(), store.versions()
    with pytest.raises(StoreError, match="available: 0, 1, 2"):  # the miss lists versions (ZRANGE)
        store.get_model_bytes(7)
    store.close()

    # Assert
    assert torch.equal(newest["w"], published[2]["w"]) and torch.equal(first["b"], published[0]["b"])
    assert blob == model_to_bytes(published[1], {"round": "1"})
    assert patch == b"patch-2" and no_patch is None
    assert info is not None and info["meta"] == {"round": "2"} and head == 2 and versions == [0, 1, 2]


def test_worker_role_is_refused_writes_scripts_and_other_keys(
    acl_server: RedisServer, published: dict[int, dict[str, torch.Tensor]], admin: redis.Redis
) -> None:
    # Prepare
    client = _raw(acl_server.url_for("worker"))
    attempts = {
        "set-head": lambda: client.set(f"fedseq:{RUN}:head", b"0"),
        "set-model": lambda: client.set(f"fedseq:{RUN}:model:9", b"x"),
        "del-model": lambda: client.delete(f"fedseq:{RUN}:model:0"),
        "eval": lambda: client.eval("return 1", 0),
        "flushall": lambda: client.flushall(),
        "get-config": lambda: client.get(f"fedseq:{RUN}:config"),
        "lrange-log": lambda: client.lrange(f"fedseq:{RUN}:log:rounds", 0, -1),
        # which updates a defense kept or rejected is nothing an (adaptive) attacker should read
        "get-summary": lambda: client.get(f"fedseq:{RUN}:summary:2"),
        "smembers-runs": lambda: client.smembers("fedseq:runs"),
        "scan": lambda: client.scan(0),
    }

    # Execute
    refused = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            refused[name] = False
        except redis.exceptions.NoPermissionError:
            refused[name] = True
    client.close()
    store = RedisStore.from_url(acl_server.url_for("worker"), RUN)
    with pytest.raises(StoreError, match="no permissions to run the 'evalsha' command"):
        store.put_model(5, _tensors(5.0))
    with pytest.raises(StoreError, match="permission"):
        store.put_patch_bytes(2, b"forged")
    with pytest.raises(StoreError, match="permission"):
        store.get_config()
    with pytest.raises(StoreError, match="permission"):
        store.records("rounds")
    store.close()

    # Assert
    assert all(refused.values()), [n for n, ok in refused.items() if not ok]
    assert admin.get(f"fedseq:{RUN}:head") == b"2" and admin.get(f"fedseq:{RUN}:patch:2") == b"patch-2"
    assert admin.exists(f"fedseq:{RUN}:model:5") == 0 and admin.dbsize() > 0


# ---------------------------------------------------------------------------- persistence and logs
def test_a_persistent_server_keeps_its_passwords_and_data_across_a_restart(tmp_path: Path) -> None:
    # Prepare
    data_dir = tmp_path / "redis"
    with RedisServer(data_dir=data_dir, acl=True) as first:
        before = first.passwords
        with RedisStore.from_url(first.url_for("server"), RUN) as store:
            store.put_model(0, _tensors(1.0))

    # Execute
    with RedisServer(data_dir=data_dir, acl=True) as second:
        after = second.passwords
        with RedisStore.from_url(second.url_for("worker"), RUN) as store:
            model = CachedModelReader(store).get()
        mode = stat.S_IMODE((data_dir / "users.acl").stat().st_mode)

    # Assert
    assert after == before and set(after) == set(REDIS_ROLES)
    assert torch.equal(model["w"], _tensors(1.0)["w"])
    assert mode == 0o600 and (data_dir / "users.acl").exists()


def test_passwords_are_not_in_the_log_or_the_repr(tmp_path: Path) -> None:
    # Prepare
    log_file = tmp_path / "redis.log"

    # Execute
    with RedisServer(acl=True, log_file=log_file) as server:
        passwords = server.passwords
        for role in REDIS_ROLES:  # a login of each role, and a refused one
            client = _raw(server.url_for(role))
            client.ping()
            client.close()
        refused = _raw(f"redis://worker:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(redis.exceptions.AuthenticationError):
            refused.ping()
        refused.close()
        text = repr(server)
    log = log_file.read_text()

    # Assert
    assert "--aclfile" in log and "# fedseq:" in log
    for password in passwords.values():
        assert password not in log and password not in text


def test_restarting_the_same_persistent_server_after_a_crash_keeps_its_urls(tmp_path: Path) -> None:
    # Prepare: what the launcher's supervisor does when redis-server dies
    server = RedisServer(data_dir=tmp_path / "redis", acl=True).start()
    try:
        urls = {role: server.url_for(role) for role in REDIS_ROLES}
        with RedisStore.from_url(urls["server"], RUN) as store:
            store.put_model(0, _tensors(2.0))
        assert server.process is not None
        server.process.kill()
        server.process.wait(10)

        # Execute
        server.start()
        urls_after = {role: server.url_for(role) for role in REDIS_ROLES}
        with RedisStore.from_url(urls_after["worker"], RUN) as store:
            head = store.head()
    finally:
        server.stop()

    # Assert
    assert urls_after == urls and head == 0
