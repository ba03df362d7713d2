"""What a ``fedseq sweep`` runs: the presets (``mission``, ``rules``, ``matrix``), the sweep spec
(base experiment keys and the axes, or explicit scenarios) from a preset, ``--spec FILE`` and the
flags, and its cells (one run each), every cell's config validated before anything runs.

The ``fedseq`` command's parser is built from this module (through cli/sweep.py), so importing it
loads no torch: the rule-spec parser and the engine's plan are imported where a sweep is built."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedseq.config import ConfigError, ExperimentConfig, build_config

from .flags import QUICKSTART

ENGINES = ("services", "inprocess")
CONFIG_KEYS = set(ExperimentConfig.__dataclass_fields__)
KS = (5, 10, 20, 30)
METRICS = ("hr@10", "ndcg@10", *(f"er@{k}" for k in KS))
CURVES = ("hr@10", "er@5", "er@10")  # per-epoch curves kept per scenario (Figure 2 plots ER@5)
# scenario keys that are not experiment keys: display name, the axes, and reference numbers
SCENARIO_KEYS = {"name", "attack", "defense", "malicious_ratio", "paper"}
# The sweep's former names of the malicious ratio (the run config's ``malicious_ratio``): a spec
# file, a scenario or a sweep.json row that still carries one is read under the new name (both
# at once is an error); nothing is written under the old names.
OLD_SPEC_KEYS = {"ratios": "malicious_ratios"}
OLD_SCENARIO_KEYS = {"ratio": "malicious_ratio"}

# The main job: the embedded synthetic generator, clean, under DV-FSR and under DV-FSR with
# mixed-RFA, through the services. 0.5% malicious clients (2 of 400): at 0.1% (one attacker) the
# attack's effect swings with the seed (ER@10 after 8 epochs 0.02-0.37 over seeds 0-4); at 1% (4)
# it saturates and overwhelms mixed-RFA's mean part (ER@10 0.96 / 0.86 with the defense, seeds 0-1).
# 5 interest clusters instead of the generator's 10: two attackers copy two users' histories, and
# with 10 clusters whether those cover the users' interests is luck (seed 4: ER@10 0.09); with 5
# both effects are clear on every seed 0-4 (docs/results/mission.md).
MISSION_RATIO = 0.005
MISSION_DATA = "synthetic:num_clusters=5"
PRESETS: dict[str, dict[str, Any]] = {
    "mission": {
        "title": "The mission: DV-FSR against no defense and mixed-RFA (synthetic data, services)",
        "base": {**QUICKSTART, "dataset": MISSION_DATA},
        "scenarios": [
            {"name": "clean", "attack": "none", "defense": "fedavg"},
            {"name": "dv-fsr", "attack": "dv-fsr", "defense": "fedavg", "malicious_ratio": MISSION_RATIO},
            {"name": "dv-fsr + mixed-rfa", "attack": "dv-fsr", "defense": "mixed-rfa",
             "malicious_ratio": MISSION_RATIO},
        ],
        "seeds": [0],
        "engine": "services",
    },
    "rules": {
        "title": "Every aggregation rule: clean accuracy and DV-FSR exposure (synthetic default, in process)",
        "base": dict(QUICKSTART),
        "attacks": ["none", "dv-fsr"],
        "defenses": ["fedavg", "rfa", "mixed-rfa", "median", "trimmed-mean:beta=0.1", "krum:m=8",
                     "norm-clip:bound=1.0", "foolsgold", "fltrust"],
        "malicious_ratios": [0.005],  # 2 malicious clients of 400
        "seeds": [0, 1, 2, 3, 4],
        "engine": "inprocess",
    },
}


# Every attack against every defense (dense, item-wise sparse, DP, client-side), one heat map per
# malicious ratio. On the mission's data by default (docs/results/matrix.md: seeds 0-2); the full
# Steam matrix is this preset with --set dataset=steam --set epochs=30 --set clients_per_round=256
# --set lr=0.001 --set num_negatives=1000 --malicious-ratios 0.001,0.01 --seeds 0-2 (about 1,000
# cells), the reduced one the two specs in docs/results/matrix/steam-*.toml.
PRESETS["matrix"] = {
    "title": "Every attack against every defense (heat maps per malicious ratio)",
    "base": {**QUICKSTART, "dataset": MISSION_DATA},
    "attacks": ["none", "dv-fsr", "c-fsr", "s-fsr", "eb", "a-ra", "ra", "alie", "min-max", "pieck", "fedrecattack",
                "spattack", "poisonfrs", "hidattack"],
    "defenses": ["fedavg", "mixed-rfa", "rfa", "median", "trimmed-mean:beta=0.1", "krum:m=8", "bulyan", "flame",
                 "dnc", "foolsgold", "sparse:median", "sparse:trimmed-mean", "sparse:krum", "pieck-reg",
                 # C about an update's median norm here (docs/results/dp.md, bench/bench_update_norms.py)
                 "dp-fixed:clip=1.0,noise=1.0", "dp-adaptive:noise=1.0", "ldp:clip=1.0,noise=0.01"],
    "malicious_ratios": [MISSION_RATIO],
    "seeds": [0, 1, 2],
    "engine": "inprocess",
}


class SweepError(ValueError):
    """A sweep specification that cannot run (message says which key and why)."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep."""

    attack: str
    defense: str  # rule name, with options as "name:k=v,k=v"
    malicious_ratio: float
    seed: int
    model: str | None = None
    codec: str | None = None
    name: str = ""  # a scenario's display name (presets); empty: built from the fields
    keys: tuple[tuple[str, Any], ...] = ()  # further experiment keys of the scenario (sorted), e.g. compat
    same_as: str = ""  # the folder of another cell whose run this one is, to the last bit (see SweepSpec.cells)

    @property
    def scenario(self) -> str:
        """What the cell measures, without its seed (the rows of the table)."""
        if self.name:
            return self.name
        parts = [f"attack {self.attack}" + (f" {self.malicious_ratio:g}" if self.attack != "none" else ""),
                 f"defense {self.defense}"]
        parts += [f"model {self.model}"] if self.model else []
        parts += [f"codec {self.codec}"] if self.codec else []
        parts += [f"{k} {v}" for k, v in self.keys]
        return ", ".join(parts)

    @property
    def folder(self) -> str:
        """The cell's folder name: from what it runs (not its display name), so two sweeps that
        share a cells folder (``fedseq reproduce``) run a shared cell once; a cell that is the
        same run as another (``same_as``) has that cell's folder."""
        if self.same_as:
            return self.same_as
        # "r<ratio>": the malicious ratio's folder tag, kept short as it was, so the cells of
        # sweeps run before the rename to malicious_ratio keep their folders and resume
        bits = [self.attack, f"r{self.malicious_ratio:g}" if self.attack != "none" else "",
                self.defense.replace(":", "-"),
                self.model or "", self.codec or ""]
        for k, v in self.keys:
            text = ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
            bit = f"{k.replace('_', '')}-{text}"
            bits.append(bit if len(bit) <= 32 else f"{k.replace('_', '')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}")
        bits.append(f"seed{self.seed}")
        name = "_".join(b for b in bits if b).replace("=", "").replace("!", "no")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name)  # also a valid run id

    def overrides(self) -> dict[str, Any]:
        """The experiment keys this cell sets on top of the sweep's base."""
        from server.aggregation import RuleConfigError, parse_rule_spec  # torch: not at import (module docstring)

        try:  # "name:k=v,k=v", and a wrapping rule's inner shorthand ("sparse:median")
            rule, opts = parse_rule_spec(self.defense)
        except RuleConfigError as e:
            raise ConfigError(str(e)) from None
        out: dict[str, Any] = {"attack": self.attack, "defense": rule, "seed": self.seed,
                               "defense_opts": [f"{k}={v}" for k, v in opts.items()]}
        if self.attack != "none":
            out["malicious_ratio"] = self.malicious_ratio
        if self.model:
            out["model"] = self.model
        if self.codec:
            out["codec"] = self.codec
        out.update(self.keys)
        return out


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"0-4"``, ``"0,3,7"`` or a list -> seeds."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise SweepError(f"seeds: {part!r} is not a seed or a range like 0-4") from None
    if not out:
        raise SweepError("seeds: none given")
    return out


