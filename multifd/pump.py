"""The hot path: one channel's packets, sent or received inside that channel's worker thread.

Ownership: each BlockSender / BlockReceiver belongs to one channel task and is used only from
the worker thread that task starts (Conn.run forbids two at once). Its buffers are reused for
every block; its counters have that one writer, and other tasks only read them for progress.
Per block the Python work is constant: no loop runs per page (pages.PageScanner finds zero
pages at C speed; runs are per contiguous range, not per page). The one exception is the page
digest of a live session: one hash call per data page (digest.PageTerms).
"""

from __future__ import annotations

import array

from . import codec
from . import errors as E
from . import wire
from .conn import Conn
from .digest import BlockTerms, DigestSum, PageTerms, term_bytes, terms_for
from .errors import Stage
from .image import OutputFile, SourceImage
from .pages import PageScanner, zeros
from .wire import Compression, PacketKind, RunKind


_FULL = wire.FLAG_DIGEST | wire.FLAG_FULL_BLOCK


class Counters:
    # payload_bytes: data pages' bytes; wire_bytes: what they took on the wire (compressed)
    __slots__ = ("packets", "pages", "zero_pages", "payload_bytes", "wire_bytes",
                 "image_bytes", "blocks")

    def __init__(self) -> None:
        self.packets = self.pages = self.zero_pages = 0
        self.payload_bytes = self.wire_bytes = self.image_bytes = self.blocks = 0

    def merge(self, other: "Counters") -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def totals(pumps, digest: bool = True) -> tuple[DigestSum, Counters]:
    """The migration's digest (the sum of every block's last term, whichever table of
    terms its channel kept; not summed without `digest`) and counts (every channel's)."""
    total, counters, tables = DigestSum(), Counters(), {}
    for pump in pumps:
        tables[id(pump.terms)] = pump.terms
        counters.merge(pump.counters)
    for table in tables.values() if digest else ():
        total.merge(table.sum())
    return total, counters


class LastRoundWins:
    """The arrival policy: every block in round 0; in a later round a block may come again
    (a live source dirtied it), at most once a round; the last copy is the one that stays
    (written last: the round barrier orders rounds) and whose term counts (BlockTerms).

    Shared by every channel's thread: one entry per block, the last round it came in, set
    (never read-modified-written by two threads: a block is on one channel a round). It is the
    one place that knows the rule.
    """

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self._last = array.array("l", [-1]) * nblocks

    def arrived(self, block: int, round: int) -> None:
        if self._last[block] == -1 and round:
            raise E.RemoteProtocolError(f"block {block} first came in round {round} (round 0 "
                                        f"sends every block)")
        if self._last[block] == round:
            raise E.RemoteProtocolError(f"block {block} came twice in round {round}")
        if self._last[block] > round:
            raise E.RemoteProtocolError(f"block {block} of round {round} after its copy of "
                                        f"round {self._last[block]}")
        self._last[block] = round

    def check(self) -> None:
        missing = self._last.count(-1)
        if missing:
            raise E.VerificationError(
                f"{missing} of the {self.nblocks} blocks never came (round 0 sends them all)",
                side="receiver", stage=Stage.VERIFY)


def unpack_runs(packed, ranges) -> list[tuple[int, int, int]]:
    """Runs found in pages packed range after range, as runs of the block: `ranges` are the
    (first page in block, pages) each packed range came from; a run that spans two ranges
    becomes one run in each."""
    if len(packed) == 1:  # all data, or all zero: each range is one run
        kind = packed[0][2]
        return [(first, n, kind) for first, n in ranges]
    runs, i = [], 0
    (first, n), start = ranges[0], 0  # the range, and where it begins among packed pages
    for at, count, kind in packed:
        while count:
            while at >= start + n:
                start += n
                i += 1
                first, n = ranges[i]
            take = min(count, start + n - at)
            runs.append((first + at - start, take, kind))
            at, count = at + take, count - take
    return runs


