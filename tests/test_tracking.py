"""``--track mlflow[:URI]`` (cli/tracking.py): a run, a sweep and a reproduce suite logged to a real
MLflow file store in the test's folder and read back through MLflow's own client; a resumed sweep
logs nothing twice; a bad ``--track`` and a missing MLflow exit 2 before anything runs; nothing
imports MLflow without ``--track``.

Every test is Prepare / Execute / Assert."""

from __future__ import annotations

import ast
import functools
import json
import sys
from pathlib import Path

import pytest

from cli import reproduce, sweep, tracking
from cli.sweep import inprocess_cell

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic:users=24,items=40,max_length=20", "--epochs", "2", "--clients-per-round", "8",
        "--num-negatives", "20", "--lr", "0.01"]
TINY_BASE = {"dataset": "synthetic:users=24,items=40,max_length=20", "epochs": 2, "clients_per_round": 8,
             "num_negatives": 20, "lr": 0.01}
MLFLOW_VARS = ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_EXPERIMENT_NAME",
               "MLFLOW_TRACKING_URI")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty MLflow file store folder; MLflow's variables unset for the test (and put back after)."""
    for var in MLFLOW_VARS:
        monkeypatch.setenv(var, "")  # records the value to put back, then unset
        monkeypatch.delenv(var)
    return tmp_path / "mlruns"


