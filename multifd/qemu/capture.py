"""The receiver of a real QEMU's multifd migration (`multifd-recv --qemu DIR`).

Theory of operation. Every accepted connection is greeted: its TLS handshake (with --tls),
then its first bytes tell what it is, never its arrival order: `QEVM` is the main channel,
a MultiFDInit_t (0x11223344) is multifd channel `id`; anything else is a stranger, dropped
and logged. Each channel then has a task in the capture's nursery that reads in a worker
thread and writes pages straight into the block files:

- the main channel's task parses the header, configuration, commands and RAM section
  (wire.MainStream), applies its zero pages (and pages, multifd off), and stops at each sync
  point until every multifd channel has delivered its SYNC (epochs.py);
- a multifd channel's task reads packet after packet, decompresses, writes the pages and, at
  each SYNC, waits for the main channel to reach the matching sync point.

QEMU never says how many multifd channels it opens. It opens all of them, and each sends
its init and its first SYNC, before the main channel's first sync point: so at that point,
once no connection is still being greeted or waiting to be accepted, the set is complete and
is closed (a channel of the migration that comes later fails the capture). Between QEMU and
the receiver, a proxy may connect the channels later than QEMU did: --qemu-channels N then
says how many to wait for there.

The stream is complete when the main channel has delivered its VMDESCRIPTION and every
channel has ended at a packet boundary with as many SYNCs as the others (QEMU before 10.0
ends them without a TLS close: the framing decides). With the return-path capability QEMU
waits for our SHUT before it closes anything: then completion is every channel's SYNC of the
completion, and SHUT(0) goes out once the directory is in place.

The first failure cancels everything; the directory is removed (blocks.OutputDir).
"""

from __future__ import annotations

import functools
import json
import os
import select
import socket
import time
from dataclasses import dataclass, field

import trio

from .. import errors as E
from .. import tls as T
from ..conn import Conn, TlsConn, within_handshake
from ..errors import Stage, collapse_group
from ..faults import Phase
from ..registry import accept_loop, accepted, drop, pending_slot
from ..side import Side
from . import wire as Q
from .blocks import OutputDir
from .epochs import Epochs, is_sync_point

MAIN = "main channel"
READ_CHUNK = 1 << 20


class LateChannel(E.RemoteProtocolError):
    """A channel of this migration that came after they were counted: its pages would be
    missing, so the capture fails (a stranger is only dropped)."""


def channel_label(channel: int) -> str:
    return f"multifd channel {channel}"


@dataclass
class ChannelStats:
    bytes: int = 0
    packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    syncs: int = 0


@dataclass
class Capture:
    """One QEMU migration being received: its channels as they are told apart, the sync
    barrier, the output, and the counts the manifest reports."""

    out: OutputDir
    side: Side
    listeners: list
    uuid: bytes | None  # --qemu-uuid, or the first multifd channel's
    expected: int | None = None  # --qemu-channels, or learnt at the first sync point
    epochs: Epochs = None
    main: Conn | None = None
    main_first: bytes = b""
    main_arrived: trio.Event = field(default_factory=trio.Event)
    channels: dict[int, Conn] = field(default_factory=dict)
    stats: dict[object, ChannelStats] = field(default_factory=lambda: {"main": ChannelStats()})
    sealed: bool = False
    greeting: int = 0  # connections whose greeting is under way
    arrivals: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    compression: str | None = None
    return_path: bool = False
    completion_synced: bool = False  # the last sync point was in the completion section
    nursery: trio.Nursery | None = None

    def __post_init__(self) -> None:
        self.epochs = Epochs(self.side.timeouts.idle)

    def claim_main(self, conn: Conn, first: bytes) -> None:
        if self.main is not None:
            raise E.RemoteProtocolError("a second main channel (QEVM)")
        self.main, self.main_first = conn, first
        self.main_arrived.set()

    def claim_channel(self, conn: Conn, init: Q.ChannelInit) -> None:
        if self.sealed:
            if init.uuid == self.uuid and init.id not in self.channels:
                raise LateChannel(
                    f"multifd channel {init.id} connected after the main channel's first "
                    f"sync point, where {len(self.channels)} were counted: between QEMU and "
                    f"this receiver something delays connections (give --qemu-channels)",
                    channel=MAIN, stage=Stage.SETUP)
            raise E.RemoteProtocolError("a multifd channel after the migration's channels "
                                        "were counted (at its first sync point)")
        if self.uuid is not None and init.uuid != self.uuid:
            raise E.RemoteProtocolError(f"uuid {init.uuid.hex()}, not the migration's "
                                        f"{self.uuid.hex()}")
        if self.expected is not None and init.id >= self.expected:
            raise LateChannel(f"multifd channel {init.id} connected, beyond the "
                              f"{self.expected} of --qemu-channels (is it the source's "
                              f"multifd-channels?)", channel=MAIN, stage=Stage.SETUP)
        self.uuid = init.uuid
        if init.id in self.channels:
            raise E.RemoteProtocolError(f"a second multifd channel {init.id}")
        self.channels[init.id] = conn
        self.stats[init.id] = ChannelStats()
        self.epochs.add(init.id)
        self.nursery.start_soon(_channel_task, self, init.id, conn)

    def close_all(self) -> None:
        for conn in [self.main, *self.channels.values()]:
            if conn is not None:
                conn.close()


