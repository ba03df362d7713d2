"""``fedseq reproduce SUITE``: the paper's settings as named runs, and their pages in docs/results/.

    fedseq reproduce learning-core                # run the suite (in-process runner), then render
    fedseq reproduce learning-core --render-only  # re-render from existing run folders
    fedseq reproduce attacks --only dv-fsr-reference

Each run is `fedseq sim` with the suite's flags (printed in the page), results in
<runs>/<suite>/<label>/results.json. Runs are long (SASRec on Steam: ~15 s per epoch here);
suites run one run at a time (the 2-core machine has no room for two).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path.cwd()  # run from the repository root: runs/ and docs/results/ are relative to it
STEAM = ["--dataset", "steam", "--data-root", "../shared/data", "--epochs", "30"]

SUITES: dict[str, dict] = {
    "learning-core": {
        "title": "Learning core: Steam, no attack, paper settings",
        "intro": "256 users per round, lr 0.001 multiplied by 0.5 every 5 epochs (ALGORITHMS.md: 0.5 for "
                 "`common`), sum aggregation, 30 epochs, sampled protocol (1,000 negatives + target). "
                 "`--compat reference` turns on every reference-compatibility switch (evaluation with dropout "
                 "and an appended mask token for SASRec, one shared negative-sampling seed, negatives from "
                 "1..M+1); `off` is fedseq's default. Timings: these runs shared the 2-core VM with two or three "
                 "other runs and test jobs, so their seconds per epoch are inflated; [speed.md](speed.md) has the "
                 "benchmark on a quiet machine.",
        "runs": [
            ("sasrec-reference", [*STEAM, "--model", "sasrec", "--compat", "reference"]),
            ("sasrec-off", [*STEAM, "--model", "sasrec"]),
            ("bert4rec-reference", [*STEAM, "--model", "bert4rec", "--compat", "reference"]),
            ("bert4rec-off", [*STEAM, "--model", "bert4rec"]),
        ],
        "paper": {"sasrec": "HR@10 0.3141, NDCG@10 0.1546", "bert4rec": "HR@10 0.3293, NDCG@10 0.1697"},
    },
}

ATK = ["--dataset", "steam", "--data-root", "../shared/data", "--epochs", "10", "--model", "sasrec"]
SUITES["attacks"] = {
    "title": "Attacks: Steam, SASRec, 0.1% malicious clients (3), sum aggregation, 10 epochs",
    "intro": "DV-FSR and its ablations (C-FSR: no explicit view; S-FSR: no implicit view) and the baselines EB and "
             "A-ra, each with the reference-compatibility switches on (`--compat reference`: above all DV-FSR's "
             "leaked substitution cross-entropy gradient, attack forwards without dropout, C-FSR's label on "
             "index 1) and off. ER@K is measured on the target item 1358 (least popular, zero training "
             "interactions) over the 3,753 benign users. 10 epochs instead of the paper's 30 to fit this "
             "machine (each run ~4 min).",
    "runs": [(f"{a}-{c}", [*ATK, "--attack", a, "--malicious-ratio", "0.001", "--compat", c])
             for a in ("dv-fsr", "c-fsr", "s-fsr", "eb", "a-ra") for c in ("reference", "off")],
    "paper": {"DV-FSR 0.1%": "ER@5 0.9169, ER@10 0.9997, HR@10 0.2944", "EB/A-ra": "ER@30 about 0.11"},
    "notes": """eb-reference and a-ra-reference ran before the `attacker_draw` switch existed, so their
malicious clients copy the seed-0 users (305, 2608, 3229); every other `reference` run copies the
public code's users.

## Which effects depend on the switches

- DV-FSR: ER@5 0.88 with the switches, 0.08 without; ER@10 0.9992 vs 0.61. The leaked
  substitution cross-entropy gradient and the copied users carry the early, top-5 exposure.
