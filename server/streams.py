"""Stream intake of the aggregation server (``SubmitUpdates``): admitting upload streams within
:class:`~server.intake.StreamLimits`, cancelling idle ones, and putting each update back together
from its chunks.

An update is a header chunk then data chunks. The header is checked first (the round buffer's
precheck, server/intake.py): a refused update's data is read off the stream and counted but never
buffered. An accepted header's data is written, chunk by chunk as it arrives, into one buffer of
its declared size, which the header check bounds by the largest update an honest worker can send
for the run's model and codec; a stream holds at most one such buffer, and a byte beyond the
declared size drops it at once ("oversize"). Complete updates go to the round buffer
(server/rounds.py), which decodes and counts them.

The streams and the buffered byte counts have a lock of their own, never held while the round
buffer's (the state lock) is taken.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from fedseq import observe
from fedseq.fairshare import identity
from fedseq.v1 import aggregator_pb2 as pb
from fedseq.v1 import common_pb2

from .intake import StreamLimits, reason
from .rounds import RoundBuffer

log = logging.getLogger(__name__)


class StreamIntake:
    """Upload streams: at most ``limits.max_streams`` open (``max_per_peer`` per certificate),
    each cancelled when idle; their updates go to ``rounds``. ``compress`` sets a call's response
    compression as the run asks."""

    def __init__(self, limits: StreamLimits, rounds: RoundBuffer, compress: Callable[[object], None]) -> None:
        self.limits = limits
        self._rounds = rounds
        self._compress = compress
        self._lock = threading.Lock()
        # bytes of update data held in the streams' buffers now, and the most ever (each stream holds
        # at most one update's, of at most the run's update limit)
        self.buffered = 0
        self.peak_buffered = 0
        # open upload streams: id -> [context, identity, window start, bytes received in the window]
        self._streams: dict[int, list] = {}
        self._watchdog: threading.Thread | None = None

    def submit(self, request_iterator: Iterable[pb.UpdateChunk], context) -> pb.SubmitReply:
        """One SubmitUpdates call: admitted (else RESOURCE_EXHAUSTED), then read to its end."""
        sid = self._open(context)
        try:
            self._compress(context)
            return self._receive(self._tracked(sid, request_iterator))
        finally:
            with self._lock:
                self._streams.pop(sid, None)
                observe.UPLOAD_STREAMS.set(len(self._streams))

    def _open(self, context) -> int:
        """Admit an upload stream within :class:`StreamLimits` (else RESOURCE_EXHAUSTED, counted).
        The per-peer cap counts the streams of the caller's certificate (its common name, whatever
        address it calls from; the host without TLS): one worker certificate gets ``max_per_peer``
        slots however many addresses it drips from."""
        peer = identity(context)
        with self._lock:
            mine = sum(1 for s in self._streams.values() if s[1] == peer)
            busy = len(self._streams) >= self.limits.max_streams or mine >= self.limits.max_per_peer
            if not busy:
                sid = id(context)
                self._streams[sid] = [context, peer, time.monotonic(), 0]
                observe.UPLOAD_STREAMS.set(len(self._streams))
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, name="upload-watchdog", daemon=True)
                    self._watchdog.start()
        if busy:
            self._rounds.count("busy")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason(
                "busy", f"{len(self._streams)} upload streams open ({mine} from {peer}; limits "
                        f"{self.limits.max_streams}, {self.limits.max_per_peer} per certificate); retry later"))
        return sid

    def _watch(self) -> None:
        """Cancel upload streams that received fewer than ``min_bytes`` in their last window of
        ``idle_timeout`` seconds (slow-loris, byte drips); a stream that did starts a new window."""
        limits = self.limits
        while True:
            time.sleep(min(1.0, limits.idle_timeout / 4))
            now = time.monotonic()
            idle = []
            with self._lock:
                for s in self._streams.values():
                    if now - s[2] >= limits.idle_timeout:
                        if s[3] < limits.min_bytes:
                            idle.append((s[0], s[1], s[3]))
                        else:
                            s[2], s[3] = now, 0
            for ctx, peer, got in idle:
                log.warning("cancelling an upload stream from %s: %d bytes in %.0f s (at least %d needed)", peer, got,
                            limits.idle_timeout, limits.min_bytes)
                with self._lock:
                    cut = self._streams.pop(id(ctx), None) is not None
                if cut:
                    self._rounds.count("idle")
                ctx.cancel()

    def _tracked(self, sid: int, request_iterator: Iterable[pb.UpdateChunk]):
        """The stream's chunks, counting their bytes for the watchdog; ends when the stream is cancelled."""
        try:
            for chunk in request_iterator:
                with self._lock:
                    s = self._streams.get(sid)
                    if s is not None:
                        s[3] += chunk.ByteSize()
                yield chunk
        except grpc.RpcError:
            return

    def _receive(self, chunks: Iterable[pb.UpdateChunk]) -> pb.SubmitReply:
        """Every update of the stream, accepted or refused, as the reply's statuses."""
        upload = _Reassembly(self._rounds, self.hold)
        try:
            for chunk in chunks:
                upload.feed(chunk)
            upload.end()
        finally:
            upload.drop()
        return pb.SubmitReply(statuses=upload.statuses, bytes_received=upload.total)

    def hold(self, n: int) -> None:
        """Count ``n`` more (or, negative, fewer) bytes held in update buffers (:attr:`buffered`)."""
        with self._lock:
            self.buffered += n
            self.peak_buffered = max(self.peak_buffered, self.buffered)


