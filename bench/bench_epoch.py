"""Speed benchmark: one training epoch and one evaluation pass of Steam SASRec (or any dataset),
in process and through the services.

    python bench/bench_epoch.py --data-root ../shared/data                 # in-process, 3 epochs
    python bench/bench_epoch.py --data-root ../shared/data --services      # also via `fedseq run`
    python bench/bench_epoch.py --data-root ../shared/data --baseline a7627a9 --repeats 3
                                      # side by side with an older commit (training epochs only)
    python bench/bench_epoch.py --data-root ../shared/data --baseline 4dc5909 --services --repeats 3
                                      # side by side: `fedseq run` epochs of both trees

Reports medians over epochs, the peak resident memory of the in-process runner, and for the
services the per-round breakdown (worker compute, encode, upload; server decode, aggregate,
store) from the run's round records. ``--baseline REV`` checks REV out into a temporary git
worktree and times its training epochs and this tree's in alternating subprocesses (A B B A ...),
each with ``--epochs`` epochs, so both see the same machine; the first epoch of a process pays for
imports and first-touch memory and is reported apart from the warm ones. Benchmarks measure; they
do not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# --tree PATH: import fedseq from another checkout (the baseline worktree), before anything imports it
TREE = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve() if "--tree" in sys.argv else ROOT
sys.path.insert(0, str(TREE))

from fedseq.config import build_config  # noqa: E402
from fedseq.experiment import setup  # noqa: E402
from fedseq.metrics import Evaluator  # noqa: E402
from fedseq.training import compute_updates  # noqa: E402

try:
    from fedseq.training import UpdateMatrix  # noqa: E402
except ImportError:  # commits before the reused round matrix (e.g. a7627a9)
    UpdateMatrix = None  # type: ignore[assignment,misc]
from fedseq.engine import RoundContext  # noqa: E402
from server.aggregation import make_rule, server_step  # noqa: E402

try:
    from fedseq.engine import epoch_rounds  # noqa: E402
except ImportError:  # commits before the round engine (e.g. a7627a9) kept it in fedseq.experiment
    from fedseq.experiment import epoch_rounds  # type: ignore[no-redef,attr-defined]  # noqa: E402


def _train(cfg, epochs: int):
    """``epochs`` training epochs of ``cfg`` in process: (setup, final weights, wall and process-CPU
    seconds per epoch, peak MB of each ``--procs`` compute process). Works on older commits
    (``--baseline``)."""
    torch.set_num_threads(cfg.threads)
    s = setup(cfg)
    params = s.initial_params()
    rule = make_rule(*((cfg.defense, dict(cfg.defense_opts)) if hasattr(cfg, "defense")
                       else (cfg.aggregation, dict(cfg.aggregation_opts))))
    ds = s.dataset
    # as the commit's own in-process runner computes a round: into one reused matrix where the
    # commit has one (fedseq.training.UpdateMatrix, cli/sim.py), else a fresh matrix per round
    matrix = UpdateMatrix.of(s.model) if UpdateMatrix is not None else None
    procs = getattr(cfg, "procs", 1)
    pool = None
    if procs > 1:  # fedseq sim --procs: forked processes write the rows (CPU counted over all of them)
        from fedseq.compute_pool import ComputePool

        pool = ComputePool(s.model, ds.train, cfg.seed, procs, cfg.clients_per_round)
        matrix = pool.matrix

    def cpu_now() -> float:
        children = sum(_cpu_of(p.pid) for p in pool._procs) if pool is not None else 0.0
        return time.process_time() + children

    wall, cpu = [], []
    rk = 0
    for e in range(epochs):
        t0, c0 = time.perf_counter(), cpu_now()
        for users in epoch_rounds(cfg, s.benign_users, e):
            if matrix is not None:
                M = matrix.take(len(users))
                into = {"into": (matrix, np.arange(len(users)))}
            else:
                into = {}
            if pool is not None:
                pool.compute(params, np.asarray(users), np.arange(len(users)), rk, cfg.local())
                updates, n = M, torch.as_tensor([len(ds.train[u]) for u in users], dtype=torch.float32)
            else:
                ub = compute_updates(s.model, params, [ds.train[u] for u in users], users, cfg.seed, rk, cfg.local(),
                                     **into)
                updates, n = ub.updates, torch.as_tensor(ub.num_samples, dtype=torch.float32)
                del ub  # as the in-process runner does: one round's matrix alive at a time
            params = server_step(params, rule(updates, RoundContext(n, round_id=rk)).vector, cfg.lr_at(e))
            rk += 1
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_now() - c0)
    # peak resident memory of each compute process (the shared round matrix counts in every
    # process that touched its pages, so these do not add up to the memory used)
    children_peak = [_peak_mb(p.pid) for p in pool._procs] if pool is not None else []
    if pool is not None:
        pool.close()
    return s, params, wall, cpu, children_peak


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def train_epochs(cfg, epochs: int) -> dict:
    """Only the training epochs: wall and process-CPU seconds per epoch, peak memory."""
    _, _, wall, cpu, children_peak = _train(cfg, epochs)
    out = {"train_epoch_s": wall, "train_epoch_cpu_s": cpu,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if children_peak:
        out["compute_procs_peak_rss_mb"] = children_peak
    return out


def _baseline_tree(rev_name: str) -> tuple[Path, dict[str, Path]]:
    """A temporary git worktree of ``rev_name``: (its temporary folder, {label: tree} of the
    baseline and this tree)."""
    rev = subprocess.run(["git", "rev-parse", "--short", rev_name], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="fedseq-bench-"))
    base = tmp / rev
    subprocess.run(["git", "worktree", "add", "--detach", str(base), rev], cwd=ROOT, check=True, capture_output=True)
    return tmp, {f"baseline {rev}": base, f"this tree ({head}{'+' if _dirty() else ''})": ROOT}


def services_side_by_side(args) -> dict:
    """``fedseq run`` of this tree and of ``args.baseline``, alternating (A B B A ...), each for
    ``--epochs`` epochs: every run's training epoch seconds, by tree."""
    import shutil

    tmp, trees = _baseline_tree(args.baseline)
    base = next(iter(trees.values()))
    got: dict[str, list[float]] = {k: [] for k in trees}
    try:
        for r in range(args.repeats):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                res, _, wall, _ = job(args, args.epochs, "run", args.threads, cwd=trees[name])
                got[name] += [e["train_seconds"] for e in res["epochs"]]
                epochs = ", ".join(f"{e['train_seconds']:.2f}" for e in res["epochs"])
                print(f"  repeat {r + 1}/{args.repeats} {name}: epochs {epochs} s ({wall:.0f} s wall)", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return got


def side_by_side(args) -> dict:
    """This tree against ``args.baseline`` in alternating subprocesses; returns both trees' epochs."""
    import shutil

    tmp, trees = _baseline_tree(args.baseline)
    base = next(iter(trees.values()))
    got: dict[str, list[dict]] = {k: [] for k in trees}
    try:
        for r in range(args.repeats):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                out = tmp / f"{len(got[name])}-{name.split()[0]}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--train-only", "--tree", str(trees[name]),
                       "--dataset", args.dataset, "--model", args.model, "--epochs", str(args.epochs),
                       "--threads", str(args.threads), "--device", args.device, "--json", str(out)]
                if args.data_root:
                    cmd += ["--data-root", str(Path(args.data_root).resolve())]
                if args.procs != 1 and trees[name] == ROOT:  # the baseline times its own runner's way
                    cmd += ["--procs", str(args.procs)]
                subprocess.run(cmd, check=True, capture_output=True, cwd=trees[name])
                got[name].append(json.loads(out.read_text())["inprocess"])
                ep = got[name][-1]["train_epoch_s"]
                print(f"  repeat {r + 1}/{args.repeats} {name}: epochs {', '.join(f'{t:.2f}' for t in ep)} s",
                      flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for name, runs in got.items():
        warm = [t for run in runs for t in run["train_epoch_s"][1:]]
        warm_cpu = [t for run in runs for t in run["train_epoch_cpu_s"][1:]]
        first = [run["train_epoch_s"][0] for run in runs]
        summary[name] = {"warm_epoch_s": warm, "warm_epoch_cpu_s": warm_cpu, "first_epoch_s": first,
                         "peak_rss_mb": max(run["peak_rss_mb"] for run in runs)}
    return summary


def _dirty() -> bool:
    return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip())


