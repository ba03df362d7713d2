"""Start-up and shutdown benchmark: a tiny `fedseq run` (60 users, 2 epochs, 2 client workers),
whose time is mostly starting and stopping the services, timed from the command to its exit.

    python bench/bench_launch.py                      # this tree, 3 runs
    python bench/bench_launch.py --baseline a108000   # alternating with an older commit (A B B A ...)

Reports, per tree, the median wall time and the median CPU time of the launcher and everything
it started (the children's rusage: Redis, the zygote and the services it forked, or the services
themselves in trees before the zygote). ``--baseline REV`` checks REV out into a temporary git
worktree (with this tree's venv) and runs both in alternation, so both see the same machine.
Benchmarks measure; they do not gate.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--dataset", "synthetic:users=60,items=80", "--epochs", "2", "--clients-per-round", "16", "--lr", "0.01",
       "--num-negatives", "50", "--workers", "2"]


def one_run(tree: Path, out: Path) -> tuple[float, float]:
    """(wall s, CPU s of the run's processes) of one `fedseq run` in ``tree``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", "run", *RUN, "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"fedseq run failed in {tree}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", help="a git revision to run alternately with this tree")
    args = p.parse_args()
    trees = {"this tree": ROOT}
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        if args.baseline:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                           check=True, capture_output=True)
            trees = {f"baseline {args.baseline}": base, "this tree": ROOT}
        try:
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
            order = list(trees)
            for i in range(args.repeats):
                for name in order if i % 2 == 0 else order[::-1]:
                    wall, cpu = one_run(trees[name], Path(tmp) / f"run-{len(times[name])}-{name.split()[0]}")
                    times[name].append((wall, cpu))
                    print(f"{name}: run {len(times[name])}: {wall:.1f} s wall, {cpu:.1f} CPU s", file=sys.stderr)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "baseline")],
                               capture_output=True)
    print("| tree | runs | wall s (median) | CPU s (median) |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {len(ts)} | {statistics.median(w for w, _ in ts):.1f} | "
              f"{statistics.median(c for _, c in ts):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
