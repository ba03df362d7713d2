"""``--track mlflow[:URI]``: finished runs logged to MLflow from their results bundles.

``fedseq run``, ``fedseq sim``, ``fedseq sweep`` and ``fedseq reproduce`` take ``--track`` (or
``FEDSEQ_TRACK``): ``mlflow`` logs to the folder ``./mlruns`` (MLflow's file store: no server),
``mlflow:URI`` to that store (a folder, ``file:PATH``, ``sqlite:///FILE``, ``http(s)://HOST``).
A run is logged once it ended, from its results bundle (``<out>/results.json``,
fedseq/results.py), so ``run`` and ``sim`` log alike: the config as parameters (nested keys
dotted), every numeric key of each epoch's record as a metric at ``step=epoch`` (``@`` spelled
``_at_``, which MLflow's names do not allow: ``hr_at_10``, ``er_at_5``, ``bytes_up``,
``rejected``), the summary's and the ledger totals' numbers as final metrics (``summary.*``,
``ledger.*``), tags (dataset, model, attack, defense, seed, fedseq's version and commit) and the
bundle's files as artifacts (results.json, config.json, rounds.jsonl, ledger.jsonl, cell.log, PNG
plots; never the TLS keys or the Redis data).

A sweep (and a ``reproduce`` suite, which is one) is a parent run with one child run per cell
(tag ``mlflow.parentRunId``, MLflow's nesting), logged by the sweep driver from each finished
cell's bundle, so a cell's own process logs nothing. A resumed sweep finds its parent (by its
folder and spec) and logs only the cells not logged before with the same results.

MLflow is imported only here and only when ``--track`` is given (its import takes seconds); a
missing MLflow or a store that cannot be opened is a configuration error (exit 2) before any run
starts."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from fedseq.config import ConfigError

TRACK_ENV = "FEDSEQ_TRACK"
EXPERIMENT = "fedseq"  # MLflow's experiment; MLFLOW_EXPERIMENT_NAME names another
DEFAULT_FOLDER = "mlruns"
INSTALL = "pip install 'fedseq[track]' (or pip install mlflow-skinny)"
ACCEPTED = ("mlflow (runs in ./mlruns), mlflow:URI (a folder, file:PATH, sqlite:///FILE, http(s)://HOST:PORT, "
            "databricks), none")
ARTIFACTS = ("results.json", "config.json", "rounds.jsonl", "ledger.jsonl", "cell.log")
SWEEP_ARTIFACTS = ("sweep.md", "sweep.json", "spec.json")
KEY_TAG, RESULTS_TAG, KIND_TAG, FOLDER_TAG = "fedseq.key", "fedseq.results_sha256", "fedseq.kind", "fedseq.folder"
PARENT_TAG = "mlflow.parentRunId"
CONFIG_TAGS = ("dataset", "model", "attack", "defense", "seed", "malicious_ratio", "codec", "run_id")
PARAM_LIMIT = 500  # MLflow's old limit on a parameter's value; the installed MLflow's own when it says


def add_track_flag(p: Any) -> None:
    """``--track`` on a command's parser (default ``FEDSEQ_TRACK``)."""
    p.add_argument("--track", default=os.environ.get(TRACK_ENV) or None, metavar="mlflow[:URI]",
                   help="log the run(s) to MLflow when they end: config as parameters, each epoch's metrics as "
                        "steps, the results bundle and plots as artifacts; a sweep as a parent run with a child "
                        "per cell. mlflow alone: the folder ./mlruns, no server (FEDSEQ_TRACK; needs "
                        f"{INSTALL})")


def parse_track(value: str | None) -> str | None:
    """The MLflow tracking URI ``--track value`` asks for (None: no tracking); a ConfigError that
    lists what is accepted for anything else. A folder (and a ``file:`` URI) becomes an absolute
    ``file:`` URI, so every process and a later call from another folder log to the same store."""
    if value is None or value.strip().lower() in ("", "none", "off"):
        return None
    tool, sep, uri = value.strip().partition(":")
    if tool != "mlflow" or (sep and not uri.strip()):
        raise ConfigError(f"--track {value!r} (or {TRACK_ENV}): accepted: {ACCEPTED}")
    if not sep:
        return Path(DEFAULT_FOLDER).resolve().as_uri()
    uri = uri.strip()
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        return Path(path[2:] if path.startswith("//") else path).expanduser().resolve().as_uri()
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri) or uri == "databricks":
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def open_tracker(value: str | None) -> Tracker | None:
    """The tracker of ``--track value``, its store opened (None without tracking)."""
    uri = parse_track(value)
    return None if uri is None else Tracker(uri)


