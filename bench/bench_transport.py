"""What the upload path's transport costs by itself: gRPC streaming of update-sized messages from
a client to a server in another process, through fedseq's own channel and server construction
(``fedseq.rpc``: the same options, mutual TLS with a role-checked certificate, or plaintext), with
a servicer that only counts the bytes. No encoding, no decoding, no training: the CPU seconds per
update each side spends are the floor that ``fedseq run`` pays on top of the in-process runner
for every update it moves.

    python bench/bench_transport.py                         # 390 KB (a Steam SASRec sparse-fp32 update), mTLS and plaintext
    python bench/bench_transport.py --sizes 4000,390000,1000000 --updates 3000

Per size and mode: wall seconds, client and server CPU milliseconds per update (process CPU time
from ``getrusage`` / ``/proc``), and the server's receive rate. Benchmarks measure; they do not gate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedseq import rpc, tls  # noqa: E402
from fedseq.v1 import aggregator_pb2 as pb  # noqa: E402
from fedseq.v1 import aggregator_pb2_grpc as pb_grpc  # noqa: E402

PER_STREAM = 128  # updates per SubmitUpdates stream (a worker's share of a 256-user round)


class Counting(pb_grpc.AggregatorServicer):
    """Reads every chunk of every stream and counts its data bytes: the server's share of the transport."""

    def SubmitUpdates(self, request_iterator, context):
        n = 0
        for chunk in request_iterator:
            n += len(chunk.data)
        return pb.SubmitReply(bytes_received=n)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(tls_dir: str | None) -> int:
    """The server process: print the port, serve until a line arrives on stdin."""
    identity = tls.Identity.load(tls_dir, "server") if tls_dir else None
    svc = rpc.Service([(pb_grpc.add_AggregatorServicer_to_server, Counting(), "fedseq.v1.Aggregator")],
                      identity=identity).start()
    print(svc.port, flush=True)
    sys.stdin.readline()
    svc.stop(0)
    return 0


def measure(size: int, updates: int, tls_dir: str | None) -> dict:
    """Stream ``updates`` messages of ``size`` data bytes (each an UpdateChunk with its header, as a
    worker sends a one-chunk update) to a server process; CPU and wall of both sides."""
    argv = [sys.executable, __file__, "--serve"] + (["--tls-dir", tls_dir] if tls_dir else [])
    server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        identity = tls.Identity.load(tls_dir, "client-0") if tls_dir else None
        stub = pb_grpc.AggregatorStub(rpc.channel(f"127.0.0.1:{port}", identity=identity, peer="server"))
        payload = os.urandom(size)
        stub.SubmitUpdates(iter([pb.UpdateChunk(data=b"x")]), timeout=30)  # connect (and handshake) first

        def stream(n: int):
            for u in range(n):
                header = pb.UpdateHeader(run_id="bench", round_id=1, user_id=u, token="t" * 32, num_samples=30,
                                         total_bytes=size, encoding="sparse-fp32")
                yield pb.UpdateChunk(header=header, data=payload)

        c0, s0, t0 = _cpu_self(), _cpu_of(server.pid), time.perf_counter()
        sent = 0
        while sent < updates:
            n = min(PER_STREAM, updates - sent)
            reply = stub.SubmitUpdates(stream(n), timeout=600)
            assert reply.bytes_received == n * size
            sent += n
        wall, client, srv = time.perf_counter() - t0, _cpu_self() - c0, _cpu_of(server.pid) - s0
    finally:
        server.stdin.write("\n")
        server.stdin.flush()
        server.wait(timeout=30)
    return {"size": size, "updates": updates, "mode": "mtls" if tls_dir else "plaintext", "wall_s": wall,
            "client_ms_per_update": 1e3 * client / updates, "server_ms_per_update": 1e3 * srv / updates,
            "server_mb_per_cpu_s": size * updates / srv / 1e6 if srv else float("inf")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="390000", help="comma list of update sizes in bytes")
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--modes", default="mtls,plaintext")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.tls_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tls.make_certs(tmp, {"server": "server", "client-0": "worker"})
        for size in (int(s) for s in args.sizes.split(",")):
            for mode in args.modes.split(","):
                r = measure(size, args.updates, tmp if mode == "mtls" else None)
                rows.append(r)
                print(f"{size:>9} B {r['mode']:>9}: {r['updates']} updates in {r['wall_s']:.2f} s; CPU per update: "
                      f"client {r['client_ms_per_update']:.3f} ms, server {r['server_ms_per_update']:.3f} ms "
                      f"(server receives {r['server_mb_per_cpu_s']:.0f} MB per CPU second)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
