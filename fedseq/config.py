"""Experiment configuration: one frozen dataclass, read from a JSON/TOML file, ``FEDSEQ_*``
environment variables and CLI flags (in that order of precedence, flags last), validated with a
clear message for anything missing or invalid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .codec_names import CODEC_NAMES
from .data.summary import TARGET_PRESETS
from .device import check_name as check_device
from .local import AdvTrainConfig, LocalConfig, LocalDP, PieckReg


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Compat:
    """Reference-compatibility switches: where the DV-FSR public code departs from the textbook
    (README "Reference-compatibility switches" lists each). All off by default; ``Compat.reference()`` turns every one on."""

    eval_dropout: bool = False  # evaluate with dropout on (the model stays in train mode)
    eval_mask_token: bool = False  # SASRec scores at an appended, never-trained mask token
    shared_neg_seed: bool = False  # every client's negative sampler seeded with one constant
    neg_from_vocab: bool = False  # SASRec negatives drawn from 1..M+1 (mask token included)
    attack_leak: bool = False  # DV-FSR: the substitution's CE gradient leaks into the upload
    attack_eval_mode: bool = False  # DV-FSR: attack-loss forwards run without dropout
    substitution_fill: bool = False  # DV-FSR: items failing tau still fill the top-T tries (score 0, by id)
    attacker_draw: bool = False  # malicious clients copy the users the public code draws (Python random)
    cfsr_label_index: bool = False  # C-FSR: contrastive label on index 1 (first negative)
    advtrain_noop: bool = False  # adv_train applies no update (the public code's behaviour)
    literal_step: bool = False  # w -= lr * rule output at every scale (mean-scale rules step ~K times less)

    @classmethod
    def reference(cls) -> Compat:
        return cls(**{f.name: True for f in fields(cls)})

    @classmethod
    def parse(cls, text: str) -> Compat:
        """``"off"``, ``"reference"``/``"on"``, or a comma list of switch names, where
        ``reference`` stands for all of them and ``!name`` takes one away (``"reference,!literal_step"``:
        every switch but the paper's literal step)."""
        text = text.strip()
        if text in ("", "off", "none"):
            return cls()
        if text in ("reference", "on", "all"):
            return cls.reference()
        names = {f.name for f in fields(cls)}
        chosen: set[str] = set()
        removed: set[str] = set()
        for t in (t.strip() for t in text.split(",") if t.strip()):
            if t in ("reference", "on", "all"):
                chosen |= set(cls.reference().enabled())
                continue
            drop = t.startswith("!")
            name = t.lstrip("!").replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown compat switch {name!r}; known: {sorted(names)} (or 'reference', 'off'; "
                                  f"'!name' removes one)")
            (removed if drop else chosen).add(name)
        return cls(**{c: True for c in chosen - removed})

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


MODES = ("paper", "fedavg")
COMPRESSIONS = ("none", "gzip")  # gRPC message compression (fedseq.ledger computes its sizes)


def _typed_opts(what: str, opts: tuple[tuple[str, str], ...], known: Mapping[str, type]) -> dict[str, Any]:
    """String options of a client-side defense as typed values; unknown keys and bad values are
    :class:`ConfigError`s naming ``what``, the key and the options."""
    kw: dict[str, Any] = {}
    for k, v in opts:
        if k not in known:
            raise ConfigError(f"{what} has no option {k!r}; options: {sorted(known)}")
        try:
            kw[k] = known[k](v)
        except ValueError:
            raise ConfigError(f"{what} option {k}={v!r} is not a valid {known[k].__name__}") from None
    return kw


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment (the paper's settings are the defaults)."""

    run_id: str = ""
    dataset: str = "synthetic"
    data_root: str | None = None
    model: str = "sasrec"
    mode: str = "paper"  # "paper": FedSGD gradients, every user once per epoch; "fedavg": local epochs
    epochs: int = 30
    clients_per_round: int = 256
    fraction: float = 0.0  # fedavg mode: share of users sampled per round (0 = paper-mode epochs)
    lr: float = 0.001
    lr_decay: float = 0.5
    lr_decay_every: int = 5
    # the defense: an aggregation rule's registry name (server/aggregation; the paper's "common" is
    # the fedavg sum), "adv-train" (client-side adversarial training over the sum; read below) or
    # "pieck-reg" (PIECK's client-side regularisers over the sum, fedseq/training.py PieckReg)
    defense: str = "fedavg"
    defense_opts: tuple[tuple[str, str], ...] = ()
    local_epochs: int = 1
    local_lr: float = 0.01
    optimizer: str = "sgd"
    dropout: bool = True
    eval_every: int = 1
    protocol: str = "sampled"
    num_negatives: int = 1000
    targets: tuple[int, ...] = ()  # empty: the items of target_preset
    target_preset: str = "least-popular"  # least-popular | popular | mid-tail | several (fedseq.data.preset_targets)
    seed: int = 0
    compat: Compat = field(default_factory=Compat)
    adv_train: bool = False  # client-side adversarial training (Yue et al. 2022); `--defense adv-train`
    adv_train_opts: tuple[tuple[str, str], ...] = ()  # steps, step_size, switch_prob, users_per_round
    pieck_reg: bool = False  # PIECK's client-side regularisers (Zhang et al., ICDE 2024); `--defense pieck-reg`
    pieck_reg_opts: tuple[tuple[str, str], ...] = ()  # size, ipe_mu, uea_mu
    # local differential privacy on every benign update (fedseq/local.py LocalDP); `--defense
    # ldp:clip=C,noise=Z[,inner=RULE]`, the server's rule then being `inner` (default fedavg)
    ldp: bool = False
    ldp_opts: tuple[tuple[str, str], ...] = ()  # clip, noise
    attack: str = "none"
    malicious_ratio: float = 0.001  # the paper's main setting; used only when attack != "none"
    attack_opts: tuple[tuple[str, str], ...] = ()
    codec: str = "sparse-fp32"  # lossless: embedding tables as touched rows only, the rest dense
    threads: int = 1  # torch threads per process (see docs: oversubscription on small machines)
    # fedseq sim only: processes computing the benign updates (fedseq/compute_pool.py), each with
    # one torch thread; 1 = in the runner's own process with `threads` threads
    procs: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N (fedseq/device.py); a worker's own --device wins
    compression: str = "none"  # gRPC message compression of the run's calls: "none" | "gzip"
    model_delta: bool = False  # workers holding version v-1 download v as a row patch (fedseq/delta.py)
    # scale knobs (0 = off, the defaults, which change nothing): evaluate a fixed seeded sample of
    # this many benign users instead of all of them; stop after this many rounds of the plan
    eval_users: int = 0
    max_rounds: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(not self.run_id or re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", self.run_id) is not None,
             f"run_id {self.run_id!r} must be 1-128 letters, digits, '-', '_' or '.'")
        need(self.model in ("sasrec", "bert4rec"), f"model must be 'sasrec' or 'bert4rec', got {self.model!r}")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.clients_per_round >= 1, f"clients_per_round must be >= 1, got {self.clients_per_round}")
        need(0.0 <= self.fraction <= 1.0, f"fraction must be in [0, 1], got {self.fraction}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        need(self.lr_decay_every >= 1, "lr_decay_every must be >= 1")
        need(self.eval_every >= 1, "eval_every must be >= 1")
        need(self.eval_users >= 0, f"eval_users must be >= 0 (0: every benign user), got {self.eval_users}")
        need(self.max_rounds >= 0, f"max_rounds must be >= 0 (0: every round of the plan), got {self.max_rounds}")
        need(self.protocol in ("sampled", "full"), f"protocol must be 'sampled' or 'full', got {self.protocol!r}")
        need(self.num_negatives >= 1, "num_negatives must be >= 1")
        need(0.0 <= self.malicious_ratio < 1.0, f"malicious_ratio must be in [0, 1), got {self.malicious_ratio}")
        need(self.threads >= 0, "threads must be >= 0 (0 = torch's default)")
        need(self.procs >= 1, f"procs must be >= 1, got {self.procs}")
        try:
            check_device(self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        need(self.codec in CODEC_NAMES, f"codec must be one of {CODEC_NAMES}, got {self.codec!r}")
        need(self.compression in COMPRESSIONS,
             f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        need(all(int(t) >= 1 for t in self.targets), f"target items must be >= 1, got {self.targets}")
        need(self.target_preset in TARGET_PRESETS,
             f"target_preset must be one of {TARGET_PRESETS}, got {self.target_preset!r}")
        try:
            self.local()
            self.adv_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def local(self) -> LocalConfig:
        return LocalConfig(
            mode=self.mode,
            dropout=self.dropout,
            local_epochs=self.local_epochs,
            local_lr=self.local_lr,
            optimizer=self.optimizer,
            shared_neg_seed=self.compat.shared_neg_seed,
            neg_from_vocab=self.compat.neg_from_vocab,
            device=self.device,
            pieck=self.pieck_config() if self.pieck_reg else None,
            ldp=self.ldp_config() if self.ldp else None,
        )

    def ldp_config(self) -> LocalDP:
        """Local differential privacy (``fedseq.local.LocalDP``) from ``ldp_opts``, validated."""
        kw = _typed_opts("ldp", self.ldp_opts, {"clip": float, "noise": float})
        missing = [k for k in ("clip", "noise") if k not in kw]
        if missing:
            raise ConfigError(f"ldp needs option(s) {', '.join(missing)}, e.g. --defense ldp:clip=1.0,noise=1.0")
        if self.defense.split(":", 1)[0] in ("dp-fixed", "dp-adaptive", "ldp"):
            raise ConfigError(f"ldp's server rule cannot be {self.defense.split(':', 1)[0]!r}: one privacy mechanism a run")
        try:
            return LocalDP(seed=self.seed, **kw)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def pieck_config(self) -> PieckReg:
        """PIECK's client-side regularisers (``fedseq.training.PieckReg``) from ``pieck_reg_opts``, validated."""
        kw = _typed_opts("pieck-reg", self.pieck_reg_opts, {"size": int, "ipe_mu": float, "uea_mu": float})
        try:
            return PieckReg(init_seed=self.seed, **kw)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def adv_config(self) -> AdvTrainConfig:
        """The adversarial-training settings (``fedseq.local.AdvTrainConfig``), validated."""
        known = {"steps": int, "step_size": float, "switch_prob": float, "users_per_round": int}
        return AdvTrainConfig(**_typed_opts("adv-train", self.adv_train_opts, known))

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``: multiplied by ``lr_decay`` every ``lr_decay_every`` epochs."""
        return self.lr * self.lr_decay ** (epoch // self.lr_decay_every)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["defense_opts"] = dict(self.defense_opts)
        d["attack_opts"] = dict(self.attack_opts)
        d["adv_train_opts"] = dict(self.adv_train_opts)
        d["pieck_reg_opts"] = dict(self.pieck_reg_opts)
        d["ldp_opts"] = dict(self.ldp_opts)
        d["targets"] = list(self.targets)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        known = {f.name: f for f in fields(cls)}
        data = {LEGACY_KEYS.get(k, k): v for k, v in data.items()}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        kw: dict[str, Any] = {}
        for key, value in data.items():
            kw[key] = _coerce(key, value)
        if kw.get("defense") == "adv-train":  # a client-side defense on top of the paper's sum
            kw["defense"], kw["adv_train"] = "fedavg", True
            if kw.get("defense_opts"):  # --defense-opt goes to adv-train then
                kw["adv_train_opts"] = kw.pop("defense_opts")
        if kw.get("defense") == "pieck-reg":  # PIECK's client-side defense on top of the paper's sum
            kw["defense"], kw["pieck_reg"] = "fedavg", True
            if kw.get("defense_opts"):
                kw["pieck_reg_opts"] = kw.pop("defense_opts")
        if str(kw.get("defense", "")).split(":", 1)[0] == "ldp":
            kw.update(_ldp_defense(str(kw["defense"]), kw.pop("defense_opts", ())))
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a JSON or TOML file into a dict of config keys (validated later, with the rest)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        try:
            data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold an object/table of keys")
        return data


LEGACY_KEYS = {"aggregation": "defense", "aggregation_opts": "defense_opts"}  # results written before 2026-11-29


def _ldp_defense(spec: str, opts: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``--defense ldp:clip=C,noise=Z[,inner=RULE][,inner.K=V]`` (options also from
    ``--defense-opt``) as config keys: the client-side ``ldp``/``ldp_opts`` and the server's rule
    ``defense``/``defense_opts`` (``inner``, default fedavg, and its ``inner.`` options)."""
    items = [x.strip() for x in spec.partition(":")[2].split(",") if x.strip()]
    bad = [x for x in items if "=" not in x]
    if bad:
        raise ConfigError(f"defense {spec!r}: option {bad[0]!r} must look like key=value")
    merged = dict(parse_opts(items))
    merged.update(dict(opts))
    inner = merged.pop("inner", "fedavg")
    rule_opts = tuple(sorted((k[len("inner."):], v) for k, v in merged.items() if k.startswith("inner.")))
    own = tuple(sorted((k, v) for k, v in merged.items() if not k.startswith("inner.")))
    return {"defense": inner, "defense_opts": rule_opts, "ldp": True, "ldp_opts": own}


def _coerce(key: str, value: Any) -> Any:
    """Turn file/env/CLI values (strings, lists, dicts) into the field's type."""
    try:
        if key == "compat":
            if isinstance(value, Compat):
                return value
            if isinstance(value, Mapping):
                return Compat(**{k.replace("-", "_"): bool(v) for k, v in value.items()})
            return Compat.parse(str(value))
        if key in ("defense_opts", "attack_opts", "adv_train_opts", "pieck_reg_opts", "ldp_opts"):
            if isinstance(value, Mapping):
                return tuple(sorted((str(k), str(v)) for k, v in value.items()))
            if isinstance(value, str):
                return parse_opts(value.split(",") if value else [])
            if all(isinstance(x, str) for x in value):  # ["k=v", ...] (a TOML/JSON list)
                return parse_opts(list(value))
            return tuple(sorted((str(k), str(v)) for k, v in value))  # [(k, v), ...]
        if key == "targets":
            if isinstance(value, str):
                return tuple(int(x) for x in value.split(",") if x.strip())
            return tuple(int(x) for x in value)
        typ = {f.name: f.type for f in fields(ExperimentConfig)}[key]
        if isinstance(value, str):
            if typ == "int":
                return int(value)
            if typ == "float":
                return float(value)
            if typ == "bool":
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return low in ("1", "true", "yes")
            if typ == "str | None":
                return value or None
        return value
    except ConfigError:
        raise  # already names the key/switch and the fix (a ConfigError is also a ValueError)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: invalid value {value!r}") from None


def parse_opts(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``["k=v", ...]`` -> sorted ``((k, v), ...)`` with a clear error for a malformed item."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return tuple(sorted(out.items()))


def env_overrides(prefix: str = "FEDSEQ_", environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Config keys given as ``FEDSEQ_<KEY>`` environment variables (e.g. ``FEDSEQ_EPOCHS=5``)."""
    environ = os.environ if environ is None else environ
    known = {f.name for f in fields(ExperimentConfig)}
    out = {}
    for k, v in environ.items():
        if k.startswith(prefix):
            key = k[len(prefix) :].lower()
            if key in known:
                out[key] = v
    return out


def build_config(file: str | None, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ExperimentConfig:
    """File, then ``FEDSEQ_*`` env, then explicit overrides (CLI flags); validated once."""
    data: dict[str, Any] = {}
    if file:
        data.update(ExperimentConfig.from_file(file))
    data.update(env_overrides(environ=environ))
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ExperimentConfig.from_dict(data)
    if cfg.attack == "none" and "malicious_ratio" in data and cfg.malicious_ratio != 0.0:
        # said by the user (file, variable or flag), not the default: it has no effect, say so
        logging.getLogger(__name__).warning("malicious_ratio=%g is ignored: attack is 'none'", cfg.malicious_ratio)
    return cfg