# --- telling connections apart

def _tls_handshake(conn: TlsConn) -> None:
    """The handshake, after a look at the first bytes: a source without TLS credentials is
    told apart from a broken handshake."""
    first = socket.socket.recv(conn.sock, 4, socket.MSG_PEEK)
    if first in (Q.QEVM, Q.MULTIFD_MAGIC_BYTES):
        raise E.TlsError("a plaintext QEMU migration channel, and this receiver was started "
                         "with --tls (set tls-creds on the source)")
    conn.handshake()


def _read_identity(conn: Conn) -> bytes:
    first = conn.recv_bytes(4, "the first bytes of a channel")
    if first == Q.QEVM:
        return first
    if first == Q.MULTIFD_MAGIC_BYTES:
        return first + conn.recv_bytes(Q.INIT.size - 4, "a multifd init")
    if first.startswith(T.TLS_RECORD_PREFIX):
        raise E.BadMagic("a TLS handshake, and this receiver was started without --tls")
    raise E.BadMagic(f"first bytes {first.hex()}: neither QEMU's main channel (QEVM) nor a "
                     f"multifd channel ({Q.MULTIFD_MAGIC_BYTES.hex()})")


async def _identify(conn: Conn, side: Side) -> bytes:
    """TLS (with TLS) and the first bytes, under the handshake deadline."""
    async def greeting():
        if isinstance(conn, TlsConn):
            await side.faults.handshake(conn)
            await conn.run(Stage.TLS, _tls_handshake, conn)
            if not side.tls.allows(identity := conn.peer_common_name()):
                raise E.TlsError(f"client identity {identity!r} is not allowed "
                                 "(--tls-allow-client)", stage=Stage.TLS)
            conn.peer_name = "the source"
        return await conn.run(Stage.HELLO, _read_identity, conn)

    return await within_handshake(side, greeting, lambda: E.PeerTimeout(
        f"no {'TLS handshake and ' if side.tls else ''}first bytes within "
        f"{side.timeouts.handshake:g}s", channel=conn.label,
        stage=Stage.TLS if side.tls else Stage.HELLO))


async def _greet(sock: socket.socket, pending: trio.CapacityLimiter, cap: Capture) -> None:
    """Hand one accepted connection over as the main channel or a multifd channel, or drop
    it as a stranger. Before its TLS handshake a connection is named by its arrival, as
    QEMU connects them (main first, then multifd 0, 1, ...): a --fault aimed at it by that
    name ends the capture with its error instead of dropping it."""
    side = cap.side
    cap.arrivals += 1
    by_arrival = MAIN if cap.arrivals == 1 else channel_label(cap.arrivals - 2)
    targeted = side.faults.targets(by_arrival)
    try:
        # Named by its arrival only for a fault aimed at that name: a stranger's log line
        # must not call it a channel.
        conn = accepted(sock, side, by_arrival if targeted else "a connection")
    except (OSError, ValueError) as exc:
        pending.release_on_behalf_of(sock)
        side.log(f"dropped a connection: {exc}")
        sock.close()
        return
    cap.greeting += 1
    try:
        with pending_slot(pending, sock):
            first = await _identify(conn, side)
            if first == Q.QEVM:
                conn.label = MAIN
            else:
                init = Q.decode_init(first)
                conn.label = channel_label(init.id)
            targeted = targeted or side.faults.targets(conn.label)
            await side.faults.connect(conn.label)
        conn.establish(conn.label)
        if first == Q.QEVM:
            cap.claim_main(conn, first)
        else:
            cap.claim_channel(conn, init)
    except BaseException as exc:
        await drop(conn, exc, side)
        if targeted or isinstance(exc, LateChannel) or not isinstance(exc, E.MultifdError):
            raise
    finally:
        cap.greeting -= 1


