"""``fedseq reproduce`` (cli/reproduce.py): every suite is a valid sweep at the paper's settings,
shared cells run once, the page puts the paper's number beside fedseq's, and a real tiny suite
runs a few cells at a time and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.reproduce import PAPER_BASE, SUITES, VARIANTS, suite_spec
from fedseq.config import ConfigError, build_config

TINY_DATA = "synthetic:users=40,items=60,max_length=15"


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_is_a_valid_sweep_at_the_papers_settings(suite):
    # Execute
    spec = suite_spec(suite, [0, 1, 2])
    cells = spec.cells()  # validates every cell's config
    # Assert: paper base, three variants per paper cell, every seed
    assert spec.base == PAPER_BASE and spec.engine == "inprocess"
    assert len(cells) == len(SUITES[suite]["scenarios"]) * len(VARIANTS) * 3
    for c in cells:
        cfg = build_config(None, {**spec.base, **c.overrides(), "run_id": f"sweep-{c.folder}"[:100]}, environ={})
        assert cfg.epochs == 30 and cfg.dataset == "steam"  # and the folder makes a valid run id
        if c.name.endswith("[compat off]"):
            assert not cfg.compat.enabled()
        elif c.name.endswith("[full ranking]"):
            assert cfg.protocol == "full" and cfg.compat.attack_leak
        else:
            assert cfg.protocol == "sampled" and cfg.compat.attack_leak
    mixed = [c for c in cells if c.defense == "mixed-rfa"]
    for c in mixed:  # the engine's step, every other switch
        cfg = build_config(None, {**spec.base, **c.overrides()}, environ={})
        assert not cfg.compat.literal_step


def test_a_cell_two_suites_share_has_one_folder():
    # Prepare
    folders = {s: {c.name: c.folder for c in suite_spec(s, [0], variants=("reference",)).cells()}
               for s in ("table1", "table3", "table4", "figure2")}
    # Assert: SASRec under DV-FSR at 0.1% with the reference switches is one run
    shared = {folders["table1"]["SASRec DV-FSR 0.1%"], folders["table3"]["SASRec DV-FSR 0.1%"],
              folders["table4"]["SASRec DV-FSR 0.1%"], folders["figure2"]["SASRec DV-FSR 0.1%"]}
    assert len(shared) == 1
    assert folders["table4"]["SASRec DV-FSR 0.1% + mixed-RFA"] not in shared


def test_quick_only_targets_and_bad_input():
    # Execute
    quick = suite_spec("table4", [0], quick=True, only=["0.2%"], target_preset="popular", dataset=TINY_DATA)
    # Assert
    assert [c.name for c in quick.cells()] == ["SASRec DV-FSR 0.2%", "SASRec DV-FSR 0.2% + adv_train",
                                               "SASRec DV-FSR 0.2% + mixed-RFA"]
    assert quick.base["epochs"] == 3 and quick.base["target_preset"] == "popular"
    exact = suite_spec("table4", [0], only=["SASRec DV-FSR 0.2%"], variants=("reference",))
    assert [c.name for c in exact.cells()] == ["SASRec DV-FSR 0.2%"]  # a whole name is that scenario only
    with pytest.raises(ConfigError, match="no scenario"):
        suite_spec("table4", [0], only=["7%"])
    with pytest.raises(ConfigError, match="variants"):
        suite_spec("table4", [0], variants=("sideways",))
    with pytest.raises(ConfigError, match="presets"):
        suite_spec("table4", [0], target_preset="hot")


@pytest.mark.slow
def test_a_tiny_suite_runs_a_few_cells_at_a_time_and_writes_the_page(tmp_path, fedseq_cli, monkeypatch):
    """`fedseq reproduce` with its cells run in this process (the sweep's in-process runner; the
    default runner, a process a cell, is tests/test_sweep.py's: both runners give the same bundle)."""
    import functools

    from cli import reproduce
    from cli.sweep import inprocess_cell

    # Prepare: one paper cell of table 3 and its compat-off variant, one epoch on tiny data, the
    # cells run in process (the command's parser takes `reproduce.main` when it is built)
    monkeypatch.setattr(reproduce, "main", functools.partial(reproduce.main, runner=inprocess_cell))
    args = ["reproduce", "table3", "--dataset", TINY_DATA, "--epochs", "1", "--seeds", "0", "--only",
            "SASRec DV-FSR 0.1%", "--variants", "reference,off", "--out", str(tmp_path), "--page",
            str(tmp_path / "page.md")]
    # Execute: one cell, then the rest
    rc1, _, err1 = fedseq_cli(*args, "--max-cells", "1")
    first = json.loads((tmp_path / "table3" / "sweep.json").read_text())
    rc2, out2, err2 = fedseq_cli(*args)
    # Assert
    assert rc1 == 0 and len(first["scenarios"]) == 1 and "1 left for a later call" in err1
    assert rc2 == 0 and "(2 of 2 runs done)" in out2 and err2.count("done before (kept)") == 1
    page = (tmp_path / "page.md").read_text()
    row = next(ln for ln in page.splitlines() if ln.startswith("| SASRec DV-FSR 0.1% | 0 |"))
    assert "0.9169" not in row  # the paper has no numbers for this data set
    assert "[compat off]" in page and "| BERT4Rec" not in page  # --only: the page is of the cells asked for
    assert (tmp_path / "page" / "epochs.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cells").iterdir())) == 2


