"""Static checks of deploy/: the compose files, the Dockerfile and the scripts agree with the code.

Cheap (no containers, no network): every compose service runs a real ``fedseq`` subcommand,
every ``FEDSEQ_*`` variable a service is given is one that service's code reads, the
orchestrator's default experiment is a valid config, and the scripts are valid bash. The full
container run is ``deploy/build-local.sh && deploy/run-local.sh`` (see deploy/README.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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
        assert _services(COMPOSE)[worker]["environment"]["FEDSEQ_ORCHESTRATOR"] == f"orchestrator:{orch_port}"
        assert _services(COMPOSE)[worker]["environment"]["FEDSEQ_PORT"] != "0", "workers need a fixed port"


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


def test_compose_config_with_podman_compose():
    """podman-compose (>= 1.1, which has `config`) parses the files with PyYAML and resolves them."""
    local = Path(os.environ.get("FEDSEQ_DEPLOY_CACHE", "/var/tmp/fedseq-deploy"), "tools/bin/podman-compose")
    exe = str(local) if local.exists() else shutil.which("podman-compose")
    if exe is None:
        pytest.skip("podman-compose not installed (deploy/build-local.sh installs it)")
    helptext = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).stdout
    if not re.search(r"\bconfig\b", helptext):
        pytest.skip(f"{exe} is too old to have `config` (Debian's 1.0.3)")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU)], ["--profile", "attack", "-f", str(COMPOSE), "-f", str(TLS)]):
        r = subprocess.run([exe, *files, "config"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "serve-orchestrator" in r.stdout
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
    for name in SERVICE_KINDS:
        test = svcs[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "fedseq.healthcheck"], name
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
    plain = mod.worker_services({"client": 3, "attacker": 1}, tls=False)
    assert set(plain["services"]) == {"client-2"} and "volumes" not in plain
    assert plain["services"]["client-2"]["environment"]["FEDSEQ_INSECURE"] == "1"
    out = tmp_path / "w.yaml"
    assert mod.main([str(out), "--clients", "3", "--tls"]) == 0
    assert set(_yaml(out)["services"]) == {"client-2", "prepare"}


def test_lock_files_pin_everything_and_are_used():
    for lock in ("requirements.lock", "requirements-dev.lock"):
        lines = [ln.split("#")[0].strip() for ln in (ROOT / lock).read_text().splitlines()]
        pins = dict(ln.split("==", 1) for ln in lines if ln)
        assert all(ln == "" or "==" in ln for ln in lines), f"{lock}: every requirement is an exact pin"
        assert pins["torch"] == "2.13.0+cpu", lock
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        deps = project["dependencies"] + (project["optional-dependencies"]["dev"] if "dev" in lock else [])
        names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
        missing = names - {k.lower() for k in pins}
        assert not missing, f"{lock} lacks {sorted(missing)}: run `make lock`"
    make = (ROOT / "Makefile").read_text()
    assert "-r requirements-dev.lock" in make and "$(VENV)/.installed: pyproject.toml requirements-dev.lock" in make


def test_only_the_server_and_the_orchestrator_reach_redis():
    doc = _yaml(COMPOSE)
    nets = {name: svc.get("networks", ["default"]) for name, svc in doc["services"].items()}
    assert nets["redis"] == ["store"]
    assert {n for n, v in nets.items() if "store" in v} == {"redis", "server", "orchestrator"}
    assert doc["networks"]["store"]["internal"] is True
    for name in WORKERS:
        assert "FEDSEQ_STORE_URL" not in doc["services"][name]["environment"], name