def _accept_pending(listeners) -> bool:
    """Whether a connection waits in a listener's accept queue."""
    fds = [listener.socket.fileno() for listener in listeners]
    return bool(select.select(fds, [], [], 0)[0])


def _settled(cap: Capture) -> bool:
    if cap.expected is not None:  # told: wait for that many (a proxy may connect late)
        return len(cap.channels) >= cap.expected
    return not cap.greeting and not _accept_pending(cap.listeners)


async def _seal(cap: Capture) -> None:
    """Close the set of multifd channels (see the module docstring), bounded by the
    handshake or the idle timeout, whichever is shorter."""
    timeouts = cap.side.timeouts
    deadline = trio.current_time() + min(timeouts.handshake, timeouts.idle)
    cap.epochs.arrive(1)  # the main channel is at its sync point: its wait is the bounded one
    while not _settled(cap) and trio.current_time() < deadline:
        await trio.sleep(0.002)
    cap.sealed = True
    ids = sorted(cap.channels)
    count = max(ids, default=-1) + 1 if cap.expected is None else cap.expected
    missing = sorted(set(range(count)) - set(ids))
    if missing:
        raise E.RemoteProtocolError(
            f"multifd channel{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} never arrived (channels {ids} did)",
            channel=MAIN, stage=Stage.SETUP)
    cap.side.faults.phase(Phase.SETUP)


# --- the main channel

def _main_step(cap: Capture, parser: Q.MainStream, buf: bytearray):
    """(worker thread) Read and apply the main channel up to its next event that is not
    pages, and return that event."""
    view, stats, main = memoryview(buf), cap.stats["main"], cap.main
    while True:
        event = parser.next_event()
        if event is Q.NEED_DATA:
            n = main.recv_some(view)
            if n == 0:
                return parser.end_of_stream()
            stats.bytes += n
            cap.epochs.progress["main"] += n
            parser.feed(view[:n])
        elif isinstance(event, Q.ZeroPages):
            cap.out.blocks[event.block].zero_pages(event.offsets)
            stats.zero_pages += len(event.offsets)
        elif isinstance(event, Q.Page):
            cap.out.blocks[event.block].write_pages((event.offset,), event.data)
            stats.pages += 1
        else:
            return event


async def _main_channel(cap: Capture) -> tuple[Q.End, Q.MainStream, object]:
    """The main channel through its VMDESCRIPTION: (End, parser, configuration)."""
    main, parser, config = cap.main, Q.MainStream(), None
    parser.feed(cap.main_first)
    buf = bytearray(READ_CHUNK)
    while True:
        event = await main.run(Stage.DATA, _main_step, cap, parser, buf)
        if isinstance(event, Q.Configuration):
            config = event
        elif isinstance(event, Q.RamBlocks):
            await trio.to_thread.run_sync(cap.out.create_blocks, event.blocks)
            cap.blocks = dict(event.blocks)
            cap.epochs.notify()
        elif isinstance(event, Q.Command):
            if event.command == Q.CMD_OPEN_RETURN_PATH:
                cap.return_path = True
            elif event.command == Q.CMD_PING and cap.return_path and len(event.data) == 4:
                await main.run(Stage.DATA, main.send_all,
                               Q.encode_pong(int.from_bytes(event.data, "big")))
        elif isinstance(event, (Q.EndOfSection, Q.Flush)):
            if is_sync_point(event, parser.flushes):
                if not cap.sealed:
                    await _seal(cap)
                await cap.epochs.main_sync_point()
                cap.completion_synced = parser.completing
        elif isinstance(event, Q.End):
            return event, parser, config


# --- a multifd channel

