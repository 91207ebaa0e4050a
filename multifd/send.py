"""The sending side of one migration.

Theory of operation:
1. open_sender_channels() dials the control channel, then all N data channels concurrently in
   one nursery. Each attempt is connect -> hello -> hello accepted; only then does its Conn join
   the close-on-exit set. The function yields only when every channel is established; the first
   failure cancels the other attempts, is told to the receiver, and everything already
   established is closed.
2. SESSION / READY on the control channel.
3. A producer task hands batches of blocks to the channel tasks through an unbuffered memory
   channel (backpressure: a batch is taken only by an idle channel). Each channel task sends
   its batch from its worker thread, then SYNC and END. In 1 and 3 the control channel is
   heeded (watched without reading): a receiver that gives up says why there.
4. COMPLETE (counts and the image digest) / DONE: the receiver verified and committed.
The first error anywhere cancels the rest; control.conclude_failure tells the peer why, or
reads the peer's reason when ours is only "the connection broke".
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import uuid
from contextlib import asynccontextmanager

import trio

from . import control
from . import errors as E
from . import wire
from .address import format_address
from . import tls as T
from .conn import Conn, TlsConn, collapse_group
from .digest import DigestSum
from .faults import Plan
from .image import SourceImage
from .pump import BlockSender, Counters
from .ratelimit import RateLimiter, batch_bytes_for
from .report import Report
from .settings import BATCH_BYTES, DEFAULT_BLOCK_PAGES, DEFAULT_PAGE_SIZE, Timeouts

SIDE = "sender"


def _hello_exchange(conn: Conn, hello: wire.Hello, faults: Plan) -> None:
    conn.send_all(faults.hello_bytes(conn.label, wire.encode_hello(hello)))
    status = wire.decode_hello_reply(conn.recv_bytes(wire.HELLO_REPLY.size, "the hello reply"))
    if status is not wire.HelloStatus.OK:
        raise E.RemoteProtocolError(
            f"receiver rejected the hello: {wire.HELLO_STATUS_TEXT[status]}")


def _reason(exc: OSError) -> str:
    """trio reports failed connects as one OSError caused by a group of the attempts' errors."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if exc.errno is None and isinstance(cause, OSError):
        exc = cause
    if isinstance(exc, socket.gaierror):  # name resolution: its errno is not an OS errno
        return exc.strerror or str(exc)
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def dial(host: str, port: int, hello: wire.Hello, timeouts: Timeouts,
               tls: T.ClientTls | None = None, faults: Plan = Plan()) -> Conn:
    """Connect, secure (with TLS) and say hello; returns only a fully established channel."""
    label = hello.label()
    if faults.find("refuse", label):
        raise E.TransportError(f"cannot connect to {format_address(host, port)}: refused "
                               f"(injected fault)", side=SIDE, channel=label, stage="connect")
    if delay := faults.find("delay", label):
        await trio.sleep(delay.params.get("seconds", 5.0))
    try:
        with trio.fail_after(timeouts.connect):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise E.PeerTimeout(f"no connection to {format_address(host, port)} within "
                            f"{timeouts.connect:g}s",
                            side=SIDE, channel=label, stage="connect") from None
    except OSError as exc:
        raise E.TransportError(f"cannot connect to {format_address(host, port)}: {_reason(exc)}",
                               side=SIDE, channel=label, stage="connect") from None
    raw = socket.socket(fileno=stream.socket.detach())
    try:
        conn = _secure(raw, host, label, tls, timeouts) if tls else Conn(
            raw, label, side=SIDE, timeout=timeouts.handshake)
    except BaseException:
        raw.close()
        raise
    try:
        # One deadline for TLS and hello together, as the receiver has.
        with trio.move_on_after(timeouts.handshake) as deadline:
            if tls is not None:
                await _tls_faults(conn, faults)
                await conn.run("tls", conn.handshake)
            await conn.run("hello", _hello_exchange, conn, hello, faults)
        if deadline.cancelled_caught:
            raise E.PeerTimeout(f"no TLS handshake and hello reply within "
                                f"{timeouts.handshake:g}s" if tls else
                                f"no hello reply within {timeouts.handshake:g}s",
                                side=SIDE, channel=label, stage="tls" if tls else "hello")
        conn.set_timeout(timeouts.idle)
        conn.sock = faults.wrap_socket(label, conn.sock)
    except BaseException:
        conn.close()
        raise
    return conn


