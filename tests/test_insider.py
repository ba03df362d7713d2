"""The insider: an attacker worker that holds a legitimate certificate of its own (``attacker-0``)
and runs code nobody controls (README "Security model"). tests/insider_worker.py is a real
``fedseq serve-attacker`` process whose behaviour was replaced; here it runs against real
services, each its own process with mutual TLS and the run's roster, and tries everything the
Worker contract forbids:

- run "calm" (the insider tries, is refused, then behaves): claiming a benign kind or shard or a
  benign worker's id, a takeover after a benign worker's crash (a real SIGKILL), weighting itself
  (num_samples 1e9), updates of 3e38 and NaN, oversize, forged tokens and ids, a replayed token,
  a duplicate, and 50,000 fake ledger entries. Each is refused, counted with its reason, and the
  run's metrics equal an undisturbed seeded run's (``fedseq sim``) to the last bit;
- run "starve": 40 Health.Watch streams and 16 drip uploads held on the aggregation server, and
  16 uploads of 60 MiB of garbage under valid tokens. Every benign update of every round is
  accepted, rounds stay fast, the server's memory stays flat.
- ``fedseq run --redis-url`` hands workers no store credentials, and no password is on any argv.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from _procmem import memory_holds

from cli.sim import run_inprocess
from cli.zygote import Forked, Zygote
from fedseq import roster as roster_mod
from fedseq.config import ExperimentConfig
from fedseq.tls import make_certs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
USERS = 60
CFG = ExperimentConfig(run_id="insider", dataset=f"synthetic:users={USERS},items=80", epochs=4, clients_per_round=16,
                       lr=0.01, num_negatives=50, attack="dv-fsr", malicious_ratio=0.1, threads=1)
METRICS = ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30")
TRAIN_ACTS = ["weight", "huge", "nan", "oversize", "forged-token", "forged-id", "replay", "duplicate", "ledger"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


class Proc:
    """A service process, its log in ``logs``: ``fedseq <argv>`` forked by the zygote (as ``fedseq
    run`` starts them), or the insider script, a new interpreter of its own (its acts, JSON lines,
    on its stdout)."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str], zygote: Zygote,
                 script: list[str] | None = None):
        self.name, self.logs = name, logs
        self.port_file = logs / f"{name}.port"
        self.out = open(logs / f"{name}.out", "wb")  # noqa: SIM115 - closed in stop()
        self.err = open(logs / f"{name}.log", "wb")  # noqa: SIM115
        args = ["--log-level", "info", *argv, "--port-file", str(self.port_file)]
        self.popen: subprocess.Popen | Forked
        if script is None:
            self.popen = zygote.spawn(name, args, env, logs / f"{name}.log", cwd=str(ROOT))
        else:
            self.popen = subprocess.Popen([sys.executable, *script, *args], stdout=self.out, stderr=self.err,
                                          env=env, cwd=ROOT)

    def started(self, timeout: float = 60.0) -> None:
        """Wait until a worker (which listens on no port) writes its health file."""
        health = self.logs / f"{self.name}.health"
        end = time.time() + timeout
        while time.time() < end:
            if health.exists():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}: {self.log()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start: {self.log()[-2000:]}")

    def port(self, timeout: float = 60.0) -> int:
        end = time.time() + timeout
        while time.time() < end:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}: {self.log()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.logs / f"{self.name}.log").read_text(errors="replace")

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in (self.logs / f"{self.name}.out").read_text().splitlines() if x.startswith("{")]

    def stop(self) -> None:
        self.terminate()
        if self.popen.poll() is None:
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.out.close()
        self.err.close()

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)