- The ablations (Table 5's ordering DV-FSR > S-FSR > C-FSR) hold only with the switches. With them,
  S-FSR (no L_con) keeps most of the effect (ER@10 0.98) because the leak rides on the substitution,
  and C-FSR is about 0 because its contrastive label sits on a random negative. Without them, S-FSR
  is about 0 (the substitution alone adds nothing) and C-FSR (BCE + a correct L_con) equals DV-FSR
  (ER@10 0.61 vs 0.61): the implicit view is what carries the attack.
- EB and A-ra stay near 0 either way (ER@30 0.02-0.03; paper about 0.11).

## What the reference switches change

`--compat reference` includes `attacker_draw`: the three malicious clients copy the users the public
code copies (`random.seed(20000000)`: users 26, 3021, 3417 with 32, 5 and 6 training items); with
switches off they copy the users drawn with the run seed (seed 0: users 305, 2608, 3229 with 31,
277 and 5 items). Without the leaked cross-entropy gradient (`attack_leak`) and the rest, DV-FSR
still reaches ER@10 0.61 after 10 epochs, far above EB and A-ra, but ER@5 stays low: the leak and
the copied users carry most of the early exposure, as ALGORITHMS.md measured on the public code
(ER@10 after epoch 4: 0.994 with the leak, 0.408 without).

Probe runs (4 epochs, in-process, helper investigation; epochs 2/3/4):

| attackers copy | benign negatives | ER@5 | ER@10 |
|---|---|---|---|
| users 305, 2608, 3229 (seed 0) | per-round seed | .011/.089/.41 | .03/.31/.88 |
| users 26, 3021, 3417 (reference draw) | per-round seed | .048/.316/.630 | .168/.635/.957 |
| reference draw | the public code's persistent `Random(2024)` stream per client | .025/.443/.707 | .126/.853/.992 |
| public code (ALGORITHMS.md) | | ?/.55-.64/? | ?/?/.994 |

The last fedseq row reproduces the public code's curve; it needs each client's sampler to persist
across its participations, which fedseq's stateless per-round seeding (`shared_neg_seed`) does not
do yet (it also makes benign learning faster than the reference's measured no-attack curve).
""",
}
SUITES["defenses"] = {
    "title": "Defenses: Steam, SASRec, DV-FSR (reference switches), 10 epochs",
    "intro": "mixed-RFA (lambda 0.3, Eq. 10) against no defense (sum aggregation) at 0.05% (1 attacker) and 0.1% "
             "(3 attackers); lr 0.001 halved every 5 epochs as in the paper for SASRec. Clean HR@10 under each "
             "rule without attack for reference.",
    "runs": [
        ("none-0.05", [*ATK, "--attack", "dv-fsr", "--malicious-ratio", "0.0005", "--compat", "reference"]),
        ("mixed-rfa-0.05", [*ATK, "--attack", "dv-fsr", "--malicious-ratio", "0.0005", "--compat", "reference",
                            "--defense", "mixed-rfa"]),
        ("mixed-rfa-0.1", [*ATK, "--attack", "dv-fsr", "--malicious-ratio", "0.001", "--compat", "reference",
                           "--defense", "mixed-rfa"]),
        ("mixed-rfa-clean-lr0.256", [*ATK, "--compat", "reference", "--defense", "mixed-rfa", "--lr", "0.256"]),
        # mixed-RFA's step is a mean, ~B = 256 times smaller than the sum's: the same lr barely trains,
        # so also with lr scaled by 256
        ("mixed-rfa-0.1-lr0.256", [*ATK, "--attack", "dv-fsr", "--malicious-ratio", "0.001", "--compat", "reference",
                                   "--defense", "mixed-rfa", "--lr", "0.256"]),
        ("mixed-rfa-0.05-lr0.256", [*ATK, "--attack", "dv-fsr", "--malicious-ratio", "0.0005", "--compat",
                                    "reference", "--defense", "mixed-rfa", "--lr", "0.256"]),
        ("adv-train-0.1-4ep", ["--dataset", "steam", "--data-root", "../shared/data", "--epochs", "4", "--model",
                               "sasrec", "--attack", "dv-fsr", "--malicious-ratio", "0.001", "--compat",
                               "eval_dropout,eval_mask_token,shared_neg_seed,neg_from_vocab,attack_leak,"
                               "attack_eval_mode,substitution_fill,attacker_draw", "--defense", "adv-train"]),
    ],
    "paper": {"Table 4": "ER@5 no defense 0.0011 (0.05%) / 0.9169 (0.1%); mixed-RFA 0.0000 / 0.0578"},
    "notes": """No defense at 0.1% is the attack page's `dv-fsr-reference` run: ER@5 0.8841, ER@10 0.9992,
HR@10 0.3088 after 10 epochs.

mixed-RFA's aggregate is a mean-scale vector (0.3 x mean + 0.7 x geometric median), about B = 256
times smaller than the paper's sum, so at the paper's lr 0.001 the model does not train (HR@10 0.008
after 10 epochs) and exposure stays 0 trivially. With the lr scaled by 256 (0.256) it trains like
the sum (HR@10 0.32) and still holds DV-FSR down: ER@5 0.0157 at 0.1% against 0.8841 without
defense (paper 0.0578 vs 0.9169) and 0 at 0.05%.

adv-train (`--defense adv-train`, Yue et al. 2022) adds one adversarial round per round (32 users
with a full-vocabulary one-hot input each), which makes a Steam epoch several times longer; its
run below is 4 epochs, against DV-FSR's 4-epoch exposure without defense (ER@5 0.63, ER@10 0.96 at
epoch 4 in `dv-fsr-reference`). The public code's adv_train applies no update (compat
`advtrain_noop`), so the paper's adv_train rows equal no defense.
""",
}

KEYS = ("hr@10", "ndcg@10", "er@5", "er@10", "er@20", "er@30")


def run(suite: str, label: str, flags: list[str], runs_root: Path) -> None:
    out = runs_root / suite / label
    cmd = [sys.executable, "-m", "cli.main", "sim", *flags, "--out", str(out)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def render(suite: str, runs_root: Path, dest: Path) -> None:
    spec = SUITES[suite]
    lines = [f"# {spec['title']}", "", spec["intro"], ""]
    if spec.get("paper"):
        lines += ["Paper: " + "; ".join(f"{k}: {v}" for k, v in spec["paper"].items()), ""]
    lines += ["| run | command | epochs | final HR@10 | final NDCG@10 | best HR@10 (epoch) | ER@5 | ER@10 | ER@30 | "
              "median s/epoch (train + eval) |", "|---|---|---|---|---|---|---|---|---|---|"]
    curves = []
    for label, flags in spec["runs"]:
        path = runs_root / suite / label / "results.json"
        if not path.exists():
            lines.append(f"| {label} | `fedseq sim {' '.join(flags)}` | not run | | | | | | | |")
            continue
        res = json.loads(path.read_text())
        ep = [e for e in res["epochs"] if "hr@10" in e]
        last = ep[-1]
        best = max(ep, key=lambda e: e["hr@10"])
        sec = statistics.median(e["seconds"] for e in ep)
        lines.append(f"| {label} | `fedseq sim {' '.join(flags)}` | {len(ep)} | {last['hr@10']:.4f} | "
                     f"{last['ndcg@10']:.4f} | {best['hr@10']:.4f} ({best['epoch']}) | {last['er@5']:.4f} | "
                     f"{last['er@10']:.4f} | {last['er@30']:.4f} | {sec:.1f} |")
        curves.append((label, ep))
    if spec.get("notes"):
        lines += ["", spec["notes"].rstrip()]
    for label, ep in curves:
        lines += ["", f"## {label}: per-epoch curve", "", "| epoch | lr | " + " | ".join(KEYS) + " | seconds |",
                  "|---" * (len(KEYS) + 3) + "|"]
        for e in ep:
            lines.append(f"| {e['epoch']} | {e.get('lr', 0):.6g} | " + " | ".join(f"{e[k]:.4f}" for k in KEYS) +
                         f" | {e['seconds']:.1f} |")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")
    print(f"wrote {dest}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "fidelity"), help="run folders (default runs/fidelity)")
    ap.add_argument("--render-only", action="store_true", help="only re-render the page from existing runs")
    ap.add_argument("--only", action="append", help="run only these labels (repeatable)")


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(ap)
        args = ap.parse_args()
    runs_root = Path(args.runs)
    if not args.render_only:
        from .sweep import Progress

        todo = [(label, flags) for label, flags in SUITES[args.suite]["runs"] if not args.only or label in args.only]
        progress = Progress(len(todo))
        for label, flags in todo:
            t0 = time.time()
            run(args.suite, label, flags, runs_root)
            print(progress.line(f"{args.suite}/{label} done in {time.time() - t0:.0f}s"), file=sys.stderr, flush=True)
    render(args.suite, runs_root, ROOT / "docs" / "results" / f"{args.suite}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
