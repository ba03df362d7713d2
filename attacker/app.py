"""The attacker worker as a service: the client's worker (client/app.py), same settings, same
tasks and wire behaviour, with the adversary's population plug-in
(:func:`attacker.service.malicious_population_hosted`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from client.app import Worker, WorkerSettings
from client.app import build as build_worker
from client.worker import WorkerTasks

from .service import malicious_population_hosted

__all__ = ["Worker", "WorkerSettings", "build"]


def build(settings: WorkerSettings, tasks_class: Callable[..., WorkerTasks] = WorkerTasks) -> Worker:
    """A started attacker worker hosting its shard of the run's malicious clients."""
    return build_worker(dataclasses.replace(settings, kind="attacker"), malicious_population_hosted, tasks_class)