def inprocess(cfg, epochs: int) -> dict:
    """Training epochs, then three evaluation passes each with the standard and the reference settings."""
    s, params, train_t, _, _ = _train(cfg, epochs)
    ds = s.dataset
    eval_t: dict[str, list[float]] = {}
    for name, ecfg in (("standard", s.eval_config()),):
        ev = Evaluator(s.model, ds.train, ds.test, s.benign_users, s.targets, ecfg)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ev(params)
            times.append(time.perf_counter() - t0)
        eval_t[name] = times
    from dataclasses import replace

    ev = Evaluator(s.model, ds.train, ds.test, s.benign_users, s.targets,
                   replace(s.eval_config(), dropout=True, mask_token_query=True))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ev(params)
        times.append(time.perf_counter() - t0)
    eval_t["reference-compat"] = times
    return {"train_epoch_s": train_t, "eval_s": eval_t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def job(args, epochs: int, command: str, threads: int, extra: tuple[str, ...] = (),
        cwd: Path = ROOT) -> tuple[dict, list[dict], float, float]:
    """``fedseq <command>`` (run or sim) for ``epochs`` epochs with one evaluation at the end:
    (results, round records, wall seconds, CPU seconds of every process it started)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cli.main", command, "--dataset", args.dataset, "--model", args.model,
               "--epochs", str(epochs), "--codec", args.codec, "--out", tmp, "--eval-every", str(epochs),
               "--threads", str(threads), "--device", args.device, *extra]
        if command == "run":
            cmd += ["--workers", str(args.workers)]
        if args.data_root:  # absolute: the command may run in another tree (--baseline)
            cmd += ["--data-root", str(Path(args.data_root).resolve())]
        t0, c0 = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)  # `-m cli.main` imports cwd's tree
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} (in {cwd}) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
        res = json.loads(Path(tmp, "results.json").read_text())
        rounds_file = Path(tmp, "rounds.jsonl")
        rounds = [json.loads(x) for x in rounds_file.read_text().splitlines()] if rounds_file.exists() else []
    return res, rounds, wall, cpu


def whole_jobs(args, epochs: int) -> dict:
    """The same job in process (``fedseq sim``, ``--workers`` torch threads: the cores the services'
    workers get) and through the services (``fedseq run``): wall and CPU seconds of each."""
    out = {}
    jobs = [("inprocess", "sim", args.workers, ()), ("services", "run", args.threads, ())]
    if args.procs > 1:  # --procs compute processes of 1 thread (fedseq/compute_pool.py); the runner's own
        jobs.append(("inprocess-procs", "sim", args.workers, ("--procs", str(args.procs))))  # work on --workers threads
    for name, command, threads, extra in jobs:
        res, _, wall, cpu = job(args, epochs, command, threads, extra)
        out[name] = {"wall_s": wall, "cpu_s": cpu, "threads": threads,
                     "train_epoch_s": [e["train_seconds"] for e in res["epochs"]]}
    return out


def attacked(args, epochs: int) -> dict:
    """``fedseq sim`` clean and under DV-FSR at ``--malicious-ratio``: training epoch seconds of each."""
    out = {}
    for name, extra in (("clean", ()), ("dv-fsr", ("--attack", "dv-fsr", "--malicious-ratio", str(args.malicious_ratio)))):
        res, _, wall, cpu = job(args, epochs, "sim", args.threads, extra)
        out[name] = {"train_epoch_s": [e["train_seconds"] for e in res["epochs"]], "wall_s": wall, "cpu_s": cpu}
    return out


def services(args, epochs: int, extra: tuple[str, ...] = ()) -> dict:
    """``fedseq run`` for ``epochs`` epochs (``extra``: more flags, e.g. ``--insecure``)."""
    res, rounds, wall, cpu = job(args, epochs, "run", args.threads, extra)
    keys = ("model", "compute", "encode", "upload")
    breakdown = {f"worker_{k}": sum(r["worker_timings"].get(k, 0.0) for r in rounds) / epochs for k in keys}
    for k in ("decode", "aggregate", "step", "store"):
        breakdown[f"server_{k}"] = sum(r["server_timings"].get(k, 0.0) for r in rounds) / epochs
    return {"train_epoch_s": [e["train_seconds"] for e in res["epochs"]], "wall_s": wall, "cpu_s": cpu,
            "breakdown_per_epoch_s": breakdown, "bytes_up_per_epoch": res["summary"]["bytes_up"] / epochs}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="steam")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--procs", type=int, default=1,
                    help="in-process: processes computing the updates, 1 thread each (fedseq sim --procs)")
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (in-process and services)")
    ap.add_argument("--services", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--codec", default="sparse-fp32")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--attack-check", action="store_true",
                    help="also time fedseq sim clean against DV-FSR at --malicious-ratio")
    ap.add_argument("--malicious-ratio", type=float, default=0.01)
    ap.add_argument("--baseline", metavar="REV", help="also time this commit's training epochs, side by side")
    ap.add_argument("--repeats", type=int, default=3, help="with --baseline: processes per tree (alternating)")
    ap.add_argument("--train-only", action="store_true", help="only the in-process training epochs")
    ap.add_argument("--tree", help="import fedseq from this checkout (used by --baseline)")
    return ap


def main() -> int:
    ap = _parser()
    args = ap.parse_args()
    if args.epochs < 1 or args.repeats < 1:
        ap.error("--epochs and --repeats must be >= 1")
    if args.baseline and args.services:
        return _report_services_side_by_side(args)
    if args.baseline:
        if args.epochs < 2:
            ap.error("--baseline needs --epochs >= 2 (the first epoch of a process is reported apart)")
        return _report_side_by_side(args)
    cfg = _bench_config(args)
    machine = _machine(args)
    if args.train_only:
        return _report_train_only(args, cfg, machine)
    out = {"machine": machine, "inprocess": inprocess(cfg, args.epochs)}
    ip = out["inprocess"]
    print(f"in-process: train epoch median {statistics.median(ip['train_epoch_s']):.2f}s "
          f"({', '.join(f'{t:.2f}' for t in ip['train_epoch_s'])}), peak RSS {ip['peak_rss_mb']:.0f} MB")
    for k, v in ip["eval_s"].items():
        print(f"  eval pass ({k}): median {statistics.median(v):.2f}s")
    if args.services:
        _report_services(args, out, ip)
    if args.attack_check:
        at = attacked(args, args.epochs)
        out["attacked"] = at
        c, a = (statistics.median(at[k]["train_epoch_s"]) for k in ("clean", "dv-fsr"))
        print(f"fedseq sim clean train epoch median {c:.2f}s, DV-FSR at {args.malicious_ratio:.2%} {a:.2f}s "
              f"= {a / c:.2f}x clean")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def _report_services_side_by_side(args) -> int:
    """``--baseline REV --services``: `fedseq run` epochs of both trees."""
    print(f"services side by side: {args.repeats} `fedseq run` per tree, {args.epochs} epoch(s) each, "
          f"{args.workers} workers", flush=True)
    got = services_side_by_side(args)
    meds = {name: statistics.median(v) for name, v in got.items()}
    for name, v in got.items():
        print(f"{name}: services train epoch median {meds[name]:.2f} s (n={len(v)}: "
              f"{', '.join(f'{t:.2f}' for t in v)})")
    names = list(meds)
    print(f"ratio this tree / baseline: {meds[names[1]] / meds[names[0]]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"services_side_by_side": got}, indent=2))
    return 0


def _report_side_by_side(args) -> int:
    """``--baseline REV``: in-process training epochs of both trees."""
    print(f"side by side: {args.repeats} processes per tree, {args.epochs} epochs each, "
          f"{args.threads} thread(s)", flush=True)
    sbs = side_by_side(args)
    meds = {}
    for name, v in sbs.items():
        meds[name] = statistics.median(v["warm_epoch_s"])
        print(f"{name}: warm epoch median {meds[name]:.2f} s (n={len(v['warm_epoch_s'])}), "
              f"CPU {statistics.median(v['warm_epoch_cpu_s']):.2f} s, first epoch median "
              f"{statistics.median(v['first_epoch_s']):.2f} s, peak RSS {v['peak_rss_mb']:.0f} MB")
    names = list(meds)
    print(f"ratio this tree / baseline: {meds[names[1]] / meds[names[0]]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"side_by_side": sbs}, indent=2))
    return 0


def _bench_config(args):
    over = {"dataset": args.dataset, "data_root": args.data_root, "model": args.model, "threads": args.threads,
            "codec": args.codec}
    if args.procs != 1:  # older commits (--baseline) have no procs key
        over["procs"] = args.procs
    if args.device != "cpu":  # older commits (--baseline) have no device key; cpu is what they compute on
        over["device"] = args.device
    return build_config(None, over)


def _machine(args) -> str:
    machine = f"{Path('/proc/cpuinfo').read_text().count('processor')} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    return machine + f"; device {args.device}"


def _report_train_only(args, cfg, machine: str) -> int:
    """``--train-only``: the in-process training epochs alone."""
    out = {"machine": machine, "inprocess": train_epochs(cfg, args.epochs)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"train epochs: {', '.join(f'{t:.2f}' for t in out['inprocess']['train_epoch_s'])} s, peak RSS "
          f"{out['inprocess']['peak_rss_mb']:.0f} MB"
          + "".join(f", compute process {m:.0f} MB" for m in out["inprocess"].get("compute_procs_peak_rss_mb", [])))
    return 0


def _report_services(args, out: dict, ip: dict) -> None:
    """``--services``: the same epochs through `fedseq run`, and the whole jobs on the same cores."""
    sv = services(args, args.epochs)
    out["services"] = sv
    ratio = statistics.median(sv["train_epoch_s"]) / statistics.median(ip["train_epoch_s"])
    print(f"services ({args.workers} workers, {args.codec}): train epoch median "
          f"{statistics.median(sv['train_epoch_s']):.2f}s = {ratio:.2f}x in-process; "
          f"{sv['bytes_up_per_epoch'] / 1e6:.1f} MB up per epoch")
    for k, v in sv["breakdown_per_epoch_s"].items():
        print(f"  {k}: {v:.2f}s per epoch")
    jobs = whole_jobs(args, args.epochs)
    out["same_cores"] = jobs
    ip_, sv_ = jobs["inprocess"], jobs["services"]
    print(f"same job, same cores: fedseq sim ({ip_['threads']} threads) train epoch median "
          f"{statistics.median(ip_['train_epoch_s']):.2f}s, whole job {ip_['wall_s']:.1f}s wall / "
          f"{ip_['cpu_s']:.1f}s CPU; fedseq run ({args.workers} workers x {sv_['threads']} thread) "
          f"{statistics.median(sv_['train_epoch_s']):.2f}s, {sv_['wall_s']:.1f}s wall / {sv_['cpu_s']:.1f}s CPU; "
          f"epoch ratio {statistics.median(sv_['train_epoch_s']) / statistics.median(ip_['train_epoch_s']):.2f}x")
    if "inprocess-procs" in jobs:
        pp = jobs["inprocess-procs"]
        print(f"  fedseq sim --procs {args.procs} --threads {args.workers}: train epoch median {statistics.median(pp['train_epoch_s']):.2f}s, "
              f"whole job {pp['wall_s']:.1f}s wall / {pp['cpu_s']:.1f}s CPU; services epoch ratio "
              f"{statistics.median(sv_['train_epoch_s']) / statistics.median(pp['train_epoch_s']):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