class Federation:
    """server, orchestrator (with the roster), client workers and the insider, each its own process."""

    def __init__(self, tmp: Path, redis_url: str, cfg: ExperimentConfig, clients: int, spec: dict, zygote: Zygote,
                 server_flags: tuple[str, ...] = ()) -> None:
        self.tmp, self.cfg, self.zygote = tmp, cfg, zygote
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True)
        self.tls = tmp / "tls"
        names = {"server": "server", "orchestrator": "orchestrator", "operator": "operator",
                 **{f"client-{i}": "worker" for i in range(clients)}, "attacker-0": "worker"}
        make_certs(self.tls, names)
        self.roster = tmp / "roster.json"  # the orchestrator's alone, outside the certificate folder
        roster_mod.make(clients, 1).write(self.roster)
        (tmp / "config.json").write_text(cfg.to_json())
        self.env = _env(FEDSEQ_STORE_URL=redis_url)
        self.procs: dict[str, Proc] = {}
        self.spec = spec
        self.server = self._start("server", ["serve-server", "--port", "0", *self._tls("server"), *server_flags])
        self.aggregator = f"127.0.0.1:{self.server.port()}"
        self.orch = self._start("orchestrator", [
            "serve-orchestrator", "--config", str(tmp / "config.json"), "--port", "0", "--aggregator", self.aggregator,
            "--min-workers", str(clients + 1), "--round-timeout", "60", "--out", str(tmp / "out"),
            "--exit-when-done", "--roster", str(self.roster), "--metrics-port", "0", *self._tls("orchestrator")])
        self.orchestrator = f"127.0.0.1:{self.orch.port()}"
        self.clients = clients
        self.last_metrics, self.metrics_errors = "", []
        self.watcher = threading.Thread(target=self._watch_metrics, name="metrics-watch", daemon=True)
        self.watcher.start()

    def _tls(self, name: str) -> list[str]:
        return ["--tls-dir", str(self.tls), "--tls-name", name]

    def _start(self, name: str, argv: list[str], script: list[str] | None = None) -> Proc:
        p = Proc(name, argv, self.logs, self.env, self.zygote, script)
        self.procs[name] = p
        return p

    def worker_argv(self, kind: str, name: str) -> list[str]:
        return [f"serve-{kind}", "--orchestrator", self.orchestrator, "--threads", "1",
                "--worker-id", name, "--health-file", str(self.logs / f"{name}.health"), *self._tls(name)]

    def client(self, i: int) -> Proc:
        (self.logs / f"client-{i}.health").unlink(missing_ok=True)  # a restarted worker writes its own
        p = self._start(f"client-{i}", self.worker_argv("client", f"client-{i}"))
        p.started()
        return p

    def insider(self) -> Proc:
        spec = json.dumps({**self.spec, "client_shards": self.clients})
        p = self._start("attacker-0", self.worker_argv("attacker", "attacker-0"),
                        script=[str(ROOT / "tests" / "insider_worker.py"), spec])
        p.started()
        return p

    def _watch_metrics(self) -> None:
        """From the orchestrator's start until it exits: read its metrics page every 0.2 s
        (:attr:`last_metrics`: the last page read after its log showed an epoch's evaluation).
        A thread of its own, so a run that ends before :meth:`wait` is called is watched too."""
        while self.orch.popen.poll() is None:
            evaluated = "epoch 1:" in self.orch.log()  # before the read: a page read after it is after an evaluation
            try:
                text = self.metrics_text()
            except (OSError, ValueError) as e:  # not serving yet, or gone
                self.metrics_errors.append(repr(e))
                text = None
            if evaluated and text is not None:
                self.last_metrics = text
            time.sleep(0.2)

    def wait(self, timeout: float = 240.0) -> dict:
        """The results bundle once the orchestrator exits (its metrics are watched meanwhile:
        :meth:`_watch_metrics`)."""
        end = time.time() + timeout
        while self.orch.popen.poll() is None:
            if time.time() > end:
                pytest.fail(f"the run did not finish in {timeout:.0f}s: {self.orch.log()[-3000:]}")
            time.sleep(0.1)
        self.watcher.join(15)
        return json.loads((self.tmp / "out" / "results.json").read_text())

    def rounds(self) -> list[dict]:
        return [json.loads(x) for x in (self.tmp / "out" / "rounds.jsonl").read_text().splitlines()]

    def metrics_text(self) -> str:
        port = int((self.logs / "orchestrator.port.metrics").read_text())
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def close(self) -> None:
        procs = list(self.procs.values())
        for p in procs:  # all asked to stop first: their graceful ends overlap
            p.terminate()
        for p in reversed(procs):
            p.stop()


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def undisturbed():
    """The seeded run without the insider's acts: the in-process runner (bit for bit the services at
    one thread, tests/test_engine_equal.py)."""
    return run_inprocess(CFG, None, progress=lambda _l: None)


