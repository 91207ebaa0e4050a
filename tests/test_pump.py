"""multifd/pump.py: BlockSender to BlockReceiver over socketpairs, through a real image file.

The image is small (4 KiB pages, 4-page blocks) with a known pattern of zero and data pages
and a partial last page, so every count the pumps keep can be checked against the pattern.
Covers: the output equals the input, both sides' digests and counters, LastRoundWins' proof
(and a second round whose copies win, zero pages included),
a corrupted payload and packets out of their round or their order.
"""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager

import pytest
import trio

from multifd import errors as E
from multifd import wire
from multifd.conn import Conn
from multifd.digest import image_digest
from multifd.errors import Stage
from multifd.faults import Faults, parse
from multifd.image import OutputFile, SourceImage
from multifd.pump import BlockReceiver, BlockSender, LastRoundWins, totals
from multifd.settings import Timeouts
from multifd.side import Side

PAGE = 4096
BLOCK_PAGES = 4
TAIL = 1234  # bytes in the image's partial last page
FAST = Timeouts(connect=1, handshake=1, idle=5)
RECEIVER = Side("receiver", FAST)

# Per block: D = data page, Z = zero page, H = data page whose first word is zero.
PATTERN = ["DZDZ", "ZZZZ", "HDDD", "ZDDZ", "DZZD", "ZZDD"]
# The last block: two full pages and the partial one, under each rule for that page.
TAILS = {
    "data": ("DZ", "D", 0),  # (full pages, tail kind, tail counted as zero)
    "zero-after-zero": ("DZ", "Z", 1),  # zero as part of a zero run that reaches it
    "zero-alone": ("ZD", "Z", 1),  # alone after data: a zero page all the same
}


class Image:
    def __init__(self, path: str, data: bytes, zero_pages: int) -> None:
        self.path = path
        self.data = data
        self.zero_pages = zero_pages
        self.session = wire.Session(len(data), PAGE, BLOCK_PAGES)
        self.npages = -(-len(data) // PAGE)


def _page(kind: str, rng: random.Random, size: int = PAGE) -> bytes:
    if kind == "Z":
        return bytes(size)
    data = rng.randbytes(size)
    return bytes(8) + data[8:] if kind == "H" else data


@pytest.fixture
def image(request, tmp_path) -> Image:
    """The image, with the partial last page of the kind the test names (default: data)."""
    tail = getattr(request, "param", "data")
    full, tail_kind, tail_zero = TAILS[tail]
    rng = random.Random(tail)
    pages = "".join(PATTERN) + full
    data = b"".join(_page(k, rng) for k in pages) + _page(tail_kind, rng, TAIL)
    assert len(data) % PAGE  # not a whole number of pages
    path = tmp_path / "source.img"
    path.write_bytes(data)
    return Image(str(path), data, pages.count("Z") + tail_zero)


@pytest.fixture
def links():
    """make(faults=...) -> (sender's Conn, receiver's Conn) over a fresh socketpair."""
    socks = []

    def make(faults: Faults = Faults(), label: str = "data channel 0"):
        a, b = socket.socketpair()
        socks.extend((a, b))
        return (Conn(a, label, side=Side("sender", FAST, faults=faults), timeout=5),
                Conn(b, label, side=RECEIVER, timeout=5))

    yield make
    for s in socks:
        s.close()


async def _send(sender: BlockSender, ranges, rounds: int = 1) -> None:
    conn = sender.conn
    for first, last in ranges:
        await conn.run(Stage.DATA, sender.send_blocks, first, last, 0)
    await conn.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, 0)
    await conn.run(Stage.FINISH, sender.finish, rounds)


async def _receive(receiver: BlockReceiver, markers: list) -> None:
    conn = receiver.conn
    markers.append(await conn.run(Stage.DATA, receiver.receive_round, 0))
    markers.append(await conn.run(Stage.DATA, receiver.receive_round, 1))


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _whole_image(tx, rx, source, session, output=None):
    """Every block of `source` through one channel in round 0; returns (sender, receiver)."""
    sender = BlockSender(tx, source, session)
    receiver = BlockReceiver(rx, session, output, LastRoundWins(session.nblocks))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send, sender, [(0, session.nblocks)])
            nursery.start_soon(_receive, receiver, [])
    return sender, receiver


