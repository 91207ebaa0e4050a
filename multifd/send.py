"""The sending side of one migration.

Theory of operation:
1. open_sender_channels() dials the control channel, then all N data channels concurrently in
   one nursery. Each attempt is connect -> hello -> hello accepted; only then does its Conn join
   the close-on-exit set. The function yields only when every channel is established; the first
   failure cancels the other attempts, is told to the receiver, and everything already
   established is closed.
2. SESSION / READY on the control channel.
3. For each round (settings.ROUNDS), a producer task hands batches of blocks to the channel
   tasks through an unbuffered memory channel (backpressure: a batch is taken only by an idle
   channel); each channel task sends its batches from its worker thread, then its SYNC. After
   the last round every channel sends END. In 1 and 3 the control channel is heeded (watched
   without reading): a receiver that gives up says why there.
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

from . import codec, control, precopy
from . import errors as E
from . import tls as T
from . import wire
from .address import format_address
from .conn import Conn, TlsConn, within_handshake
from .errors import Stage, collapse_group
from .faults import NO_FAULTS, Faults, Phase
from .image import SourceImage, copy_file
from .workload import Workload
from .digest import terms_for
from .pump import BlockSender, totals
from .ratelimit import RateLimiter, batch_bytes_for
from .report import Report, reporting_progress
from .settings import BATCH_BYTES, DEFAULT_BLOCK_PAGES, DEFAULT_PAGE_SIZE, ROUNDS, Timeouts
from .side import Side


def _hello_exchange(conn: Conn, hello: wire.Hello) -> None:
    conn.send_all(conn.side.faults.hello_bytes(conn.label, wire.encode_hello(hello)))
    status = wire.decode_hello_reply(conn.recv_bytes(wire.HELLO_REPLY.size, "the hello reply"))
    if status is not wire.HelloStatus.OK:
        raise E.RemoteProtocolError(
            f"receiver rejected the hello: {wire.HELLO_STATUS_TEXT[status]}")


def _reason(exc: OSError | E.TransportError) -> str:
    """trio reports failed connects as one OSError caused by a group of the attempts' errors."""
    if isinstance(exc, E.MultifdError):  # e.g. a refusal the side's faults made up
        return exc.message
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if exc.errno is None and isinstance(cause, OSError):
        exc = cause
    if isinstance(exc, socket.gaierror):  # name resolution: its errno is not an OS errno
        return exc.strerror or str(exc)
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def _connect(host: str, port: int, label: str, side: Side) -> socket.socket:
    where = dict(side=side.name, channel=label, stage=Stage.CONNECT)
    try:
        await side.faults.connect(label)
        with trio.fail_after(side.timeouts.connect):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise E.PeerTimeout(f"no connection to {format_address(host, port)} within "
                            f"{side.timeouts.connect:g}s", **where) from None
    except (OSError, E.TransportError) as exc:
        raise E.TransportError(f"cannot connect to {format_address(host, port)}: {_reason(exc)}",
                               **where) from None
    return socket.socket(fileno=stream.socket.detach())


async def _greet(conn: Conn, hello: wire.Hello, side: Side) -> None:
    """TLS (with TLS) and the hello exchange, under one deadline, as the receiver has."""
    async def greeting():
        if isinstance(conn, TlsConn):
            await side.faults.handshake(conn)
            await conn.run(Stage.TLS, conn.handshake)
        await conn.run(Stage.HELLO, _hello_exchange, conn, hello)

    bound = side.timeouts.handshake
    await within_handshake(side, greeting, lambda: E.PeerTimeout(
        f"no TLS handshake and hello reply within {bound:g}s" if side.tls else
        f"no hello reply within {bound:g}s", side=side.name,
        channel=conn.label, stage=Stage.TLS if side.tls else Stage.HELLO))


