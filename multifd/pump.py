"""The hot path: one channel's packets, sent or received inside that channel's worker thread.

Ownership: each BlockSender / BlockReceiver belongs to one channel task and is used only from
the worker thread that task starts (Conn.run forbids two at once). Its buffers are reused for
every block; its counters have that one writer, and other tasks only read them for progress.
Per block the Python work is constant: no loop runs per page (pages.PageScanner finds zero
pages at C speed; runs are per contiguous range, not per page).
"""

from __future__ import annotations

from . import errors as E
from . import wire
from .conn import Conn
from .digest import DigestSum, block_term, term_bytes
from .faults import Plan
from .image import OutputFile, SourceImage
from .pages import PageScanner, zeros
from .wire import PacketKind, RunKind


_FULL = wire.FLAG_DIGEST | wire.FLAG_FULL_BLOCK


class Counters:
    __slots__ = ("packets", "pages", "zero_pages", "payload_bytes", "image_bytes", "blocks")

    def __init__(self) -> None:
        self.packets = self.pages = self.zero_pages = 0
        self.payload_bytes = self.image_bytes = self.blocks = 0

    def merge(self, other: "Counters") -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class BlockSender:
    def __init__(self, conn: Conn, source: SourceImage, session: wire.Session,
                 faults: Plan = Plan()) -> None:
        self.conn = conn
        self.faults = faults
        self.source = source
        self.session = session
        self.scanner = PageScanner(session.page_size, session.block_bytes)
        self.seq = 0
        self.sum = DigestSum()
        self.counters = Counters()

    def send_blocks(self, first: int, last: int, round: int = 0) -> int:
        """Send blocks [first, last) as full-block packets; returns payload bytes sent."""
        s = self.session
        start = first * s.block_bytes
        end = min(last * s.block_bytes, s.image_size)
        with self.source.mapped(start, end - start) as (window, delta):
            with memoryview(window) as view:
                return sum(self._send_block(window, view, delta + b * s.block_bytes - start, b,
                                            round) for b in range(first, last))

    def _send_block(self, window, view: memoryview, at: int, block: int, round: int) -> int:
        s = self.session
        page = s.page_size
        length = s.block_len(block)
        npages = -(-length // page)
        runs, zero = self.scanner.runs(view, at, length)
        term = block_term(view[at:at + length], block)
        self.sum.add(term)
        parts = [wire.encode_packet(PacketKind.PAGES, seq=self.seq, round=round,
                                    offset=block * s.block_bytes, runs=runs, page_size=page,
                                    flags=_FULL, digest=term_bytes(term))]
        for first, n, kind in runs:
            if kind == RunKind.DATA:
                lo, hi = at + first * page, at + min((first + n) * page, length)
                parts.append(view[lo:hi])
                if hi - lo < n * page:  # the image's partial last page travels zero-padded
                    parts.append(bytes(n * page - (hi - lo)))
        try:
            self.conn.send_parts(self.faults.packet(self.conn.label, self.seq, parts))
        finally:
            parts.clear()  # release the window's views before it is unmapped, failure or not
        self.seq += 1
        c = self.counters
        c.packets += 1
        c.blocks += 1
        c.pages += npages
        c.zero_pages += zero
        c.payload_bytes += (npages - zero) * page
        c.image_bytes += length
        return (npages - zero) * page

    def send_marker(self, kind: PacketKind, round: int) -> None:
        self.conn.send_all(wire.encode_packet(kind, seq=self.seq, round=round))
        self.seq += 1

    def finish(self, rounds: int) -> None:
        """END, then (with TLS) the close that proves nothing was cut after it."""
        self.send_marker(PacketKind.END, rounds)
        self.conn.send_close()


class BlockReceiver:
    """One data channel's receiving end.

    `seen` is shared by every channel of the migration: one byte per block, set (never
    incremented, so no two threads race on a read-modify-write) when a block arrives. With
    the block count it proves every block arrived exactly once (1 byte per block).
    """

    def __init__(self, conn: Conn, session: wire.Session, output: OutputFile | None,
                 seen: bytearray, channel: int = 0) -> None:
        self.conn = conn
        self.channel = channel
        self.session = session
        self.output = output
        self.buf = bytearray(session.block_bytes)
        self.view = memoryview(self.buf)
        self.zeros = memoryview(zeros(session.block_bytes))
        self.head = bytearray(wire.PACKET.size)
        self.runs = bytearray(wire.RUN.size * session.block_pages)
        self.seen = seen
        self.seq = 0
        self.sum = DigestSum()
        self.counters = Counters()

    def receive_round(self, round: int) -> wire.PacketHeader:
        """Receive packets of `round` until its SYNC or the channel's END; return that marker."""
        s = self.session
        page = s.page_size
        conn = self.conn
        head_view = memoryview(self.head)
        runs_view = memoryview(self.runs)
        while True:
            conn.recv_exactly(head_view, "a packet header")
            h = wire.decode_packet_header(self.head, s)
            if h.seq != self.seq:
                raise E.RemoteProtocolError(f"packet number {h.seq} (expected {self.seq})")
            if h.round != round:
                raise E.RemoteProtocolError(f"packet {h.seq} is for round {h.round} "
                                            f"(expected round {round})")
            self.seq += 1
            if h.kind is PacketKind.END:
                conn.close_stream()
            if h.kind is not PacketKind.PAGES:
                return h
            if h.flags != _FULL:
                raise E.RemoteProtocolError(
                    f"packet {h.seq}: flags 0x{h.flags:02x} (this receiver takes full blocks "
                    f"with digests, 0x{_FULL:02x})")
            conn.recv_exactly(runs_view[:h.runs_len], "a run table")
            runs = wire.decode_runs(runs_view[:h.runs_len], h, s)
            block = h.offset // s.block_bytes
            length = s.block_len(block)
            zero = 0
            for start, n, kind in runs:
                part = self.view[start * page:(start + n) * page]
                if kind == RunKind.DATA:
                    conn.recv_exactly(part, "packet payload")
                else:
                    part[:] = self.zeros[:n * page]
                    zero += n
            term = block_term(self.view[:length], block)
            if term_bytes(term) != h.digest:
                raise E.ChecksumMismatch(
                    f"packet {h.seq} (offset {h.offset}): checksum {term:032x} "
                    f"(expected {h.digest.hex()})")
            self.sum.add(term)
            self.seen[block] = 1
            if self.output is not None:
                for start, n, kind in runs:
                    if kind == RunKind.DATA:
                        lo = start * page
                        self.output.write(self.view[lo:min((start + n) * page, length)],
                                          h.offset + lo)
            c = self.counters
            c.packets += 1
            c.blocks += 1
            npages = -(-length // page)
            c.pages += npages
            c.zero_pages += zero
            c.payload_bytes += h.payload_len
            c.image_bytes += length
