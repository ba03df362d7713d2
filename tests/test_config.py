"""Tests for experiment configuration (fedseq.config): precedence file < FEDSEQ_* env < overrides,
TOML and JSON files, validation with clear messages, compat switches, the learning-rate schedule
and the dict round trip.

Every test is Prepare / Execute / Assert.
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from fedseq.config import (
    Compat,
    ConfigError,
    ExperimentConfig,
    build_config,
    env_overrides,
    parse_opts,
)
from fedseq.training import LocalConfig

# ----------------------------------------------------------------------------- precedence


def test_precedence_file_then_env_then_overrides(tmp_path):
    # Prepare
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.5, "model": "bert4rec", "seed": 9}))
    env = {"FEDSEQ_EPOCHS": "7", "FEDSEQ_LR": "0.25", "FEDSEQ_NOT_A_KEY": "x", "OTHER_EPOCHS": "99"}

    # Execute
    cfg = build_config(str(path), {"epochs": 11, "seed": None}, environ=env)

    # Assert: override beats env beats file; None overrides are ignored; unknown env keys too
    assert cfg.epochs == 11
    assert cfg.lr == 0.25
    assert cfg.model == "bert4rec"
    assert cfg.seed == 9


def test_env_values_are_coerced_to_field_types():
    # Prepare
    env = {"FEDSEQ_DROPOUT": "no", "FEDSEQ_MALICIOUS_RATIO": "0.01", "FEDSEQ_TARGETS": "5,9",
           "FEDSEQ_COMPAT": "eval-dropout,shared_neg_seed", "FEDSEQ_DEFENSE_OPTS": "b=2,a=1",
           "FEDSEQ_DATA_ROOT": ""}

    # Execute
    cfg = build_config(None, {}, environ=env)

    # Assert
    assert cfg.dropout is False
    assert cfg.malicious_ratio == 0.01
    assert cfg.targets == (5, 9)
    assert cfg.compat == Compat(eval_dropout=True, shared_neg_seed=True)
    assert cfg.defense_opts == (("a", "1"), ("b", "2"))
    assert cfg.data_root is None
    assert env_overrides(environ={"FEDSEQ_SEED": "4", "FEDSEQ_BOGUS": "1"}) == {"seed": "4"}


def test_toml_file_with_a_compat_table(tmp_path):
    # Prepare
    path = tmp_path / "exp.toml"
    path.write_text(
        'model = "sasrec"\nepochs = 4\nlr = 0.002\ntargets = [3, 8]\n'
        "[compat]\neval_mask_token = true\nneg-from-vocab = true\n"
        '[defense_opts]\nreduce = "mean"\n'
    )

    # Execute
    cfg = build_config(str(path), {}, environ={})

    # Assert
    assert (cfg.epochs, cfg.lr, cfg.targets) == (4, 0.002, (3, 8))
    assert cfg.compat.enabled() == ["eval_mask_token", "neg_from_vocab"]
    assert cfg.defense_opts == (("reduce", "mean"),)
    assert cfg.local().neg_from_vocab is True and cfg.local().shared_neg_seed is False


@pytest.mark.parametrize("suffix,text,match", [
    (".json", "{not json", "not valid JSON"),
    (".toml", "epochs = = 3", "not valid TOML"),
    (".json", "[1, 2]", "must hold an object"),
])
def test_bad_files(tmp_path, suffix, text, match):
    path = tmp_path / f"exp{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        build_config(str(path), {}, environ={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(str(tmp_path / "nope.json"), {}, environ={})


# ----------------------------------------------------------------------------- validation


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['epochz'\]"):
        build_config(None, {"epochz": 3}, environ={})


@pytest.mark.parametrize("overrides,match", [
    ({"epochs": -1}, "epochs must be >= 1, got -1"),
    ({"epochs": "three"}, "config key 'epochs': invalid value 'three'"),
    ({"malicious_ratio": 1.0}, r"malicious_ratio must be in \[0, 1\), got 1.0"),
    ({"lr": 0}, "lr must be > 0"),
    ({"model": "gru4rec"}, "model must be 'sasrec' or 'bert4rec'"),
    ({"protocol": "loo"}, "protocol must be"),
    ({"fraction": 1.5}, "fraction must be in"),
    ({"dropout": "maybe"}, "config key 'dropout': invalid value 'maybe'"),
    ({"targets": "3,0"}, "target items must be >= 1"),
    ({"optimizer": "rmsprop"}, "optimizer must be 'sgd' or 'adam'"),
    ({"local_epochs": 0}, "local_epochs"),
    ({"defense_opts": "reduce"}, "option 'reduce' must look like key=value"),
])
def test_invalid_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(None, overrides, environ={})


def test_bad_compat_switch_names_the_switch_and_the_choices():
    # Execute
    with pytest.raises(ConfigError) as err:
        build_config(None, {}, environ={"FEDSEQ_COMPAT": "eval_dropout,leaky"})

    # Assert: the message names the bad switch and lists the known ones
    assert "leaky" in str(err.value)
    assert "eval_dropout" in str(err.value) and "reference" in str(err.value)


def test_compat_parse():
    # Execute / Assert
    ref = Compat.parse("reference")
    assert ref == Compat.reference() == Compat.parse("on") == Compat.parse("all")
    assert ref.enabled() == [f.name for f in fields(Compat)] and len(ref.enabled()) == 11
    assert Compat.parse("off") == Compat() == Compat.parse("") == Compat.parse(" none ")
    assert Compat.parse("attack-leak, cfsr_label_index").enabled() == ["attack_leak", "cfsr_label_index"]
    with pytest.raises(ConfigError, match="unknown compat switch"):
        Compat.parse("attack_leak,nope")
    but_one = Compat.parse("reference,!literal_step")
    assert but_one.enabled() == [n for n in ref.enabled() if n != "literal_step"]
    assert Compat.parse("attack_leak,!attack_leak") == Compat()
    with pytest.raises(ConfigError, match="'!name' removes one"):
        Compat.parse("reference,!nope")


def test_parse_opts():
    assert parse_opts(["k=v", " a = b=c "]) == (("a", "b=c"), ("k", "v"))
    with pytest.raises(ConfigError, match="key=value"):
        parse_opts(["novalue"])


# ----------------------------------------------------------------------------- schedule, local, round trip


def test_lr_schedule_halves_every_five_epochs():
    # Prepare
    cfg = ExperimentConfig(lr=0.001)

    # Execute
    lrs = [cfg.lr_at(e) for e in range(16)]

    # Assert
    assert lrs[:5] == [0.001] * 5
    assert lrs[5:10] == [0.0005] * 5
    assert lrs[10:15] == [0.00025] * 5
    assert lrs[15] == pytest.approx(0.000125)
    assert ExperimentConfig(lr=0.1, lr_decay=0.15, lr_decay_every=2).lr_at(5) == pytest.approx(0.1 * 0.15**2)


def test_local_config_follows_the_experiment():
    # Execute
    cfg = ExperimentConfig(mode="fedavg", local_epochs=3, local_lr=0.2, optimizer="adam", dropout=False,
                           compat=Compat.reference(), device="cpu")

    # Assert
    assert cfg.local() == LocalConfig(mode="fedavg", dropout=False, local_epochs=3, local_lr=0.2, optimizer="adam",
                                      shared_neg_seed=True, neg_from_vocab=True, device="cpu")


def test_to_dict_from_dict_round_trip():
    # Prepare
    cfg = build_config(None, {
        "run_id": "r1", "model": "bert4rec", "epochs": 2, "targets": [4, 2], "compat": "eval_dropout",
        "defense": "mixed-rfa", "defense_opts": {"lam": "0.3", "eps": "1e-5"},
        "attack_opts": ["n=100"], "malicious_ratio": 0.001, "data_root": "/tmp/x",
    }, environ={})

    # Execute
    d = cfg.to_dict()
    back = ExperimentConfig.from_dict(d)
    via_json = ExperimentConfig.from_dict(json.loads(cfg.to_json()))

    # Assert
    assert back == cfg and via_json == cfg
    assert d["compat"]["eval_dropout"] is True and d["defense_opts"] == {"eps": "1e-5", "lam": "0.3"}
    assert d["targets"] == [4, 2] and d["attack_opts"] == {"n": "100"}


def test_option_lists_as_strings_or_pairs():
    # Execute
    from_strings = build_config(None, {"attack_opts": ["n=100", "s=10"]}, environ={})
    from_pairs = build_config(None, {"attack_opts": [["s", 10], ["n", "100"]]}, environ={})

    # Assert: both forms give sorted (key, value) string pairs
    assert from_strings.attack_opts == from_pairs.attack_opts == (("n", "100"), ("s", "10"))
    with pytest.raises(ConfigError, match="config key 'attack_opts': invalid value"):
        build_config(None, {"attack_opts": [["n", "1", "extra"]]}, environ={})


def test_the_defense_has_one_name_and_old_results_still_load():
    # Prepare: a config dict as results.json held it before the key was renamed
    old = {"aggregation": "mixed-rfa", "aggregation_opts": {"lambda": "0.5"}}
    # Execute
    cfg = ExperimentConfig.from_dict(old)
    # Assert: read under the one name, written under it
    assert (cfg.defense, cfg.defense_opts) == ("mixed-rfa", (("lambda", "0.5"),))
    assert "aggregation" not in cfg.to_dict() and cfg.to_dict()["defense"] == "mixed-rfa"
    assert build_config(None, {}, environ={"FEDSEQ_DEFENSE": "krum"}).defense == "krum"


def test_a_malicious_ratio_given_without_an_attack_is_warned_about_and_the_default_is_not(caplog):
    # Prepare / Execute: the same configuration, with and without the ratio said
    with caplog.at_level("WARNING", logger="fedseq.config"):
        build_config(None, {"dataset": "synthetic"}, environ={})
        quiet = list(caplog.records)
        build_config(None, {"dataset": "synthetic", "malicious_ratio": 0.001}, environ={})
    # Assert: only the ratio the user set (here the default's value) is named as ignored
    assert quiet == []
    assert [r.getMessage() for r in caplog.records] == ["malicious_ratio=0.001 is ignored: attack is 'none'"]
