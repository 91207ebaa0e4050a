"""The receiver's front door: accept connections, read hellos, sort out the migration's channels.

Theory of operation. Every accepted connection gets a greeter task (at most MAX_PENDING at
once; more are closed on arrival). The greeter reads the hello under the handshake timeout and
asks the Registry for a slot. Channels are identified by their hello, never by arrival order:
a data channel that arrives before the control channel waits (bounded) until the control
channel has named the session. Anything that fails its hello is a stranger: it gets a reply
saying why when it spoke our protocol, is closed, and is logged; the migration goes on.

The Registry is plain state used only from trio tasks in one thread, so its check-and-claim in
claim() cannot interleave with another greeter's (there is no await inside it). It owns every
connection handed to it and closes them all when the receiver leaves `open_registry`.
"""

from __future__ import annotations

import contextlib
import socket
from contextlib import asynccontextmanager

import trio

from . import control
from . import errors as E
from . import tls as T
from . import wire
from .address import format_address
from .conn import Conn, TlsConn
from .faults import Plan
from .settings import Timeouts

# Connections that have not yet sent a complete hello, at once: more than a whole migration's
# (64 data channels and the control channel arrive together), few enough to bound a flood.
MAX_PENDING = 128
TLS_DRAIN = 1.0  # how long a refused TLS peer gets to read our alert
SIDE = "receiver"


class Registry:
    def __init__(self) -> None:
        self.session_id: bytes | None = None
        self.channels = 0
        self.control: Conn | None = None
        self.data: dict[int, Conn] = {}
        self._claimed: set[object] = set()
        self.session_known = trio.Event()
        self.complete = trio.Event()

    @staticmethod
    def _key(hello: wire.Hello) -> object:
        return "control" if hello.role is wire.Role.CONTROL else hello.channel

    def claim(self, hello: wire.Hello) -> wire.HelloStatus:
        """Reserve the hello's slot. The session is named only by fill(), once the control
        channel is established: a control hello that dies before its reply names nothing."""
        S = wire.HelloStatus
        if hello.role is wire.Role.CONTROL:
            if "control" in self._claimed:
                return S.BUSY
        elif hello.session != self.session_id:
            return S.UNKNOWN_SESSION
        elif hello.channels != self.channels:
            return S.BAD_CHANNEL
        elif hello.channel in self._claimed:
            return S.DUPLICATE_CHANNEL
        self._claimed.add(self._key(hello))
        return S.OK

    def release(self, hello: wire.Hello) -> None:
        self._claimed.discard(self._key(hello))

    def fill(self, hello: wire.Hello, conn: Conn) -> None:
        if hello.role is wire.Role.CONTROL:
            self.control = conn
            self.session_id, self.channels = hello.session, hello.channels
            self.session_known.set()
        else:
            self.data[hello.channel] = conn
        if self.control is not None and len(self.data) == self.channels:
            self.complete.set()

    def missing(self) -> list[int]:
        return [i for i in range(self.channels) if i not in self.data]

    def close_all(self) -> None:
        for conn in [self.control, *self.data.values()]:
            if conn is not None:
                conn.close()


def _read_hello(conn: Conn) -> wire.Hello:
    data = conn.recv_bytes(wire.HELLO.size, "a hello")
    try:
        return wire.decode_hello(data)
    except E.BadVersion:
        conn.send_all(wire.encode_hello_reply(wire.HelloStatus.BAD_VERSION))
        raise
    except E.BadMagic:
        if data.startswith(T.TLS_RECORD_PREFIX):
            raise E.BadMagic("a TLS handshake, and this receiver was started without --tls")
        raise  # not our protocol: say nothing to it
    except E.BadChannelId:
        conn.send_all(wire.encode_hello_reply(wire.HelloStatus.BAD_CHANNEL))
        raise
    except E.ProtocolError:
        conn.send_all(wire.encode_hello_reply(wire.HelloStatus.BAD_HELLO))
        raise