class _Reassembly:
    """One stream's updates put back together from their chunks, each handed to ``rounds`` when
    its declared bytes are in (or refused: a header refused by the precheck, more bytes than
    declared, a stream or update that ends early, data before any header). ``hold`` counts the
    bytes of the buffer held."""

    def __init__(self, rounds: RoundBuffer, hold: Callable[[int], None]) -> None:
        self._rounds = rounds
        self._hold = hold
        self.statuses: list[common_pb2.UpdateStatus] = []
        self.total = 0  # the stream's bytes, as serialized
        self.header: pb.UpdateHeader | None = None  # of the update being received
        # the update's data so far: the one chunk that holds all of it (the usual update, no copy), or
        # one buffer of the declared size (within the run's limit: precheck) filled as chunks arrive.
        # None: nothing yet, or a refused update (its data is read off and counted, never kept)
        self.buf: bytes | bytearray | None = None
        self.held = 0  # len(buf), counted by hold
        self.refusal: str | None = None
        self.got = 0  # the update's data bytes so far
        self.wire = 0  # the update's chunks' bytes so far, as serialized

    def feed(self, chunk: pb.UpdateChunk) -> None:
        size = chunk.ByteSize()
        self.total += size
        if chunk.HasField("header"):
            self._start(chunk.header)
        elif self.header is None:
            self.statuses.append(self._rounds.refuse(None, reason("malformed", "data chunk before any update header"),
                                                     size))
            return
        self._data(chunk.data, size)

    def _start(self, header: pb.UpdateHeader) -> None:
        """A new update begins (the one before, if any, ended early)."""
        if self.header is not None:
            h = self.header
            self.statuses.append(self._rounds.refuse(h, self.refusal or reason(
                "truncated", f"update of user {h.user_id} ended after {self.got} of "
                             f"{h.total_bytes} bytes (the next header came)"), self.wire))
        self.drop()
        self.header, self.got, self.wire = header, 0, 0
        self.refusal = self._rounds.precheck(header)

    def _data(self, data: bytes, size: int) -> None:
        h = self.header
        assert h is not None
        at = self.got
        self.got += len(data)
        self.wire += size
        if self.got > h.total_bytes:  # dropped at once; its further data is read off until the next header
            if self.refusal is None:
                self.refusal = reason("oversize", f"update of user {h.user_id} is longer than its declared "
                                                  f"{h.total_bytes} bytes")
            self.drop()
            return
        if self.refusal is None and data:
            if self.buf is None:
                self.buf = data if len(data) == h.total_bytes else bytearray(h.total_bytes)
                self.held = len(self.buf)
                self._hold(self.held)
            if self.buf is not data:
                self.buf[at : self.got] = data  # type: ignore[index]
        if self.got == h.total_bytes:
            if self.refusal is None and self.buf is not None:
                self.statuses.append(self._rounds.accept(h, self.buf, self.wire))
            else:
                self.statuses.append(self._rounds.refuse(h, self.refusal or reason("malformed", "no data"), self.wire))
            self.drop()
            self.header, self.refusal = None, None

    def end(self) -> None:
        """The stream ended: an update still incomplete is refused."""
        h = self.header
        if h is not None:
            self.statuses.append(self._rounds.refuse(h, self.refusal or reason(
                "truncated", f"stream ended after {self.got} of {h.total_bytes} bytes"), self.wire))

    def drop(self) -> None:
        """Let go of the update's buffer (and its count)."""
        self.buf = None
        if self.held:
            self._hold(-self.held)
            self.held = 0