def _client_class() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ConfigError(f"--track: MLflow's client is not installed ({e}); install it with {INSTALL}") from None
    return MlflowClient


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Tracker:
    """One MLflow store and its experiment (``fedseq``): logs finished runs from their bundles."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if uri.startswith("file:"):  # MLflow >= 3.7 refuses its file store unless told (the variable wins)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # fedseq sends nothing anywhere unasked
        client_class = _client_class()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        try:
            self.client = client_class(tracking_uri=uri)
            self.experiment_id = self._experiment(name)
        except ConfigError:
            raise
        except Exception as e:  # MlflowException, OSError, a server that does not answer
            raise ConfigError(f"--track: MLflow cannot open {uri}: {_first_line(e)}") from None
        self.lock = threading.Lock()  # a sweep's cells finish on several threads

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return str(self.client.create_experiment(name))
            except Exception:  # made meanwhile by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise ConfigError(f"--track: experiment {name!r} is deleted in {self.uri}; restore it, or name another "
                              "with MLFLOW_EXPERIMENT_NAME")
        return str(exp.experiment_id)

    def find(self, tags: Mapping[str, str]) -> list[Any]:
        """The active runs of the experiment with all of ``tags`` (every page)."""
        filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filt, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def create(self, name: str, tags: Mapping[str, str], params: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, tags=dict(tags), run_name=name)
        self.log(run.info.run_id, params=params)
        return str(run.info.run_id)

    def log(self, run_id: str, params: Mapping[str, str] | None = None,
            metrics: Iterable[tuple[str, float, int]] = ()) -> None:
        """Parameters and (name, value, step) metrics, in MLflow's batch sizes."""
        from mlflow.entities import Metric, Param

        limit = _param_limit()
        ps = [Param(k, v[:limit]) for k, v in (params or {}).items()]
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
        for i in range(0, len(ps), 100):
            self.client.log_batch(run_id, params=ps[i:i + 100])
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i:i + 1000])

    def artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        for p in paths:
            if p.is_file():
                self.client.log_artifact(run_id, str(p))

    def log_run(self, folder: Path, parent: str | None = None, tags: Mapping[str, str] | None = None,
                status: str | None = None) -> str:
        """Log the run whose bundle is ``folder/results.json`` (a child of ``parent``, if given)
        as an ended MLflow run (``status``, else the bundle's state); returns its id."""
        folder = Path(folder).resolve()
        raw = (folder / "results.json").read_bytes()
        res = json.loads(raw)
        all_tags = {**run_tags(res, folder), RESULTS_TAG: hashlib.sha256(raw).hexdigest(),
                    **(tags or {}), **({PARENT_TAG: parent} if parent else {})}
        run_id = self.create(folder.name, all_tags, flatten_params(res.get("config", {})))
        try:
            self.log(run_id, metrics=bundle_metrics(res))
            self.artifacts(run_id, [*(folder / n for n in ARTIFACTS), *sorted(folder.glob("*.png"))])
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, status or run_status(res))
        return run_id

    def log_single(self, folder: str | Path, rc: int = 0) -> int:
        """``fedseq run``/``sim --track``: log the run in ``folder`` (if it wrote a bundle) and say
        where; the command's exit status (1 when logging failed after a run that succeeded)."""
        if not (Path(folder) / "results.json").is_file():
            return rc
        try:
            status = None if rc == 0 else "KILLED" if rc == 130 else "FAILED"  # 130: interrupted (Ctrl-C)
            run_id = self.log_run(Path(folder), tags={KIND_TAG: "run"}, status=status)
        except Exception as e:
            print(f"fedseq: tracking: could not log {folder} to {self.uri}: {_first_line(e)} (the results "
                  "bundle is kept)", file=sys.stderr)
            return rc or 1
        print(f"tracked: MLflow run {run_id} in {self.uri}")
        return rc

    def sweep(self, out: Path, spec: Mapping[str, Any], name: str) -> SweepTracking:
        return SweepTracking(self, out, spec, name)