def _server_handshake(conn: TlsConn) -> None:
    """The TLS handshake, after a look at the first bytes: a sender without --tls gets a
    plain hello reply that tells it why, instead of a TLS error it cannot read."""
    plain = conn.sock  # the plain socket's methods, before TLS takes over the stream
    first = socket.socket.recv(plain, len(wire.MAGIC_BYTES), socket.MSG_PEEK)
    if not first:
        raise E.PeerClosed("closed before saying anything")
    if wire.MAGIC_BYTES.startswith(first):
        got = b""
        while len(got) < wire.HELLO.size:  # read it all: closing on unread bytes resets
            chunk = socket.socket.recv(plain, wire.HELLO.size - len(got))
            if not chunk:
                break
            got += chunk
        socket.socket.sendall(plain, wire.encode_hello_reply(wire.HelloStatus.TLS_REQUIRED))
        raise E.TlsError("a plaintext multifd hello (the sender was started without --tls)")
    conn.handshake()


def _accepted(sock: socket.socket, tls: T.ServerTls | None, timeouts: Timeouts) -> Conn:
    if tls is None:
        return Conn(sock, "connection", side=SIDE, timeout=timeouts.handshake)
    secured = tls.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                                      suppress_ragged_eofs=False)
    return TlsConn(secured, "connection", side=SIDE, timeout=timeouts.handshake,
                   peer_name="the peer")


async def _greet(sock: socket.socket, pending: trio.CapacityLimiter, registry: Registry,
                 timeouts: Timeouts, log, tls: T.ServerTls | None = None,
                 faults: Plan = Plan()) -> None:
    """Read one hello (after the TLS handshake) and hand the connection to the registry, or
    drop it as a stranger.

    The connection holds a `pending` slot until its hello is complete and, for a data
    channel, its session is known."""
    try:
        conn = _accepted(sock, tls, timeouts)
    except (OSError, ValueError) as exc:  # gone before we could even set it up
        log(f"dropped a connection: {exc}")
        sock.close()
        pending.release_on_behalf_of(sock)
        return
    where = format_address(*conn.peer[:2]) if conn.peer else "unknown peer"
    handed_over = released = False
    hello = None
    try:
        # One deadline for the handshake and the whole hello, not one per byte: a peer that
        # trickles bytes must not hold its slot for ever.
        with trio.move_on_after(timeouts.handshake):
            if tls is not None:
                # Before the handshake no channel is known: TLS faults hit every connection.
                if faults.find("tls-stall"):
                    await trio.sleep_forever()  # until the handshake deadline
                if faults.find("tls-abort"):
                    await conn.run("tls", conn.abort_handshake)
                await conn.run("tls", _server_handshake, conn)
            hello = await conn.run("hello", _read_hello, conn)
        if hello is None:
            raise E.PeerTimeout(f"no {'TLS handshake and ' if tls else ''}complete hello "
                                f"within {timeouts.handshake:g}s", stage="hello")
        conn.label = hello.label()
        if faults.find("refuse", conn.label):
            raise E.TransportError("refused (injected fault)", stage="hello")
        if delay := faults.find("delay", conn.label):
            await trio.sleep(delay.params.get("seconds", 5.0))
        if tls is not None and not tls.allows(identity := conn.peer_common_name()):
            await conn.run("hello", conn.send_all,
                           wire.encode_hello_reply(wire.HelloStatus.CLIENT_NOT_ALLOWED))
            raise E.TlsError(f"client identity {identity!r} is not allowed "
                             f"(--tls-allow-client)" if identity is not None else
                             "the client certificate has no single common name to check "
                             "against --tls-allow-client", stage="tls")
        if isinstance(conn, TlsConn):
            conn.peer_name = "the sender"
        if hello.role is wire.Role.DATA and not registry.session_known.is_set():
            # Still holding its pending slot: a flood of data hellos for sessions that never
            # come is bounded like a flood of silent connections.
            with trio.move_on_after(timeouts.handshake):
                await registry.session_known.wait()
            if not registry.session_known.is_set():
                raise E.PeerTimeout(f"no control channel arrived within "
                                    f"{timeouts.handshake:g}s", stage="hello")
        pending.release_on_behalf_of(sock)
        released = True
        status = registry.claim(hello)
        try:
            await conn.run("hello", conn.send_all, wire.encode_hello_reply(status))
        except BaseException:
            if status is wire.HelloStatus.OK:
                registry.release(hello)
            raise
        if status is not wire.HelloStatus.OK:
            raise E.RemoteProtocolError(wire.HELLO_STATUS_TEXT[status], stage="hello")
        conn.set_timeout(timeouts.idle)
        conn.sock = faults.wrap_socket(conn.label, conn.sock)
        registry.fill(hello, conn)
        handed_over = True
    except E.MultifdError as exc:
        log(f"dropped {conn.label} from {where}: {exc.stage or 'hello'}: {exc.message}")
        if isinstance(exc, E.TlsError) and isinstance(conn, TlsConn):
            with contextlib.suppress(E.MultifdError, OSError):
                await conn.run("tls", conn.drain, TLS_DRAIN)
    finally:
        if not released:
            pending.release_on_behalf_of(sock)
        if not handed_over:
            conn.close()


