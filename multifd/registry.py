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
import functools
import socket
from contextlib import asynccontextmanager, contextmanager

import trio

from . import control
from . import errors as E
from . import tls as T
from . import wire
from .address import format_address
from .conn import Conn, TlsConn, within_handshake
from .errors import Stage
from .side import Side

# Connections that have not yet sent a complete hello, at once: more than a whole migration's
# (64 data channels and the control channel arrive together), few enough to bound a flood.
MAX_PENDING = 128
TLS_DRAIN = 1.0  # how long a refused TLS peer gets to read our alert


class Registry:
    """The migration's channels, as their hellos claim them: claim() reserves a slot, fill()
    hands the established connection over, and the Registry closes it in close_all()."""

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

    @contextmanager
    def claiming(self, hello: wire.Hello):
        """Claim the hello's slot (yielding the status to answer with); an OK claim is given
        back if the block fails before the connection is handed over."""
        status = self.claim(hello)
        try:
            yield status
        except BaseException:
            if status is wire.HelloStatus.OK:
                self._claimed.discard(self._key(hello))
            raise

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


def accepted(sock: socket.socket, side: Side, label: str = "connection") -> Conn:
    timeout = side.timeouts.handshake
    if side.tls is None:
        return Conn(sock, label, side=side, timeout=timeout)
    secured = side.tls.context.wrap_socket(sock, server_side=True,
                                           do_handshake_on_connect=False,
                                           suppress_ragged_eofs=False)
    return TlsConn(secured, label, side=side, timeout=timeout, peer_name="the peer")


@contextmanager
def pending_slot(pending: trio.CapacityLimiter, sock: socket.socket):
    """The slot the accept loop took for `sock`, given back when the block ends."""
    try:
        yield
    finally:
        pending.release_on_behalf_of(sock)


async def _greet(sock: socket.socket, pending: trio.CapacityLimiter, registry: Registry,
                 side: Side) -> None:
    """Hand one accepted connection to the registry, or drop it as a stranger.

    The steps, in order; reaching the end is being handed over, and any failure on the way
    drops the connection (a stranger's failure is logged, never raised: the migration goes
    on). The connection holds a `pending` slot until its hello is complete and, for a data
    channel, its session is known."""
    try:
        conn = accepted(sock, side)
    except (OSError, ValueError) as exc:  # gone before we could even set it up
        pending.release_on_behalf_of(sock)
        side.log(f"dropped a connection: {exc}")
        sock.close()
        return
    try:
        with pending_slot(pending, sock):
            hello = await _read_greeting(conn, side)
            await _admit(conn, hello, side)
            await _await_session(registry, hello, side)
        with registry.claiming(hello) as status:
            await _reply(conn, status)
            conn.establish(hello.label())
            registry.fill(hello, conn)
    except BaseException as exc:
        await drop(conn, exc, side)
        if not isinstance(exc, E.MultifdError):
            raise


async def _read_greeting(conn: Conn, side: Side) -> wire.Hello:
    """The TLS handshake (with TLS) and the whole hello, under one deadline: a peer that
    trickles bytes must not hold its slot for ever."""
    async def greeting():
        if side.tls is not None:
            await side.faults.handshake(conn)
            await conn.run(Stage.TLS, _server_handshake, conn)
        hello = await conn.run(Stage.HELLO, _read_hello, conn)
        conn.label = hello.label()
        return hello

    return await within_handshake(side, greeting, lambda: E.PeerTimeout(
        f"no {'TLS handshake and ' if side.tls else ''}complete hello within "
        f"{side.timeouts.handshake:g}s", stage=Stage.HELLO))


async def _admit(conn: Conn, hello: wire.Hello, side: Side) -> None:
    """Whether this peer may take part: the fault seam, then the TLS allow-list."""
    await side.faults.connect(conn.label)
    if not isinstance(conn, TlsConn):
        return
    if not side.tls.allows(identity := conn.peer_common_name()):
        await conn.run(Stage.HELLO, conn.send_all,
                       wire.encode_hello_reply(wire.HelloStatus.CLIENT_NOT_ALLOWED))
        raise E.TlsError(f"client identity {identity!r} is not allowed "
                         f"(--tls-allow-client)" if identity is not None else
                         "the client certificate has no single common name to check "
                         "against --tls-allow-client", stage=Stage.TLS)
    conn.peer_name = "the sender"


