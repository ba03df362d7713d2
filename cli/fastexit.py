"""Leave a finished ``fedseq`` process without tearing down its modules.

At exit the interpreter joins the non-daemon threads, runs the ``atexit`` handlers (logging's
flush, multiprocessing's, weakref finalizers), flushes stdio, and then tears down every module and
collects every object. With torch, gRPC and numpy loaded that last part costs 0.3-0.7 CPU s in a
new interpreter, and about 1 CPU s in a service forked from the zygote (cli/zygote.py), where it
writes to, and so copies, nearly every page it shares with the zygote (docs/results/suite.md).
Nothing needs it: the process is about to end.

:func:`install` registers :func:`_leave` with ``atexit``; called before any other module that
registers a handler is imported, :func:`_leave` runs last (``atexit`` runs handlers in reverse),
after everything the interpreter's exit does but the teardown. :func:`arm` gives it the exit
status once the command has returned; an unarmed process (a command that raised, a library
caller such as a test calling ``cli.main.main``) exits as usual."""

from __future__ import annotations

import atexit
import os
import sys

_STATUS: list[int] = []


def _leave() -> None:
    if not _STATUS:
        return
    logging = sys.modules.get("logging")
    if logging is not None:  # its own handler ran before this one if it was registered later
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_STATUS[0])


def install() -> None:
    atexit.register(_leave)


def arm(status: int) -> int:
    """The exit status ``status`` (returned) is the process's: exit without the module teardown."""
    _STATUS[:] = [status & 0xFF]
    return status
