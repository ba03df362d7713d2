"""Generated gRPC/protobuf stubs (do not edit; run tools/gen_protos.py)."""