async def dial(host: str, port: int, hello: wire.Hello, side: Side) -> Conn:
    """Connect, secure (with TLS) and say hello; returns only a fully established channel."""
    label = hello.label()
    raw = await _connect(host, port, label, side)
    try:
        conn = _secure(raw, host, label, side) if side.tls else Conn(
            raw, label, side=side, timeout=side.timeouts.handshake)
    except BaseException:
        raw.close()
        raise
    try:
        await _greet(conn, hello, side)
        conn.establish(label)
    except BaseException:
        conn.close()
        raise
    return conn


def _secure(raw: socket.socket, host: str, label: str, side: Side) -> TlsConn:
    tls: T.ClientTls = side.tls
    name = host if tls.hostname is None else tls.hostname
    try:
        sock = tls.context.wrap_socket(raw, server_hostname=name, do_handshake_on_connect=False,
                                       suppress_ragged_eofs=False)
    except (ValueError, ssl.SSLError) as exc:  # a name ssl cannot check
        raise E.UsageError(f"cannot check the receiver's certificate against {name!r}: "
                           f"{exc}") from None
    hint = "" if tls.has_identity else (f", and this sender has none ({T.CLIENT_CERT} "
                                        f"is not in the --tls directory)")
    return TlsConn(sock, label, side=side, timeout=side.timeouts.handshake,
                   peer_name="the receiver", hostname=name, hint=hint)


@asynccontextmanager
async def open_sender_channels(host: str, port: int, session_id: bytes, channels: int,
                               side: Side):
    """The control channel first, then every data channel concurrently.

    Control first because only the control channel binds the receiver to this migration:
    once it is established, any failure of ours reaches the receiver as a reason, so both
    sides end. A data channel failing while the control channel was still connecting would
    leave the receiver waiting for a migration that had already died."""
    established: dict[object, Conn] = {}  # the close-on-exit set

    async def attempt(key: object, hello: wire.Hello) -> None:
        established[key] = await dial(host, port, hello, side)

    try:
        await attempt("control", wire.Hello(wire.Role.CONTROL, session_id, 0, channels))
        ctl = established["control"]
        async with control.concluding(lambda: ctl):
            # A receiver that gives up meanwhile says why on the control channel.
            async with control.heeding(ctl, Stage.SETUP, None):
                with collapse_group():
                    async with trio.open_nursery() as dials:
                        for i in range(channels):
                            dials.start_soon(attempt, i, wire.Hello(wire.Role.DATA, session_id,
                                                                    i, channels))
        yield ctl, [established[i] for i in range(channels)]
    finally:
        for conn in established.values():
            conn.close()


async def _channel_round(sender: BlockSender, batches, limiter: RateLimiter | None,
                         round: int, dirty) -> None:
    """One data channel's part of a round: the batches it takes, then its SYNC."""
    conn = sender.conn
    conn.side.faults.phase(Phase.ROUND, conn.label, round=round)
    async for first, last, budget in batches:
        if limiter is not None:
            await limiter.acquire(budget)
        sent = await conn.run(Stage.DATA, sender.send_blocks, first, last, round, dirty)
        if limiter is not None:
            limiter.refund(budget - sent)
    await conn.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, round)
    conn.side.faults.phase(Phase.SYNC, conn.label)


MAX_SPAN = 256  # blocks a batch may reach across (the clean ones among them cost a lookup)


def _batches(work, batch_bytes: int):
    """(first, last, bytes): ranges of blocks holding at most batch_bytes of the work (but
    at least one block), from (block, bytes to send) in block order."""
    first = last = None
    weight = 0
    for block, nbytes in work:
        if first is not None and (weight + nbytes > batch_bytes or block - first >= MAX_SPAN):
            yield first, last, weight
            first = None
        if first is None:
            first, weight = block, 0
        last, weight = block + 1, weight + nbytes
    if first is not None:
        yield first, last, weight


async def _produce(batches_tx, work, batch_bytes: int) -> None:
    async with batches_tx:
        for batch in _batches(work, batch_bytes):
            await batches_tx.send(batch)


