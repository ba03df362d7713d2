"""What mutual TLS costs: the Steam SASRec training epoch through the services (`fedseq run`) with
mTLS (the default) and with ``--insecure``, interleaved A/B pairs on the same machine, medians and
the ratio. Also the bytes: TLS adds no protobuf bytes (the ledger counts serialized messages), so
only time is compared.

    python bench/bench_tls.py --data-root ../shared/data              # 2 pairs x 2 epochs
    python bench/bench_tls.py --dataset synthetic --pairs 3           # quick look

Benchmarks measure; they do not gate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_epoch import services  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="steam")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--codec", default="sparse-fp32")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"mtls": [], "insecure": []}
    for p in range(args.pairs):
        order = ("mtls", "insecure") if p % 2 == 0 else ("insecure", "mtls")  # alternate who goes first
        for mode in order:
            t0 = time.perf_counter()
            r = services(args, args.epochs, ("--insecure",) if mode == "insecure" else ())
            runs[mode].append(r)
            print(f"pair {p + 1} {mode}: epochs {', '.join(f'{t:.2f}' for t in r['train_epoch_s'])} s "
                  f"(run {time.perf_counter() - t0:.0f} s)", flush=True)
    med = {m: statistics.median(t for r in rs for t in r["train_epoch_s"]) for m, rs in runs.items()}
    upload = {m: statistics.median(r["breakdown_per_epoch_s"]["worker_upload"] for r in rs) for m, rs in runs.items()}
    print(f"train epoch median: mTLS {med['mtls']:.2f} s, insecure {med['insecure']:.2f} s, "
          f"ratio {med['mtls'] / med['insecure']:.3f}")
    print(f"worker upload time per epoch (max over workers per round, summed): mTLS {upload['mtls']:.2f} s, "
          f"insecure {upload['insecure']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median_epoch_s": med, "upload_s": upload}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
