"""The attacker worker as a service: the client's Worker service (client/app.py), same settings,
same contract and wire behaviour, with the adversary's population plug-in
(:func:`attacker.service.malicious_population_hosted`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from client.app import Worker, WorkerSettings
from client.app import build as build_worker
from client.worker import WorkerServicer

from .service import malicious_population_hosted

__all__ = ["Worker", "WorkerSettings", "build"]


def build(settings: WorkerSettings, servicer_class: Callable[..., WorkerServicer] = WorkerServicer) -> Worker:
    """A started attacker worker hosting its shard of the run's malicious clients."""
    return build_worker(dataclasses.replace(settings, kind="attacker"), malicious_population_hosted, servicer_class)
