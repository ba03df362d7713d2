"""Shared fixtures: a real Redis server process for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from fedseq.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server process (temporary, in memory), started once per test session."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis server, with the database flushed before the test."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
