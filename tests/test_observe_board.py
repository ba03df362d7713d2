"""The Grafana board (deploy/grafana/dashboards/fedseq.json) asks only for what the services export.

Every panel target's PromQL is read by a small PromQL reader (:func:`selectors`: metric names,
their label matchers, the labels of ``by``/``on`` lists) and checked against the metric families
the services' own registry serves on its HTTP endpoint (:func:`fedseq.observe.serve_metrics`,
after importing what ``fedseq serve-server``, ``serve-orchestrator``, ``serve-client`` and
``serve-attacker`` build from): each name is a series of an exported family (``_total`` of a
counter, ``_bucket``/``_sum``/``_count`` of a histogram), each label one the family has (or
``job``/``instance``, which Prometheus adds), each matched value one the code can write. Also:
every panel queries through the ``datasource`` variable, ids are unique, the panels needing the
orchestrator's ``--metrics-experiment`` say so, and the reader catches a misspelt name, label,
value or function. Where ``promtool`` is installed it parses every query and the Prometheus
configurations (skipped, with the reason, where it is not).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedseq.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S_SCRAPE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-scrape.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
STANDARD = ("process_", "python_")  # prometheus_client's default collectors
EXPERIMENT_FLAG = ("--metrics-experiment", "FEDSEQ_METRICS_EXPERIMENT=1")

# ------------------------------------------------------------------ a small PromQL reader

FUNCTIONS = {
    # aggregation operators
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "time",
    "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "mad_over_time",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}  # followed by a label list
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+)
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matchop>=~|!~|!=|==|>=|<=)
  | (?P<punct>[(){}\[\],@^*/%+\-<>=])
""", re.X)


@dataclass
class Query:
    """What one PromQL expression asks for: each vector selector (name, matchers) and the labels
    named in its ``by``/``without``/``on``/``ignoring``/``group_*`` lists."""
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    unknown_calls: list[str] = field(default_factory=list)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(expr):
        m = _TOKEN.match(expr, i)
        if not m:
            raise ValueError(f"cannot read {expr[i:i + 20]!r} in {expr!r}")
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
        i = m.end()
    return out


def selectors(expr: str) -> Query:
    """Read ``expr`` (PromQL, Grafana variables allowed where a string or a range goes)."""
    q, toks, i = Query(), _tokens(expr), 0

    def label_list(j: int) -> int:  # toks[j] is "(": the labels up to ")"
        j += 1
        while toks[j][1] != ")":
            if toks[j][0] == "ident":
                q.grouping.add(toks[j][1])
            j += 1
        return j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "[":  # a range or subquery: durations and variables only
            while toks[i][1] != "]":
                i += 1
            i += 1
        elif kind == "ident" and text in GROUPING:
            i = label_list(i + 1) if nxt == "(" else i + 1
        elif kind == "ident" and (nxt == "(" or (text in FUNCTIONS and nxt in ("by", "without"))) \
                and text not in KEYWORDS:  # a call, or an aggregation with its grouping first
            if text not in FUNCTIONS:
                q.unknown_calls.append(text)
            i += 1
        elif kind == "ident" and text.lower() in KEYWORDS:
            i += 1
        elif kind == "ident":
            matchers: list[tuple[str, str, str]] = []
            i += 1
            if nxt == "{":
                i += 1
                while toks[i][1] != "}":
                    if toks[i][1] == ",":
                        i += 1
                        continue
                    (_, label), (_, op), (vkind, value) = toks[i:i + 3]
                    if vkind != "string" or op not in ("=", "!=", "=~", "!~"):
                        raise ValueError(f"bad matcher {label}{op}{value} in {expr!r}")
                    matchers.append((label, op, value[1:-1]))
                    i += 3
                i += 1
            q.selectors.append((text, matchers))
        elif text == "{":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        else:
            i += 1
    return q


def label_values_query(query: str) -> tuple[str, str]:
    """``label_values(metric..., label)`` (a Grafana variable query) -> (the metric part, the label)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", query)
    if not m:
        raise ValueError(f"not a label_values query: {query!r}")
    return m.group(1), m.group(2)


# ------------------------------------------------------------------ the board

def _panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])  # a collapsed row holds its panels
    return out


def _queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and variable query."""
    out = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
           for p in _panels(board) for t in p.get("targets", [])]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", label_values_query(query)[0]))
    return out


# ------------------------------------------------------------------ what the services export

@dataclass
class Family:
    type: str  # counter, gauge, histogram, summary, info, ...
    labels: set[str]