def test_the_page_puts_the_papers_number_beside_fedseqs(tmp_path):
    # Prepare: SASRec DV-FSR 0.1% (Steam) on two seeds, its compat-off variant on one
    from cli.reproduce import render
    from cli.sweep import summarise

    spec = suite_spec("table3", [0, 1], variants=("reference", "off"), only=["SASRec DV-FSR 0.1%"])
    ref, off = [c for c in spec.cells() if c.seed == 0]
    _bundle(tmp_path / ref.folder, [0.5, 0.9])
    _bundle(tmp_path / ref.folder.replace("seed0", "seed1"), [0.5, 0.7])
    _bundle(tmp_path / off.folder, [0.0, 0.1])
    summary = summarise(spec, spec.cells(), tmp_path)
    # Execute
    page = render("table3", spec, summary, tmp_path / "t3.md", [], "fedseq reproduce table3").read_text()
    # Assert: mean ± std over the seeds, the paper's 0.9169 and fedseq - paper
    row = next(ln for ln in page.splitlines()  # two of the 30 epochs in these bundles: marked
               if ln.startswith("| SASRec DV-FSR 0.1% (unfinished: at epoch 2 of 30) | 0,1 |"))
    assert "0.8000 ± 0.1414 (0.9169, -0.1169)" in row
    variants = next(ln for ln in page.splitlines() if ln.startswith("| SASRec DV-FSR 0.1% | 0.3000"))
    assert variants.endswith("| 0.3000 / 0.1000 / 0.1000 | not run |")  # reference (mean), off (seed 0), full
    assert "Not run yet (1): SASRec DV-FSR 0.1% [compat off]" not in page  # it ran, on one seed
    assert suite_spec("table3", [0], dataset="ml-1m", variants=("reference",)).scenarios[0]["paper"]["er@5"] == 0.9890


def test_figure2_plot_has_a_line_per_malicious_ratio(tmp_path):
    # Prepare: two malicious ratios' curves, hand-made
    from cli.reproduce import plot_figure2
    from cli.sweep import summarise

    spec = suite_spec("figure2", [0], variants=("reference",), only=["1%"])  # 1% and 0.1%
    for c, er in zip(spec.cells(), ([0.2, 0.9, 1.0], [0.0, 0.1, 0.5]), strict=True):
        _bundle(tmp_path / c.folder, er)
    summary = summarise(spec, spec.cells(), tmp_path)
    # Execute
    path = plot_figure2(summary, list(spec.scenarios), tmp_path / "f2.png")
    old = [{("ratio" if k == "malicious_ratio" else k): v for k, v in sc.items()} for sc in spec.scenarios]
    old_path = plot_figure2(summary, old, tmp_path / "f2-old.png")  # scenarios in the old key, too
    # Assert
    from cli.reproduce import first_epoch_at

    got = summary["scenarios"]["SASRec DV-FSR 1%"]
    assert path.read_bytes()[:4] == b"\x89PNG" and old_path.read_bytes()[:4] == b"\x89PNG"
    assert [sc["malicious_ratio"] for sc in spec.scenarios] == [0.01, 0.001] and "ratio" not in spec.scenarios[0]
    assert first_epoch_at(got["curve"]["er@5"], got["epochs"], 0.9) == "2"
    slow = summary["scenarios"]["SASRec DV-FSR 0.1%"]
    assert first_epoch_at(slow["curve"]["er@5"], slow["epochs"], 0.9) == "not within 3"


def _bundle(folder: Path, er5: list[float]) -> None:
    folder.mkdir(parents=True)
    epochs = [{"epoch": i + 1, "hr@10": 0.3, "ndcg@10": 0.15, "er@5": e, "er@10": e, "er@20": e, "er@30": e,
               "seconds": 1.0} for i, e in enumerate(er5)]
    (folder / "results.json").write_text(json.dumps({"epochs": epochs, "summary": {"state": "done"}}))