class SweepTracking:
    """A sweep in MLflow: one parent run per sweep folder and spec (found again when the sweep
    resumes), one child per cell folder. A context manager: leaving it by an exception ends the
    parent KILLED; :meth:`finish` ends it with the sweep's files as artifacts."""

    def __init__(self, tracker: Tracker, out: Path, spec: Mapping[str, Any], name: str) -> None:
        self.tracker, self.out = tracker, Path(out).resolve()
        key = _key("sweep", str(self.out), json.dumps(spec, sort_keys=True, default=list))
        found = tracker.find({KEY_TAG: key})
        if found:
            self.parent = str(found[0].info.run_id)
            tracker.client.update_run(self.parent, status="RUNNING")
        else:
            tags = {KEY_TAG: key, KIND_TAG: "sweep", FOLDER_TAG: str(self.out), **_version_tags()}
            self.parent = tracker.create(name, tags, flatten_params(dict(spec)))
        # what is logged already: cell key -> results digests (one search, not one per cell)
        self.logged: dict[str, list[tuple[str, str]]] = {}
        for r in tracker.find({PARENT_TAG: self.parent}):
            self.logged.setdefault(r.data.tags.get(KEY_TAG, ""), []).append(
                (str(r.info.run_id), r.data.tags.get(RESULTS_TAG, "")))

    def __enter__(self) -> SweepTracking:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None:
            self.tracker.client.set_terminated(self.parent, "KILLED")

    def cell(self, folder: Path, scenario: str = "") -> str | None:
        """Log the finished cell in ``folder`` as a child, unless it is logged with these results
        already (a child of other results, from a cell run again, is deleted first). None, or
        what went wrong (the sweep goes on; the next call logs what is missing)."""
        folder = Path(folder).resolve()
        key = _key("cell", str(folder))
        with self.tracker.lock:
            try:
                digest = hashlib.sha256((folder / "results.json").read_bytes()).hexdigest()
                old = self.logged.get(key, [])
                if any(d == digest for _, d in old):
                    return None
                for run_id, _ in old:
                    self.tracker.client.delete_run(run_id)
                run_id = self.tracker.log_run(folder, parent=self.parent,
                                              tags={KEY_TAG: key, KIND_TAG: "cell", "fedseq.scenario": scenario})
                self.logged[key] = [(run_id, digest)]
            except Exception as e:
                return f"tracking: could not log {folder.name} to {self.tracker.uri}: {_first_line(e)}"
        return None

    def finish(self, failed: Iterable[str] = (), extra: Iterable[Path] = ()) -> None:
        """End the parent: the sweep's files (sweep.md, sweep.json, spec.json, its PNG plots and
        ``extra``) as artifacts, the cell counts as metrics."""
        t, failed = self.tracker, list(failed)
        t.artifacts(self.parent, [*(self.out / n for n in SWEEP_ARTIFACTS), *sorted(self.out.glob("*.png")),
                                  *extra])
        t.log(self.parent, metrics=[("cells_logged", sum(len(v) for v in self.logged.values()), 0),
                                    ("cells_failed", len(failed), 0)])
        t.client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")


def sweep_tracking(tracker: Tracker | None, out: Path, spec: Mapping[str, Any], name: str) -> Any:
    """``with sweep_tracking(...) as track``: a :class:`SweepTracking`, or None without a tracker."""
    return contextlib.nullcontext(None) if tracker is None else tracker.sweep(out, spec, name)


# ---------------------------------------------------------------------------- bundle -> MLflow
def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def metric_name(key: str) -> str:
    """A results key as an MLflow name: ``@`` as ``_at_`` (``hr@10`` -> ``hr_at_10``), any other
    character MLflow refuses as ``_``."""
    return re.sub(r"[^\w./\- ]", "_", key.replace("@", "_at_"))


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) if isinstance(
        v, list | tuple | dict) else str(v)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A config (or spec) as MLflow parameters: nested keys dotted (``compat.literal_step``),
    lists as JSON, everything as text (cut to MLflow's length when logged)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        name = metric_name(f"{prefix}{k}")
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, f"{name}."))
        else:
            out[name] = _text(v)
    return out


def _numbers(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.extend(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out.append((metric_name(f"{prefix}{k}"), float(v)))
    return out


def bundle_metrics(results: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) of a results bundle: every number of each epoch's record at its epoch,
    then the summary's (``summary.*``) and the ledger totals' (``ledger.*``) at the last epoch."""
    out: list[tuple[str, float, int]] = []
    last = 0
    for i, row in enumerate(results.get("epochs", []), 1):
        step = int(row.get("epoch", i))
        last = max(last, step)
        out.extend((k, v, step) for k, v in _numbers({k: v for k, v in row.items() if k != "epoch"}))
    for prefix, section in (("summary.", results.get("summary", {})),
                            ("ledger.", results.get("ledger", {}).get("totals", {}))):
        out.extend((k, v, last) for k, v in _numbers(section, prefix))
    return out


def run_status(results: Mapping[str, Any]) -> str:
    state = results.get("summary", {}).get("state", "done")
    return {"done": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")


def run_tags(results: Mapping[str, Any], folder: Path) -> dict[str, str]:
    cfg, summary = results.get("config", {}), results.get("summary", {})
    tags = {k: _text(cfg[k]) for k in CONFIG_TAGS if k in cfg}
    tags.update({FOLDER_TAG: str(folder), "fedseq.runner": str(summary.get("runner", "")),
                 "fedseq.state": str(summary.get("state", "done")), **_version_tags()})
    return tags


@functools.cache
def _version_tags() -> dict[str, str]:
    import importlib.metadata
    import subprocess

    tags = {}
    try:
        tags["fedseq.version"] = importlib.metadata.version("fedseq")
    except importlib.metadata.PackageNotFoundError:
        pass
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            tags["mlflow.source.git.commit"] = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return tags


@functools.cache
def _param_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:
        return PARAM_LIMIT
    return int(MAX_PARAM_VAL_LENGTH)