@pytest.fixture(scope="module")
def calm(tmp_path_factory, redis_server, zygote):
    """Run "calm": three client workers and the insider, which tries every refused act, then behaves.
    client-2 is killed (SIGKILL) before the run starts, the insider tries to take its place, then
    client-2 comes back."""
    tmp = tmp_path_factory.mktemp("calm")
    spec = {"register": ["claim-client", "claim-shard", "claim-id"], "victim": "client-0", "train": TRAIN_ACTS,
            "takeover": {"trigger": str(tmp / "takeover"), "victim": "client-2", "shard": [2, 3]}}
    fed = Federation(tmp, redis_server.url, replace(CFG, run_id="calm"), clients=3, spec=spec, zygote=zygote)
    try:
        fed.client(0)
        victim = fed.client(2)
        _wait_for(lambda: re.search(r"worker client-0 ready", fed.orch.log()), 60, "client-0 to be ready")
        insider = fed.insider()
        _wait_for(lambda: any(x["act"] == "claim-id" for x in insider.lines()), 60, "the insider's registration acts")
        _wait_for(lambda: re.search(r"worker client-2 ready", fed.orch.log()), 60, "client-2 to be ready")
        victim.popen.send_signal(signal.SIGKILL)  # a benign worker crashes: its shard is free
        victim.popen.wait()
        (tmp / "takeover").write_text("now")
        _wait_for(lambda: (tmp / "takeover.done").exists(), 60, "the takeover attempt")
        fed.procs.pop("client-2").stop()
        fed.client(2)  # the benign identity comes back and gets its own shard again
        _wait_for(lambda: len(re.findall(r"worker client-2 ready", fed.orch.log())) >= 2, 60, "client-2 to be back")
        fed.client(1)
        results = fed.wait()
        yield {"results": results, "rounds": fed.rounds(), "acts": insider.lines(), "metrics": fed.last_metrics,
               "metrics_errors": fed.metrics_errors,
               "orch_log": fed.orch.log()}
    finally:
        fed.close()


def _act(calm, name: str) -> list[dict]:
    return [x for x in calm["acts"] if x["act"] == name]


def _words(statuses: list[dict]) -> set[str]:
    return {s["reason"].split(":", 1)[0] for s in statuses if not s["accepted"]}


def _refused_in_rounds(calm, word: str) -> int:
    return sum(r.get("refused", {}).get(word, 0) for r in calm["rounds"])


# ---------------------------------------------------------------------------- run "calm"
def test_the_calm_run_ends_done_with_the_undisturbed_metrics(calm, undisturbed):
    results = calm["results"]
    assert results["summary"]["state"] == "done"
    assert len(results["epochs"]) == len(undisturbed["epochs"]) == CFG.epochs
    for got, want in zip(results["epochs"], undisturbed["epochs"], strict=True):
        for k in METRICS:
            assert got[k] == pytest.approx(want[k], abs=1e-12), (got["epoch"], k)
    # every act was tried (the Train acts need a Train call each)
    assert {x["act"] for x in calm["acts"]} >= {*TRAIN_ACTS, "claim-client", "claim-shard", "claim-id"}


