"""A pre-imported process that forks the services of ``fedseq run``.

Every fedseq service imports torch, numpy and gRPC before it does anything: about 2.4 CPU
seconds each on the project's 2-core machine (docs/results/suite.md), paid again by every
restart. The launcher instead starts one zygote (``python -m cli.zygote_main``; this module is the
launcher's handle on it), which imports all of that once and then forks one child per service on
request. Each child is a real process of its
own (its own pid, session, log file and environment; a signal kills it as it would kill an
exec'd one) that runs ``fedseq <argv>`` from the imported state. The Android runtime and
CPython's ``multiprocessing`` forkserver start processes the same way.

Rules that keep the fork safe:

- the zygote forks from one thread: it runs no torch operation, opens no gRPC channel and starts
  no thread (``OMP_NUM_THREADS=1`` keeps OpenBLAS from starting its pool at import; with more
  threads, numpy's BLAS pool is re-made by its own at-fork handler);
- the zygote never holds a secret, since every child is a copy of its memory: its own
  environment is the launcher's service environment (no credentials), and a child's environment
  (store credentials included) comes on a pipe of its own whose read end the zygote passes on
  unread (SCM_RIGHTS); only the child reads it, after the fork. (tests/test_insider.py reads the
  workers' whole memory for the store password.)
- a child's parent is the zygote, which exits when the launcher's end of its socket closes (the
  launcher exited or was killed); each child names the zygote as ``FEDSEQ_PARENT_PID``, so it
  shuts down when its parent is gone (``fedseq.rpc.wait_for_signal``).

Protocol: JSON messages on a Unix SOCK_SEQPACKET socket pair. The launcher sends
``{"name", "argv", "log", "cwd", "netns"}`` with the read end of the child's environment pipe
attached; the
zygote answers ``{"pid": N}`` (or ``{"error": ...}``) and, whenever a child ends,
``{"exited": N, "rc": R}`` with R as ``subprocess`` reports it (negative: killed by that signal)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_MESSAGE = 1 << 16


def send(sock: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


class ZygoteGone(RuntimeError):
    pass


class Forked:
    """A service forked by a :class:`Zygote`: the part of ``subprocess.Popen`` the launcher uses."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            with self.zygote.changed:
                self.zygote.changed.wait(0.05)
        return self.returncode  # type: ignore[return-value]


class Zygote:
    """The launcher's handle on its zygote process: :meth:`spawn` forks a service."""

    def __init__(self, env: dict[str, str], tag: str, log: Path) -> None:
        # the tag (the run's log folder) names the zygote's and so every child's command line
        self.log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli.zygote_main", str(theirs.fileno()), tag],
                                         stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
                                         pass_fds=(theirs.fileno(),))
        self.changed = threading.Condition()
        self._exits: dict[int, int] = {}
        self._replies: list[dict] = []
        self._spawn_lock = threading.Lock()
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            with self.changed:
                if "exited" in message:
                    self._exits[message["exited"]] = message["rc"]
                elif "ready" not in message:  # (ready: its imports are done)
                    self._replies.append(message)
                self.changed.notify_all()
        with self.changed:
            self._gone = True
            self.changed.notify_all()

    def _reply(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        with self.changed:
            while not self._replies:
                if self._gone:
                    raise ZygoteGone(f"the zygote exited with code {self.proc.wait()}")
                if time.monotonic() >= end:
                    raise ZygoteGone(f"the zygote did not answer within {timeout:.0f}s")
                self.changed.wait(0.1)
            return self._replies.pop(0)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path, timeout: float = 60,
              cwd: str | None = None, netns: str | None = None) -> Forked:
        """Fork ``fedseq <argv>`` as ``name`` (its comm), its stdout and stderr appended to ``log``,
        with exactly the environment ``env``, in ``cwd`` (default: the zygote's), in the network
        namespace ``netns`` when given (a path such as ``/run/netns/NAME``: the child enters it
        before it runs anything, as ``ip netns exec`` would; needs the privilege setns needs)."""
        blob = json.dumps(env).encode()
        r, w = os.pipe()  # the environment goes to the child past the zygote (module docstring)
        try:
            if len(blob) > 60_000:  # a pipe holds 64 KiB: more would block before the child reads
                raise ZygoteGone(f"the environment of {name} is too large ({len(blob)} bytes)")
            os.write(w, blob)
            os.close(w)
            w = -1
            with self._spawn_lock:
                try:
                    send(self.sock, {"name": name, "argv": argv, "log": str(log), "cwd": cwd, "netns": netns}, (r,))
                except OSError as e:
                    raise ZygoteGone(f"the zygote is gone ({e})") from e
                reply = self._reply(timeout)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        if "error" in reply:
            raise ZygoteGone(reply["error"])
        return Forked(self, int(reply["pid"]))

    def exit_code(self, pid: int) -> int | None:
        with self.changed:
            if pid in self._exits:
                return self._exits[pid]
            if not self._gone:
                return None
        # the zygote died before its child: the child notices and exits; report it once it has
        return None if os.path.exists(f"/proc/{pid}") else -signal.SIGKILL

    def close(self, timeout: float = 10) -> None:
        """Close our end of the socket (the zygote exits; children still running follow) and wait."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self.log.close()
