"""Shared fixtures: a real Redis server process for the whole test session, the zygote that forks
service processes (as ``fedseq run`` starts them, cli/zygote.py), and the ``fedseq`` command run
in this process."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from cli.zygote import Zygote
from fedseq.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server process (temporary, in memory), started once per test session."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def zygote(tmp_path_factory) -> Iterator[Zygote]:
    """A zygote for the session: ``zygote.spawn(name, argv, env, log)`` forks ``fedseq <argv>`` as
    its own process (own pid, session and log; real signals) without a new interpreter's imports
    (2-3 CPU s each). Its own environment holds no ``FEDSEQ_*`` variable; each spawn gives the
    child's whole environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    z = Zygote(env, "tests", tmp_path_factory.mktemp("zygote") / "zygote.log")
    try:
        yield z
    finally:
        z.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis server, with the database flushed before the test."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def fedseq_cli(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """``fedseq ARGS`` in this process: ``run(*args) -> (exit status, stdout, stderr)``.

    It calls ``cli.main.main``, the function the ``fedseq`` script and ``python -m cli.main`` exit
    with, so the status is the process's; what a test saves is the new interpreter's torch import
    (3-4 s each). No ``FEDSEQ_*`` variable is set (as in a clean environment), stderr holds what
    main prints and its log handler writes (it logs to the stderr of the moment, captured here),
    and the root logger and service name that main sets are put back after each call. Tests whose
    point is the real process keep a subprocess."""
    from cli.main import main
    from fedseq import observe

    for key in list(os.environ):
        if key.startswith("FEDSEQ_"):
            monkeypatch.delenv(key)

    def run(*args: object) -> tuple[int, str, str]:
        root = logging.getLogger()
        handlers, level, service = root.handlers[:], root.level, dict(observe._SERVICE)
        capsys.readouterr()  # only this call's output
        try:
            rc = main([str(a) for a in args])
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            observe._SERVICE.update(service)
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


# Wall seconds of the files that take more than a few (pytest -n 2, 2026-12-04): sent to the
# suite's workers longest first, so that what is left at the end is short files that even out
# the two workers' ends (--dist loadfile --no-loadscope-reorder hands out files in collection
# order; without the flag xdist sends the files with the most tests first, and the two workers
# ended 37 s apart).
FILE_SECONDS = {"test_insider.py": 37, "test_sweep_ray.py": 30, "test_mission.py": 28, "test_faults.py": 27, "test_engine_equal.py": 26,
                "test_scale.py": 26, "test_e2e.py": 26, "test_netns.py": 18, "test_sweep.py": 18,
                "test_ledger.py": 14, "test_adversary.py": 14, "test_services.py": 14, "test_reproduce.py": 12,
                "test_intake.py": 10, "test_fairshare.py": 10, "test_compute_pool.py": 8, "test_k8s.py": 8,
                "test_attacks.py": 7, "test_zygote.py": 7, "test_codec_service.py": 6, "test_dp.py": 6,
                "test_tracking.py": 6}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: file order within a rank


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread (oversubscription costs ~100x);
    the attack and compute-pool tests use it (the reference of a pool is one thread, as each child)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
