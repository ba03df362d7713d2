"""``fedseq sweep`` (cli/sweep.py and cli/sweep_*.py): cells of the axes, their folders and
configs, the summary (mean and spread over seeds), resuming an interrupted sweep, tiny sweeps whose
cells run in this process (``inprocess_cell``), and one real tiny sweep whose cells run as
processes (the default runner, slow), equal to the in-process runner's."""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
from pathlib import Path

import pytest

from cli.sweep import (
    PRESETS,
    Cell,
    SweepError,
    SweepSpec,
    add_arguments,
    cell_command,
    cell_done,
    format_table,
    inprocess_cell,
    parse_seeds,
    run_sweep,
    spec_from,
    subprocess_cell,
    summarise,
)

TINY = {"dataset": "synthetic:users=30,items=50,max_length=15", "epochs": 2, "clients_per_round": 8,
        "num_negatives": 20, "lr": 0.01}


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_cells_are_the_product_with_no_malicious_ratio_for_no_attack():
    spec = SweepSpec(base=TINY, attacks=("none", "dv-fsr"), defenses=("fedavg", "krum:m=4"),
                     malicious_ratios=(0.05, 0.1), seeds=(0, 1))
    cells = spec.cells()
    assert len(cells) == (1 + 2) * 2 * 2  # none once per defense, dv-fsr per ratio; x seeds
    assert len({c.folder for c in cells}) == len(cells)
    krum = next(c for c in cells if c.defense == "krum:m=4" and c.attack == "dv-fsr")
    assert krum.overrides()["defense"] == "krum" and krum.overrides()["defense_opts"] == ["m=4"]
    assert "malicious_ratio" not in next(c for c in cells if c.attack == "none").overrides()


def test_a_cells_defense_spec_takes_the_inner_rule_shorthand():
    spec = SweepSpec(base=TINY, attacks=("none",), defenses=("sparse:median", "sparse:trimmed-mean,inner.beta=0.2"))
    by = {c.defense: c.overrides() for c in spec.cells()}
    assert by["sparse:median"]["defense"] == "sparse" and by["sparse:median"]["defense_opts"] == ["inner=median"]
    assert by["sparse:trimmed-mean,inner.beta=0.2"]["defense_opts"] == ["inner=trimmed-mean", "inner.beta=0.2"]
    with pytest.raises(SweepError, match="option 'beta' must look like key=value"):
        SweepSpec(base=TINY, attacks=("none",), defenses=("median:beta",)).cells()


def test_a_bad_cell_fails_before_anything_runs():
    with pytest.raises(SweepError, match="cell .*malicious_ratio"):
        SweepSpec(base=TINY, attacks=("dv-fsr",), malicious_ratios=(1.5,)).cells()
    with pytest.raises(SweepError, match="engine"):
        SweepSpec(base=TINY, engine="cloud").cells()
    with pytest.raises(SweepError, match="unknown preset"):
        spec_from(_args("nope"))
    # a rule or attack no run knows, or an option it does not take: refused here, not in every cell
    with pytest.raises(SweepError, match="cell none_bogus_seed0: unknown aggregation rule 'bogus'"):
        SweepSpec(base=TINY, attacks=("none",), defenses=("bogus",)).cells()
    with pytest.raises(SweepError, match="rule 'krum' option 'm'='x' is not a valid int"):
        SweepSpec(base=TINY, attacks=("none",), defenses=("krum:m=x",)).cells()
    with pytest.raises(SweepError, match="cell bogus_r0.005_fedavg_seed0: unknown attack 'bogus'"):
        SweepSpec(base=TINY, attacks=("bogus",)).cells()


def test_seeds_and_flags_and_presets():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("0,3,7") == [0, 3, 7]
    with pytest.raises(SweepError):
        parse_seeds("a-b")
    spec = spec_from(_args("mission", "--seeds", "0-2", "--malicious-ratios", "0.02", "--set", "epochs=3"))
    cells = spec.cells()
    assert [c.name for c in cells[::3]] == [s["name"] for s in PRESETS["mission"]["scenarios"]]
    assert {c.seed for c in cells} == {0, 1, 2} and {c.malicious_ratio for c in cells if c.attack != "none"} == {0.02}
    assert spec.base["epochs"] == "3" and spec.engine == "services"
    custom = spec_from(_args("--attacks", "none,dv-fsr", "--defenses", "fedavg;krum:m=8", "--engine", "inprocess"))
    assert custom.defenses == ("fedavg", "krum:m=8") and custom.engine == "inprocess"
    for listed in ("fedavg;median", "fedavg,median"):  # ';' between rules whether or not one has options
        assert spec_from(_args("--defenses", listed)).defenses == ("fedavg", "median")