async def _send_round(senders: list[BlockSender], limiter: RateLimiter | None,
                      per_hop: int, round: int, dirty=None) -> None:
    """Every block (dirty None), or the dirty pages of a dirty.Dirty, each block once, in
    batches of about per_hop bytes taken by whichever channel is idle (backpressure: the
    memory channel holds nothing); returns once every channel has sent its SYNC."""
    session = senders[0].session
    if dirty is None:
        work = [(b, session.block_bytes) for b in range(session.nblocks)]
    else:
        work = [(b, n * session.page_size) for b, n in dirty.blocks()]
    # Spread a small round over every channel rather than one batch on one channel.
    total = sum(nbytes for _, nbytes in work)
    batch_bytes = max(1, min(per_hop, -(-total // len(senders))))
    batches_tx, batches_rx = trio.open_memory_channel(0)
    with batches_rx:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_produce, batches_tx, work, batch_bytes)
            for sender in senders:
                nursery.start_soon(_channel_round, sender, batches_rx, limiter, round, dirty)


async def _transfer(ctl: Conn, senders: list[BlockSender], max_bandwidth: float | None,
                    live: precopy.Live | None = None, workload=None,
                    on_round=None) -> precopy.Outcome | None:
    """Every round, then END on every channel, the control channel heeded meanwhile;
    returns the live rounds' outcome (None: one round of a still image)."""
    session = senders[0].session
    limiter = RateLimiter(max_bandwidth) if max_bandwidth else None
    per_hop = batch_bytes_for(max_bandwidth, BATCH_BYTES)
    # A receiver that fails says why on the control channel, even while our sends hang.
    outcome = None
    async with control.heeding(ctl, Stage.DATA, None):
        if live is None:
            for round in range(ROUNDS):
                await _send_round(senders, limiter, per_hop, round)
            rounds = ROUNDS
        else:
            async def send_round(dirty, round):
                await _send_round(senders, limiter, per_hop, round, dirty)

            outcome = await precopy.run(send_round, workload,
                                        lambda: totals(senders, digest=False)[1],
                                        session.page_size, live, on_round)
            rounds = len(outcome.rounds)
        async with trio.open_nursery() as nursery:
            for sender in senders:
                nursery.start_soon(sender.conn.run, Stage.FINISH, sender.finish, rounds)
    return outcome


async def _complete(ctl: Conn, senders: list[BlockSender], rounds: int, side: Side):
    """COMPLETE with what we sent, then the receiver's DONE with the digest it verified."""
    total, counters = totals(senders)
    side.faults.phase(Phase.COMPLETION)
    await control.send(ctl, Stage.FINISH, wire.Complete(
        rounds, counters.packets, counters.pages, counters.zero_pages, total.digest()))
    done = await control.receive(ctl, Stage.FINISH, wire.Done)
    if done.digest != total.digest():
        raise E.VerificationError(f"receiver confirmed digest {done.digest.hex()} "
                                  f"(expected {total.hexdigest()})", side=side.name,
                                  stage=Stage.FINISH)
    return total, counters, done


def _session(source: SourceImage, channels: int, page_size: int, block_pages: int,
             max_bandwidth: float | None, timeouts: Timeouts,
             compression: wire.Compression = wire.Compression.NONE,
             live: bool = False) -> wire.Session:
    """The session this image and these options make, or the usage error that says why not.
    A live image is digested per page: later rounds send only a block's dirty pages."""
    digest = wire.DigestAlg.XXH3_64_PAGE_SUM if live else wire.DigestAlg.XXH3_128_BLOCK_SUM
    try:
        session = wire.Session(source.size, page_size, block_pages, digest, compression)
    except E.LocalProtocolError as exc:
        raise E.UsageError(exc.message) from None
    if max_bandwidth and channels * session.block_bytes / max_bandwidth > timeouts.idle / 2:
        # Packets leave whole and channels take turns: at this rate a channel would stay
        # silent for longer than half the idle timeout between two of its packets.
        raise E.UsageError(
            f"--max-bandwidth {max_bandwidth:g} B/s is too low for {channels} channels "
            f"of {session.block_bytes}-byte packets with a {timeouts.idle:g}s idle "
            f"timeout (use fewer --channels, smaller --packet-pages or a longer "
            f"--idle-timeout)")
    return session


def _start_workload(path: str, page_size: int, block_pages: int, live: precopy.Live):
    try:
        return Workload(path, page_size, block_pages, live.rate, live.pattern, live.seed)
    except (OSError, ValueError) as exc:
        raise E.UsageError(f"--live: cannot start the workload on {path}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def _save_final(copy: str, path: str) -> None:
    """The paused guest's state, written beside `path` and renamed onto it."""
    tmp = f"{path}.part"
    try:
        with open(copy, "rb") as src, open(tmp, "wb") as dst:
            copy_file(src.fileno(), dst.fileno())
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise E.ImageError(f"--save-final {path}: {exc.strerror or exc}") from None


async def send_image(host: str, port: int, path: str, *, channels: int = 4,
                     page_size: int = DEFAULT_PAGE_SIZE, block_pages: int = DEFAULT_BLOCK_PAGES,
                     max_bandwidth: float | None = None, timeouts: Timeouts = Timeouts(),
                     method: codec.Method = codec.Method(), live: precopy.Live | None = None,
                     tls: T.ClientTls | None = None, faults: Faults = NO_FAULTS,
                     on_progress=None, on_complete=None, on_round=None) -> Report:
    """Migrate the image at `path` to the receiver at host:port. Raises MultifdError.

    on_round(precopy.Round) is told of each live round as it ends. on_complete(report) is
    called the moment the receiver's DONE confirmed the image, before
    the cleanup that a late cancellation could still interrupt."""
    if not 1 <= channels <= wire.MAX_CHANNELS:
        raise E.UsageError(f"--channels {channels} out of range (1..{wire.MAX_CHANNELS})")
    side = Side("sender", timeouts, tls, faults)
    with contextlib.ExitStack() as stack:
        workload = None
        if live is not None:  # the guest writes into its own copy; IMAGE stays as it is
            workload = stack.enter_context(await trio.to_thread.run_sync(
                _start_workload, path, page_size, block_pages, live))
        source = stack.enter_context(SourceImage(workload.path if workload else path))
        session = _session(source, channels, page_size, block_pages, max_bandwidth, timeouts,
                           method.compression, live is not None)
        started = trio.current_time()
        async with open_sender_channels(host, port, uuid.uuid4().bytes, channels,
                                        side) as (ctl, datas):
            side.faults.phase(Phase.SETUP)
            terms = terms_for(session)
            senders = [BlockSender(conn, source, session, method, terms, live is not None)
                       for conn in datas]
            async with control.concluding(lambda: ctl):
                async with reporting_progress(on_progress, senders, session.image_size):
                    await control.send(ctl, Stage.SETUP, session)
                    await control.receive(ctl, Stage.SETUP, wire.Ready)
                    outcome = await _transfer(ctl, senders, max_bandwidth, live, workload,
                                              on_round)
                rounds = ROUNDS if outcome is None else len(outcome.rounds)
                total, counters, done = await _complete(ctl, senders, rounds, side)
                if outcome is not None:
                    outcome.downtime = trio.current_time() - outcome.paused_at
                    outcome.receiver_downtime = done.last_round_us / 1e6
                    if live.save_final:
                        await trio.to_thread.run_sync(_save_final, workload.path,
                                                      live.save_final)
                report = Report.finished(side.name, counters, session.image_size, channels,
                                         trio.current_time() - started, total.hexdigest(),
                                         compression=str(method), digest_name=terms.name,
                                         live=None if outcome is None else outcome.as_dict())
                if on_complete is not None:
                    on_complete(report)
            # DONE decided the outcome; the TLS close that follows only ends the stream
            # politely, and a peer that skips it cannot undo a verified migration.
            with contextlib.suppress(E.MultifdError):
                await ctl.end_stream(Stage.FINISH)
        return report
