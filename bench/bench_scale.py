"""Scale benchmark (issue 15, item 4): resident memory per 100k users, and per-round seconds of a
networked run with a million users against a 10k-user run with the same round size.

    PYTHONPATH=. .venv/bin/python bench/bench_scale.py memory            # RSS of data and of a hosting worker
    PYTHONPATH=. .venv/bin/python bench/bench_scale.py rounds            # fedseq run: 10k vs 1M users
    PYTHONPATH=. .venv/bin/python bench/bench_scale.py rounds --users 10000,1000000 --workers 4 --rounds 8

``memory`` runs one subprocess per measurement: it builds a tiny population first (imports, the
model), then reads VmRSS before and after loading the data set (``data``) or building a benign
worker's whole population (``worker``: data set, setup, hosted users), after ``gc.collect()``.
The default generator (one numpy array per user, item-by-item Python) is measured at 100k users
next to the vectorized one (``vectorized=1``: CSR, numpy).

``rounds`` runs ``fedseq run --insecure`` (Redis, aggregation server, orchestrator, ``--workers``
client workers as separate processes) on ``synthetic:users=N,items=2000,max_length=60,
vectorized=1`` with ``max_rounds`` rounds of ``--per-round`` users, one epoch, evaluation on a
fixed sample of ``--eval-users`` users; it reads per-round seconds from ``rounds.jsonl`` (the first
round, which warms caches, is left out of the median) and polls every process's VmRSS and RssAnon
for their peaks. ``--data-cache`` runs with ``FEDSEQ_DATA_CACHE`` (a fresh folder): the first
process generates the data set and every process memory-maps it.
Prints one JSON object per measurement and a summary table (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent("""
    import gc, json, sys, time
    def rss():
        with open("/proc/self/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
    import torch
    torch.set_num_threads(1)
    from fedseq.config import ExperimentConfig
    from fedseq.data import load_dataset
    from client.service import benign_population
    what, n, vec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    spec = "synthetic:users={n},items=2000,max_length=60,vectorized=" + str(vec)
    benign_population(ExperimentConfig(dataset=spec.format(n=200), epochs=1), None)
    gc.collect()
    base = rss()["VmRSS"]
    t = time.time()
    if what == "data":
        obj = load_dataset(spec.format(n=n))
        extra = {"interactions": int(obj.train_lengths().sum()) + obj.num_users}
    else:
        obj = benign_population(ExperimentConfig(dataset=spec.format(n=n), epochs=1), None)
        extra = {"hosted": len(obj.sequences)}
    s = time.time() - t
    gc.collect()
    r = rss()
    print(json.dumps({"what": what, "users": n, "vectorized": vec, "rss_mb": round(r["VmRSS"] - base, 1),
                      "peak_mb": round(r["VmHWM"] - base, 1), "seconds": round(s, 2), **extra}))
""")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def memory(args) -> list[dict]:
    rows = []
    cases = [(w, n, 1) for n in args.users for w in ("data", "worker")]
    if args.python_baseline:
        cases += [(w, 100_000, 0) for w in ("data", "worker")]
    for what, n, vec in cases:
        out = subprocess.run([sys.executable, "-c", MEASURE, what, str(n), str(vec)], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=3600)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["mb_per_100k"] = round(row["rss_mb"] * 100_000 / n, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _tree_rss(root_pid: int) -> dict[int, tuple[str, float, float]]:
    """(role, VmRSS MB, RssAnon MB) of ``root_pid``'s descendants; the role from the command line.
    RssAnon leaves out file pages (a memory-mapped data cache, shared between processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out: dict[int, tuple[str, float, float]] = {}
    todo = list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = {line.split(":")[0]: int(line.split()[1]) / 1024
                      for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith(("VmRSS", "RssAnon"))}
            rss, anon = status["VmRSS"], status["RssAnon"]
        except (OSError, KeyError):
            continue
        role = next((c.decode() for c in cmd if c.startswith(b"serve-")),
                    "redis-server" if cmd[0].endswith(b"redis-server") else Path(cmd[0].decode()).name)
        out[pid] = (role, rss, anon)
    return out


def one_run(n: int, args, out_dir: Path) -> dict:
    cfg = {"eval_users": args.eval_users, "max_rounds": args.rounds}
    cfg_file = out_dir / f"scale-{n}.json"
    cfg_file.write_text(json.dumps(cfg))
    run_dir = out_dir / f"run-{n}"
    cmd = [sys.executable, "-m", "cli.main", "run", "--insecure", "--config", str(cfg_file),
           "--dataset", f"synthetic:users={n},items=2000,max_length=60,vectorized=1,seed={args.data_seed}",
           "--epochs", "1", "--clients-per-round", str(args.per_round), "--num-negatives", "100",
           "--workers", str(args.workers), "--threads", "1", "--seed", str(args.seed), "--out", str(run_dir),
           "--run-id", f"scale-{n}", "--round-timeout", "600"]
    run_env = env()
    if args.data_cache:
        cache = out_dir / f"data-cache-{n}"  # fresh: the run's first process generates, the rest map it
        run_env["FEDSEQ_DATA_CACHE"] = str(cache)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: dict[int, tuple[str, float]] = {}
    peak_anon: dict[int, tuple[str, float]] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid, (role, rss, anon) in _tree_rss(proc.pid).items():
                if rss > peak.get(pid, ("", 0.0))[1]:
                    peak[pid] = (role, rss)
                if anon > peak_anon.get(pid, ("", 0.0))[1]:
                    peak_anon[pid] = (role, anon)
            stop.wait(1.0)

    threading.Thread(target=poll, daemon=True).start()
    log, _ = proc.communicate(timeout=args.timeout)
    stop.set()
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"fedseq run with {n} users failed (rc {proc.returncode}):\n{log[-4000:]}")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    secs = [r["seconds"] for r in rounds]
    res = json.loads((run_dir / "results.json").read_text())
    ep = res["epochs"][0] if res.get("epochs") else {}
    by_role: dict[str, float] = {}
    for role, rss in peak.values():
        by_role[role] = max(by_role.get(role, 0.0), rss)
    anon_by_role: dict[str, float] = {}
    for role, anon in peak_anon.values():
        anon_by_role[role] = max(anon_by_role.get(role, 0.0), anon)
    row = {"users": n, "workers": args.workers, "per_round": args.per_round, "rounds": len(rounds),
           "round_seconds": [round(s, 3) for s in secs],
           "median_round_s": round(statistics.median(secs[1:] or secs), 3),
           "eval_users": ep.get("eval_users"), "eval_seconds": round(ep.get("eval_seconds", 0.0), 2),
           "wall_s": round(wall, 1), "data_cache": bool(args.data_cache),
           "peak_rss_mb_by_role": {k: round(v) for k, v in sorted(by_role.items())},
           "peak_anon_mb_by_role": {k: round(v) for k, v in sorted(anon_by_role.items())}}
    print(json.dumps(row), flush=True)
    return row


def rounds(args) -> list[dict]:
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench-scale-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    return [one_run(n, args, out_dir) for n in args.users]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--users", default="100000,1000000", help="comma-separated user counts (vectorized generator)")
    m.add_argument("--no-python-baseline", dest="python_baseline", action="store_false",
                   help="skip the default generator at 100k users (about 30 s)")
    r = sub.add_parser("rounds")
    r.add_argument("--users", default="10000,1000000")
    r.add_argument("--workers", type=int, default=4)
    r.add_argument("--rounds", type=int, default=8, help="max_rounds: rounds per run")
    r.add_argument("--per-round", type=int, default=256)
    r.add_argument("--eval-users", type=int, default=1000, help="eval_users: the evaluated sample")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data-seed", type=int, default=0)
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("--out", default="")
    r.add_argument("--data-cache", action="store_true",
                   help="run with FEDSEQ_DATA_CACHE (a fresh folder): one process generates, all memory-map")
    args = ap.parse_args()
    args.users = [int(x) for x in args.users.split(",") if x]
    print(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True).stdout.strip()}), flush=True)
    rows = memory(args) if args.cmd == "memory" else rounds(args)
    if args.cmd == "memory":
        print("\n| what | users | generator | RSS added (MB) | peak added (MB) | MB per 100k users | seconds |")
        print("|---|---|---|---|---|---|---|")
        for x in rows:
            print(f"| {x['what']} | {x['users']:,} | {'vectorized' if x['vectorized'] else 'default'} | "
                  f"{x['rss_mb']} | {x['peak_mb']} | {x['mb_per_100k']} | {x['seconds']} |")
    else:
        print("\n| users | workers | per round | rounds | median s/round (w/o first) | eval users | eval s | "
              "wall s | data cache | peak RSS MB by process | peak RssAnon MB by process |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for x in rows:
            print(f"| {x['users']:,} | {x['workers']} | {x['per_round']} | {x['rounds']} | {x['median_round_s']} | "
                  f"{x['eval_users']} | {x['eval_seconds']} | {x['wall_s']} | {x['data_cache']} | "
                  f"{x['peak_rss_mb_by_role']} | {x['peak_anon_mb_by_role']} |")


if __name__ == "__main__":
    main()
