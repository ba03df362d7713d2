"""The orchestrator's settings (``fedseq serve-orchestrator`` flags and ``FEDSEQ_*`` variables,
parsed by cli/services.py; validated here)."""

from __future__ import annotations

from dataclasses import dataclass

from fedseq.roster import Roster
from fedseq.rpc import LOOPBACK
from fedseq.tls import Identity

# How a run's status message starts once the operator has stopped it (Orchestrator.Stop), as opposed
# to a signal ending the process mid-run: the exit code (cli/services.py) and `fedseq run`'s
# supervision (cli/launcher.py) tell the two apart by it.
OPERATOR_STOP = "stop requested"


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
    # which certificate identity is a client or an attacker worker and which shard it holds
    # (fedseq/roster.py); required under mutual TLS, where it replaces the *_shards settings
    roster: Roster | None = None
    # export the newest HR@10/NDCG@10/ER@K as Prometheus gauges (the endpoint is unauthenticated)
    export_experiment: bool = False
    heartbeat: float = 5.0  # seconds between heartbeats on an idle worker stream (3 missed: the worker is dead)
    # live worker streams at most (each holds a thread); 0: the roster's identities, else 64
    max_workers: int = 0

    def __post_init__(self) -> None:
        if self.min_workers < 1:
            raise ValueError("min_workers must be >= 1")
        if self.round_timeout <= 0 or self.worker_wait <= 0:
            raise ValueError("round_timeout and worker_wait must be > 0")
        if not 0.05 <= self.heartbeat <= 300:
            raise ValueError(f"heartbeat must be in 0.05..300 seconds, got {self.heartbeat}")
        if self.max_workers < 0:
            raise ValueError("max_workers must be >= 0 (0: the roster's size, else 64)")
        if self.client_shards < 0 or self.attacker_shards < 0:
            raise ValueError("client_shards and attacker_shards must be >= 0")
        if self.roster is not None and self.identity is None:
            raise ValueError("a roster needs mutual TLS: without certificates no worker has an identity to check "
                             "(drop --insecure, or drop the roster)")
        if self.identity is not None and self.roster is None:
            raise ValueError("under mutual TLS the orchestrator needs a roster of the worker identities "
                             "(--roster FILE or FEDSEQ_ROSTER, default <tls-dir>/roster.json; make one with "
                             "`fedseq certs DIR --clients N --attackers M`)")
        if self.roster is not None:
            for kind, flag in (("client", self.client_shards), ("attacker", self.attacker_shards)):
                if flag and flag != self.roster.shards(kind):
                    raise ValueError(f"--{kind}-shards {flag} disagrees with the roster's {self.roster.shards(kind)} "
                                     f"{kind} shards; drop the flag (the roster decides)")

    def worker_limit(self) -> int:
        """Live worker streams the orchestrator takes: ``max_workers``, else one per rostered
        identity, else 64."""
        if self.max_workers:
            return self.max_workers
        return len(self.roster.entries) if self.roster is not None else 64

    def shards(self) -> dict[str, int]:
        """Shards of each worker kind: the roster's, else the *_shards settings (insecure runs)."""
        if self.roster is not None:
            return {k: self.roster.shards(k) for k in ("client", "attacker")}
        return {"client": self.client_shards, "attacker": self.attacker_shards}