class BlockSender:
    def __init__(self, conn: Conn, source: SourceImage, session: wire.Session,
                 method: codec.Method = codec.Method(),
                 terms: BlockTerms | PageTerms | None = None, live: bool = False) -> None:
        self.conn = conn
        self.source = source
        self.session = session
        self.terms = terms_for(session) if terms is None else terms
        self.page_digest = isinstance(self.terms, PageTerms)
        if live and not self.page_digest:  # a later round may carry some pages of a block
            raise E.LocalProtocolError("a live source needs a session with page digests")
        self.snapshot = bytearray(session.block_bytes) if live else None
        self._snapshot_view = memoryview(self.snapshot) if live else None
        self.compressor = None if method.compression is Compression.NONE else \
            codec.Compressor(method)
        self.scanner = PageScanner(session.page_size, session.block_bytes)
        self.seq = 0
        self.counters = Counters()

    def send_blocks(self, first: int, last: int, round: int = 0, dirty=None) -> int:
        """Send blocks [first, last): whole, or (dirty: a dirty.Dirty) each block's dirty
        pages; returns payload bytes sent."""
        s = self.session
        if dirty is not None and self.snapshot is None:
            raise E.LocalProtocolError("dirty pages are sent only by a live sender")
        start = first * s.block_bytes
        end = min(last * s.block_bytes, s.image_size)
        with self.source.mapped(start, end - start) as (window, delta):
            with memoryview(window) as view:
                if dirty is None:
                    data = self.source.next_data(start)  # the first byte not in a hole
                    sent = 0
                    for b in range(first, last):
                        if data < b * s.block_bytes:
                            data = self.source.next_data(b * s.block_bytes)
                        hole = data >= b * s.block_bytes + s.block_len(b)
                        sent += self._send_block(view, delta + b * s.block_bytes - start, b,
                                                 round, None, hole)
                    return sent
                # A batch of dirty pages may reach across clean blocks: they send nothing.
                return sum(self._send_block(view, delta + b * s.block_bytes - start, b, round,
                                            ranges)
                           for b in range(first, last) if (ranges := dirty.ranges(b)) != ())

    def _send_block(self, view: memoryview, at: int, block: int, round: int,
                    ranges: tuple[tuple[int, int], ...] | None, hole: bool = False) -> int:
        """One packet: the block's pages in `ranges` ((first page, pages) runs), or all of
        them (None); `hole`: the block lies in a hole of a still image (all zero, unread)."""
        s = self.session
        page = s.page_size
        length = s.block_len(block)
        if ranges is None:
            ranges = ((0, -(-length // page)),)
            flags = _FULL
        else:
            flags = wire.FLAG_DIGEST
        if self.snapshot is None:  # a still image: whole blocks, read in place
            npages, carried = ranges[0][1], length
            if hole:  # nothing to read
                runs, zero, data = ((0, npages, RunKind.ZERO),), npages, []
            else:
                runs, zero = self.scanner.runs(view, at, length)
                data = [view[at + f * page:at + min((f + n) * page, length)]
                        for f, n, kind in runs if kind == RunKind.DATA]
        else:
            # A live source writes while we read: scan, hash and send one copy of the pages
            # (packed range after range), or what is sent could differ from its term.
            carried = 0
            for first, n in ranges:
                lo, hi = first * page, min((first + n) * page, length)
                self.snapshot[carried:carried + hi - lo] = view[at + lo:at + hi]
                carried += hi - lo
            view = self._snapshot_view
            packed, zero = self.scanner.runs(view, 0, carried)
            npages = -(-carried // page)
            runs = unpack_runs(packed, ranges)
            data = [view[f * page:min((f + n) * page, carried)]
                    for f, n, kind in packed if kind == RunKind.DATA]
        if self.page_digest:
            term = self.terms.take(data, block, runs)
        else:
            term = self.terms.take(view[at:at + length] if data else None, block)
        parts = [b"", *data]  # the header, once the payload is known; the data pages
        data_bytes = (npages - zero) * page
        if carried < npages * page and data:  # the image's short last page travels padded
            parts.append(bytes(data_bytes - sum(map(len, data))))
        packed = self.compressor.compress(b"".join(parts[1:])) \
            if self.compressor is not None and data_bytes else None
        compression = Compression.NONE if packed is None else self.session.compression
        if packed is not None:
            del parts[1:]
            parts.append(packed)
        parts[0] = wire.encode_packet(PacketKind.PAGES, seq=self.seq, round=round,
                                      offset=block * s.block_bytes, runs=runs, page_size=page,
                                      flags=flags, digest=term_bytes(term),
                                      compression=compression,
                                      payload_len=None if packed is None else len(packed))
        try:
            self.conn.send_parts(self.conn.side.faults.packet(self.conn.label, self.seq, parts))
        finally:
            parts.clear()  # release the window's views before it is unmapped, failure or not
        self.seq += 1
        c = self.counters
        c.packets += 1
        c.blocks += 1
        c.pages += npages
        c.zero_pages += zero
        c.payload_bytes += data_bytes
        c.wire_bytes += data_bytes if packed is None else len(packed)
        c.image_bytes += carried
        return data_bytes if packed is None else len(packed)

    def send_marker(self, kind: PacketKind, round: int) -> None:
        self.conn.send_all(wire.encode_packet(kind, seq=self.seq, round=round))
        self.seq += 1

    def finish(self, rounds: int) -> None:
        """END, then (with TLS) the close that proves nothing was cut after it."""
        self.send_marker(PacketKind.END, rounds)
        self.conn.send_close()


class BlockReceiver:
    """One data channel's receiving end.

    Each packet goes through the same steps: header (numbered, of this round), run table,
    payload into the reused block buffer, digest term checked, the arrival told to the
    policy, the data runs written out, the counts kept.
    """

    def __init__(self, conn: Conn, session: wire.Session, output: OutputFile | None,
                 arrivals: LastRoundWins, channel: int = 0,
                 terms: BlockTerms | PageTerms | None = None) -> None:
        self.conn = conn
        self.channel = channel
        self.session = session
        self.output = output
        self.arrivals = arrivals
        self.buf = bytearray(session.block_bytes)
        self.view = memoryview(self.buf)
        self.zeros = memoryview(zeros(session.block_bytes))
        self.decompressor = None if session.compression is Compression.NONE else \
            codec.Decompressor(session.compression)
        self.packed = bytearray()  # a compressed payload, as it came
        self.head = bytearray(wire.PACKET.size)
        self.head_view = memoryview(self.head)
        self.runs_view = memoryview(bytearray(wire.RUN.size * session.block_pages))
        self.seq = 0
        self.terms = terms_for(session) if terms is None else terms
        # Only page digests can check a packet that carries some of a block's pages.
        self.page_digest = session.digest is wire.DigestAlg.XXH3_64_PAGE_SUM
        self.counters = Counters()

    def receive_round(self, round: int) -> wire.PacketHeader:
        """Receive packets of `round` until its SYNC or the channel's END; return that marker."""
        while True:
            h = self._header(round)
            if h.kind is PacketKind.END:
                self.conn.close_stream()
            if h.kind is not PacketKind.PAGES:
                return h
            runs = self._runs(h)
            block = h.offset // self.session.block_bytes
            length = self.session.block_len(block)
            if self.page_digest:
                zero = self._receive_pages(h, runs, block, length)
            else:
                zero = self._payload(h, runs)
                # A block of zeros (however many zero runs it came in) has the term 0.
                all_zero = zero == self.session.block_page_count(block)
                self._check(h, self.terms.take(None if all_zero else self.view[:length],
                                               block))
                self.arrivals.arrived(block, round)
                self._write(h, runs, length)
            self._count(h, runs, length, zero)

    def _header(self, round: int) -> wire.PacketHeader:
        self.conn.recv_exactly(self.head_view, "a packet header")
        h = wire.decode_packet_header(self.head, self.session)
        if h.seq != self.seq:
            raise E.RemoteProtocolError(f"packet number {h.seq} (expected {self.seq})")
        if h.round != round:
            raise E.RemoteProtocolError(f"packet {h.seq} is for round {h.round} "
                                        f"(expected round {round})")
        if h.kind is PacketKind.PAGES and h.flags != _FULL and not (
                h.flags == wire.FLAG_DIGEST and self.page_digest and round):
            raise E.RemoteProtocolError(
                f"packet {h.seq}: flags 0x{h.flags:02x} (expected whole blocks with digests, "
                f"0x{_FULL:02x}" + (", or after round 0 some pages of one with its digest, "
                                    f"0x{wire.FLAG_DIGEST:02x})" if self.page_digest else ")"))
        self.seq += 1
        return h

    def _runs(self, h: wire.PacketHeader):
        table = self.runs_view[:h.runs_len]
        self.conn.recv_exactly(table, "a run table")
        return wire.decode_runs(table, h, self.session)

    def _receive_pages(self, h: wire.PacketHeader, runs, block: int, length: int) -> int:
        """A packet of a page-digest session (whole block or some of its pages): the data
        pages read in one piece, checked, then written run by run; returns its zero pages.
        """
        page = self.session.page_size
        ndata = sum(n for _, n, kind in runs if kind == RunKind.DATA)
        packed = self._unpacked(h, runs)
        if packed is None:
            packed = self.view[:ndata * page]
            self.conn.recv_exactly(packed, "packet payload")
        last, n, kind = runs[-1]  # the image's short last page, if it came, came padded
        short = max(0, (last + n) * page - length) if kind == RunKind.DATA else 0
        self._check(h, self.terms.take((packed[:ndata * page - short],), block, runs))
        self.arrivals.arrived(block, h.round)
        if self.output is not None:
            at = 0
            for first, n, kind in runs:
                lo, hi = first * page, min((first + n) * page, length)
                if kind == RunKind.DATA:
                    self.output.write(packed[at:at + hi - lo], h.offset + lo)
                    at += n * page
                elif h.round:  # see _write
                    self.output.write(self.zeros[:hi - lo], h.offset + lo)
        return sum(n for _, n, kind in runs if kind != RunKind.DATA)

    def _payload(self, h: wire.PacketHeader, runs) -> int:
        """The block's bytes into the buffer, run by run; returns its zero pages."""
        page = self.session.page_size
        if len(runs) == 1 and runs[0][2] == RunKind.ZERO:
            return runs[0][1]  # a block of zeros: its term is 0, nothing to fill or hash
        data = self._unpacked(h, runs)
        zero, at = 0, 0
        for start, n, kind in runs:
            part = self.view[start * page:(start + n) * page]
            if kind != RunKind.DATA:
                part[:] = self.zeros[:n * page]
                zero += n
            elif data is None:
                self.conn.recv_exactly(part, "packet payload")
            else:
                part[:] = data[at:at + n * page]
                at += n * page
        return zero

    def _unpacked(self, h: wire.PacketHeader, runs) -> memoryview | None:
        """A compressed payload's data pages, decoded; None for a plain one (read in place)."""
        if h.compression is Compression.NONE:
            return None
        if len(self.packed) < h.payload_len:
            self.packed = bytearray(h.payload_len)
        packed = memoryview(self.packed)[:h.payload_len]
        self.conn.recv_exactly(packed, "packet payload")
        size = sum(n for _, n, kind in runs if kind == RunKind.DATA) * self.session.page_size
        return memoryview(self.decompressor.decompress(packed, size, h.seq))

    def _check(self, h: wire.PacketHeader, term: int) -> None:
        # The terms are kept as they are computed: a mismatch ends the migration anyway.
        if term_bytes(term) != h.digest:
            raise E.ChecksumMismatch(f"packet {h.seq} (offset {h.offset}): checksum "
                                     f"{term:032x} (expected {h.digest.hex()})")

    def _write(self, h: wire.PacketHeader, runs, length: int) -> None:
        if self.output is None:
            return
        page = self.session.page_size
        for start, n, kind in runs:
            # Zero runs of round 0 stay holes; in a later round the page may hold data of an
            # earlier one, and its zeros must be written.
            if kind == RunKind.DATA or h.round:
                lo, hi = start * page, min((start + n) * page, length)
                source = self.view if kind == RunKind.DATA else self.zeros
                self.output.write(source[lo:hi], h.offset + lo)

    def _count(self, h: wire.PacketHeader, runs, length: int, zero: int) -> None:
        page = self.session.page_size
        npages = sum(n for _, n, _ in runs)
        c = self.counters
        c.packets += 1
        c.blocks += 1
        c.pages += npages
        c.zero_pages += zero
        c.payload_bytes += (npages - zero) * page
        c.wire_bytes += h.payload_len
        # The image's bytes carried: the block's short last page counts as what it holds.
        last_start, last_n, _ = runs[-1]
        c.image_bytes += npages * page - max(0, (last_start + last_n) * page - length)
