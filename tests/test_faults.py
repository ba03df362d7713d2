"""Faults under `fedseq run`, with real processes and real signals: the server mid-round, Redis,
the orchestrator (SIGKILL, and a drain's SIGTERM), a worker mid-round, and the launcher itself.
The service kills land one after another in one run, each after the previous victim is back; the
run must finish with every round applied exactly once and every epoch evaluating every user, and
its metrics must equal the in-process runner's (``fedseq sim``) on the same configuration exactly
wherever the round in flight was retried (server, Redis, orchestrator). A killed worker's users
are missing from the round it died in (the round is not retried), so the epoch it dies in may
differ, unless it died after its uploads landed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# 80 users in 5 rounds of 16 per epoch, 4 epochs; a small data set, so that the run's time is
# mostly the faults and the restarts
USERS, EPOCHS, ROUNDS = 80, 4, 4 * 5
CONFIG = {"dataset": f"synthetic:users={USERS},items=80,max_length=20", "epochs": EPOCHS, "clients_per_round": 16,
          "lr": 0.01, "num_negatives": 50, "seed": 3}
RUN = [a for k, v in CONFIG.items() for a in (f"--{k.replace('_', '-')}", str(v))] + \
    ["--workers", "2", "--round-timeout", "60"]
METRICS = ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30")
# (victim, signal, the round it is killed at): one after another in one run; the worker last,
# mid-way through the last epoch (rounds 15-19), so only that epoch may differ
KILLS = [("server", signal.SIGKILL, 2), ("redis", signal.SIGKILL, 5), ("orchestrator", signal.SIGKILL, 8),
         # a drain's or `compose stop`'s SIGTERM mid-run: the orchestrator exits 75 (not done), which a
         # supervisor restarts, and the run resumes from the store
         ("orchestrator", signal.SIGTERM, 11),
         ("client-1", signal.SIGKILL, 16)]


def _launch(out: Path, tmpdir: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    if tmpdir is not None:  # the run's temporary folders there, not among other tests' in /tmp
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return subprocess.Popen([sys.executable, "-m", "cli.entry", "run", *RUN, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pids(marker: str) -> list[int]:
    """Processes whose command line (or, for redis-server, working folder) contains ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            try:
                cwd = os.path.realpath(d / "cwd")
            except OSError:
                cwd = ""
            if (marker in cmd or marker in cwd) and int(d.name) != os.getpid():
                out.append(int(d.name))
    return out


def _round_id(out: Path) -> int:
    """The run's completed rounds, asked of the orchestrator with the operator's certificate."""
    import grpc

    from fedseq.rpc import channel
    from fedseq.tls import Identity
    from fedseq.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    try:
        port = int((out / "logs" / "orchestrator.port").read_text())
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel(f"127.0.0.1:{port}", identity=Identity.load(
            out / "tls", "operator"), peer="orchestrator"))
        return stub.GetStatus(orchestrator_pb2.StatusRequest(), timeout=5).round_id
    except (OSError, ValueError, grpc.RpcError):
        return -1


def _wait_round(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read() if proc.stderr else ''}")
        if _round_id(out) >= at_least:
            return
        time.sleep(0.05)
    raise TimeoutError(f"round {at_least} not reached")


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    res["_stderr"] = stderr
    res["_rounds"] = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return res


def _check_complete(res: dict) -> None:
    """Every round applied exactly once, every epoch evaluated every user."""
    assert res["summary"]["state"] == "done"
    assert sorted(r["round"] for r in res["_rounds"]) == list(range(ROUNDS))
    assert [e["epoch"] for e in res["epochs"]] == list(range(1, EPOCHS + 1))
    assert all(e["eval_users"] == USERS for e in res["epochs"]), [e["eval_users"] for e in res["epochs"]]


def _victim_pid(out: Path, victim: str) -> int:
    if victim == "redis":  # redis-server rewrites its title; it runs in <out>/redis
        pids = [p for p in _pids("redis-server") if os.path.realpath(f"/proc/{p}/cwd") == str(out / "redis")]
        assert len(pids) == 1, (victim, pids)
        return pids[0]
    # the launcher writes each service's pid (rewritten on a restart); it is a process of this run
    pid = int((out / "logs" / f"{victim}.pid").read_text())
    assert pid in _pids(str(out)) and (Path(f"/proc/{pid}/comm").read_text().strip() == victim), victim
    return pid


def test_killed_services_are_restarted_one_after_another_and_the_run_equals_the_sim(tmp_path):
    # Prepare: the reference, in process; the run, as real processes
    from cli.sim import run_inprocess
    from fedseq.config import build_config

    sim = run_inprocess(build_config(None, dict(CONFIG)), None, progress=lambda _l: None)
    out = tmp_path / "run"
    proc = _launch(out)
    try:
        # Execute: each kill once the run (back from the previous one) has reached its round
        for victim, sig, at_round in KILLS:
            _wait_round(out, proc, at_round)
            os.kill(_victim_pid(out, victim), sig)
        res = _finish(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: whole, every victim restarted, the drained orchestrator's exit said so
    _check_complete(res)
    for victim in ("server", "redis-server", "orchestrator", "client-1"):
        assert any(victim in line and "restart" in line for line in res["_stderr"].splitlines()), victim
    assert "orchestrator was interrupted (exit 75)" in res["_stderr"]
    got = [{k: e[k] for k in METRICS} for e in res["epochs"]]
    want = [{k: e[k] for k in METRICS} for e in sim["epochs"]]
    # the rounds in flight at the server, Redis and orchestrator kills were rerun from the store head:
    # nothing lost, nothing twice, the same numbers as the in-process runner's
    for g, w in zip(got[:-1], want[:-1], strict=True):
        for k in METRICS:
            assert g[k] == pytest.approx(w[k], abs=1e-9), (k, g, w)
    # the worker's kill hit a round of the last epoch (its Train task failed, or its stream was gone)
    # (a round whose reply a killed orchestrator never got has its counts back from the store, not
    # what the workers answered: summary_recovered, no failed_workers)
    hit = [r for r in res["_rounds"] if "client-1" in r.get("failed_workers", []) + r.get("lost_workers", [])]
    assert hit and all(r["round"] >= 15 for r in hit), [(r["round"], r.get("failed_workers")) for r in res["_rounds"]]
    assert not any(r.get("summary_lost") for r in res["_rounds"])
    assert all(r["accepted"] + r["rejected"] + r["missing"] == r["users"] for r in res["_rounds"])
    if not any(r["missing"] > 0 for r in hit):  # it died after its uploads landed: nothing was lost
        for k in METRICS:
            assert got[-1][k] == pytest.approx(want[-1][k], abs=1e-9), k


def test_a_killed_launcher_leaves_no_process_and_no_temp_folder(tmp_path):
    # Prepare: the launcher's temporary folders go to a folder of this test's own
    tmp = tmp_path / "tmp"
    out = tmp_path / "run"
    proc = _launch(out, tmp)
    try:
        _wait_round(out, proc, 1)
        assert len(_pids(str(out))) >= 4  # server, orchestrator, workers, redis
        # Execute
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        end = time.time() + 20
        while _pids(str(out)) and time.time() < end:
            time.sleep(0.2)
        # Assert
        assert _pids(str(out)) == []
        assert [p.name for p in tmp.iterdir() if p.name.startswith("fedseq-")] == []  # (torch keeps its cache there)
    finally:
        for p in _pids(str(out)):
            os.kill(p, signal.SIGKILL)
