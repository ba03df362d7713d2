"""Regenerate the committed gRPC/protobuf stubs in fedseq/v1/ from protos/fedseq/v1/*.proto.

    python tools/gen_protos.py          # regenerate
    python tools/gen_protos.py --check  # fail (exit 1) if the committed stubs are stale

The generated files import each other as ``fedseq.v1.x_pb2`` because the proto include root is
``protos/`` and the package path is ``fedseq/v1``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "fedseq" / "v1"


def generate(dest: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    protos = sorted(PROTO_ROOT.glob("fedseq/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}/fedseq/v1")
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={dest}", f"--pyi_out={dest}",
            f"--grpc_python_out={dest}", *[str(p.relative_to(PROTO_ROOT)) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen = dest / "fedseq" / "v1"
    return sorted(p for p in gen.iterdir() if p.suffix in (".py", ".pyi"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            committed = sorted(p for p in OUT.glob("*_pb2*.py*"))
            stale = [f.name for f in files if not (OUT / f.name).exists() or not filecmp.cmp(f, OUT / f.name, shallow=False)]
            extra = [p.name for p in committed if p.name not in {f.name for f in files}]
            if stale or extra:
                print(f"stale generated stubs in {OUT}: {stale + extra}; run: python tools/gen_protos.py", file=sys.stderr)
                return 1
            print(f"generated stubs are current ({len(files)} files)")
            return 0
        OUT.mkdir(parents=True, exist_ok=True)
        for old in OUT.glob("*_pb2*.py*"):
            old.unlink()
        for f in files:
            shutil.copy(f, OUT / f.name)
        (OUT / "__init__.py").write_text('"""Generated gRPC/protobuf stubs (do not edit; run tools/gen_protos.py)."""\n')
        print(f"wrote {len(files)} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
