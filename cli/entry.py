"""The ``fedseq`` console script. It installs SIGTERM handling before anything heavy is imported.

``cli.main`` imports torch (seconds, more on a busy machine). In a container without an init
process, fedseq runs as PID 1, and the kernel drops signals that PID 1 has no handler for. A
``podman stop`` or ``docker stop`` sent during that import was then lost, and the container was
killed when the stop grace period ran out (exit 137). With this entry point, a SIGTERM that
arrives before a service serves stops the process at once with exit code 143 (128 + 15).
Once a service serves, :func:`fedseq.rpc.serve_until_signal` replaces the handler with the
graceful shutdown.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from cli import fastexit

fastexit.install()  # before cli.main's imports register their exit handlers, so it runs last


def _stop_early(signum: int, _frame) -> None:
    code = 128 + signum
    try:
        os.write(2, f"fedseq: signal {signum} while starting: exiting with code {code}\n".encode())
    except OSError:
        pass
    if threading.active_count() > 1:
        # Service threads already run (the gRPC server, worker registration). A SystemExit in
        # the main thread would wait for them, so leave at once, as the default action would.
        os._exit(code)
    raise SystemExit(code)


def install_early_stop() -> None:
    """SIGTERM stops the process while it starts up, even as PID 1. A handler somebody else
    installed, or an ignored SIGTERM, is left alone."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _stop_early)


def main(argv: list[str] | None = None) -> int:
    install_early_stop()
    from cli.main import main as fedseq_main  # imports torch: the slow part

    return fedseq_main(argv)


def script() -> int:
    """The ``fedseq`` console script (and ``python -m cli.entry``): :func:`main`, then an exit
    without the module teardown (cli/fastexit.py)."""
    return fastexit.arm(main())


if __name__ == "__main__":
    sys.exit(script())