def test_claiming_the_benign_kind_is_refused_and_counted(calm):
    (claim,) = _act(calm, "claim-client")
    assert claim["code"] == "PERMISSION_DENIED"
    assert "rostered as kind 'attacker'; it may not register as kind 'client'" in claim["detail"]
    assert calm["results"]["summary"]["refused"].get("register: kind", 0) >= 2  # claim-client, claim-shard (+ takeover)


def test_claiming_a_benign_shard_is_refused(calm):
    (claim,) = _act(calm, "claim-shard")
    assert claim["code"] == "PERMISSION_DENIED"


def test_claiming_a_benign_workers_id_is_refused(calm):
    (claim,) = _act(calm, "claim-id")
    assert claim["code"] == "PERMISSION_DENIED" and "not this worker's identity" in claim["detail"]


def test_a_takeover_after_a_benign_crash_is_refused_and_the_shard_goes_back_to_its_identity(calm):
    (as_client,) = _act(calm, "takeover-as-client")
    (as_attacker,) = _act(calm, "takeover-id-as-attacker")
    assert as_client["code"] == "PERMISSION_DENIED"
    assert as_attacker["code"] == "PERMISSION_DENIED" and "not this worker's identity" in as_attacker["detail"]
    assert calm["results"]["summary"]["refused"].get("register: id", 0) >= 2
    # client-2 got shard 2 of 3 back: every epoch evaluated every benign user
    assert re.search(r"client worker client-2 connected from .* \(shard 2/3", calm["orch_log"])
    assert all(e["eval_users"] == USERS for e in calm["results"]["epochs"])


def test_weighting_itself_is_refused_with_the_reason_weight(calm):
    (up,) = _act(calm, "weight")
    assert up["code"] == "OK" and _words(up["statuses"]) == {"weight"}
    assert _refused_in_rounds(calm, "weight") >= 1


def test_an_update_of_3e38_is_refused_by_the_sanity_bound(calm):
    (up,) = _act(calm, "huge")
    assert _words(up["statuses"]) == {"out-of-bounds"}, up
    assert _refused_in_rounds(calm, "out-of-bounds") >= 1


def test_a_nan_update_is_refused(calm):
    (up,) = _act(calm, "nan")
    assert _words(up["statuses"]) <= {"non-finite", "out-of-bounds"} and _words(up["statuses"])


def test_oversize_updates_are_refused(calm):
    (declared,) = _act(calm, "oversize")
    (sent,) = _act(calm, "oversize-sent")
    assert _words(declared["statuses"]) == {"oversize"} and _words(sent["statuses"]) == {"oversize"}


def test_a_forged_token_is_refused(calm):
    (up,) = _act(calm, "forged-token")
    assert _words(up["statuses"]) == {"bad-token"}


def test_a_forged_user_id_is_refused(calm):
    (up,) = _act(calm, "forged-id")
    assert _words(up["statuses"]) <= {"bad-token", "unassigned"} and _words(up["statuses"])


def test_a_replayed_token_is_refused(calm):
    (stale,) = _act(calm, "replay-stale")
    (now,) = _act(calm, "replay")
    assert _words(stale["statuses"]) == {"stale"}
    assert _words(now["statuses"]) <= {"bad-token", "unassigned", "duplicate"} and _words(now["statuses"])


def test_a_duplicate_update_is_refused(calm):
    (up,) = _act(calm, "duplicate")
    assert _words(up["statuses"]) == {"duplicate"}


def test_fake_ledger_entries_do_not_write_the_books(calm, undisturbed):
    (sent,) = _act(calm, "ledger")
    assert sent["entries"] == 50_000
    rounds, results = calm["rounds"], calm["results"]
    assert sum(r.get("ledger_refused", 0) for r in rounds) >= 1
    # update bytes are the aggregator's measurement, round by round
    for r in rounds:
        assert r["update_bytes"] == r["bytes_received"], r["round"]
    totals = results["ledger"]["totals"]
    assert totals["bytes_per_update"] < 1 << 20  # a tiny model's update, not 995 MB
    assert results["summary"]["bytes_up"] < 1 << 30  # not 150 TB
    assert all(v <= 60 for r in rounds for v in r["worker_timings"].values())
    assert all(len(k) <= 32 for r in rounds for k in r["worker_timings"])


