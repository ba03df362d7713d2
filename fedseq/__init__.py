"""fedseq: federated sequential recommendation, attacked and defended, as networked services.

The library every service shares (README "Module map"; docs/architecture.md)."""

import os as _os

# gRPC's fork support (on by default in grpcio >= 1.78) runs at-fork handlers in every fork(),
# including subprocess's fork-then-exec of redis-server (its preexec_fn rules out vfork); with gRPC's
# threads live, the child's handler can abort it before the exec (seen once in the suite:
# redis-server "exited with code -6 during startup", its log "epoll_wait error: Bad file
# descriptor"; grpc/grpc#13873). fedseq forks only to exec, or into compute processes that never use
# gRPC, so it needs none of it. Set before any grpc import (every fedseq module imports this package
# first); a value already in the environment wins.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