async def _accept_loop(listener: trio.SocketListener, registry: Registry, timeouts: Timeouts,
                       log, nursery: trio.Nursery, tls: T.ServerTls | None,
                       faults: Plan) -> None:
    pending = trio.CapacityLimiter(MAX_PENDING)
    quiet_until = 0.0  # accept errors are logged at most once a second
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            # Out of descriptors or buffers: the migration in progress must not die of it.
            if trio.current_time() >= quiet_until:
                log(f"cannot accept a connection: {exc.strerror or exc}; retrying")
                quiet_until = trio.current_time() + 1.0
            await trio.sleep(0.1)
            continue
        sock = socket.socket(fileno=stream.socket.detach())
        try:
            pending.acquire_on_behalf_of_nowait(sock)
        except trio.WouldBlock:
            log(f"dropped a connection: {MAX_PENDING} connections already waiting for a hello")
            sock.close()
            continue
        nursery.start_soon(_greet, sock, pending, registry, timeouts, log, tls, faults)


@asynccontextmanager
async def open_registry(listeners: list[trio.SocketListener], timeouts: Timeouts, log,
                        tls: T.ServerTls | None = None, faults: Plan = Plan()):
    """Serve the listeners in the background; yield the Registry; stop and close on exit."""
    registry = Registry()
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, registry, timeouts, log, nursery,
                                   tls, faults)
            yield registry
            nursery.cancel_scope.cancel()
    finally:
        registry.close_all()


async def wait_for_channels(registry: Registry, timeouts: Timeouts) -> wire.Session | None:
    """Wait for a migration to begin (unbounded), then for all its channels (bounded).

    Meanwhile the control channel is heeded: a sender that gives up during setup says why
    there, and this ends at once. Returns the sender's SESSION if it came during the wait (it
    may: the sender sends it once all its hellos were answered, which can be a moment before
    the last answered channel is registered here)."""
    await registry.session_known.wait()
    heard = control.Heard()
    with trio.move_on_after(timeouts.handshake):
        async with control.heeding(registry.control, "setup", wire.Session, "sender") as heard:
            await registry.complete.wait()
    if not registry.complete.is_set():
        missing = registry.missing()
        what = "the control channel" if registry.control is None else (
            "data channel" + ("s " if len(missing) > 1 else " ")
            + ", ".join(map(str, missing)))
        raise E.MissingChannels(f"{what} did not arrive within {timeouts.handshake:g}s "
                            f"({len(registry.data)} of {registry.channels} data channels "
                            f"connected)", side=SIDE, stage="setup")
    return heard.message