class _ChannelReader:
    """A multifd channel's buffers and decompressor, used by its worker thread only."""

    def __init__(self, cap: Capture, channel: int, conn: Conn) -> None:
        self.cap, self.channel, self.conn = cap, channel, conn
        self.head = bytearray(Q.PACKET_HEADER)
        self.payload = bytearray(Q.MAX_PAYLOAD)
        self.inflater: Q.Inflater | None = None
        self.stats = cap.stats[channel]

    def _read(self, view: memoryview, what: str) -> None:
        self.conn.recv_exactly(view, what)
        self.stats.bytes += len(view)
        self.cap.epochs.progress[self.channel] += len(view)

    def step(self) -> Q.Packet | None:
        """Read and apply one packet; None at the end of the stream."""
        head, cap = memoryview(self.head), self.cap
        n = self.conn.recv_some(head)
        if n == 0:
            return None
        self.stats.bytes += n
        cap.epochs.progress[self.channel] += n
        if n < len(head):
            self._read(head[n:], "the rest of a packet header")
        packet = Q.decode_packet(head, cap.blocks)
        if packet.compression != "none":
            if cap.compression not in (None, packet.compression):
                raise E.RemoteProtocolError(f"a {packet.compression} packet in a "
                                            f"{cap.compression} migration")
            cap.compression = packet.compression
            if self.inflater is None:
                self.inflater = Q.Inflater(packet.compression)
        block = cap.out.blocks.get(packet.block) if packet.block else None
        if packet.payload_size:
            payload = memoryview(self.payload)[:packet.payload_size]
            self._read(payload, "a packet's pages")
            if self.inflater is not None:
                payload = self.inflater.inflate(payload, len(packet.normal))
            block.write_pages(packet.normal, payload)
        if packet.zero:
            block.zero_pages(packet.zero)
        self.stats.packets += 1
        self.stats.pages += len(packet.normal)
        self.stats.zero_pages += len(packet.zero)
        self.stats.syncs += packet.sync
        return packet

    def epoch(self) -> bool:
        """(worker thread) Read and apply packets up to and including the next SYNC (True),
        or to the end of the stream (False): one hop to trio per epoch, not per packet."""
        while (packet := self.step()) is not None:
            if packet.sync:
                return True
        return False


async def _channel_task(cap: Capture, channel: int, conn: Conn) -> None:
    label, epochs = conn.label, cap.epochs
    await epochs.wait_for(lambda: bool(cap.blocks), lambda: ["main"], lambda: E.PeerTimeout(
        f"the main channel sent no RAM block list within {epochs.idle:g}s", channel=label,
        stage=Stage.SETUP))
    reader = _ChannelReader(cap, channel, conn)
    while await conn.run(Stage.DATA, reader.epoch):
        cap.side.faults.phase(Phase.SYNC, label)
        await epochs.channel_synced(channel, label)
    epochs.end(channel)


# --- the whole migration

async def _finish(cap: Capture) -> None:
    """After the main channel's VMDESCRIPTION: the rest of every channel, and the check that
    each delivered the same SYNCs, as many as the source sent (a channel cut short at a
    packet boundary has fewer)."""
    epochs = cap.epochs
    epochs.release_all()
    if cap.return_path:
        # QEMU closes nothing before our SHUT: the markers must say every channel is done.
        # 9.1+ ends the completion with a SYNC and no sync point after it.
        want = epochs.passed + (0 if cap.completion_synced else 1)
        await epochs.wait_for(
            lambda: all(n >= want or c in epochs.ended for c, n in epochs.synced.items()),
            lambda: [c for c, n in epochs.synced.items() if n < want],
            lambda: E.PeerTimeout(
                f"no SYNC {want} from multifd channels "
                f"{[c for c, n in epochs.synced.items() if n < want]} within "
                f"{epochs.idle:g}s: the completion ends without one (a source whose last "
                f"iteration has no SYNC, QEMU 10's, needs no return-path capability here)",
                channel=MAIN, stage=Stage.FINISH))
    else:
        await epochs.wait_for(lambda: len(epochs.ended) == len(cap.channels),
                              lambda: [c for c in cap.channels if c not in epochs.ended],
                              lambda: E.PeerTimeout(
                                  f"multifd channels "
                                  f"{sorted(set(cap.channels) - epochs.ended)} did not end "
                                  f"within {epochs.idle:g}s of the main channel's",
                                  side=cap.side.name, stage=Stage.FINISH))
        extra = await cap.main.run(Stage.FINISH, cap.main.recv_some,
                                   memoryview(bytearray(1)))
        if extra:
            raise E.RemoteProtocolError("bytes after the end of the stream (the "
                                        "VMDESCRIPTION)", channel=MAIN, stage=Stage.FINISH)
    counts = sorted(set(epochs.synced.values()))
    if counts and (len(counts) > 1 or counts[0] < epochs.passed):
        raise E.RemoteProtocolError(
            f"the multifd channels ended with different numbers of SYNCs "
            f"({dict(sorted(epochs.synced.items()))}, {epochs.passed} sync points): a channel "
            f"was cut short", channel=MAIN, stage=Stage.FINISH)


