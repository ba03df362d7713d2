"""Effect of each update encoding on accuracy and on DV-FSR's exposure, through the real services.

    python bench/codec_effect.py                      # synthetic default (fedseq run's quickstart)
    python bench/codec_effect.py --dataset steam --data-root ../shared/data --epochs 10 --compat reference

For every codec: one run without attack and one with DV-FSR at the paper's 0.001 ratio; prints a
markdown table of final HR@10, NDCG@10, ER@5, ER@10 and bytes per update (ledger).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CODECS = ("dense-fp32", "sparse-fp32", "dense-fp16", "dense-bf16", "sparse-fp16", "int8-row")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--out", help="write the markdown table here")
    args, extra = ap.parse_known_args()
    rows = ["| codec | attack | HR@10 | NDCG@10 | ER@5 | ER@10 | bytes per update (mean) |", "|---|---|---|---|---|---|---|"]
    for codec in args.codecs.split(","):
        for attack in ("none", "dv-fsr"):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "cli.main", "run", "--codec", codec, "--attack", attack, "--out", tmp,
                       *extra]
                subprocess.run(cmd, check=True, capture_output=True)
                res = json.loads(Path(tmp, "results.json").read_text())
            last = res["epochs"][-1]
            per = res["summary"].get("bytes_per_update", 0)
            rows.append(f"| {codec} | {attack} | {last['hr@10']:.4f} | {last['ndcg@10']:.4f} | {last['er@5']:.4f} | "
                        f"{last['er@10']:.4f} | {per:,.0f} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