@pytest.mark.parametrize("image", list(TAILS), indirect=True)
async def test_two_channels_deliver_the_image_whole(image, links, tmp_path):
    session = image.session
    assert session.nblocks == 7
    out = tmp_path / "out.img"
    split = [[(0, 2), (2, 4)], [(4, 7)]]  # channel 0 takes two hops, channel 1 one
    markers: list = []
    with SourceImage(image.path) as source, OutputFile(str(out), session.image_size) as output:
        arrivals = LastRoundWins(session.nblocks)
        senders, receivers = [], []
        for channel in range(2):
            tx, rx = links(label=f"data channel {channel}")
            senders.append(BlockSender(tx, source, session))
            receivers.append(BlockReceiver(rx, session, output, arrivals, channel=channel))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for channel in range(2):
                    nursery.start_soon(_send, senders[channel], split[channel])
                    nursery.start_soon(_receive, receivers[channel], markers)
        arrivals.check()
        output.publish()
    assert _read(out) == image.data

    kinds = sorted((m.kind, m.round) for m in markers)
    assert kinds == [(wire.PacketKind.SYNC, 0)] * 2 + [(wire.PacketKind.END, 1)] * 2

    sent_sum, sent = totals(senders)
    got_sum, got = totals(receivers)
    reference = image_digest(
        (b, image.data[b * session.block_bytes:(b + 1) * session.block_bytes])
        for b in range(session.nblocks))
    assert sent_sum.digest() == got_sum.digest() == reference
    for counters in (sent, got):
        assert counters.blocks == counters.packets == 7
        assert counters.pages == image.npages == 27
        assert counters.zero_pages == image.zero_pages
        # every data page travels whole, the partial last page zero-padded
        assert counters.payload_bytes == (image.npages - image.zero_pages) * PAGE
        assert counters.image_bytes == len(image.data)


async def test_send_blocks_returns_the_payload_it_sent(image, links):
    session = image.session
    tx, rx = links()
    with SourceImage(image.path) as source:
        sender = BlockSender(tx, source, session)
        with trio.fail_after(5):
            # block 1 is all zero pages: nothing but the header travels
            assert await tx.run(Stage.DATA, sender.send_blocks, 1, 2, 0) == 0
            assert await tx.run(Stage.DATA, sender.send_blocks, 0, 1, 0) == 2 * PAGE
    assert (sender.seq, sender.counters.zero_pages, sender.counters.pages) == (2, 6, 8)


def test_every_block_must_come_in_round_0():
    arrivals = LastRoundWins(4)
    for block in (2, 0, 3):
        arrivals.arrived(block, 0)
    with pytest.raises(E.VerificationError, match=r"^verify: 1 of the 4 blocks never came"):
        arrivals.check()
    arrivals.arrived(1, 0)
    arrivals.arrived(2, 1)  # again, in a later round: a live source dirtied it
    arrivals.check()


def test_a_block_first_seen_after_round_0_is_refused_at_once():
    arrivals = LastRoundWins(4)
    with pytest.raises(E.RemoteProtocolError, match=r"^block 3 first came in round 1 \(round 0 "
                                                    r"sends every block\)$"):
        arrivals.arrived(3, 1)


def test_a_block_twice_in_one_round_or_back_in_time_is_refused_at_once():
    arrivals = LastRoundWins(4)
    arrivals.arrived(1, 0)
    with pytest.raises(E.RemoteProtocolError, match=r"^block 1 came twice in round 0$"):
        arrivals.arrived(1, 0)
    arrivals.arrived(1, 2)
    with pytest.raises(E.RemoteProtocolError, match=r"^block 1 of round 1 after its copy of "
                                                    r"round 2$"):
        arrivals.arrived(1, 1)


async def test_a_block_sent_twice_in_a_round_is_a_protocol_error(image, links):
    session = image.session
    tx, rx = links()
    with SourceImage(image.path) as source:
        sender = BlockSender(tx, source, session)
        receiver = BlockReceiver(rx, session, None, LastRoundWins(session.nblocks))
        with trio.fail_after(10):
            with pytest.raises(E.RemoteProtocolError, match="block 3 came twice in round 0"):
                with E.collapse_group():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_send, sender, [(0, 4), (3, 5), (6, 7)])
                        nursery.start_soon(_receive, receiver, [])