def _client(store: Path, monkeypatch):
    """MLflow's own client on ``store`` and the id of its ``fedseq`` experiment."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 opens a file store only so
    client = MlflowClient(tracking_uri=store.as_uri())
    return client, client.get_experiment_by_name("fedseq").experiment_id


def _epoch_metrics(client, run_id: str, results: dict) -> tuple[dict, dict]:
    """Every numeric key of each epoch record, as the bundle has it and as MLflow has it:
    {(metric, step): value} both."""
    want = {(tracking.metric_name(k), e["epoch"]): float(v) for e in results["epochs"] for k, v in e.items()
            if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)}
    got = {(name, m.step): m.value for name in {n for n, _ in want} for m in client.get_metric_history(run_id, name)}
    return want, got


@pytest.mark.slow  # a run and MLflow's import (2 s): `make test` runs it, `make test-fast` skips it
def test_fedseq_sim_track_logs_config_epochs_and_bundle(tmp_path, store, fedseq_cli, monkeypatch):
    # Prepare
    out = tmp_path / "run"

    # Execute
    rc, stdout, err = fedseq_cli("sim", *TINY, "--out", out, "--track", f"mlflow:{store}")

    # Assert: one finished run, params = the config, metrics = every epoch at steps 1..E, the bundle
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    client, exp = _client(store, monkeypatch)
    (run,) = client.search_runs([exp])
    assert f"tracked: MLflow run {run.info.run_id} in {store.as_uri()}" in stdout
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == tracking.flatten_params(results["config"])
    assert run.data.params["epochs"] == "2" and run.data.params["compat.literal_step"] == "False"
    assert run.data.params["dataset"] == results["config"]["dataset"]
    want, got = _epoch_metrics(client, run.info.run_id, results)
    assert got == want and {s for _, s in got} == {1, 2}
    assert {"hr_at_10", "ndcg_at_10", "er_at_5", "er_at_30", "rejected"} <= {n for n, _ in got}
    tags = run.data.tags
    assert tags["dataset"] == results["config"]["dataset"] and tags["model"] == "sasrec" and tags["seed"] == "0"
    assert tags["fedseq.folder"] == str(out.resolve()) and tags["fedseq.kind"] == "run"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]
    logged = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == results


@pytest.mark.slow  # seconds of runs: `make test` runs it, `make test-fast` skips it
def test_a_tracked_sweep_is_a_parent_with_a_child_per_cell_and_resumes_without_duplicates(
        tmp_path, store, fedseq_cli, monkeypatch):
    # Prepare: two cells, run in this process (the parser takes `sweep.main` when it is built)
    monkeypatch.setattr(sweep, "main", functools.partial(sweep.main, runner=inprocess_cell))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": TINY_BASE, "attacks": ["none", "dv-fsr"], "malicious_ratios": [0.1],
                                "engine": "inprocess"}))
    out = tmp_path / "sweep"
    args = ["sweep", "--spec", spec, "--cores", "1", "--out", out, "--track", f"mlflow:{store}"]

    # Execute: the sweep, the same sweep again (every cell done before), then again with one cell lost
    rc1, out1, err1 = fedseq_cli(*args)
    client, exp = _client(store, monkeypatch)
    first = {r.info.run_id for r in client.search_runs([exp])}
    rc2, _, err2 = fedseq_cli(*args)
    second = {r.info.run_id for r in client.search_runs([exp])}
    lost = sorted(p for p in out.iterdir() if p.is_dir())[0]
    (lost / "results.json").unlink()
    rc3, _, err3 = fedseq_cli(*args)

    # Assert: one parent, one child per cell (its metrics the cell's bundle); nothing logged twice
    assert (rc1, rc2, rc3) == (0, 0, 0), err1 + err2 + err3
    assert err2.count("done before (kept)") == 2 and second == first and len(first) == 3
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2 and parent.info.run_id in first
    assert f"tracked: MLflow run {parent.info.run_id}" in out1 and parent.info.status == "FINISHED"
    assert parent.data.params["attacks"] == '["none", "dv-fsr"]' and parent.data.params["base.epochs"] == "2"
    assert {"sweep.md", "sweep.json", "spec.json", "epochs.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert sorted(c.info.run_name for c in children) == sorted(p.name for p in out.iterdir() if p.is_dir())
    for child in children:
        folder = Path(child.data.tags["fedseq.folder"])
        want, got = _epoch_metrics(client, child.info.run_id, json.loads((folder / "results.json").read_text()))
        assert got == want and child.info.status == "FINISHED"
        assert (child.info.run_id in first) == (folder != lost.resolve())  # the cell run again: a new child


@pytest.mark.slow  # a run and MLflow's import (2 s): `make test` runs it, `make test-fast` skips it
def test_a_tracked_reproduce_suite_is_a_parent_with_its_cells_and_page(tmp_path, store, fedseq_cli, monkeypatch):
    # Prepare: one paper cell of table 3, one epoch, run in this process
    monkeypatch.setattr(reproduce, "main", functools.partial(reproduce.main, runner=inprocess_cell))
    args = ["reproduce", "table3", "--dataset", "synthetic:users=24,items=40,max_length=15", "--epochs", "1",
            "--seeds", "0", "--only", "SASRec DV-FSR 0.1%", "--variants", "reference", "--out", tmp_path / "r",
            "--page", tmp_path / "page.md", "--track", f"mlflow:{store}"]

    # Execute
    rc, _, err = fedseq_cli(*args)

    # Assert
    assert rc == 0, err
    client, exp = _client(store, monkeypatch)
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name.startswith("table3 (") and child.data.tags["attack"] == "dv-fsr"
    assert "page.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert child.data.metrics["er_at_5"] == json.loads(
        (Path(child.data.tags["fedseq.folder"]) / "results.json").read_text())["epochs"][-1]["er@5"]


def test_a_bad_track_value_and_a_missing_mlflow_exit_2_before_anything_runs(tmp_path, store, fedseq_cli,
                                                                          monkeypatch):
    # Prepare: a run folder per attempt; MLflow made unimportable for the last one
    outs = [tmp_path / f"run{i}" for i in range(4)]

    # Execute
    bad = fedseq_cli("sim", *TINY, "--out", outs[0], "--track", "wandb")
    empty = fedseq_cli("sim", *TINY, "--out", outs[1], "--track", "mlflow:")
    monkeypatch.setenv("FEDSEQ_TRACK", "tensorboard")
    from_env = fedseq_cli("sweep", "--engine", "inprocess", "--out", outs[2])
    monkeypatch.delenv("FEDSEQ_TRACK")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow...` raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    missing = fedseq_cli("sim", *TINY, "--out", outs[3], "--track", f"mlflow:{store}")

    # Assert: exit 2, one line saying what is accepted / what to install; no run began
    for rc, _, err in (bad, empty, from_env):
        assert rc == 2 and "configuration error" in err and "accepted: mlflow (runs in ./mlruns), mlflow:URI" in err
    assert "'wandb'" in bad[2] and "'tensorboard'" in from_env[2] and "FEDSEQ_TRACK" in from_env[2]
    assert missing[0] == 2 and "pip install 'fedseq[track]'" in missing[2] and "mlflow-skinny" in missing[2]
    assert not any(o.exists() for o in outs) and not store.exists()


def test_track_values_become_uris(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.chdir(tmp_path)

    # Execute
    got = {v: tracking.parse_track(v) for v in ("mlflow", "mlflow:runs/ml", "mlflow:file:./x", "mlflow:/abs/m",
                                                "mlflow:sqlite:///m.db", "mlflow:http://127.0.0.1:5000", "none",
                                                "", None)}

    # Assert: folders absolute (a cell's process and a later call find the same store), URIs as given
    assert got["mlflow"] == (tmp_path / "mlruns").resolve().as_uri()
    assert got["mlflow:runs/ml"] == (tmp_path / "runs" / "ml").resolve().as_uri()
    assert got["mlflow:file:./x"] == (tmp_path / "x").resolve().as_uri() and got["mlflow:/abs/m"] == "file:///abs/m"
    assert got["mlflow:sqlite:///m.db"] == "sqlite:///m.db" and got["mlflow:http://127.0.0.1:5000"].startswith("http")
    assert got["none"] is got[""] is got[None] is None
    assert tracking.metric_name("hr@10") == "hr_at_10" and tracking.metric_name("refused.bad token") == "refused.bad token"


def test_nothing_imports_mlflow_but_the_tracking_module_inside_its_functions():
    # Prepare: every module of the source folders, parsed
    files = [p for pkg in ("fedseq", "server", "client", "attacker", "orchestrator", "cli")
             for p in (ROOT / pkg).rglob("*.py") if "v1" not in p.parts]

    # Execute: where `mlflow` is imported, and at which depth
    found = []
    for path in files:
        text = path.read_text()
        if "mlflow" not in text:
            continue
        tree = ast.parse(text)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                found.append((path.relative_to(ROOT).as_posix(), id(node) in top))

    # Assert: only cli/tracking.py, never at module level (its import costs seconds: --track only)
    assert found and {f for f, _ in found} == {"cli/tracking.py"} and not any(at_top for _, at_top in found)