async def _tls_faults(conn: TlsConn, faults: Plan) -> None:
    if faults.find("tls-stall", conn.label):
        await trio.sleep_forever()  # until the handshake deadline
    if faults.find("tls-abort", conn.label):
        await conn.run("tls", conn.abort_handshake)


def _secure(raw: socket.socket, host: str, label: str, tls: T.ClientTls,
            timeouts: Timeouts) -> TlsConn:
    name = host if tls.hostname is None else tls.hostname
    try:
        sock = tls.context.wrap_socket(raw, server_hostname=name, do_handshake_on_connect=False,
                                       suppress_ragged_eofs=False)
    except (ValueError, ssl.SSLError) as exc:  # a name ssl cannot check
        raise E.UsageError(f"cannot check the receiver's certificate against {name!r}: "
                           f"{exc}") from None
    hint = "" if tls.has_identity else (f", and this sender has none ({T.CLIENT_CERT} "
                                        f"is not in the --tls directory)")
    return TlsConn(sock, label, side=SIDE, timeout=timeouts.handshake,
                   peer_name="the receiver", hostname=name, hint=hint)


@asynccontextmanager
async def open_sender_channels(host: str, port: int, session_id: bytes, channels: int,
                               timeouts: Timeouts, tls: T.ClientTls | None = None,
                               faults: Plan = Plan()):
    """The control channel first, then every data channel concurrently.

    Control first because only the control channel binds the receiver to this migration:
    once it is established, any failure of ours reaches the receiver as a reason, so both
    sides end. A data channel failing while the control channel was still connecting would
    leave the receiver waiting for a migration that had already died."""
    established: dict[object, Conn] = {}  # the close-on-exit set

    async def attempt(key: object, hello: wire.Hello) -> None:
        established[key] = await dial(host, port, hello, timeouts, tls, faults)

    try:
        await attempt("control", wire.Hello(wire.Role.CONTROL, session_id, 0, channels))
        ctl = established["control"]
        try:
            # A receiver that gives up meanwhile says why on the control channel.
            async with control.heeding(ctl, "setup", None, "receiver"):
                with collapse_group():
                    async with trio.open_nursery() as dials:
                        for i in range(channels):
                            dials.start_soon(attempt, i, wire.Hello(wire.Role.DATA, session_id,
                                                                    i, channels))
        except BaseException as exc:
            reported = await control.conclude_failure(ctl, exc, "receiver")
            if reported is exc:
                raise
            raise reported from None
        yield established["control"], [established[i] for i in range(channels)]
    finally:
        for conn in established.values():
            conn.close()


async def _channel_task(sender: BlockSender, batches, limiter: RateLimiter | None,
                        block_bytes: int) -> None:
    conn = sender.conn
    faults = sender.faults
    async for first, last in batches:
        faults.crash("round", conn.label, round=0)
        budget = (last - first) * block_bytes
        if limiter is not None:
            await limiter.acquire(budget)
        sent = await conn.run("data", sender.send_blocks, first, last)
        if limiter is not None:
            limiter.refund(budget - sent)
    await conn.run("sync", sender.send_marker, wire.PacketKind.SYNC, 0)
    faults.crash("sync", conn.label)
    await conn.run("finish", sender.finish, 1)


async def _produce(batches_tx, nblocks: int, batch_blocks: int) -> None:
    async with batches_tx:
        for first in range(0, nblocks, batch_blocks):
            await batches_tx.send((first, min(first + batch_blocks, nblocks)))