def _manifest(cap: Capture, end: Q.End, parser: Q.MainStream, config, digests: dict,
              seconds: float) -> dict:
    zero_in_packets = any(s.zero_pages for k, s in cap.stats.items() if k != "main")
    return {
        "output": cap.out.path,
        "machine": config.machine if config else None,
        "stream_version": Q.STREAM_VERSION,
        "sync": "flush (QEMU 8.1+)" if parser.flushes else "per section (QEMU 7.2-8.0, or an "
                "old machine type)",
        "zero_pages": "in multifd packets (QEMU 9.0+)" if zero_in_packets else
                      "on the main channel",
        "compression": cap.compression or "none",
        "tls": cap.side.tls is not None,
        "return_path": cap.return_path,
        "uuid": cap.uuid.hex() if cap.uuid else None,
        "channels": len(cap.channels),
        "iterations": parser.sections,
        "sync_points": cap.epochs.passed,
        "blocks": [{"name": b.name, "file": b.file, "bytes": b.size, "xxh3_128": digests[name],
                    "pages_never_sent": b.never_sent()} for name, b in cap.out.blocks.items()],
        "main": {"bytes": cap.stats["main"].bytes, "zero_pages": cap.stats["main"].zero_pages,
                 "pages": cap.stats["main"].pages},
        "multifd": [{"channel": c, **vars(cap.stats[c])} for c in sorted(cap.channels)],
        "device_state": {"file": "device-state.bin", "bytes": len(end.device_state)},
        "vmdescription": None if end.vmdescription is None else
                         {"file": "vmdescription.json", "bytes": len(end.vmdescription)},
        "seconds": round(seconds, 6),
    }


def _write_out(cap: Capture, end: Q.End, manifest_of) -> dict:
    """(worker thread) The files beside the blocks, the digests, and the manifest."""
    out = cap.out
    out.write_file("device-state.bin", end.device_state)
    if end.vmdescription is not None:
        out.write_file("vmdescription.json", end.vmdescription)
    manifest = manifest_of({name: b.xxh3_128() for name, b in out.blocks.items()})
    out.write_file("manifest.json", json.dumps(manifest, indent=2).encode() + b"\n")
    # A precopy sends every page at least once, but for pages the guest gave back (free
    # page hinting, a balloon): they stay zero here. Said, not refused.
    for block in manifest["blocks"]:
        if block["pages_never_sent"]:
            cap.side.log(f"warning: {block['pages_never_sent']} pages of RAM block "
                         f"{block['name']!r} were never sent (left zero): free page hinting "
                         "on the source, or a multifd channel that never arrived "
                         "(--qemu-channels)")
    return manifest


async def receive_qemu(listeners, output: str, *, side: Side, uuid: bytes | None = None,
                       channels: int | None = None, on_complete=None) -> dict:
    """Accept one QEMU migration and put its RAM blocks and device state in `output`;
    returns the manifest (also written there). on_complete(manifest) is called once the
    directory is in place."""
    with OutputDir(output, side.faults.pwrite(os.pwrite), side.log) as out:
        cap = Capture(out, side, listeners, uuid, channels)
        try:
            with collapse_group():
                async with trio.open_nursery() as nursery:
                    cap.nursery = nursery
                    for listener in listeners:
                        nursery.start_soon(accept_loop, listener,
                                           functools.partial(_greet, cap=cap), side, nursery)
                    manifest = await _migrate(cap, on_complete)
                    nursery.cancel_scope.cancel()
        finally:
            cap.close_all()
    return manifest


async def _migrate(cap: Capture, on_complete) -> dict:
    """From the main channel's arrival (awaited for as long as it takes a migration to
    come) to the directory in place and, with a return path, the SHUT."""
    await cap.main_arrived.wait()
    start = time.monotonic()
    end, parser, config = await _main_channel(cap)
    await _finish(cap)
    manifest = await trio.to_thread.run_sync(_write_out, cap, end, functools.partial(
        _manifest, cap, end, parser, config, seconds=time.monotonic() - start))
    cap.side.faults.phase(Phase.COMPLETION)
    await trio.to_thread.run_sync(cap.out.publish)
    if on_complete is not None:
        on_complete(manifest)
    if cap.return_path:
        main = cap.main
        await main.run(Stage.FINISH, main.send_all, Q.encode_shut(False))
        # The source closes once it has read it; closing first could reset the connection
        # under the SHUT.
        with trio.move_on_after(cap.side.timeouts.idle):
            await main.run(Stage.FINISH, main.recv_some, memoryview(bytearray(1)))
    return manifest
