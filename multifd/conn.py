"""Established connections: blocking sockets driven from worker threads under trio.

Theory of operation. trio owns creation, synchronization and cleanup; bulk I/O runs in a worker
thread per channel because blocking socket calls (and, with TLS, OpenSSL) release the GIL and
use both cores, where trio's own I/O path costs far more CPU per byte.

- A `Conn` exists only once its socket is connected (and, later, its TLS handshake and hello
  are done). Whoever holds it closes it: `async with conn`.
- `Conn.run(stage, fn, *args)` runs `fn(*args)` in a thread started with `trio.to_thread`
  from the calling task. It cannot be abandoned: if the task is cancelled while the thread is
  blocked, a guard task shuts the socket down, the blocked call fails at once, and the failure
  is turned back into `trio.Cancelled` so that it is never reported as an error of its own. No
  thread outlives the `run` call that started it.
- Every blocking call has the connection's timeout as its bound, so a silent peer raises
  `PeerTimeout` naming the channel and stage.
- Foreign exceptions (OSError, TimeoutError) are translated here, once, into our types.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import time
import traceback

import trio

from . import errors as E
from . import tls
from .errors import Stage, caused_by_shutdown, collapse_group, inherit_stamp, stamped_call
from .side import Side

IOV_BATCH = 512


class Conn:
    """An established connection, closed by whoever holds it.

    Only one thread may use a Conn at a time: two threads reading one socket would split
    records between them. `_busy` is a conflict detector that turns such a bug into an
    immediate error; it records nothing else.
    """

    def __init__(self, sock: socket.socket, label: str, *, side: Side, timeout: float) -> None:
        self.sock = sock
        self.raw = sock  # the socket itself, also once a fault seam wraps `sock`
        self.label = label
        self.side = side
        self.set_timeout(timeout)
        self._busy = False
        try:
            self.peer = sock.getpeername()
        except OSError:
            self.peer = None

    def establish(self, label: str) -> None:
        """The hellos are done: name the channel, bound its waits by the idle timeout, and
        put the side's socket seam under it."""
        self.label = label
        self.set_timeout(self.side.timeouts.idle)
        self.sock = self.side.faults.socket(label, self.sock)

    def set_timeout(self, seconds: float) -> None:
        """Bound every later send and receive by `seconds`.

        The bound is the kernel's (SO_RCVTIMEO / SO_SNDTIMEO) on a blocking socket, not
        Python's socket timeout: that one turns every call into poll() plus a non-blocking
        call, which costs a third of the throughput on the bulk path.
        """
        self.sock.settimeout(None)
        self._kernel_timeouts(seconds, socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
        self.timeout = seconds

    def _kernel_timeouts(self, seconds: float, *options: int) -> None:
        seconds = max(seconds, 1e-6)  # a zero timeval would mean no timeout at all
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
        for option in options:
            self.sock.setsockopt(socket.SOL_SOCKET, option, timeval)

    # --- blocking primitives, called from the worker thread

    def send_all(self, data) -> None:
        """All of `data` within the timeout: one deadline for the whole call, as with TLS.

        The kernel's send timeout alone is no bound: a send that moved a single byte before it
        expired returns short, and every retry gets a fresh timeout, so a peer that stopped
        reading was detected only after two or three timeouts."""
        deadline = time.monotonic() + self.timeout
        view = memoryview(data).cast("B")
        sent = self.sock.send(view)
        if sent < view.nbytes:
            self._send_rest(view[sent:], deadline)

    def send_parts(self, parts: list) -> None:
        """Send header and payload views with one system call per IOV_BATCH parts (a packet
        of alternating data and zero pages has hundreds of them; the kernel takes 1024), all
        within one timeout of the call's start, as send_all(). (TlsConn has Python's timeout
        per TLS write instead.)"""
        deadline = time.monotonic() + self.timeout
        if len(parts) <= IOV_BATCH:
            self._send_group(parts, deadline)
            return
        try:
            for i in range(0, len(parts), IOV_BATCH):
                if i:
                    self._narrow_send_timeout(deadline)
                self._send_group(parts[i:i + IOV_BATCH], deadline)
        finally:
            self._restore_send_timeout()

    def _send_group(self, parts: list, deadline: float) -> None:
        part = None
        try:
            sent = self.sock.sendmsg(parts)
            for part in parts:
                size = part.nbytes if isinstance(part, memoryview) else len(part)
                if sent >= size:
                    sent -= size
                    continue
                self._send_rest(memoryview(part).cast("B")[sent:], deadline)
                sent = 0
        finally:
            # A traceback keeps this frame alive: it must not keep a view of the sender's
            # mapped window alive too, or the window could not be unmapped.
            part = None
            parts = None

    def _send_rest(self, view: memoryview, deadline: float) -> None:
        """The slow path of a send that came back short: the rest by `deadline`, each retry
        bounded by the time left (the kernel's timeout, set for it and restored after)."""
        try:
            while view:
                self._narrow_send_timeout(deadline)
                view = view[self.sock.send(view):]
        finally:
            view = None  # no view of the sender's window may outlive the call
            self._restore_send_timeout()

    def _restore_send_timeout(self) -> None:
        """Undo _narrow_send_timeout(). On the way out of a failure the socket may be gone
        (a reset closes it): the failure is the news, not this."""
        with contextlib.suppress(OSError):
            self._kernel_timeouts(self.timeout, socket.SO_SNDTIMEO)

    def _narrow_send_timeout(self, deadline: float) -> None:
        """Bound the next send by the time left until `deadline` (the caller restores it)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("send timed out")
        self._kernel_timeouts(left, socket.SO_SNDTIMEO)

    def recv_exactly(self, view: memoryview, what: str) -> None:
        recv_into = self.sock.recv_into
        while view:
            # MSG_WAITALL: one system call (and one GIL hand-off) per packet part instead of
            # one per socket-buffer's worth; the kernel still returns early on a timeout.
            n = recv_into(view, 0, socket.MSG_WAITALL)
            if n == 0:
                raise E.PeerClosed(f"connection closed by the peer while waiting for {what}")
            view = view[n:]

    def recv_some(self, view: memoryview) -> int:
        """What has arrived, up to len(view), waiting for at least a byte; 0 at the end of
        the stream."""
        return self.sock.recv_into(view)

    def recv_bytes(self, size: int, what: str) -> bytes:
        buf = bytearray(size)
        self.recv_exactly(memoryview(buf), what)
        return bytes(buf)

    # --- trio side

    def error(self, exc: BaseException, stage: Stage) -> E.MultifdError:
        """Translate a foreign exception raised on this connection into our type."""
        if isinstance(exc, E.MultifdError):
            exc.side = exc.side or self.side.name
            exc.channel = exc.channel or self.label
            exc.stage = exc.stage or stage
            return exc
        where = dict(side=self.side.name, channel=self.label, stage=stage)
        if isinstance(exc, ssl.SSLError):
            # A stream cut short is what a failing peer leaves behind: its reason may follow.
            return E.TlsError(self.explain_tls(exc, stage),
                              peer_may_explain=isinstance(exc, ssl.SSLEOFError), **where)
        if isinstance(exc, (TimeoutError, BlockingIOError)):
            return E.PeerTimeout(f"peer silent for {self.timeout:g}s", **where)
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return E.PeerClosed(f"connection lost ({exc.strerror or exc})", **where)
        return E.TransportError(f"{exc.strerror or exc}" if isinstance(exc, OSError) else
                                repr(exc), **where)

    async def run(self, stage: Stage, fn, *args):
        """Run fn(*args) in a worker thread; cancellation shuts the socket down."""
        if self._busy:
            raise E.LocalProtocolError(f"{self.label}: two operations at once on one connection")
        self._busy = True
        interrupted = None  # when the guard shut the socket down (an errors.stamp)
        finished = False

        async def guard() -> None:
            nonlocal interrupted
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    interrupted = E.now()
                    self.shutdown()

        try:
            with collapse_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(guard)
                    try:
                        return await trio.to_thread.run_sync(
                            stamped_call, fn, *args, limiter=trio.CapacityLimiter(1))
                    except Exception as exc:
                        if interrupted is not None and caused_by_shutdown(exc, interrupted):
                            # The failure is the shutdown we caused: report the cancellation.
                            await trio.lowlevel.checkpoint()
                        err = self.error(exc, stage)
                        # Ordered by when it happened in the thread, not by when trio got to
                        # translating it: the cause must come before its consequences.
                        inherit_stamp(err, exc)
                        raise err from (None if isinstance(exc, E.MultifdError) else exc)
                    finally:
                        finished = True
                        nursery.cancel_scope.cancel()
        finally:
            self._busy = False

    def explain_tls(self, exc: ssl.SSLError, stage: Stage) -> str:
        return str(exc)

    async def wait_readable(self) -> None:
        """Until the peer has sent something or hung up, without reading it: trio's own wait,
        so cancelling it leaves the connection intact (cancelling run() shuts it down)."""
        await trio.lowlevel.wait_readable(self.raw)

    def shutdown(self) -> None:
        try:
            # The plain socket's shutdown, also under TLS: SSLSocket's own would drop the
            # SSL object under the feet of a thread that is still using it.
            socket.socket.shutdown(self.raw, socket.SHUT_RDWR)
        except OSError:
            pass

    tls = False

    def close_stream(self) -> None:
        """End the stream so that the peer can tell it was not cut: nothing to do in plain TCP,
        where END and DONE are the last messages."""

    def send_close(self) -> None:
        """The sending half of close_stream()."""

    async def end_stream(self, stage: Stage) -> None:
        if self.tls:
            await self.run(stage, self.close_stream)

    def close(self) -> None:
        self.raw.close()

    async def __aenter__(self) -> "Conn":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class TlsConn(Conn):
    """A Conn over an `ssl.SSLSocket`.

    Differences that matter: OpenSSL hands out one 16 KiB record per read and has no
    scatter-gather send; its retry loop would turn a kernel socket timeout into an endless
    wait, so this uses Python's own timeouts; and a stream ends with a TLS close both ways
    (`close_stream`), so a connection cut short is an error, never a quiet end.
    """

    tls = True
    COALESCE = 64 << 10  # parts smaller than this share one TLS record with their neighbours

    def __init__(self, sock: ssl.SSLSocket, label: str, *, side: Side, timeout: float,
                 peer_name: str, hostname: str | None = None, hint: str = "") -> None:
        self.peer_name = peer_name  # "the receiver" / "the sender", for error lines
        self.hostname = hostname
        self.hint = hint
        self._scratch = bytearray()
        super().__init__(sock, label, side=side, timeout=timeout)

    def set_timeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        self.timeout = seconds

    def handshake(self) -> None:
        self.sock.do_handshake()

    async def wait_readable(self) -> None:
        if self.sock.pending():  # already decrypted: the socket itself may stay quiet
            await trio.lowlevel.checkpoint()
            return
        await super().wait_readable()

    def peer_common_name(self) -> str | None:
        return tls.common_name(self.sock.getpeercert())

    def send_all(self, data) -> None:
        self.sock.sendall(data)  # Python's timeout, not the kernel's, bounds TLS (see above)

    def send_parts(self, parts: list) -> None:
        scratch = self._scratch
        try:
            for part in parts:
                size = part.nbytes if isinstance(part, memoryview) else len(part)
                if size < self.COALESCE:
                    scratch += part
                    continue
                if scratch:
                    self.sock.sendall(scratch)
                    scratch.clear()
                self.sock.sendall(part)
            if scratch:
                self.sock.sendall(scratch)
            scratch.clear()
        except BaseException as exc:
            # ssl.py's sendall is Python: its frames in the traceback hold views of the
            # image window and of the scratch buffer, which would turn the window's unmapping
            # (and the scratch's next resize) into a BufferError hiding the real failure.
            traceback.clear_frames(exc.__traceback__)
            self._scratch = bytearray()
            raise
        finally:
            part = None  # see Conn._send_group: no view of the window may outlive the call
            parts = None

    def recv_exactly(self, view: memoryview, what: str) -> None:
        recv_into = self.sock.recv_into
        while view:
            n = recv_into(view)
            if n == 0:
                raise E.PeerClosed(f"connection closed by the peer (TLS close) while waiting "
                                   f"for {what}")
            view = view[n:]

    def recv_some(self, view: memoryview) -> int:
        """As Conn's. A stream cut without a TLS close also reads as its end: the caller's
        framing must decide whether it was complete (QEMU before 10.0 sends no TLS close)."""
        try:
            return self.sock.recv_into(view)
        except ssl.SSLEOFError:
            return 0

    def close_stream(self) -> None:
        """Send our TLS close and wait for the peer's: returns only if the stream ended whole."""
        self.sock.unwrap()

    def send_close(self) -> None:
        """Send our TLS close without waiting for the peer's: a sender's data channel is done
        once its END is sealed, while the receiver may still be waiting for other channels."""
        self.sock.setblocking(False)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.sock.unwrap()  # the peer's close was already there
                return
            except ssl.SSLWantReadError:  # ours went out; theirs is not awaited
                return
            except ssl.SSLWantWriteError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.raw], [], left)[1]:
                    raise TimeoutError("no room to send the TLS close") from None

    def drain(self, seconds: float) -> None:
        """After a failed handshake, end our side and read until the peer leaves: closing with
        its bytes unread would reset the connection, and the reset can overtake the alert
        that tells the peer why."""
        socket.socket.shutdown(self.raw, socket.SHUT_WR)
        self.raw.settimeout(seconds)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and socket.socket.recv(self.raw, 1 << 16):
            pass

    def error(self, exc: BaseException, stage: Stage) -> E.MultifdError:
        if stage is Stage.TLS and isinstance(exc, (ConnectionError, ssl.SSLEOFError)):
            # What a receiver without TLS does with our ClientHello: not its protocol. (A
            # sender without TLS is recognised by its hello before any handshake.)
            hint = " (does it use --tls?)" if self.peer_name == "the receiver" else ""
            return E.TlsError(f"{self.peer_name} closed the connection during the TLS "
                              f"handshake{hint}", side=self.side.name, channel=self.label,
                              stage=stage)
        return super().error(exc, stage)

    def explain_tls(self, exc: ssl.SSLError, stage: Stage) -> str:
        return tls.explain(exc, peer=self.peer_name, name=self.hostname, stage=stage,
                           hint=self.hint, side=self.side.name) or str(exc)


async def within_handshake(side: Side, greeting, timed_out):
    """`await greeting()` under the handshake deadline, or raise `timed_out()` (made when it
    happens: an error's stamp is taken when it is made).

    Each read of a greeting is also bounded by the kernel with the same length (the Conn's
    timeout before `establish`); under load that bound can expire a hair before trio's
    deadline. It is the same deadline, so it is reported the same way."""
    try:
        with trio.move_on_after(side.timeouts.handshake):
            return await greeting()
    except E.PeerTimeout:
        pass
    raise timed_out()