def _wrappers() -> dict[str, object]:
    """Every prometheus_client metric object the project's loaded modules hold, by family name."""
    from prometheus_client.metrics import MetricWrapperBase

    out = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or name.split(".")[0] not in ("fedseq", "server", "client", "attacker", "orchestrator", "cli"):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, MetricWrapperBase):
                out[obj._name] = obj
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, Family]:
    """The metric families of the services' registry, read from its HTTP endpoint the way Prometheus
    reads it, after importing what the serve commands build the services from."""
    from prometheus_client.parser import text_string_to_metric_families

    import attacker.app  # noqa: F401
    import client.app  # noqa: F401
    import orchestrator.app  # noqa: F401
    import server.app  # noqa: F401
    from fedseq.observe import serve_metrics

    port = serve_metrics(0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wrappers = _wrappers()
    families = {}
    for fam in text_string_to_metric_families(text):
        labels = {k for s in fam.samples for k in s.labels if k not in ("le", "quantile")}
        if fam.name.startswith("fedseq_"):  # a labelled family serves no sample until a label set is used
            # (the text format serves a counter's or histogram's creation times as a gauge <name>_created)
            base = fam.name.removesuffix("_created") if fam.name not in wrappers else fam.name
            assert base in wrappers, f"{fam.name} is served but no module of the project defines it"
            labels |= set(wrappers[base]._labelnames)
        families[fam.name] = Family(fam.type, labels)
    return families


def series(families: dict[str, Family]) -> dict[str, tuple[str, Family]]:
    """PromQL series name -> (its family's name, the family): ``_total`` of a counter,
    ``_bucket``/``_sum``/``_count`` of a histogram, ``_sum``/``_count`` of a summary, the name of
    a gauge (or untyped, or info)."""
    out = {}
    for name, fam in families.items():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["", "_sum", "_count"], "info": ["_info"]}.get(fam.type, [""])
        for s in suffixes:
            out[name + s] = (name, fam)
    return out


def known_values() -> dict[tuple[str, str], set[str]]:
    """(family, label) -> every value the code writes there, read from the code."""
    from fedseq import ledger, observe
    from fedseq.metrics import MetricSums

    server_src = "".join(p.read_text() for p in (ROOT / "server").glob("*.py"))
    workers_src = (ROOT / "orchestrator" / "workers.py").read_text()
    return {
        ("fedseq_updates", "outcome"): set(re.findall(r'UPDATES\.labels\("([a-z-]+)"', server_src)),
        ("fedseq_workers", "state"): set(re.findall(r'WORKERS\.labels\(kind, "([a-z-]+)"\)', workers_src)),
        ("fedseq_experiment_metric", "metric"): set(MetricSums().means()),
        ("fedseq_run_state", "state"): set(observe.RUN_STATES),
        ("fedseq_bytes", "direction"): set(ledger.DIRECTIONS),
        ("fedseq_bytes", "kind"): set(ledger.KINDS),
    }


def board_errors(board: dict, families: dict[str, Family], values: dict[tuple[str, str], set[str]]) -> list[str]:
    """Every name, label, value or function of the board's queries the services do not export."""
    errors = []
    by_series = series(families)
    for where, expr in _queries(board):
        q = selectors(expr)
        errors += [f"{where}: unknown function {f}()" for f in q.unknown_calls]
        named = []
        for name, matchers in q.selectors:
            if name == "up":  # Prometheus' own, one per target
                named.append(Family("gauge", set()))
                continue
            if name not in by_series:
                errors.append(f"{where}: {name} is not a metric the services export")
                continue
            fname, fam = by_series[name]
            if not name.startswith("fedseq_") and not name.startswith(STANDARD):
                errors.append(f"{where}: {name} is neither fedseq's nor a standard collector's")
            named.append(fam)
            for label, op, value in matchers:
                if label not in fam.labels | TARGET_LABELS:
                    errors.append(f"{where}: {name} has no label {label!r} (it has {sorted(fam.labels)})")
                    continue
                if (fname, label) not in values or "$" in value:
                    continue
                known = values[(fname, label)]
                alts = value.split("|") if op in ("=~", "!~") else [value]
                for alt in alts:
                    hits = {v for v in known if re.fullmatch(alt, v)} if op in ("=~", "!~") else {alt} & known
                    if not hits:
                        errors.append(f"{where}: {name}{{{label}{op}{value!r}}}: {alt!r} is no value the code "
                                      f"writes ({sorted(known)})")
        # a grouping label must be one of a series the query reads (or le of a histogram's buckets)
        has = set(TARGET_LABELS).union(*(f.labels for f in named)) if named else set(TARGET_LABELS)
        if any(n.endswith("_bucket") for n, _ in q.selectors):
            has.add("le")
        errors += [f"{where}: groups by {label!r}, which no series of the query has" for label in q.grouping - has]
    return errors


# ------------------------------------------------------------------ tests

def _board() -> dict:
    return json.loads(BOARD.read_text())


def test_every_query_names_only_what_the_services_export(exported):
    # Prepare
    board = _board()
    values = known_values()
    # Execute
    errors = board_errors(board, exported, values)
    used = {name for _, expr in _queries(board) for name, _ in selectors(expr).selectors}
    # Assert
    assert errors == []
    assert all(values.values()), values  # the value sets were really read from the code
    # the board shows what issue 27 asks for: rounds, updates by outcome and reason, bytes, ER@K/HR@10
    assert {"fedseq_rounds_total", "fedseq_updates_total", "fedseq_bytes_total", "fedseq_experiment_metric",
            "fedseq_model_version", "fedseq_run_state", "fedseq_epoch", "fedseq_workers", "fedseq_upload_streams",
            "fedseq_aggregate_seconds_bucket", "process_cpu_seconds_total", "process_resident_memory_bytes"} <= used
    shown = {v for _, expr in _queries(board) for name, ms in selectors(expr).selectors
             if name == "fedseq_experiment_metric" for label, _, value in ms if label == "metric"
             for v in values["fedseq_experiment_metric", "metric"] if re.fullmatch(value, v)}
    assert {"er@5", "er@10", "er@20", "hr@10", "ndcg@10"} <= shown