async def _await_session(registry: Registry, hello: wire.Hello, side: Side) -> None:
    """A data channel that came before its control channel waits for it (bounded, and still
    holding its pending slot: a flood of data hellos for sessions that never come is bounded
    like a flood of silent connections)."""
    if hello.role is wire.Role.CONTROL:
        return
    with trio.move_on_after(side.timeouts.handshake):
        await registry.session_known.wait()
        return
    raise E.PeerTimeout(f"no control channel arrived within {side.timeouts.handshake:g}s",
                        stage=Stage.HELLO)


async def _reply(conn: Conn, status: wire.HelloStatus) -> None:
    """The answer to a claimed hello: OK, or why not (and the connection is dropped)."""
    await conn.run(Stage.HELLO, conn.send_all, wire.encode_hello_reply(status))
    if status is not wire.HelloStatus.OK:
        raise E.RemoteProtocolError(wire.HELLO_STATUS_TEXT[status], stage=Stage.HELLO)


async def drop(conn: Conn, exc: BaseException, side: Side) -> None:
    """Close a connection that was not handed over, logging why if it failed on its own."""
    try:
        if isinstance(exc, E.MultifdError):
            where = format_address(*conn.peer[:2]) if conn.peer else "unknown peer"
            side.log(f"dropped {conn.label} from {where}: {exc.stage or 'hello'}: "
                     f"{exc.message}")
            if isinstance(exc, E.TlsError) and isinstance(conn, TlsConn):
                with contextlib.suppress(E.MultifdError, OSError):
                    await conn.run(Stage.TLS, conn.drain, TLS_DRAIN)
    finally:
        conn.close()


async def accept_loop(listener: trio.SocketListener, greet, side: Side,
                      nursery: trio.Nursery) -> None:
    """Accept connections for ever, each greeted by greet(sock, pending) in `nursery`; at
    most MAX_PENDING hold a `pending` slot (until their greeting is done) at once."""
    pending = trio.CapacityLimiter(MAX_PENDING)
    quiet_until = 0.0  # accept errors are logged at most once a second
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            # Out of descriptors or buffers: the migration in progress must not die of it.
            if trio.current_time() >= quiet_until:
                side.log(f"cannot accept a connection: {exc.strerror or exc}; retrying")
                quiet_until = trio.current_time() + 1.0
            await trio.sleep(0.1)
            continue
        sock = socket.socket(fileno=stream.socket.detach())
        try:
            pending.acquire_on_behalf_of_nowait(sock)
        except trio.WouldBlock:
            side.log(f"dropped a connection: {MAX_PENDING} connections already waiting for a "
                     f"hello")
            sock.close()
            continue
        nursery.start_soon(greet, sock, pending)


@asynccontextmanager
async def open_registry(listeners: list[trio.SocketListener], side: Side):
    """Serve the listeners in the background; yield the Registry; stop and close on exit."""
    registry = Registry()
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener,
                                   functools.partial(_greet, registry=registry, side=side),
                                   side, nursery)
            yield registry
            nursery.cancel_scope.cancel()
    finally:
        registry.close_all()


async def wait_for_channels(registry: Registry, side: Side) -> wire.Session | None:
    """Wait for a migration to begin (unbounded), then for all its channels (bounded).

    Meanwhile the control channel is heeded: a sender that gives up during setup says why
    there, and this ends at once. Returns the sender's SESSION if it came during the wait (it
    may: the sender sends it once all its hellos were answered, which can be a moment before
    the last answered channel is registered here)."""
    await registry.session_known.wait()
    bound = side.timeouts.handshake
    with trio.move_on_after(bound):
        async with control.heeding(registry.control, Stage.SETUP, wire.Session) as heard:
            await registry.complete.wait()
        return heard.message
    missing = registry.missing()
    raise E.MissingChannels(f"data channel{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} did not arrive within {bound:g}s "
                            f"({len(registry.data)} of {registry.channels} data channels "
                            f"connected)", side=side.name, stage=Stage.SETUP)
