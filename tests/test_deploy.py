"""Static checks of deploy/: the compose files, the Dockerfile and the scripts agree with the code.

Cheap (no containers, no network): every compose service runs a real ``fedseq`` subcommand,
every ``FEDSEQ_*`` variable a service is given is one that service's code reads, the
orchestrator's default experiment is a valid config, workers have no port and a health-file probe
that really works, the image is tagged with the project's version and labelled, the lock files pin
every package with hashes and are installed with ``--require-hashes``, and the scripts are valid
bash. The full container run is ``deploy/build-local.sh && deploy/run-local.sh`` (see deploy/README.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

import cli.main as cli
from fedseq.config import ExperimentConfig, build_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
GPU = DEPLOY / "compose.gpu.yaml"
TLS = DEPLOY / "compose.tls.yaml"
# one named service per worker identity (its own certificate under compose.tls.yaml)
WORKERS = {"client-0": "client", "client-1": "client", "attacker-0": "attacker"}
SERVICE_KINDS = {"server", "orchestrator", *WORKERS}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
# a worker dials out and listens on nothing: none of these may be set on it
LISTEN_ENV = {"FEDSEQ_PORT", "FEDSEQ_HOST", "FEDSEQ_ADVERTISE_HOST"}
HEALTH_FILE = "/tmp/fedseq/health.json"
WORKER_HEALTHCHECK = ["CMD", "python", "-m", "fedseq.healthcheck", "--file", HEALTH_FILE, "--max-age", "60"]

# ------------------------------------------------------------------ a small reader for our compose files


def _blocks(lines: list[str], indent: int) -> dict[str, list[str]]:
    """``key:`` lines at exactly ``indent`` spaces -> the lines below them (more indented)."""
    out: dict[str, list[str]] = {}
    key = None
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lead = len(line) - len(line.lstrip(" "))
        m = re.match(r"^ {" + str(indent) + r"}([A-Za-z0-9_.-]+):", line)
        if m and lead == indent:
            key = m.group(1)
            out[key] = [line]
        elif lead > indent and key is not None:
            out[key].append(line)
        elif lead <= indent:
            key = None
    return out


def _services(path: Path) -> dict[str, dict]:
    """Each service's command, environment and profiles, read without a YAML library (the
    compose files keep to plain block style; test_yaml_agrees checks this against PyYAML)."""
    top = _blocks(path.read_text().splitlines(), 0)
    out: dict[str, dict] = {}
    for name, body in _blocks(top.get("services", [])[1:], 2).items():
        keys = _blocks(body[1:], 4)
        svc: dict = {"environment": {}}
        if "command" in keys:
            svc["command"] = re.findall(r'"([^"]*)"', keys["command"][0].split(":", 1)[1])
        if "profiles" in keys:
            svc["profiles"] = re.findall(r'"([^"]*)"', keys["profiles"][0].split(":", 1)[1])
        for line in keys.get("environment", [])[1:]:
            m = re.match(r"^\s+([A-Z0-9_]+):\s*(.*?)\s*$", line)
            if m:
                svc["environment"][m.group(1)] = m.group(2).strip('"').strip("'")
        svc["keys"] = set(keys)
        svc["deploy"] = keys.get("deploy", [])
        out[name] = svc
    return out


def _interpolate(value: str) -> str:
    """``${VAR:-default}`` -> default (what compose gives with the variable unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _resolve(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` with nested defaults (``${A:-x:${B:-y}}``), as Docker Compose
    and podman-compose >= 1.1 resolve it."""
    out, i = "", 0
    while i < len(value):
        if not value.startswith("${", i):
            out += value[i]
            i += 1
            continue
        depth, j = 1, i + 2
        while depth:  # to the matching brace
            if value.startswith("${", j):
                depth, j = depth + 1, j + 1
            elif value[j] == "}":
                depth -= 1
            j += 1
        body = value[i + 2:j - 1]
        name, _, default = body.partition(":-")
        out += env.get(name) or _resolve(default, env)
        i = j
    return out


# ------------------------------------------------------------------ what the code reads


def _reads(cmd: str, var: str, value: str, monkeypatch) -> bool:
    """Whether ``fedseq CMD`` takes ``var`` from the environment: its parsed arguments differ with
    ``var=value`` from without it (the parser reads FEDSEQ_* defaults when it is built)."""
    monkeypatch.delenv(var, raising=False)
    without = vars(cli.parser().parse_args([cmd]))
    changed = False
    for v in (value, "17", "1"):  # "17": a value no default has (the compose value may equal the default);
        # "1": a flag an overlay turns back to its default ("0")
        monkeypatch.setenv(var, v)
        changed = changed or vars(cli.parser().parse_args([cmd])) != without
    monkeypatch.delenv(var)
    return changed


EXPERIMENT_ENV = {f"FEDSEQ_{f.name.upper()}" for f in fields(ExperimentConfig)}  # read by build_config


# ------------------------------------------------------------------ tests


def test_compose_has_the_services_and_the_attack_profile():
    svcs = _services(COMPOSE)
    assert {"redis", *SERVICE_KINDS} <= set(svcs), sorted(svcs)
    assert svcs["attacker-0"].get("profiles") == ["attack"], "the attacker must sit behind the 'attack' profile"
    for name in ("redis", "server", "orchestrator", "client-0", "client-1"):
        assert not svcs[name].get("profiles"), f"{name} must run in the default profile"
    workers = {n: s for n, s in svcs.items() if s.get("command", [""])[0] in ("serve-client", "serve-attacker")}
    assert set(workers) == set(WORKERS), "one named service per worker identity"
    for name, kind in WORKERS.items():
        assert workers[name]["command"] == [f"serve-{kind}"], name
        # one identity per service: never scaled to replicas that would share it
        assert not workers[name]["deploy"] and "scale" not in workers[name]["keys"], name
        assert "container_name" not in workers[name]["keys"], name
    assert "${REDIS_IMAGE:-redis:7}" in COMPOSE.read_text()


@pytest.mark.parametrize("path", [COMPOSE, GPU], ids=lambda p: p.name)
def test_every_command_is_a_real_fedseq_subcommand(path, capsys):
    seen = 0
    for name, svc in _services(path).items():
        if name == "redis" or "command" not in svc:
            continue
        cmd = svc["command"]
        assert cmd, f"{path.name}: {name} has an empty command"
        # the CLI's own argparse: an unknown subcommand exits 2, `--help` of a real one exits 0
        with pytest.raises(SystemExit) as exc:
            cli.main([*cmd, "--help"])
        assert exc.value.code == 0, f"{path.name}: {name} runs {cmd!r}, not a fedseq subcommand"
        seen += 1
    if path == COMPOSE:
        assert seen == len(SERVICE_KINDS)
        kinds = {svc["command"][0] for n, svc in _services(path).items() if n in SERVICE_KINDS}
        assert kinds == {"serve-server", "serve-orchestrator", "serve-client", "serve-attacker"}
    capsys.readouterr()


@pytest.mark.parametrize("path", [COMPOSE, GPU, TLS], ids=lambda p: p.name)
def test_every_fedseq_env_var_is_read_by_the_code(path, monkeypatch):
    checked = 0
    base = _services(COMPOSE)
    for name, svc in _services(path).items():
        command = svc.get("command") or base.get(name, {}).get("command")  # an overlay keeps the base's
        if not command:
            continue
        cmd = command[0]
        for var, raw in svc["environment"].items():
            if not var.startswith("FEDSEQ_"):
                continue
            value = _interpolate(raw)
            if cmd == "serve-orchestrator" and var in EXPERIMENT_ENV:
                continue  # an experiment key: build_config reads it (test below builds that config)
            # workers and the server take the experiment from the orchestrator: an experiment key
            # set on them would be silently ignored, so each variable must change what CMD parses
            assert _reads(cmd, var, value, monkeypatch), f"{path.name}: {name} ({cmd}) sets {var}={value!r}, " \
                "which that command does not read"
            checked += 1
    assert checked >= {COMPOSE: 24, GPU: 0, TLS: 15}[path]


def test_env_check_catches_a_variable_no_command_reads(monkeypatch):
    assert _reads("serve-client", "FEDSEQ_ORCHESTRATOR", "orch:1", monkeypatch)
    assert not _reads("serve-client", "FEDSEQ_NOT_A_SETTING", "1", monkeypatch)
    assert not _reads("serve-server", "FEDSEQ_ORCHESTRATOR", "orch:1", monkeypatch)


def test_orchestrator_default_experiment_is_valid():
    env = {k: _interpolate(v) for k, v in _services(COMPOSE)["orchestrator"]["environment"].items()}
    cfg = build_config(None, {}, environ=env)
    assert cfg.run_id == env["FEDSEQ_RUN_ID"]
    assert cfg.dataset == env["FEDSEQ_DATASET"]
    assert cfg.epochs == int(env["FEDSEQ_EPOCHS"])
    assert env["FEDSEQ_EXIT_WHEN_DONE"] == "1" and env["FEDSEQ_OUT"].startswith("/results/")
    for k in ("FEDSEQ_STORE_URL",):
        assert _services(COMPOSE)["server"]["environment"][k] == env[k], "server and orchestrator share the store"
    host, port = env["FEDSEQ_AGGREGATOR"].split(":")
    assert host == "server" and port == _services(COMPOSE)["server"]["environment"]["FEDSEQ_PORT"]
    orch_port = env["FEDSEQ_PORT"]
    for worker in WORKERS:
        wenv = _services(COMPOSE)[worker]["environment"]
        assert wenv["FEDSEQ_ORCHESTRATOR"] == f"orchestrator:{orch_port}", worker
        # the worker dials out: no port, no listening interface, no address to advertise
        assert not LISTEN_ENV & set(wenv), f"{worker} sets {sorted(LISTEN_ENV & set(wenv))}"
        assert wenv["FEDSEQ_HEALTH_FILE"] == HEALTH_FILE, worker


def test_yaml_agrees():
    yaml = pytest.importorskip("yaml")
    for path in (COMPOSE, GPU, TLS):
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc["services"], dict)
        mine = _services(path)
        for name, svc in doc["services"].items():
            assert name in mine
            if "command" in svc:
                assert list(svc["command"]) == mine[name]["command"]
            # FEDSEQ_* settings are written out per service (never through YAML anchors)
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if k.startswith("FEDSEQ_")}
            assert env == {k: v for k, v in mine[name]["environment"].items() if k.startswith("FEDSEQ_")}, name


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_compose_config_with_podman_compose():
    """podman-compose (>= 1.1, which has `config`) parses the files with PyYAML and resolves them."""
    local = Path(os.environ.get("FEDSEQ_DEPLOY_CACHE", "/var/tmp/fedseq-deploy"), "tools/bin/podman-compose")
    exe = str(local) if local.exists() else shutil.which("podman-compose")
    if exe is None:
        pytest.skip("podman-compose not installed (deploy/build-local.sh installs it)")
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).stdout
    if not re.search(r"\bconfig\b", helptext):
        pytest.skip(f"{exe} is too old to have `config` (Debian's 1.0.3)")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU)], ["--profile", "attack", "-f", str(COMPOSE), "-f", str(TLS)],
                  ["--profile", "observe", "-f", str(COMPOSE)]):
        r = subprocess.run([exe, *files, "config"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "serve-orchestrator" in r.stdout
        if "observe" in files:
            import yaml

            merged = yaml.safe_load(r.stdout)["services"]
            assert {"prometheus", "grafana"} <= set(merged)
            assert merged["server"]["environment"]["FEDSEQ_METRICS_PORT"] == "9464"
        if TLS in map(Path, files):
            import yaml

            merged = yaml.safe_load(r.stdout)["services"]
            for name in SERVICE_KINDS:  # the overlay's settings land on top of the base file's
                env = merged[name]["environment"]
                assert env["FEDSEQ_INSECURE"] == "0" and env["FEDSEQ_TLS_DIR"] == "/tls", name
                assert any(str(v).endswith(":/tls:ro") for v in merged[name]["volumes"]), name
            assert any("/data:ro" in str(v) for v in merged["orchestrator"]["volumes"]), "base volumes kept"


def test_dockerfile_is_standard_with_a_wheelhouse_option():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    # dependencies exactly as locked, installed without resolving anything new
    assert "COPY requirements.lock " in text and "cp /src/requirements.lock /tmp/lock.txt" in text
    assert text.count("-r /tmp/lock.txt") == 3  # wheelhouse, CPU index, plain
    assert text.count("--no-deps") >= 3
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["python", "-m", "fedseq.healthcheck"\]', text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^ARG WHEELHOUSE=$", text, re.M)
    assert "--no-index --find-links" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), "the image must run as a non-root user"
    assert re.search(r'^ENTRYPOINT \["fedseq"\]', text, re.M)
    assert "FEDSEQ_DATA_ROOT=/data" in text
    assert not re.search(r"^(COPY|ADD)\s+.*shared/data", text, re.M), "data stays out of the image"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and ".venv" in ignore
    assert "!deploy/wheelhouse" in ignore or not any(p.startswith("deploy") for p in ignore)


@pytest.mark.parametrize("script", ["build-local.sh", "run-local.sh", "down-local.sh", "fault-check.sh", "k8s/play-local.sh"])
def test_scripts_are_valid_bash(script):
    path = DEPLOY / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "set -Eeuo pipefail" in path.read_text()


# ------------------------------------------------------------------ behaviour the compose files promise


def _yaml(path: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def test_compose_health_checks_order_the_start():
    svcs = _yaml(COMPOSE)["services"]
    for name in ("server", "orchestrator"):  # gRPC health on their port
        test = svcs[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "fedseq.healthcheck"], name
    for name in WORKERS:  # no port: the health file the worker writes
        assert svcs[name]["healthcheck"]["test"] == WORKER_HEALTHCHECK, name
        assert svcs[name]["environment"]["FEDSEQ_HEALTH_FILE"] == HEALTH_FILE, name
        assert svcs[name]["healthcheck"]["start_period"], name
    assert "redis-cli ping" in " ".join(svcs["redis"]["healthcheck"]["test"])
    cond = {name: {dep: spec["condition"] for dep, spec in (svc.get("depends_on") or {}).items()}
            for name, svc in svcs.items()}
    assert cond["server"] == {"redis": "service_healthy"}
    assert cond["orchestrator"] == {"prepare": "service_completed_successfully", "redis": "service_healthy",
                                    "server": "service_healthy"}
    for name in WORKERS:
        assert cond[name] == {"orchestrator": "service_healthy"}, name


def test_compose_restarts_are_bounded_and_signals_reach_the_services():
    svcs = _yaml(COMPOSE)["services"]
    for name, svc in svcs.items():
        if name == "prepare":
            assert svc["restart"] == "no" and svc["user"] == "0:0"
            continue
        assert re.fullmatch(r"on-failure:[1-9]", svc["restart"]), f"{name}: restart {svc['restart']!r} is unbounded"
        if name in SERVICE_KINDS:
            assert svc["init"] is True, f"{name} needs an init process as PID 1"
            assert svc["stop_grace_period"] == "20s"


def test_orchestrator_is_restarted_unless_its_run_is_done():
    """The orchestrator exits 0 only for a finished run; a SIGTERM mid-run (a drain, a host
    shutdown) is a non-zero exit, so compose's `on-failure` restarts it and it resumes from Redis.
    `always`/`unless-stopped` would also restart a finished run; `no` would leave an interrupted
    one down."""
    from cli.services import orchestrator_exit

    orch = _yaml(COMPOSE)["services"]["orchestrator"]
    assert re.fullmatch(r"on-failure:[1-9]", orch["restart"]), orch.get("restart")
    assert orch["environment"]["FEDSEQ_EXIT_WHEN_DONE"].endswith("1}") or orch["environment"]["FEDSEQ_EXIT_WHEN_DONE"] == "1"
    assert orchestrator_exit("done") == 0
    for state in ("running", "waiting", "stopped", "failed"):  # interrupted, stopped or failed: restart
        assert orchestrator_exit(state) != 0, state


def test_compose_results_and_data_folders():
    """The orchestrator's results folder is made by the root `prepare` service and given to the
    orchestrator's user (a bind-mount folder compose creates is root-owned); the default data
    folder lies inside the checkout and exists in a fresh clone."""
    svcs = _yaml(COMPOSE)["services"]
    prep = " ".join(svcs["prepare"]["entrypoint"])
    assert 'chown "$$OWNER" "/results/$$RUN"' in prep
    assert svcs["prepare"]["environment"]["OWNER"] == svcs["orchestrator"]["user"] == "${FEDSEQ_USER:-10001:10001}"
    assert svcs["prepare"]["environment"]["RUN"] == "${FEDSEQ_RUN_ID:-compose}"
    assert svcs["orchestrator"]["environment"]["FEDSEQ_OUT"] == "/results/${FEDSEQ_RUN_ID:-compose}"
    for name in ("orchestrator", *WORKERS):
        mounts = [v for v in svcs[name]["volumes"] if v.endswith(":/data:ro")]
        assert mounts == ["${FEDSEQ_DATA_DIR:-./data}:/data:ro"], name
    assert (DEPLOY / "data" / "README.md").is_file(), "deploy/data must exist in a fresh clone"


def test_tls_overlay_mounts_only_each_services_own_key():
    doc = _yaml(TLS)
    svcs = doc["services"]
    want = {"server": "server", "orchestrator": "orchestrator", **{w: w for w in WORKERS}}
    for name, cert in want.items():
        env = svcs[name]["environment"]
        assert env["FEDSEQ_TLS_NAME"] == cert and env["FEDSEQ_TLS_DIR"] == "/tls", name
        assert svcs[name]["volumes"] == [f"tls-{cert}:/tls:ro"], name
    script = svcs["prepare"]["entrypoint"][-1]
    assert "ca.key" not in script and "operator" not in script, "the CA key and operator cert stay out"
    assert "mode=0400" in script and "mv -f" in script
    assert set(doc["volumes"]) == {f"tls-{c}" for c in want.values()}
    # prepare fills each service's volume, mounted at /tls/<certificate name>
    assert sorted(svcs["prepare"]["volumes"]) == sorted(["${FEDSEQ_CERTS:-./tls}:/certs:ro",
                                                         *(f"tls-{c}:/tls/{c}" for c in want.values())])


def test_tls_overlay_gives_every_worker_its_own_identity_and_the_roster_to_the_orchestrator_only():
    """(a) every worker service runs with its own certificate name, (b) no two services share a
    certificate or its volume, (c) the roster reaches the orchestrator's volume only: no service but
    the one-shot `prepare` mounts the certificates folder, and no service mounts another's volume."""
    base, over = _yaml(COMPOSE)["services"], _yaml(TLS)["services"]
    workers = [n for n, svc in base.items() if svc.get("command", [""])[0] in ("serve-client", "serve-attacker")]
    assert sorted(workers) == sorted(WORKERS)
    names = {n: over[n]["environment"]["FEDSEQ_TLS_NAME"] for n in over if n != "prepare"}
    for w in workers:
        assert names[w] == w, f"{w} must use its own certificate (FEDSEQ_TLS_NAME={names.get(w)!r})"
        assert names[w] != "worker", "no shared worker certificate"
    assert len(set(names.values())) == len(names), f"two services share a certificate: {names}"
    mounts = {n: [v.split(":/")[0] for v in (base[n].get("volumes") or []) + (over.get(n, {}).get("volumes") or [])]
              for n in base}
    tls_volumes = {n: [v for v in m if v.startswith("tls-")] for n, m in mounts.items() if n != "prepare"}
    for n, vols in tls_volumes.items():
        assert vols == ([f"tls-{names[n]}"] if n in names else []), f"{n} mounts {vols}"
    certs_folder = "${FEDSEQ_CERTS:-./tls}"
    assert [n for n, m in mounts.items() if certs_folder in m] == ["prepare"]
    script = over["prepare"]["entrypoint"][-1]
    # roster.json is copied for the orchestrator's volume and nowhere else
    assert script.count("roster.json") == 1
    assert re.search(r'orchestrator\)[^\n]*files="\$\$files roster\.json"', script), script
    for name in {**base, **over}:
        env = {**(base.get(name, {}).get("environment") or {}), **(over.get(name, {}).get("environment") or {})}
        assert "FEDSEQ_ROSTER" not in env or name == "orchestrator", f"{name} must not be given the roster"


def _run_prepare(tmp_path, certs: Path, names: list[str]) -> subprocess.CompletedProcess:
    script = _yaml(TLS)["services"]["prepare"]["entrypoint"][-1].replace("$$", "$")
    tls, results = tmp_path / "tls", tmp_path / "results"
    for n in names:
        (tls / n).mkdir(parents=True, exist_ok=True)
    me = f"{os.getuid()}:{os.getgid()}"
    script = (script.replace("/certs", str(certs)).replace("/tls", str(tls)).replace("/results", str(results))
              .replace("10001:10001", me))
    return subprocess.run(["sh", "-ec", script], env={"RUN": "r1", "OWNER": me, "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=60)


def test_tls_overlay_prepare_script_really_fills_the_volumes(tmp_path, fedseq_cli):
    """Runs the overlay's `prepare` script (compose's `$$` unescaped) on the certificates and roster
    `fedseq certs DIR --clients 2 --attackers 1 --unsharded` makes, in temporary folders standing for
    the mounts, then loads each service's identity from its copy."""
    from fedseq import roster
    from fedseq.tls import Identity

    certs, tls = tmp_path / "certs", tmp_path / "tls"
    rc, _, err = fedseq_cli("certs", certs, "--clients", 2, "--attackers", 1, "--unsharded")
    assert rc == 0, err
    names = [v.split(":")[1].removeprefix("/tls/") for v in _yaml(TLS)["services"]["prepare"]["volumes"]
             if v.split(":")[1].startswith("/tls/")]
    assert sorted(names) == sorted(["server", "orchestrator", *WORKERS])
    r = _run_prepare(tmp_path, certs, names)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "results" / "r1").is_dir()
    for n in names:
        extra = ["roster.json"] if n == "orchestrator" else []
        assert sorted(p.name for p in (tls / n).iterdir()) == sorted(["ca.pem", f"{n}.pem", f"{n}.key", *extra]), n
        assert ((tls / n / f"{n}.key").stat().st_mode & 0o777) == 0o400
        ident = Identity.load(tls / n, n)
        assert ident.role == (n if n in ("server", "orchestrator") else "worker")
    r_ = roster.load(tls / "orchestrator" / "roster.json")
    assert {w: r_.entry(w).kind for w in WORKERS} == WORKERS
    assert not (tls / "server" / "roster.json").exists()
    (certs / "client-1.key").unlink()
    r = _run_prepare(tmp_path, certs, names)
    assert r.returncode != 0 and "client-1.key missing" in r.stderr
    (certs / "roster.json").unlink()
    shutil.rmtree(tls)
    r = _run_prepare(tmp_path, certs, ["orchestrator"])
    assert r.returncode != 0 and "roster.json missing" in r.stderr


def test_compose_workers_writes_more_named_workers(tmp_path):
    """deploy/compose_workers.py (run-local.sh, FEDSEQ_CLIENTS > 2): each new worker is a copy of
    client-0 / attacker-0 with its own identity, certificate volume and prepare mount."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compose_workers", DEPLOY / "compose_workers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.worker_services({"client": 4, "attacker": 2}, tls=True)
    svcs = doc["services"]
    assert set(svcs) == {"client-2", "client-3", "attacker-1", "prepare"}
    base = _yaml(COMPOSE)["services"]
    for name in ("client-2", "client-3", "attacker-1"):
        kind = name.split("-")[0]
        assert svcs[name]["command"] == [f"serve-{kind}"]
        env = svcs[name]["environment"]
        assert env["FEDSEQ_TLS_NAME"] == name and env["FEDSEQ_INSECURE"] == "0" and env["FEDSEQ_TLS_DIR"] == "/tls"
        assert f"tls-{name}:/tls:ro" in svcs[name]["volumes"]
        assert {k: v for k, v in env.items() if k not in ("FEDSEQ_TLS_NAME", "FEDSEQ_INSECURE", "FEDSEQ_TLS_DIR")} == \
            {k: v for k, v in base[f"{kind}-0"]["environment"].items() if k != "FEDSEQ_INSECURE"}
    assert svcs["attacker-1"]["profiles"] == ["attack"]
    assert sorted(svcs["prepare"]["volumes"]) == sorted(f"tls-{n}:/tls/{n}" for n in ("client-2", "client-3", "attacker-1"))
    assert set(doc["volumes"]) == {"tls-client-2", "tls-client-3", "tls-attacker-1"}
    for name in ("client-2", "client-3", "attacker-1"):  # copies of a worker: no port, the file probe
        assert not {"ports", "expose"} & set(svcs[name]), name
        assert not LISTEN_ENV & set(svcs[name]["environment"]), name
        assert svcs[name]["healthcheck"]["test"] == WORKER_HEALTHCHECK, name
    plain = mod.worker_services({"client": 3, "attacker": 1}, tls=False)
    assert set(plain["services"]) == {"client-2"} and "volumes" not in plain
    assert plain["services"]["client-2"]["environment"]["FEDSEQ_INSECURE"] == "1"
    out = tmp_path / "w.yaml"
    assert mod.main([str(out), "--clients", "3", "--tls"]) == 0
    assert set(_yaml(out)["services"]) == {"client-2", "prepare"}


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """A pip-compile lock with hashes -> {name: (version, [sha256, ...])}. Fails on any line that
    is not a pin, a hash or a comment."""
    out: dict[str, tuple[str, list[str]]] = {}
    entries = re.sub(r"\\\n", " ", path.read_text())  # join the ` \` continuation lines
    for line in entries.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert m, f"{path.name}: not an exact pin with hashes: {line[:120]!r}"
        name = m.group(1).lower().replace("_", "-")
        assert name not in out, f"{path.name}: {name} twice"
        out[name] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return out


def test_lock_files_pin_everything_with_hashes():
    locks = {lock: _lock(ROOT / lock) for lock in ("requirements.lock", "requirements-dev.lock")}
    for lock, pins in locks.items():
        assert len(pins) >= 20, lock
        unhashed = sorted(n for n, (_, hashes) in pins.items() if not hashes)
        assert not unhashed, f"{lock}: pins without --hash (run `make lock`): {unhashed}"
        assert pins["torch"][0] == "2.13.0+cpu", lock
        deps = PROJECT["dependencies"] + (PROJECT["optional-dependencies"]["dev"] if "dev" in lock else [])
        names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
        missing = names - set(pins)
        assert not missing, f"{lock} lacks {sorted(missing)}: run `make lock`"
        # the tools --require-hashes needs to build the project wheel (the image) come hashed too
        assert {"setuptools", "wheel"} <= set(pins), lock
    image, dev = locks["requirements.lock"], locks["requirements-dev.lock"]
    for name, (version, hashes) in image.items():  # one resolution: the image's pins are the dev pins
        assert dev[name][0] == version, f"{name}: {version} in requirements.lock, {dev[name][0]} in requirements-dev.lock"
        assert set(hashes) <= set(dev[name][1]), name
    wheel = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    if wheel.is_file():  # the CPU wheel make setup, CI and build-local.sh install must be one the lock allows
        import hashlib

        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        for lock, pins in locks.items():
            assert digest in pins["torch"][1], f"{lock}: the sha256 of {wheel} is not among torch's hashes"


def test_lock_parser_rejects_unhashed_and_loose_lines(tmp_path):
    good = "a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via b\n"
    (tmp_path / "ok.lock").write_text(good)
    assert _lock(tmp_path / "ok.lock") == {"a": ("1.0", ["0" * 64])}
    (tmp_path / "bad.lock").write_text(good + "c>=2\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        _lock(tmp_path / "bad.lock")
    (tmp_path / "short.lock").write_text("a==1.0 \\\n    --hash=sha256:abc\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        _lock(tmp_path / "short.lock")


def test_make_and_the_image_install_the_locks_with_require_hashes():
    make = (ROOT / "Makefile").read_text()
    assert "$(VENV)/.installed: pyproject.toml requirements-dev.lock" in make
    installs = [ln for ln in make.splitlines() if "pip install" in ln and "-r requirements-dev.lock" in ln]
    assert installs and all("--require-hashes" in ln and "--no-deps" in ln for ln in installs), installs
    # the project itself: editable, no file to hash, so it must not pull anything: --no-deps
    editable = [ln for ln in make.splitlines() if re.search(r"pip install .*-e \.", ln)]
    assert editable and all("--no-deps" in ln for ln in editable), editable
    lock = [ln for ln in make.splitlines() if "pip-compile" in ln and "PIP_COMPILE =" in ln]
    assert lock and "--generate-hashes" in lock[0], lock
    assert "$(LOCK_ARGS)" in make and "/opt/wheels" in make  # where the torch hash comes from
    docker = (DEPLOY / "Dockerfile").read_text()
    lock_installs = [ln for ln in docker.splitlines() if "-r /tmp/lock.txt" in ln]
    assert len(lock_installs) == 3, lock_installs  # wheelhouse, CPU index, plain
    assert all("--require-hashes" in ln and "--no-deps" in ln for ln in lock_installs), lock_installs


def test_dockerfile_torch_variant_drops_the_whole_torch_entry(tmp_path):
    """The GPU route installs a CUDA torch first and the rest of the lock after it: the lock minus
    torch's pin *and* its hash lines, or pip would read a dangling --hash. Runs the Dockerfile's own
    sed and awk on the real lock."""
    docker = (DEPLOY / "Dockerfile").read_text()
    sed = re.search(r"v=\"\$\(sed -n '([^']+)' /src/requirements\.lock\)\"", docker)
    awk = re.search(r"awk '([^']+)' \\\n\s+/src/requirements\.lock > /tmp/lock\.txt", docker)
    assert sed and awk, "the TORCH_VARIANT step changed: update this test"
    lock = ROOT / "requirements.lock"
    v = subprocess.run(["sed", "-n", sed.group(1), str(lock)], capture_output=True, text=True, check=True).stdout
    assert v.strip() == "2.13.0"
    out = tmp_path / "lock.txt"
    out.write_text(subprocess.run(["awk", awk.group(1), str(lock)], capture_output=True, text=True, check=True).stdout)
    rest, full = _lock(out), _lock(lock)
    assert "torch" not in rest and rest == {k: v for k, v in full.items() if k != "torch"}


def test_image_is_tagged_with_the_project_version():
    """``fedseq:<pyproject version>``, never ``latest``; FEDSEQ_VERSION changes the tag and
    FEDSEQ_IMAGE the whole reference."""
    base, gpu = _yaml(COMPOSE), _yaml(GPU)
    for path in (COMPOSE, GPU, DEPLOY / "build-local.sh", DEPLOY / "Dockerfile"):
        assert not re.search(r"fedseq:(latest|gpu)\b", path.read_text()), f"{path.name} still names an unversioned tag"
    images = {svc["image"] for name, svc in base["services"].items() if name in SERVICE_KINDS | {"prepare"}}
    assert len(images) == 1, images
    image = images.pop()
    assert _resolve(image, {}) == f"fedseq:{VERSION}"
    assert _resolve(image, {"FEDSEQ_VERSION": "9.9.9"}) == "fedseq:9.9.9"
    assert _resolve(image, {"FEDSEQ_IMAGE": "registry.example.org/fedseq:1.2"}) == "registry.example.org/fedseq:1.2"
    gpu_images = {svc["image"] for svc in gpu["services"].values()}
    assert {_resolve(i, {}) for i in gpu_images} == {f"fedseq:{VERSION}-cu126"}
    for doc in (base, gpu):
        for name, svc in doc["services"].items():
            if "build" in svc:
                args = svc["build"]["args"]
                assert _resolve(args["FEDSEQ_VERSION"], {}) == VERSION, name
                assert _resolve(args["FEDSEQ_REVISION"], {"FEDSEQ_REVISION": "abc"}) == "abc", name
                assert {"FEDSEQ_CREATED", "FEDSEQ_SOURCE"} <= set(args), name
    # build-local.sh reads the version from pyproject.toml itself: run its line
    script = (DEPLOY / "build-local.sh").read_text()
    line = next(ln for ln in script.splitlines() if ln.startswith("PROJECT_VERSION="))
    r = subprocess.run(["bash", "-c", f'ROOT={str(ROOT)!r}; {line}; echo "$PROJECT_VERSION"'],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == VERSION, r.stderr
    assert 'FEDSEQ_IMAGE="${FEDSEQ_IMAGE:-localhost/fedseq:$FEDSEQ_VERSION}"' in script
    assert 'REVISION="$(git -C "$ROOT" rev-parse HEAD' in script
    for arg in ("FEDSEQ_VERSION=$FEDSEQ_VERSION", "FEDSEQ_REVISION=$REVISION", "FEDSEQ_CREATED=$CREATED"):
        assert f'--build-arg "{arg}"' in script, arg
    assert 'export FEDSEQ_IMAGE="$FEDSEQ_IMAGE"' in script  # env.sh: compose and the scripts use the built tag


def test_dockerfile_oci_labels():
    text = (DEPLOY / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', final))
    want = {"title": "fedseq", "version": "${FEDSEQ_VERSION}", "revision": "${FEDSEQ_REVISION}",
            "created": "${FEDSEQ_CREATED}", "source": "${FEDSEQ_SOURCE}", "licenses": PROJECT["license"]["text"]}
    for key, value in want.items():
        assert labels.get(f"org.opencontainers.image.{key}") == value, key
    args = dict(re.findall(r"^ARG (FEDSEQ_[A-Z]+)=(.*)$", final, re.M))
    assert args["FEDSEQ_VERSION"] == VERSION, "the Dockerfile's default version is pyproject.toml's"
    assert {"FEDSEQ_REVISION", "FEDSEQ_CREATED", "FEDSEQ_SOURCE"} <= set(args)
    # labels and their ARGs last: a new commit must not invalidate the cached layers above
    last_step = max(m.start() for m in re.finditer(r"^(RUN|COPY|ADD) ", final, re.M))
    assert min(final.index(f"ARG {a}=") for a in args if a != "FEDSEQ_UID") > last_step
    assert final.index("LABEL org.opencontainers.image.") > last_step


def test_workers_listen_on_no_port():
    """Workers dial out: no fedseq service publishes or exposes a port in the base file (only the
    `observe` profile's Prometheus and Grafana publish, on loopback), no worker gets a listening
    setting in any file, and the worker CLI has no flag for one."""
    base, tls, gpu = (_yaml(p)["services"] for p in (COMPOSE, TLS, GPU))
    for name, svc in base.items():
        if svc.get("profiles") == ["observe"]:
            continue  # test_observe_profile_brings_prometheus_and_grafana_on_loopback
        assert "ports" not in svc, f"{name} publishes {svc['ports']} (compose.override.yaml, multi-host only)"
    for doc in (base, tls, gpu):
        for name in WORKERS:
            svc = doc.get(name, {})
            assert not {"ports", "expose"} & set(svc), name
            assert not LISTEN_ENV & set(svc.get("environment") or {}), name
    for cmd in ("serve-client", "serve-attacker"):
        args = vars(cli.parser().parse_args([cmd]))
        assert not {"port", "host", "advertise_host"} & set(args), f"{cmd} still takes {set(args) & {'port', 'host', 'advertise_host'}}"
        assert "health_file" in args


def test_worker_health_probe_reads_the_file_the_worker_writes(tmp_path, monkeypatch):
    """The compose probe, run as compose runs it (the path swapped for a temporary one): no file is
    unhealthy, a file the worker's HealthFile just wrote is healthy, a stale one is not."""
    from client.worker import HealthFile

    path = tmp_path / "fedseq" / "health.json"
    cmd = [sys.executable if a == "python" else str(path) if a == HEALTH_FILE else a for a in WORKER_HEALTHCHECK[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}

    def probe(*extra: str) -> int:
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60).returncode

    assert probe() == 1, "no health file yet must be unhealthy"
    HealthFile(str(path)).write("client-0", connected=True, ready=False)
    assert probe() == 0
    assert probe("--ready") == 1, "connected but not holding its users is not ready"
    HealthFile(str(path)).write("client-0", connected=True, ready=True)
    assert probe("--ready") == 0
    old = time.time() - 120
    os.utime(path, (old, old))  # the age is the one written in the file, not the mtime
    assert probe() == 0
    path.write_text(path.read_text().replace('"time": ', '"time": 1.0, "was": '))
    assert probe() == 1, "a file the worker stopped rewriting must be unhealthy"


def test_only_the_server_and_the_orchestrator_reach_redis():
    doc = _yaml(COMPOSE)
    nets = {name: svc.get("networks", ["default"]) for name, svc in doc["services"].items()}
    assert nets["redis"] == ["store"]
    assert {n for n, v in nets.items() if "store" in v} == {"redis", "server", "orchestrator"}
    assert doc["networks"]["store"]["internal"] is True
    for name in WORKERS:
        assert "FEDSEQ_STORE_URL" not in doc["services"][name]["environment"], name


# ------------------------------------------------------------------ the `observe` profile: Prometheus and Grafana

OBSERVE = {"prometheus", "grafana"}
METRICS_PORT = "9464"  # as on Kubernetes (deploy/k8s/base/server.yaml, orchestrator.yaml)


def _host_path(volume: str) -> Path | None:
    """The host side of a bind mount (relative to the compose file's folder), None for a named volume."""
    src = volume.split(":", 1)[0]
    return (DEPLOY / src).resolve() if src.startswith(("./", "../")) else None


def test_observe_profile_brings_prometheus_and_grafana_on_loopback():
    doc = _yaml(COMPOSE)
    svcs = doc["services"]
    # Prepare: the services of the profile, and what the others serve
    observe = {n: s for n, s in svcs.items() if "observe" in (s.get("profiles") or [])}
    # Assert: exactly Prometheus and Grafana, behind the profile only, at pinned versions
    assert set(observe) == OBSERVE
    assert all(s["profiles"] == ["observe"] for s in observe.values())
    for name, image in (("prometheus", "prom/prometheus:v"), ("grafana", "grafana/grafana-oss:")):
        ref = _interpolate(svcs[name]["image"])
        assert ref.startswith(image) and re.fullmatch(r"v?\d+\.\d+\.\d+", ref.rpartition(":")[2]), ref
        # published on the host's loopback only
        ports = svcs[name]["ports"]
        assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), ports
        assert re.fullmatch(r"on-failure:[1-9]", svcs[name]["restart"])
        # every bind mount is read-only and its host path exists in the checkout
        binds = [v for v in svcs[name]["volumes"] if _host_path(v) is not None]
        assert binds, name
        for v in binds:
            assert v.endswith(":ro"), f"{name}: {v} must be read-only"
            assert _host_path(v).exists(), f"{name}: {v} mounts a path that does not exist"
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svcs["prometheus"]["volumes"]
    for kind in ("datasources", "dashboards"):
        assert f"./grafana/provisioning/{kind}:/etc/grafana/provisioning/{kind}:ro" in svcs["grafana"]["volumes"]
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in svcs["grafana"]["volumes"]
    env = svcs["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).relative_to("/etc/grafana/dashboards")).is_file()
    # the provisioned dashboard folder is the one mounted
    yaml = pytest.importorskip("yaml")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/fedseq.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    # the default profile is unchanged: no Prometheus or Grafana without --profile observe
    assert not {n for n, s in svcs.items() if not s.get("profiles")} & OBSERVE


def test_prometheus_scrapes_every_service_that_serves_metrics():
    """prometheus.yml's targets are exactly the compose services with a metrics port, on that port
    and on every interface of a network Prometheus shares with them (an internal one); workers
    serve none; the TLS overlay keeps the endpoints on loopback unless told otherwise."""
    yaml = pytest.importorskip("yaml")
    doc = _yaml(COMPOSE)
    svcs = doc["services"]
    # Prepare
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    serving = {n for n, s in svcs.items() if "FEDSEQ_METRICS_PORT" in (s.get("environment") or {})}
    # Assert
    assert serving == {"server", "orchestrator"}
    assert targets == {f"{n}:{METRICS_PORT}" for n in serving}
    for name in serving:
        env = svcs[name]["environment"]
        assert _interpolate(env["FEDSEQ_METRICS_PORT"]) == METRICS_PORT
        assert _interpolate(env["FEDSEQ_METRICS_HOST"]) == "0.0.0.0"
        assert "metrics" in svcs[name]["networks"] and "metrics" in svcs["prometheus"]["networks"], name
    assert doc["networks"]["metrics"]["internal"] is True
    assert set(svcs["grafana"]["networks"]) & set(svcs["prometheus"]["networks"]) == {"observe"}
    assert _interpolate(svcs["orchestrator"]["environment"]["FEDSEQ_METRICS_EXPERIMENT"]) == "0"  # opt-in
    for name in WORKERS:
        assert "FEDSEQ_METRICS_PORT" not in svcs[name]["environment"], name
    tls = _yaml(TLS)["services"]
    for name in serving:
        assert _interpolate(tls[name]["environment"]["FEDSEQ_METRICS_HOST"]) == "127.0.0.1", name