def _with(board: dict, good: str, bad: str) -> dict:
    """``board`` with ``good`` replaced by ``bad`` in the first panel query that has it."""
    for p in _panels(board):
        for t in p.get("targets", []):
            if good in t["expr"]:
                t["expr"] = t["expr"].replace(good, bad, 1)
                return board
    raise AssertionError(f"no query has {good!r}")


def test_the_reader_catches_a_misspelt_name_label_value_or_function(exported):
    """Negative checks: the same check on a board with one thing wrong in one query."""
    values = known_values()
    cases = {
        "fedseq_rounds_total": ("fedseq_round_total", "is not a metric the services export"),
        'outcome="refused"': ('outcomes="refused"', "has no label 'outcomes'"),
        "er@5|er@10|er@20": ("er@5|er@50", "'er@50' is no value the code writes"),
        'state="live"': ('state="alive"', "'alive' is no value the code writes"),
        "sum by (reason)": ("sum by (reasons)", "groups by 'reasons'"),
        "histogram_quantile(": ("histogram_quantil(", "unknown function histogram_quantil()"),
        "process_resident_memory_bytes": ("process_resident_memory", "is not a metric the services export"),
        "fedseq_model_version{": ("node_load1{", "is not a metric the services export"),
    }
    for good, (bad, message) in cases.items():
        # Prepare
        board = _with(_board(), good, bad)
        # Execute
        errors = board_errors(board, exported, values)
        # Assert
        assert any(message in e for e in errors), (bad, errors)
    assert selectors('sum by (a) (rate(x_total{b=~"c|d"}[$__rate_interval])) / on() group_left() y > 0') == Query(
        [("x_total", [("b", "=~", "c|d")]), ("y", [])], {"a"}, [])


def test_every_panel_queries_through_the_datasource_variable():
    # Prepare
    board = _board()
    panels = _panels(board)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # Assert: a portable board (no data source uid of one Grafana), provisioned under a fixed uid
    assert board["uid"] == "fedseq" and board["id"] is None
    assert board["schemaVersion"] == 41  # Grafana 12.0's, the compose file's grafana-oss tag
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            assert not p.get("targets"), p["title"]
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        assert all(t["datasource"] == DATASOURCE for t in p["targets"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert p.get("description"), f"{p['title']}: say what it shows and from which metric"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        assert all('job=~"$job"' in t["expr"] for t in p["targets"]), f"{p['title']}: filter by the job variable"
    # the panels that need the orchestrator's opt-in say so
    for p in panels:
        if any("fedseq_experiment_metric" in t["expr"] for t in p.get("targets", [])):
            assert all(flag in p["description"] for flag in EXPERIMENT_FLAG), p["title"]
    # no two panels overlap
    cells = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[x, y]}"
                cells[x, y] = p["title"]


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus): the PromQL reader above is the check")
    return exe


def test_promtool_parses_every_query_and_the_scrape_configs(tmp_path):
    yaml = pytest.importorskip("yaml")
    exe = _promtool()
    # Prepare: each query as a recording rule, Grafana's variables given values Prometheus accepts
    board = _board()
    exprs = [re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr).replace("$job", ".*")
             for _, expr in _queries(board)]
    rules = tmp_path / "board.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "fedseq-board", "rules": [
        {"record": f"fedseq:board:{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    k8s = yaml.safe_load(yaml.safe_load(K8S_SCRAPE.read_text())["data"]["fedseq-scrape.yml"])
    k8s_file = tmp_path / "k8s-scrape.yml"
    k8s_file.write_text(yaml.safe_dump(k8s))

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "check", *args], capture_output=True, text=True, timeout=60)

    # Execute
    r_rules = check("rules", str(rules))
    r_compose = check("config", str(PROMETHEUS_YML))
    r_k8s = check("config", str(k8s_file))
    if r_k8s.returncode and "kubernetes_sd_configs not found" in r_k8s.stdout + r_k8s.stderr:
        # Debian's promtool is built without Kubernetes discovery: check the rest of the job
        for job in k8s["scrape_configs"]:
            job["static_configs"] = [{"targets": []}]
            del job["kubernetes_sd_configs"]
        k8s_file.write_text(yaml.safe_dump(k8s))
        r_k8s = check("config", str(k8s_file))
    # Assert
    assert r_rules.returncode == 0, r_rules.stdout + r_rules.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r_rules.stdout, r_rules.stdout
    assert r_compose.returncode == 0, r_compose.stdout + r_compose.stderr
    assert r_k8s.returncode == 0, r_k8s.stdout + r_k8s.stderr