def test_live_experiment_metrics_are_not_exported_by_default(calm):
    text = calm["metrics"]
    assert "fedseq_rounds_total" in text, calm["metrics_errors"][-5:]  # read after an epoch's evaluation
    assert not re.search(r"^fedseq_experiment_metric\{", text, re.M)


# ---------------------------------------------------------------------------- run "starve"
def _status(pid: int, key: str) -> int:
    """``VmRSS``/``VmHWM`` of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture(scope="module")
def starve(tmp_path_factory, redis_server, zygote):
    """Run "starve": two client workers and an insider that, at its first Train call (the round
    open, the benign workers uploading), holds 16 drip uploads, then sends 16 uploads of 60 MiB of
    garbage under the round's valid tokens, then holds 40 Health.Watch streams on the aggregation
    server while the next rounds run: until the run ends and the server is stopped (the streams'
    own deadline, 60 s, only bounds them), so the rounds after the held one all run under them
    however slow the machine."""
    tmp = tmp_path_factory.mktemp("starve")
    spec = {"starve": {"watch": 40, "drip": 16, "garbage": 16, "seconds": 60}}
    fed = Federation(tmp, redis_server.url, replace(CFG, run_id="starve", epochs=3), clients=2, spec=spec,
                     zygote=zygote, server_flags=("--upload-idle-timeout", "3"))
    try:
        server_pid = fed.server.popen.pid
        fed.client(0)
        fed.client(1)
        rss0 = _status(server_pid, "VmRSS")
        insider = fed.insider()
        results = fed.wait()
        hwm = _status(server_pid, "VmHWM")
        fed.server.popen.kill()  # ends the Watch streams still held (a graceful stop would wait 5 s for them)
        _wait_for(lambda: {"watch", "drip"} <= {x["act"] for x in insider.lines()}, 60, "the starvation to end")
        (tmp / "growth.json").write_text(json.dumps({"rss_before": rss0, "peak": hwm}))  # for docs/results/security.md
        yield {"results": results, "rounds": fed.rounds(), "acts": insider.lines(), "growth": hwm - rss0}
    finally:
        fed.close()


@pytest.mark.alone  # the server under the insider's load only: another test's load starves it too
def test_starvation_leaves_every_benign_update_of_every_round_accepted(starve):
    assert starve["results"]["summary"]["state"] == "done"
    for r in starve["rounds"]:
        benign_accepted = r["accepted"] - r["malicious_kept"]  # fedavg keeps every aggregated update
        assert benign_accepted == r["users"] - r["malicious"], r
    # the round the insider held with its own Train call (drips, garbage) waits for it, as a round
    # waits for any slow worker up to its deadline; every other round stays fast while 40 Watch
    # streams are held (45 s a round when they exhausted the pool)
    held = next(i for i, r in enumerate(starve["rounds"]) if r["malicious"])
    assert all(r["seconds"] < 5 for i, r in enumerate(starve["rounds"]) if i != held), \
        [round(r["seconds"], 2) for r in starve["rounds"]]


@pytest.mark.alone  # the server under the insider's load only: another test's load starves it too
def test_health_watch_streams_are_capped_per_identity(starve):
    (watch,) = [x for x in starve["acts"] if x["act"] == "watch"]
    assert "RESOURCE_EXHAUSTED" in watch["codes"]
    assert watch["codes"].count("RESOURCE_EXHAUSTED") >= 30  # of 40: the identity's share is a few calls


@pytest.mark.alone  # the server under the insider's load only: another test's load starves it too
def test_drip_uploads_are_cut_by_the_byte_rate_window(starve):
    (drip,) = [x for x in starve["acts"] if x["act"] == "drip"]
    assert len(drip["codes"]) == 16 and "OK" not in drip["codes"]  # every drip ends refused or cancelled
    refused = {w: sum(r.get("refused", {}).get(w, 0) for r in starve["rounds"]) for w in ("idle", "busy")}
    assert refused["idle"] + refused["busy"] >= 1, refused


@pytest.mark.alone  # the server under the insider's load only: another test's load starves it too
def test_garbage_under_valid_tokens_is_refused_without_growing_the_server(starve):
    garbage = [x for x in starve["acts"] if x["act"] == "garbage"]
    assert len(garbage) == 16
    words = {s["reason"].split(":", 1)[0] for x in garbage for s in x.get("statuses", []) if not s["accepted"]}
    # the header declares too much (oversize); data past a finished update has no header (malformed)
    assert words <= {"oversize", "busy", "malformed"} and "oversize" in words
    assert all(x["code"] in ("OK", "RESOURCE_EXHAUSTED") for x in garbage)
    # 1.66 GB before (every valid-token update buffered whole, 64 MiB allowed); what remains is gRPC's own
    # receive buffers for 16 concurrent 60 MiB streams (tests/test_fairshare.py compares with strangers' floods)
    assert starve["growth"] < 400 << 20, f"server grew by {starve['growth'] >> 20} MB"


# ---------------------------------------------------------------------------- no shared secrets
def test_fedseq_run_refuses_a_password_on_its_command_line(fedseq_cli):
    code, _out, err = fedseq_cli("run", "--redis-url", "redis://admin:s3cret@127.0.0.1:1/0", "--epochs", "1")
    assert code != 0 and "FEDSEQ_REDIS_URL" in err and "s3cret" not in err


def test_workers_of_a_run_on_the_operators_redis_get_no_store_credentials(tmp_path):
    # Prepare: a Redis with users and passwords; its admin URL goes to `fedseq run` through the environment
    from fedseq.redis_server import RedisServer

    out = tmp_path / "run"
    with RedisServer(acl=True) as redis:
        admin = redis.url
        password = admin.split("@")[0].rsplit(":", 1)[-1]
        env = _env(FEDSEQ_REDIS_URL=admin)
        cmd = [sys.executable, "-m", "cli.entry", "run", "--dataset", f"synthetic:users={USERS},items=80", "--epochs",
               "1", "--clients-per-round", "16", "--attack", "dv-fsr", "--malicious-ratio", "0.1", "--out", str(out)]
        # Execute: once the first round is in (every worker welcomed and trained), read the whole
        # memory of every process the launcher started; also their command lines and environments
        launcher = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        holds: dict[str, bool] = {}
        seen: dict[int, tuple[str, str]] = {}
        while launcher.poll() is None:
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) in seen:
                    continue
                try:
                    environ = (d / "environ").read_bytes().decode(errors="replace")
                    argv = (d / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if f"FEDSEQ_PARENT_PID={launcher.pid}" in environ:
                    seen[int(d.name)] = (argv, environ)
            if not holds and (out / "rounds.jsonl").exists():
                # stopped while read, so none can end mid-scan (the run waits for them)
                pids = {n: int((out / "logs" / f"{n}.pid").read_text()) for n in ("server", "client-0", "client-1",
                                                                                   "attacker-0")}
                for pid in pids.values():
                    os.kill(pid, signal.SIGSTOP)
                try:
                    holds = {name: memory_holds(pid, password.encode()) for name, pid in pids.items()}
                finally:
                    for pid in pids.values():
                        os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        _out, err = launcher.communicate()
    # Assert
    assert launcher.returncode == 0, err.decode()[-3000:]
    # the server holds the password (it writes the store): the scan sees it where it is
    assert holds == {"server": True, "client-0": False, "client-1": False, "attacker-0": False}, holds
    assert len(seen) >= 5  # the zygote and the services it forked (cli/zygote.py)
    assert all(password not in argv and password not in environ for argv, environ in seen.values())