def test_an_old_spec_file_saying_ratios_loads_as_malicious_ratios(tmp_path):
    # Prepare: the same sweep in today's keys and in the old ones (spec key "ratios", scenario key
    # "ratio"), as JSON and TOML, and files that give both names
    new = {"attacks": ["none", "dv-fsr"], "malicious_ratios": [0.05, 0.1], "base": TINY}
    old = {"attacks": ["none", "dv-fsr"], "ratios": [0.05, 0.1], "base": TINY}
    scen_new = {"base": TINY, "scenarios": [{"name": "a", "attack": "dv-fsr", "malicious_ratio": 0.1}]}
    scen_old = {"base": TINY, "scenarios": [{"name": "a", "attack": "dv-fsr", "ratio": 0.1}]}
    files = {}
    for name, data in (("new", new), ("old", old), ("scen_new", scen_new), ("scen_old", scen_old),
                       ("both", {**new, "ratios": [0.2]}),
                       ("scen_both", {"base": TINY, "scenarios": [{"name": "a", "ratio": 0.1,
                                                                   "malicious_ratio": 0.2}]})):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data))
    (tmp_path / "old.toml").write_text('attacks = ["none", "dv-fsr"]\nratios = [0.05, 0.1]\n'
                                       '[base]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items()))
    # Execute
    specs = {name: spec_from(_args("--spec", str(f))) for name, f in files.items() if "both" not in name}
    toml = spec_from(_args("--spec", str(tmp_path / "old.toml")))
    # Assert: the old names load as the new ones (the same spec, cells and folders); both at once is refused
    assert specs["old"] == specs["new"] == toml and specs["old"].malicious_ratios == (0.05, 0.1)
    assert [c.folder for c in specs["old"].cells()] == [c.folder for c in specs["new"].cells()]
    assert specs["scen_old"] == specs["scen_new"] and specs["scen_old"].scenarios[0]["malicious_ratio"] == 0.1
    assert [c.folder for c in specs["scen_old"].cells()] == ["dv-fsr_r0.1_fedavg_seed0"]
    with pytest.raises(SweepError, match="'ratios' and 'malicious_ratios' both given"):
        spec_from(_args("--spec", str(files["both"])))
    with pytest.raises(SweepError, match="'ratio' and 'malicious_ratio' both given"):
        spec_from(_args("--spec", str(files["scen_both"])))
    made = SweepSpec(base=TINY, scenarios=({"name": "a", "attack": "dv-fsr", "ratio": 0.1},))  # in code, too
    assert made.scenarios == specs["scen_new"].scenarios


def test_the_deprecated_ratios_flag_is_malicious_ratios(capsys):
    # Prepare
    p = argparse.ArgumentParser(prog="fedseq sweep")
    add_arguments(p)
    # Execute
    old = p.parse_args(["--attacks", "none,dv-fsr", "--ratios", "0.02,0.04"])
    said = capsys.readouterr().err
    new = p.parse_args(["--attacks", "none,dv-fsr", "--malicious-ratios", "0.02,0.04"])
    # Assert: one destination, the same sweep; the old flag says it is deprecated, here and in the help
    assert old.malicious_ratios == new.malicious_ratios == "0.02,0.04" and not hasattr(old, "ratios")
    assert spec_from(old) == spec_from(new) and spec_from(old).malicious_ratios == (0.02, 0.04)
    assert "--ratios is deprecated; use --malicious-ratios" in said and not capsys.readouterr().err
    help_text = " ".join(p.format_help().split())
    assert "--ratios MALICIOUS_RATIOS deprecated: the old name of --malicious-ratios" in help_text
    with pytest.raises(SweepError, match="--malicious-ratios: 'x' is not a comma list"):
        spec_from(_args("--ratios", "x"))


def _old_keys(summary: dict) -> dict:
    """A sweep.json as fedseq wrote it before the rename: its rows say "ratio"."""
    def row(r: dict) -> dict:
        return {("ratio" if k == "malicious_ratio" else k): v for k, v in r.items()}

    return {**summary, "scenarios": {n: row(s) for n, s in summary["scenarios"].items()},
            "cells": [row(r) for r in summary["cells"]]}


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
def test_an_old_sweep_resumes_and_its_old_summary_loads_and_plots(tmp_path):
    # Prepare: a finished sweep (hand-made results), its spec.json and sweep.json then put back in
    # the old keys ("ratios", "ratio"), as a sweep run before the rename left them
    from cli.sweep import load_summary, matrices, plot_sweep

    spec = SweepSpec(base=TINY, attacks=("none", "dv-fsr", "eb"), defenses=("fedavg", "median"),
                     malicious_ratios=(0.05, 0.1), engine="inprocess")

    def runner(sp: SweepSpec, cell: Cell, folder: Path, threads: int) -> int:
        folder.rmdir()
        _bundle(folder, [0.1, 0.3], [0.0, 0.5 if cell.attack != "none" else 0.0])
        return 0

    first = run_sweep(spec, tmp_path, say=lambda _ln: None, runner=runner)
    old_spec = json.loads((tmp_path / "spec.json").read_text())
    old_spec["ratios"] = old_spec.pop("malicious_ratios")
    (tmp_path / "spec.json").write_text(json.dumps(old_spec))
    old_summary = _old_keys(json.loads((tmp_path / "sweep.json").read_text()))
    (tmp_path / "sweep.json").write_text(json.dumps(old_summary))
    # Execute: resume from the old spec file (nothing may run again); load and plot the old summary
    lines: list[str] = []
    resumed = run_sweep(spec_from(_args("--spec", str(tmp_path / "spec.json"))), tmp_path, say=lines.append,
                        runner=lambda *a: pytest.fail("a finished cell ran again"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sweep.json").write_text(json.dumps(old_summary))
    loaded = load_summary(tmp_path / "old" / "sweep.json")
    plots = {Path(p).name for p in plot_sweep(old_summary, tmp_path / "old")}
    # Assert: the old cells (folders such as dv-fsr_r0.05_...) were kept; the summary written again
    # says only malicious_ratio; the old summary loads, grids and plots as the new one
    assert sum("done before (kept)" in ln for ln in lines) == len(spec.cells()) == 10
    assert (tmp_path / "dv-fsr_r0.05_fedavg_seed0" / "results.json").exists()
    written = (tmp_path / "sweep.json").read_text() + (tmp_path / "spec.json").read_text()
    assert '"ratio"' not in written and '"ratios"' not in written and '"malicious_ratios"' in written
    assert resumed["scenarios"] == first["scenarios"] and resumed["cells"] == first["cells"]
    as_json = json.loads(json.dumps(first))
    assert loaded["scenarios"] == as_json["scenarios"] and loaded["cells"] == as_json["cells"]
    assert [g["malicious_ratio"] for g in matrices(old_summary)] == [0.05, 0.1]
    assert matrices(old_summary) == matrices(as_json)
    assert {"exposure_vs_ratio.png", "matrix_r0.05.png", "matrix_r0.1.png", "epochs.png"} <= plots
    with pytest.raises(SweepError, match="'ratio' and 'malicious_ratio' both given"):
        matrices({**first, "scenarios": {n: {**s, "ratio": 0.3} for n, s in first["scenarios"].items()}})


def _bundle(folder: Path, hr: list[float], er: list[float], mal: int = 0) -> None:
    folder.mkdir(parents=True)
    epochs = [{"epoch": i + 1, "hr@10": h, "ndcg@10": h / 2, "er@5": e / 2, "er@10": e, "er@20": e, "er@30": e,
               "malicious_updates": mal, "malicious_kept": mal // 2} for i, (h, e) in enumerate(zip(hr, er, strict=True))]
    (folder / "results.json").write_text(json.dumps({"epochs": epochs, "summary": {"state": "done"}}))


def test_summary_is_the_mean_and_spread_over_seeds(tmp_path):
    # Prepare: two seeds of one scenario with known finals
    spec = SweepSpec(base=TINY, attacks=("dv-fsr",), malicious_ratios=(0.1,), seeds=(0, 1), engine="inprocess")
    cells = spec.cells()
    _bundle(tmp_path / cells[0].folder, [0.1, 0.2], [0.3, 0.5], mal=4)
    _bundle(tmp_path / cells[1].folder, [0.1, 0.4], [0.3, 0.9], mal=4)
    # Execute
    s = summarise(spec, cells, tmp_path)
    # Assert
    row = s["scenarios"][cells[0].scenario]
    assert row["hr@10"] == (pytest.approx(0.3), pytest.approx(statistics.stdev([0.2, 0.4])))
    assert row["er@10"][0] == pytest.approx(0.7) and row["seeds"] == [0, 1]
    assert row["curve"]["er@10"][0] == (pytest.approx(0.3), 0.0)
    assert (row["malicious_sent"], row["malicious_kept"]) == (16, 8)
    assert "0.3000 ± 0.1414" in format_table(s)
    assert cell_done(tmp_path / cells[0].folder, 2) and not cell_done(tmp_path / cells[0].folder, 3)


def test_a_cell_still_running_is_marked_unfinished(tmp_path):
    # Prepare: one seed finished (2 epochs), the other stopped after its first
    spec = SweepSpec(base=TINY, attacks=("dv-fsr",), malicious_ratios=(0.1,), seeds=(0, 1), engine="inprocess")
    cells = spec.cells()
    _bundle(tmp_path / cells[0].folder, [0.1, 0.2], [0.3, 0.5])
    _bundle(tmp_path / cells[1].folder, [0.1], [0.3])
    # Execute
    s = summarise(spec, cells, tmp_path)
    # Assert
    assert s["scenarios"][cells[0].scenario]["unfinished"] == "at epoch 1 of 2"
    assert "(unfinished: at epoch 1 of 2)" in format_table(s)


def test_attack_by_defense_heat_maps_one_per_malicious_ratio(tmp_path):
    # Prepare: none/dv-fsr/eb x fedavg/median at two ratios, one seed, hand-made finals
    from cli.sweep import matrices, plot_matrix

    spec = SweepSpec(base=TINY, attacks=("none", "dv-fsr", "eb"), defenses=("fedavg", "median"),
                     malicious_ratios=(0.05, 0.1), engine="inprocess")
    for i, c in enumerate(spec.cells()):
        _bundle(tmp_path / c.folder, [0.1, 0.3], [0.0, i / 10])
    summary = summarise(spec, spec.cells(), tmp_path)
    # Execute
    grids = matrices(summary)
    # Assert: a grid per ratio, with the no-attack row in each
    assert [g["malicious_ratio"] for g in grids] == [0.05, 0.1]
    assert grids[0]["attacks"] == ["none", "dv-fsr", "eb"] and grids[0]["defenses"] == ["fedavg", "median"]
    assert len(grids[1]["cells"]) == 6 and grids[1]["cells"][("none", "median")]["malicious_ratio"] == 0.0
    assert plot_matrix(grids[0], "t", tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    one = SweepSpec(base=TINY, attacks=("dv-fsr",), defenses=("fedavg", "median"), engine="inprocess")
    assert matrices(summarise(one, one.cells(), tmp_path)) == []  # one attack: no grid
    assert PRESETS["matrix"]["attacks"][0] == "none" and spec_from(_args("matrix")).cells()


def test_a_tiny_sweep_runs_and_an_interrupted_one_resumes(tmp_path):
    # Prepare: two cells, run in this process
    spec = SweepSpec(base=TINY, attacks=("none", "dv-fsr"), malicious_ratios=(0.1,), seeds=(0,),
                     engine="inprocess")
    lines: list[str] = []
    # Execute: run, lose one cell's results (as an interrupted sweep would), run again
    first = run_sweep(spec, tmp_path, jobs=2, cores=2, say=lines.append, runner=inprocess_cell)
    lost = spec.cells()[1]
    (tmp_path / lost.folder / "results.json").unlink()
    again: list[str] = []
    second = run_sweep(spec, tmp_path, jobs=1, cores=2, say=again.append, runner=inprocess_cell)
    # Assert: both finished; the second run kept the finished cell and ran only the lost one
    assert not first["failed"] and not second["failed"] and len(second["scenarios"]) == 2
    assert sum("done before (kept)" in ln for ln in again) == 1 and any(lost.folder in ln and "ER@10" in ln
                                                                       for ln in again)
    assert "[sweep 2/2]" in again[-1] and "all cells done" in again[-1]
    assert (tmp_path / "sweep.md").read_text().count("| attack ") == 2
    assert (tmp_path / "epochs.png").read_bytes()[:4] == b"\x89PNG"
    dv = second["scenarios"][lost.scenario]
    assert dv["malicious_sent"] == 2 * 3  # 3 malicious clients of 30 at 0.1, once per epoch


def test_a_cell_whose_runner_fails_is_reported_and_runs_again_next_time(tmp_path):
    # Prepare: a runner that writes a cell's results (hand-made) unless told to fail it
    spec = SweepSpec(base=TINY, attacks=("none", "dv-fsr"), malicious_ratios=(0.1,), seeds=(0,),
                     engine="inprocess")
    bad = spec.cells()[1]
    ran: list[str] = []

    def runner(sp: SweepSpec, cell: Cell, folder: Path, threads: int, fail: bool = True) -> int:
        assert sp is spec and folder == tmp_path / cell.folder and folder.is_dir() and threads == 2
        ran.append(cell.folder)
        if fail and cell == bad:
            (folder / "cell.log").write_text("boom")
            return 3
        folder.rmdir()  # _bundle makes it
        _bundle(folder, [0.1, 0.2], [0.3, 0.5])
        return 0

    # Execute: a first sweep, then the same again with a runner that succeeds
    lines: list[str] = []
    first = run_sweep(spec, tmp_path, cores=2, say=lines.append, runner=runner)
    second = run_sweep(spec, tmp_path, cores=2, say=lambda _ln: None,
                       runner=lambda *a: runner(*a, fail=False))
    # Assert: the failed cell is named (its exit status, its log) and the only one run again
    assert first["failed"] == [bad.folder] and list(first["scenarios"]) == [spec.cells()[0].scenario]
    assert any(f"{bad.folder}: FAILED (exit 3; see {tmp_path / bad.folder / 'cell.log'})" in ln for ln in lines)
    assert ran == [c.folder for c in spec.cells()] + [bad.folder]
    assert not second["failed"] and len(second["scenarios"]) == 2


def test_adv_train_under_the_no_op_switch_is_the_no_defense_cell():
    # Prepare: adv_train and no defense, under the reference switches (advtrain_noop) and without
    scen = tuple({"name": f"{d} {c}", "attack": "dv-fsr", "malicious_ratio": 0.1, "defense": d, "compat": c}
                 for c in ("reference", "off") for d in ("fedavg", "adv-train"))
    # Execute
    cells = {c.scenario: c for c in SweepSpec(base=TINY, scenarios=scen, seeds=(0,), engine="inprocess").cells()}
    # Assert: four scenarios; the no-op adv_train shares the no-defense folder, the real one does not
    assert len(cells) == 4
    assert cells["adv-train reference"].folder == cells["fedavg reference"].folder
    assert cells["adv-train off"].folder != cells["fedavg off"].folder
    assert cells["adv-train reference"].overrides()["defense"] == "adv-train"  # the row still says what it is


def test_a_no_op_adv_train_cell_runs_once_and_equals_its_own_run(tmp_path):
    # Prepare: the alias alone, then the cell it stands for, both sweeps in one folder
    base = {**TINY, "compat": "reference"}
    alias = SweepSpec(base=base, scenarios=({"name": "adv", "attack": "dv-fsr", "malicious_ratio": 0.1,
                                             "defense": "adv-train"},), engine="inprocess")
    plain = SweepSpec(base=base, scenarios=({"name": "none", "attack": "dv-fsr", "malicious_ratio": 0.1},),
                      engine="inprocess")
    real = SweepSpec(base=base, scenarios=({"name": "adv", "attack": "dv-fsr", "malicious_ratio": 0.1,
                                            "defense": "adv-train", "compat": "reference,!advtrain_noop"},),
                     engine="inprocess")
    # Execute: the alias runs (as the plain cell); the plain sweep then finds it done
    first = run_sweep(alias, tmp_path, cores=1, say=lambda _ln: None, runner=inprocess_cell)
    lines: list[str] = []
    second = run_sweep(plain, tmp_path, cores=1, say=lines.append, runner=inprocess_cell)
    (tmp_path / "real").mkdir()
    third = run_sweep(real, tmp_path / "real", cores=1, say=lambda _ln: None, runner=inprocess_cell)
    # Assert: one run, kept; its config is the plain cell's; the numbers are those of the run as
    # configured with adv_train (the switch turns it into the same run), and a real adv_train differs
    cell = plain.cells()[0]
    assert sum("done before (kept)" in ln for ln in lines) == 1
    assert not json.loads((tmp_path / cell.folder / "config.json").read_text())["adv_train"]
    a, b = first["scenarios"]["adv"], second["scenarios"]["none"]
    assert [a[m] for m in ("hr@10", "er@10")] == [b[m] for m in ("hr@10", "er@10")]
    direct = _sim(tmp_path / "direct", {**base, "attack": "dv-fsr", "malicious_ratio": 0.1, "defense": "adv-train"})
    assert direct["epochs"][-1]["hr@10"] == a["hr@10"][0] and direct["epochs"][-1]["er@10"] == a["er@10"][0]
    assert third["scenarios"]["adv"]["hr@10"] != a["hr@10"] or third["scenarios"]["adv"]["er@10"] != a["er@10"]


def _sim(out: Path, keys: dict) -> dict:
    """``fedseq sim`` of ``keys`` (a config file) in ``out``, in this process: its results."""
    from cli.sim import run_inprocess
    from fedseq.config import build_config

    out.mkdir(parents=True)
    (out / "config.json").write_text(build_config(None, keys, environ={}).to_json())
    run_inprocess(build_config(str(out / "config.json"), {}, environ={}), out, progress=lambda _line: None)
    return json.loads((out / "results.json").read_text())


def _untimed(results: dict) -> dict:
    """A results bundle without its wall-clock fields (``seconds``, ``*_seconds``)."""
    return {**results, "epochs": [{k: v for k, v in e.items() if k != "seconds" and not k.endswith("_seconds")}
                                  for e in results["epochs"]]}


@pytest.mark.slow
def test_the_default_runner_runs_each_cell_as_a_process_like_the_in_process_runner(tmp_path):
    # Prepare: a tiny sweep of two cells, once with the default runner (a `fedseq sim` process a
    # cell), once with the in-process runner
    spec = SweepSpec(base=TINY, attacks=("none", "dv-fsr"), malicious_ratios=(0.1,), seeds=(0,),
                     engine="inprocess")
    # Execute
    lines: list[str] = []
    procs = run_sweep(spec, tmp_path / "procs", jobs=2, cores=2, say=lines.append)
    here = run_sweep(spec, tmp_path / "here", jobs=2, cores=2, say=lambda _ln: None, runner=inprocess_cell)
    # Assert: the default is the process runner; both ran every cell, with the same config files,
    # results (but the times) and table
    assert inspect.signature(run_sweep).parameters["runner"].default is subprocess_cell
    assert not procs["failed"] and not here["failed"] and "all cells done" in lines[-1]
    for c in spec.cells():
        a, b = tmp_path / "procs" / c.folder, tmp_path / "here" / c.folder
        assert "results:" in (a / "cell.log").read_text()  # the `fedseq sim` process's last line
        assert (a / "config.json").read_text() == (b / "config.json").read_text()
        assert _untimed(json.loads((a / "results.json").read_text())) == _untimed(
            json.loads((b / "results.json").read_text()))
    assert (tmp_path / "procs" / "sweep.md").read_text() == (tmp_path / "here" / "sweep.md").read_text()


def test_cell_folder_names_are_safe_and_readable():
    c = Cell("dv-fsr", "norm-clip:bound=1.0,inner=rfa", 0.01, 3, "bert4rec", "sparse-fp16")
    assert c.folder == "dv-fsr_r0.01_norm-clip-bound1.0-innerrfa_bert4rec_sparse-fp16_seed3"
    assert "/" not in c.folder and c.scenario.startswith("attack dv-fsr 0.01, defense norm-clip")


@pytest.mark.parametrize("engine,cores,threads,procs", [("inprocess", 2, 1, 2), ("inprocess", 1, 1, 1),
                                                        ("services", 2, 2, 1)])
def test_a_cell_gets_its_cores_as_compute_processes_in_process_and_threads_in_services(tmp_path, engine, cores,
                                                                                        threads, procs):
    # Prepare
    spec = SweepSpec(base=TINY, attacks=("none",), engine=engine)
    cell = spec.cells()[0]

    # Execute
    cmd = cell_command(spec, cell, tmp_path, cores)

    # Assert: the cell's config file says how its cores are used
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cmd[cmd.index("--config") + 1] == str(tmp_path / "config.json")
    assert (cfg["threads"], cfg["procs"]) == (threads, procs)
