"""A real TCP proxy for tests: it sits on 127.0.0.1 in front of a local port and forwards each
connection's bytes both ways, asking :meth:`TcpProxy.forward` about every read (count it, let it
pass, or cut the connection without it)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any


class TcpProxy:
    """Listens on ``port`` (chosen by the system) and forwards to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def forward(self, conn: dict[str, Any], direction: str, data: bytes) -> bool:
        """Whether ``data`` read in ``direction`` ("up": client to server, "down") goes on; False cuts
        the connection (both sides) without it. ``conn``: this connection's own state."""
        return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            conn: dict[str, Any] = {}
            threading.Thread(target=self._pipe, args=(client, server, "up", conn), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down", conn), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str, conn: dict[str, Any]) -> None:
        try:
            while data := src.recv(65536):
                if not self.forward(conn, direction, data):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown, not close: close alone waits for the other thread's recv
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()
