"""The orchestrator's settings (``fedseq serve-orchestrator`` flags and ``FEDSEQ_*`` variables,
parsed by cli/services.py; validated here)."""

from __future__ import annotations

from dataclasses import dataclass

from fedseq.rpc import LOOPBACK
from fedseq.tls import Identity


@dataclass(frozen=True)
class OrchestratorSettings:
    aggregator: str  # host:port
    store_url: str  # redis://... (the run state lives there; never handed to workers)
    min_workers: int = 1
    round_timeout: float = 600.0  # seconds a round waits for its workers before closing
    worker_wait: float = 300.0  # seconds to wait for min_workers at the start
    out_dir: str | None = None
    # shards of each worker kind's users, one per worker (0: every worker of the kind may host all
    # of them, and each round's users are spread over the live ones, as `compose --scale` wants)
    client_shards: int = 0
    attacker_shards: int = 0
    identity: Identity | None = None  # mutual TLS for the calls to the server and the workers
    shard_grace: float = 30.0  # seconds a lost worker's shard waits for a worker before rounds go on
    port: int = 50050  # where the Orchestrator service listens (0: any free port)
    host: str = LOOPBACK

    def __post_init__(self) -> None:
        if self.min_workers < 1:
            raise ValueError("min_workers must be >= 1")
        if self.round_timeout <= 0 or self.worker_wait <= 0:
            raise ValueError("round_timeout and worker_wait must be > 0")
        if self.client_shards < 0 or self.attacker_shards < 0:
            raise ValueError("client_shards and attacker_shards must be >= 0")