async def test_a_later_round_wins_and_its_zero_pages_are_written(image, links, tmp_path):
    # Round 0 sends the image; then block 0's data pages become zero and block 2 changes,
    # and round 1 sends those two again. The output and both digests are of the final state.
    session = image.session
    tx, rx = links()
    out = tmp_path / "out.img"
    final = bytearray(image.data)
    bb = session.block_bytes
    final[0:bb] = bytes(bb)
    final[2 * bb:3 * bb] = random.Random(9).randbytes(bb)
    markers: list = []
    with SourceImage(image.path) as source, OutputFile(str(out), session.image_size) as output:
        arrivals = LastRoundWins(session.nblocks)
        sender = BlockSender(tx, source, session)
        receiver = BlockReceiver(rx, session, output, arrivals)

        async def send():
            await tx.run(Stage.DATA, sender.send_blocks, 0, session.nblocks, 0)
            await tx.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, 0)
            await sync_done.wait()  # the image changes between the rounds, as a guest does
            with open(image.path, "r+b") as f:
                f.write(final)
            for block in (0, 2):
                await tx.run(Stage.DATA, sender.send_blocks, block, block + 1, 1)
            await tx.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, 1)
            await tx.run(Stage.FINISH, sender.finish, 2)

        async def receive():
            for round in range(3):
                markers.append(await rx.run(Stage.DATA, receiver.receive_round, round))
                if round == 0:
                    sync_done.set()

        sync_done = trio.Event()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        arrivals.check()
        output.publish()
    assert [(m.kind, m.round) for m in markers] == [
        (wire.PacketKind.SYNC, 0), (wire.PacketKind.SYNC, 1), (wire.PacketKind.END, 2)]
    assert _read(out) == bytes(final)
    reference = image_digest((b, bytes(final[b * bb:(b + 1) * bb]))
                             for b in range(session.nblocks))
    assert totals([sender])[0].digest() == totals([receiver])[0].digest() == reference
    assert receiver.counters.blocks == session.nblocks + 2


async def test_a_corrupted_payload_is_a_checksum_mismatch_and_never_written(image, links,
                                                                           tmp_path):
    session = image.session
    tx, rx = links(faults=Faults([parse("corrupt-payload@0:packet=2", "send")]))
    with SourceImage(image.path) as source, \
            OutputFile(str(tmp_path / "out.img"), session.image_size) as output:
        sender = BlockSender(tx, source, session)
        receiver = BlockReceiver(rx, session, output, LastRoundWins(session.nblocks))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, sender, [(0, session.nblocks)])
                with pytest.raises(E.ChecksumMismatch) as caught:
                    await rx.run(Stage.DATA, receiver.receive_round, 0)
                nursery.cancel_scope.cancel()
        written = os.pread(output.fd, session.image_size, 0)
    bb = session.block_bytes
    assert str(caught.value).startswith(f"data channel 0, data: packet 2 (offset {2 * bb}): "
                                        f"checksum ")
    assert written[:2 * bb] == image.data[:2 * bb]  # the blocks before it are written
    assert written[2 * bb:3 * bb] == bytes(bb)  # the corrupted one is not
    assert receiver.counters.blocks == 2


@contextmanager
def _pumps(image: Image, tx, rx):
    """A sender and a receiver (no output) of `image` over the links tx -> rx."""
    session = image.session
    with SourceImage(image.path) as source:
        yield (BlockSender(tx, source, session),
               BlockReceiver(rx, session, None, LastRoundWins(session.nblocks)))


async def test_a_packet_of_another_round_is_a_protocol_error(image, links):
    tx, rx = links()
    with _pumps(image, tx, rx) as (sender, receiver):
        with trio.fail_after(5):
            await tx.run(Stage.DATA, sender.send_blocks, 0, 1, 0)
            await tx.run(Stage.DATA, sender.send_blocks, 1, 2, 1)  # round 1 within round 0
            with pytest.raises(E.RemoteProtocolError) as caught:
                await rx.run(Stage.DATA, receiver.receive_round, 0)
    assert str(caught.value) == "data channel 0, data: packet 1 is for round 1 (expected round 0)"
    assert receiver.counters.blocks == 1


async def test_an_end_of_the_wrong_round_is_a_protocol_error(image, links):
    tx, rx = links()
    with _pumps(image, tx, rx) as (sender, receiver):
        with trio.fail_after(5):
            await tx.run(Stage.FINISH, sender.finish, 3)
            with pytest.raises(E.RemoteProtocolError,
                               match=r"packet 0 is for round 3 \(expected round 0\)$"):
                await rx.run(Stage.DATA, receiver.receive_round, 0)