async def _pump_all(senders: list[BlockSender], session: wire.Session,
                    max_bandwidth: float | None) -> None:
    limiter = RateLimiter(max_bandwidth) if max_bandwidth else None
    per_hop = batch_bytes_for(max_bandwidth, BATCH_BYTES)
    # Spread small images over every channel rather than one batch on one channel.
    batch_blocks = max(1, min(per_hop // session.block_bytes,
                              -(-session.nblocks // len(senders))))
    batches_tx, batches_rx = trio.open_memory_channel(0)
    with batches_rx:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_produce, batches_tx, session.nblocks, batch_blocks)
            for sender in senders:
                nursery.start_soon(_channel_task, sender, batches_rx, limiter,
                                   session.block_bytes)


async def send_image(host: str, port: int, path: str, *, channels: int = 4,
                     page_size: int = DEFAULT_PAGE_SIZE, block_pages: int = DEFAULT_BLOCK_PAGES,
                     max_bandwidth: float | None = None, timeouts: Timeouts = Timeouts(),
                     tls: T.ClientTls | None = None, faults: Plan = Plan(),
                     on_progress=None, on_complete=None) -> Report:
    """Migrate the image at `path` to the receiver at host:port. Raises MultifdError.

    on_complete(report) is called the moment the receiver's DONE confirmed the image, before
    the cleanup that a late cancellation could still interrupt."""
    if not 1 <= channels <= wire.MAX_CHANNELS:
        raise E.UsageError(f"--channels {channels} out of range (1..{wire.MAX_CHANNELS})")
    with SourceImage(path) as source:
        try:
            session = wire.Session(source.size, page_size, block_pages)
        except E.LocalProtocolError as exc:
            raise E.UsageError(exc.message) from None
        if max_bandwidth and (channels * session.block_bytes / max_bandwidth
                              > timeouts.idle / 2):
            # Packets leave whole and channels take turns: at this rate a channel would stay
            # silent for longer than half the idle timeout between two of its packets.
            raise E.UsageError(
                f"--max-bandwidth {max_bandwidth:g} B/s is too low for {channels} channels "
                f"of {session.block_bytes}-byte packets with a {timeouts.idle:g}s idle "
                f"timeout (use fewer --channels, smaller --packet-pages or a longer "
                f"--idle-timeout)")
        started = trio.current_time()
        session_id = uuid.uuid4().bytes
        async with open_sender_channels(host, port, session_id, channels, timeouts, tls,
                                        faults) as (ctl, datas):
            faults.crash("setup")
            senders = [BlockSender(conn, source, session, faults) for conn in datas]
            try:
                async with trio.open_nursery() as nursery:
                    if on_progress is not None:
                        nursery.start_soon(on_progress, lambda: sum(
                            s.counters.image_bytes for s in senders), session.image_size)
                    await control.send(ctl, "setup", session)
                    await control.receive(ctl, "setup", wire.Ready, "receiver")
                    # A receiver that fails says why there, even while our sends hang.
                    async with control.heeding(ctl, "data", None, "receiver"):
                        await _pump_all(senders, session, max_bandwidth)
                    nursery.cancel_scope.cancel()
                total, counters = DigestSum(), Counters()
                for s in senders:
                    total.merge(s.sum)
                    counters.merge(s.counters)
                faults.crash("completion")
                await control.send(ctl, "finish", wire.Complete(
                    1, counters.packets, counters.pages, counters.zero_pages, total.digest()))
                done = await control.receive(ctl, "finish", wire.Done, "receiver")
                if done.digest != total.digest():
                    raise E.VerificationError(
                        f"receiver confirmed digest {done.digest.hex()} "
                        f"(expected {total.hexdigest()})", side=SIDE, stage="finish")
                report = Report(SIDE, ok=True, bytes=session.image_size,
                                payload_bytes=counters.payload_bytes, pages=counters.pages,
                                zero_pages=counters.zero_pages, packets=counters.packets,
                                channels=channels, seconds=trio.current_time() - started,
                                digest=total.hexdigest())
                if on_complete is not None:
                    on_complete(report)
            except BaseException as exc:
                reported = await control.conclude_failure(ctl, exc, "receiver")
                if reported is exc:
                    raise
                raise reported from None
            # DONE decided the outcome; the TLS close that follows only ends the stream
            # politely, and a peer that skips it cannot undo a verified migration.
            with contextlib.suppress(E.MultifdError):
                await ctl.end_stream("finish")
        return report
