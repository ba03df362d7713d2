"""The zygote process of ``fedseq run`` (cli/zygote.py says what it is for, and its rules):
``python -m cli.zygote_main FD TAG`` imports the services' libraries, then forks a service per
request on the Unix socket FD; TAG (the run's log folder) names it, and so its children, in ``ps``."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading

from cli import fastexit

fastexit.install()  # before the preload imports register their exit handlers, so it runs last

from cli.zygote import MAX_MESSAGE, send  # noqa: E402

# what the services import before they serve; a module a service imports later costs that
# service the import (it still works). torch._dynamo is what torch.func's first vmap(grad) loads
# (about 1.1 CPU s in each training worker otherwise)
PRELOAD = ("numpy", "torch", "torch._dynamo", "grpc", "cli.main", "cli.services", "server.app", "client.app",
           "attacker.app", "orchestrator.app", "fedseq.engine", "fedseq.experiment")


def _preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threading.active_count() != 1 or threads != 1:
        print(f"fedseq zygote: {threads} threads after the imports (OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); forking from them relies on their at-fork "
              "handlers", file=sys.stderr)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send(sock, {"exited": pid, "rc": os.waitstatus_to_exitcode(status)})


def serve(sock: socket.socket) -> tuple[dict, int] | None:
    """The zygote's loop: fork a child per request on ``sock``. Returns the request and its
    environment pipe in each child (which then runs it); None in the zygote once the launcher's
    end of ``sock`` is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C, then closes the socket
    _preload()
    send(sock, {"ready": os.getpid()})
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        _reap(sock)
        if not readable:
            continue
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not data:
            return None  # the launcher is gone; the children follow when they see it
        request = json.loads(data)
        if len(fds) != 1:
            send(sock, {"error": "a request comes with its environment pipe"})
            continue
        try:
            pid = os.fork()
        except OSError as e:
            os.close(fds[0])
            send(sock, {"error": f"fork failed: {e}"})
            continue
        if pid == 0:
            sock.close()
            return request, fds[0]
        os.close(fds[0])  # unread: the child's environment is the child's alone
        send(sock, {"pid": pid})


def _set_name(name: str) -> None:
    """The child's name in ``ps -o comm``/``top`` (Linux prctl PR_SET_NAME; 15 bytes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)


CLONE_NEWNET = 0x40000000


def _enter_netns(path: str) -> None:
    """Move this (single-threaded, just forked) child into the network namespace ``path`` (e.g.
    ``/run/netns/NAME``), as ``ip netns exec`` would before it execs; OSError saying why not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, MAX_MESSAGE):
        parts.append(chunk)
    os.close(fd)
    return b"".join(parts)


def become(request: dict, env_fd: int) -> list[str]:
    """In a new child: detach from the zygote (own session, stdio to the log, the environment
    read from ``env_fd``) and return the ``fedseq`` arguments to run."""
    env = json.loads(_read_all(env_fd))
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    if request.get("netns"):
        _enter_netns(request["netns"])
    os.environ.clear()
    os.environ.update(env)
    os.environ["FEDSEQ_PARENT_PID"] = str(os.getppid())  # the zygote: gone when the launcher is
    if request.get("cwd"):
        os.chdir(request["cwd"])
    _set_name(request["name"])
    sys.argv = ["fedseq", *request["argv"]]
    return list(request["argv"])


def main() -> int:
    """Serve on the socket ``argv[1]``; in each child, run the service it was asked for."""
    got = serve(socket.socket(fileno=int(sys.argv[1])))
    if got is None:  # the launcher closed its end: exit without tearing the imports down
        sys.stderr.flush()
        os._exit(0)
    argv = become(*got)
    from cli.main import main as fedseq_main

    # the interpreter then exits as usual (threads joined, atexit run), less the module teardown
    return fastexit.arm(fedseq_main(argv))


if __name__ == "__main__":
    sys.exit(main())