async def test_a_packet_out_of_order_is_a_protocol_error(image, links):
    tx, rx = links()
    with _pumps(image, tx, rx) as (sender, receiver):
        with trio.fail_after(5):
            await tx.run(Stage.DATA, sender.send_blocks, 0, 1, 0)
            sender.seq += 1  # packet 1 lost
            await tx.run(Stage.DATA, sender.send_blocks, 1, 2, 0)
            with pytest.raises(E.RemoteProtocolError,
                               match=r"packet number 2 \(expected 1\)$"):
                await rx.run(Stage.DATA, receiver.receive_round, 0)


async def test_a_block_of_zeros_has_term_0_on_both_sides(image, links):
    # Block 1 is all zero pages: nothing is hashed for it, nor filled on the receiver.
    session = image.session
    tx, rx = links()
    with SourceImage(image.path) as source:
        sender, receiver = await _whole_image(tx, rx, source, session)
    assert sender.terms.terms[1] == receiver.terms.terms[1] == 0
    assert all(sender.terms.terms[b] for b in range(session.nblocks) if b != 1)
    assert sender.terms.terms == receiver.terms.terms
    blocks = [(b, image.data[b * session.block_bytes:(b + 1) * session.block_bytes])
              for b in range(session.nblocks)]
    assert totals([sender])[0].digest() == image_digest(blocks)


class _AllHoles(SourceImage):
    """A source whose file system says it is one hole: its blocks must go as zero, unread."""

    def next_data(self, offset: int) -> int:
        return self.size


async def test_blocks_in_a_hole_go_as_zero_without_being_read(image, links, tmp_path):
    session = image.session
    tx, rx = links()
    out = tmp_path / "out.img"
    with _AllHoles(image.path) as source, OutputFile(str(out), session.image_size) as output:
        sender, receiver = await _whole_image(tx, rx, source, session, output)
        output.publish()
    # The file holds data, but what a hole holds is zero: so was what went.
    assert _read(out) == bytes(len(image.data))
    assert sender.counters.zero_pages == image.npages and sender.counters.payload_bytes == 0
    assert totals([sender])[0].digest() == totals([receiver])[0].digest() == bytes(16)


def test_next_data_finds_the_holes_of_a_sparse_file(tmp_path):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"x" * PAGE)
    with SourceImage(str(path)) as source:  # (ext4 and tmpfs know their holes to the page)
        assert source.next_data(0) == source.next_data(40 << 20) == 40 << 20
        assert source.next_data((40 << 20) + PAGE) == 64 << 20  # no data after it


async def test_a_block_of_zeros_in_several_zero_runs_still_has_term_0(image, links):
    session = image.session
    tx, rx = links()
    receiver = BlockReceiver(rx, session, None, LastRoundWins(session.nblocks))
    runs = ((0, 1, wire.RunKind.ZERO), (1, 3, wire.RunKind.ZERO))
    packet = wire.encode_packet(wire.PacketKind.PAGES, seq=0, round=0,
                                offset=session.block_bytes, runs=runs, page_size=PAGE,
                                flags=wire.FLAG_DIGEST | wire.FLAG_FULL_BLOCK, digest=bytes(16))
    tx.send_all(packet + wire.encode_packet(wire.PacketKind.SYNC, seq=1, round=0))
    with trio.fail_after(5):
        marker = await rx.run(Stage.DATA, receiver.receive_round, 0)
    assert marker.kind is wire.PacketKind.SYNC
    assert receiver.terms.terms[1] == 0 and receiver.counters.zero_pages == BLOCK_PAGES


async def test_a_last_block_of_only_a_short_zero_page_has_term_0_written_or_sparse(links,
                                                                                   tmp_path):
    # The digest is the content's: written zeros and a hole give the same term (0).
    digests = []
    for sparse in (False, True):
        path = tmp_path / f"img-{sparse}"
        with open(path, "wb") as f:
            f.write(random.Random(3).randbytes(BLOCK_PAGES * PAGE))
            if sparse:
                f.truncate(BLOCK_PAGES * PAGE + 100)
            else:
                f.write(bytes(100))
        session = wire.Session(BLOCK_PAGES * PAGE + 100, PAGE, BLOCK_PAGES)
        tx, rx = links()
        with SourceImage(str(path)) as source:
            sender, receiver = await _whole_image(tx, rx, source, session)
        assert sender.terms.terms[1] == receiver.terms.terms[1] == 0
        digests.append(totals([sender])[0].digest())
    data = path.read_bytes()
    reference = image_digest([(0, data[:BLOCK_PAGES * PAGE]), (1, data[BLOCK_PAGES * PAGE:])])
    assert digests == [reference, reference]
