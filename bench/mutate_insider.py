"""Do the insider tests notice their checks? Remove one check at a time (a mutation of the source,
in a copy of the tree) and run the tests that guard it: each mutation must make at least one test
fail (issue "The attacker is a participant", README "Security model").

    .venv/bin/python bench/mutate_insider.py                 # every mutation, fast tests (~2 min)
    .venv/bin/python bench/mutate_insider.py --with-insider  # also tests/test_insider.py (slow: real processes)
    .venv/bin/python bench/mutate_insider.py --only weight

Prints one line per mutation (caught or MISSED, the failing tests) and a Markdown table for
docs/results/security.md; exits 1 when a mutation goes unnoticed or no longer applies.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str  # the check it removes
    path: str
    old: str  # exact source text (must occur once)
    new: str
    tests: tuple[str, ...]  # fast tests that guard it
    insider: tuple[str, ...] = ()  # tests/test_insider.py tests that guard it too


MUTATIONS = [
    Mutation("kind/roster check", "orchestrator/workers.py",
             "            if kind != entry.kind:", "            if False:",
             ("tests/test_roster.py",),
             ("tests/test_insider.py::test_claiming_the_benign_kind_is_refused_and_counted",)),
    Mutation("weight check", "server/intake.py",
             'return reason("weight",', 'return None and reason("weight",',
             ("tests/test_intake.py", "tests/test_fairshare.py"),
             ("tests/test_insider.py::test_weighting_itself_is_refused_with_the_reason_weight",)),
    Mutation("duplicate reservation", "server/rounds.py",
             "                rnd.pending.add(h.user_id)", "                pass",
             ("tests/test_intake.py",),
             ("tests/test_insider.py::test_a_duplicate_update_is_refused",)),
    Mutation("shard check", "orchestrator/workers.py",
             "                shard = self._roster_shard(entry, kind)",
             "                shard = self._free_shard(kind, (int(request.held_index), int(request.held_count)))",
             ("tests/test_roster.py",)),
    Mutation("sanity bound", "fedseq/engine.py",
             "    if not idx or updates.shape[1] == 0:\n        return []",
             "    if True:\n        return []",
             ("tests/test_engine.py", "tests/test_intake.py"),
             ("tests/test_insider.py::test_an_update_of_3e38_is_refused_by_the_sanity_bound",)),
    Mutation("per-identity cap", "fedseq/fairshare.py",
             "            if n >= self.limit:\n                return n", "            if False:\n                return n",
             ("tests/test_fairshare.py",),
             ("tests/test_insider.py::test_health_watch_streams_are_capped_per_identity",)),
]


def copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run(m: Mutation, with_insider: bool, python: str) -> tuple[str, str, float]:
    with tempfile.TemporaryDirectory(prefix="fedseq-mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        target = tree / m.path
        text = target.read_text()
        if text.count(m.old) != 1:
            return "STALE", f"{m.old.strip()[:60]!r} occurs {text.count(m.old)} times in {m.path}", 0.0
        target.write_text(text.replace(m.old, m.new))
        tests = list(m.tests) + (list(m.insider) if with_insider else [])
        # the copy, not the editable install, must be imported: run from the copy, with it first on the path
        probe = subprocess.run([python, "-c", "import fedseq, server; print(fedseq.__file__)"], cwd=tree,
                               capture_output=True, text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
        if not probe.stdout.startswith(str(tree)):
            raise SystemExit(f"the mutant copy is not the code imported: {probe.stdout}{probe.stderr}")
        t0 = time.time()
        proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                              capture_output=True, text=True,
                              env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                   "HOME": tmp})
        failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M) or re.findall(r"^ERROR (\S+)", proc.stdout, re.M)
        verdict = "caught" if proc.returncode != 0 and failed else "MISSED"
        return verdict, ", ".join(failed[:3]) or proc.stdout.strip().splitlines()[-1:][0], time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--with-insider", action="store_true", help="also run the slow tests/test_insider.py guards")
    ap.add_argument("--only", help="one mutation, by a word of its name")
    args = ap.parse_args()
    python = sys.executable
    rows = []
    bad = 0
    for m in MUTATIONS:
        if args.only and args.only not in m.name:
            continue
        verdict, detail, seconds = run(m, args.with_insider, python)
        bad += verdict != "caught"
        print(f"{m.name:24s} {verdict:7s} {seconds:6.1f}s  {detail}", flush=True)
        rows.append(f"| {m.name} | `{m.path}` | {verdict} | {detail} |")
    print("\n| check removed | file | result | first failing tests |\n|---|---|---|---|")
    print("\n".join(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