def renamed(data: dict[str, Any], old_keys: dict[str, str], where: str) -> dict[str, Any]:
    """``data`` (a copy, in its order) with each old key of ``old_keys`` (old -> new name) under its
    new name; :class:`SweepError` when ``data`` gives both."""
    both = [f"{old!r} and {new!r}" for old, new in old_keys.items() if old in data and new in data]
    if both:
        raise SweepError(f"{where}: {', '.join(both)} both given; the first is the old name of the second: "
                         "give one")
    return {old_keys.get(k, k): v for k, v in data.items()}


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        # ';' between items when any has options ("fedavg;krum:m=8", whose commas are its options)
        # or when the user wrote it ("fedavg;median"); else ','
        return [v.strip() for v in value.split(";" if ";" in value or ":" in value else ",") if v.strip()]
    return [str(v) for v in value]


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs: the base experiment keys and the axes (or explicit scenarios)."""

    base: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = ("none", "dv-fsr")
    defenses: tuple[str, ...] = ("fedavg",)
    malicious_ratios: tuple[float, ...] = (MISSION_RATIO,)
    seeds: tuple[int, ...] = (0,)
    models: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()
    scenarios: tuple[dict[str, Any], ...] = ()  # explicit cells (name, attack, defense, malicious_ratio, ...)
    engine: str = "services"
    title: str = "fedseq sweep"

    def __post_init__(self) -> None:  # a scenario with the old "ratio" key holds it as malicious_ratio
        scenarios = tuple(renamed(sc, OLD_SCENARIO_KEYS, f"scenario {sc.get('name', sc)!r}")
                          for sc in self.scenarios)
        object.__setattr__(self, "scenarios", scenarios)

    def cells(self) -> list[Cell]:
        if self.engine not in ENGINES:
            raise SweepError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        out: list[Cell] = []
        combos: list[tuple[str, str, float, str, tuple[tuple[str, Any], ...]]] = []
        if self.scenarios:
            for sc in self.scenarios:
                extra = {k: v for k, v in sc.items() if k not in SCENARIO_KEYS}
                unknown = sorted(set(extra) - CONFIG_KEYS)
                if unknown:
                    raise SweepError(f"scenario {sc.get('name', sc)!r}: unknown key(s) {unknown}; a scenario holds "
                                     f"{sorted(SCENARIO_KEYS)} and experiment keys")
                combos.append((sc.get("attack", "none"), sc.get("defense", "fedavg"),
                               float(sc.get("malicious_ratio", 0.0)), sc.get("name", ""), tuple(sorted(extra.items()))))
        else:
            for a in self.attacks:
                for d in self.defenses:
                    for r in (self.malicious_ratios if a != "none" else (0.0,)):
                        combos.append((a, d, float(r), "", ()))
        for a, d, r, name, keys in combos:
            for m in self.models or (None,):
                for c in self.codecs or (None,):
                    for s in self.seeds:
                        out.append(Cell(a, d, r, s, m, c, name, keys))
        from cli.plugins import check_plugins  # torch: not at import (module docstring)
        from fedseq.engine import adv_train_on

        unique = list({(cell.folder, cell.scenario): cell for cell in out}.values())  # in order
        for i, cell in enumerate(unique):  # validate every cell's config before anything runs
            try:
                cfg = build_config(None, {**self.base, **cell.overrides()}, environ={})
                check_plugins(cfg)  # the rule's and attack's names and options: its run would fail on them
            except ConfigError as e:
                raise SweepError(f"cell {cell.folder}: {e}") from None
            if cfg.adv_train and not adv_train_on(cfg):
                # adv_train under the compat switch advtrain_noop (the public code's no-op) plans no
                # adversarial round: the run is the same cell without the defense, bit for bit
                # (tests/test_sweep.py), so it shares that cell's folder and runs once
                unique[i] = replace(cell, same_as=replace(cell, defense="fedavg").folder)
        return unique


def spec_from(args: argparse.Namespace) -> SweepSpec:
    """The sweep of ``fedseq sweep``: a preset or ``--spec FILE`` (JSON or TOML), then the flags.
    A spec file may still say ``ratios`` (and its scenarios ``ratio``), the old names of
    ``malicious_ratios`` (``malicious_ratio``)."""
    data: dict[str, Any] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise SweepError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
        data = json.loads(json.dumps(PRESETS[args.preset]))
    if args.spec:
        p = Path(args.spec)
        try:
            text = p.read_text()
            loaded = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise SweepError(f"cannot read sweep spec {p}: {e}") from None
        if not isinstance(loaded, dict):
            raise SweepError(f"sweep spec {p}: a table of sweep keys expected, got {type(loaded).__name__}")
        loaded = renamed(loaded, OLD_SPEC_KEYS, f"sweep spec {p}")
        if isinstance(loaded.get("scenarios"), list):
            loaded["scenarios"] = [renamed(sc, OLD_SCENARIO_KEYS, f"sweep spec {p}: scenario {sc.get('name', sc)!r}")
                                   for sc in loaded["scenarios"]]
        data.update(loaded)
    for key in ("attacks", "defenses", "models", "codecs"):
        if getattr(args, key):
            data[key] = _list(getattr(args, key))
            data.pop("scenarios", None)
    if args.malicious_ratios:
        try:
            data["malicious_ratios"] = [float(x) for x in args.malicious_ratios.split(",")]
        except ValueError:
            raise SweepError(f"--malicious-ratios: {args.malicious_ratios!r} is not a comma list of numbers") from None
        for s in data.get("scenarios", []):  # a preset's scenarios take the (first) malicious ratio given
            if s.get("attack", "none") != "none":
                s["malicious_ratio"] = data["malicious_ratios"][0]
    if args.seeds:
        data["seeds"] = parse_seeds(args.seeds)
    if args.engine:
        data["engine"] = args.engine
    base = dict(data.get("base") or dict(QUICKSTART))
    for k, v in (args.set or []):
        base[k] = v
    known = {f for f in SweepSpec.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {unknown}; keys: {sorted(known)}")
    return SweepSpec(base=base, attacks=tuple(_list(data.get("attacks", ["none", "dv-fsr"]))),
                     defenses=tuple(_list(data.get("defenses", ["fedavg"]))),
                     malicious_ratios=tuple(float(r) for r in data.get("malicious_ratios", [MISSION_RATIO])),
                     seeds=tuple(parse_seeds(data.get("seeds", [0]))), models=tuple(_list(data.get("models"))),
                     codecs=tuple(_list(data.get("codecs"))), scenarios=tuple(data.get("scenarios", [])),
                     engine=str(data.get("engine", "services")), title=str(data.get("title", "fedseq sweep")))
