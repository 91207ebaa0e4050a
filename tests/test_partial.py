"""Live precopy per page, at unit level: what a later round sends is each block's dirty pages.

Proves, without subprocesses: multifd/dirty.py (count, pages, blocks, maximal runs per block,
None for a wholly dirty block, union, a short last block) against a naive per-page reference;
pump.unpack_runs against a naive reference (hypothesis); digest.PageTerms against an
independent page-sum reference written here (also after random partial updates, so the
per-block running sums are checked, and after a block re-sent whole); send._batches (weights,
a heavy block alone, MAX_SPAN, every block once and in order); and BlockSender to
BlockReceiver over a socketpair in a page-digest session: round 0 whole blocks, round 1
partial packets, the output and both digests are of the final image; a partial packet in
round 0 or in a block-digest session is refused, a corrupted one is a ChecksumMismatch and
none of it is written.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

import pytest
import trio
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd import codec
from multifd import errors as E
from multifd import wire
from multifd.conn import Conn
from multifd.digest import PageTerms, terms_for
from multifd.dirty import Dirty
from multifd.errors import Stage
from multifd.faults import Faults, parse
from multifd.image import OutputFile, SourceImage
from multifd.pump import BlockReceiver, BlockSender, LastRoundWins, totals, unpack_runs
from multifd.send import MAX_SPAN, _batches
from multifd.settings import Timeouts
from multifd.side import Side
from multifd.wire import Compression, DigestAlg, RunKind

pytestmark = pytest.mark.timeout(30)  # every test here takes well under a second

D, Z = RunKind.DATA, RunKind.ZERO
MASK = (1 << 128) - 1


# ------------------------------------------------------------------------------ references

def naive_ranges(mask: bytes, block: int, bp: int):
    """Dirty.ranges, one page at a time."""
    pages = mask[block * bp:(block + 1) * bp]
    if all(pages):
        return None
    runs: list[list[int]] = []
    for i, bit in enumerate(pages):
        if bit and runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        elif bit:
            runs.append([i, 1])
    return tuple(map(tuple, runs))


def page_term(image: bytes, p: int, page: int) -> int:
    """The documented term of page p: XXH3-64 of its bytes in the image (a short last page
    as it is), seeded with p; 0 for a zero page."""
    data = image[p * page:(p + 1) * page]
    return 0 if data == bytes(len(data)) else xxhash.xxh3_64_intdigest(data, seed=p)


def page_sum(image: bytes, page: int) -> int:
    return sum(page_term(image, p, page) for p in range(-(-len(image) // page))) & MASK


def naive_runs(image: bytes, block: int, page: int, bp: int, ranges):
    """(runs, data views) for the pages `ranges` name in `block`, each page classified on its
    own (maximal runs inside each range): what PageTerms.take is given."""
    base = block * bp
    runs = []
    for first, n in ranges:
        for i in range(first, first + n):
            data = image[(base + i) * page:(base + i + 1) * page]
            kind = Z if data == bytes(len(data)) else D
            if runs and runs[-1][2] == kind and runs[-1][0] + runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1, kind])
    runs = [tuple(r) for r in runs]
    view = memoryview(image)
    data = [view[(base + f) * page:(base + f + n) * page] for f, n, k in runs if k == D]
    return runs, data


# ------------------------------------------------------------------------------ Dirty

def test_dirty_counts_pages_blocks_and_runs():
    # Blocks of 4 pages; the last block is short (2 pages).
    mask = bytes([1, 1, 1, 1,  # wholly dirty
                  0, 0, 0, 0,  # clean
                  1, 0, 1, 1,  # two runs
                  0, 1])  # short, one page dirty
    dirty = Dirty(mask, 4)
    assert dirty.count == 8
    assert dirty.pages() == [0, 1, 2, 3, 8, 10, 11, 13]
    assert dirty.blocks() == [(0, 4), (2, 3), (3, 1)]
    assert dirty.ranges(0) is None  # the whole block goes
    assert dirty.ranges(1) == ()  # nothing of it goes
    assert dirty.ranges(2) == ((0, 1), (2, 2))
    assert dirty.ranges(3) == ((1, 1),)
    assert dirty


def test_dirty_runs_are_maximal():
    dirty = Dirty(bytes([0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0]), 16)
    assert dirty.ranges(0) == ((1, 3), (5, 2), (8, 7))
    assert dirty.blocks() == [(0, 12)]


def test_a_short_last_block_wholly_dirty_is_sent_whole():
    dirty = Dirty(bytes([0, 0, 0, 0, 1, 1, 1]), 4)  # the last block has 3 pages, all dirty
    assert dirty.ranges(1) is None
    assert dirty.ranges(0) == ()
    assert dirty.blocks() == [(1, 3)]
    assert Dirty(bytes([0, 0, 0, 0, 1, 0, 1]), 4).ranges(1) == ((0, 1), (2, 1))


def test_union_and_truth():
    a = Dirty(bytes([1, 0, 0, 0, 0, 0, 0, 1, 0]), 4)
    b = Dirty(bytes([0, 0, 1, 0, 0, 0, 0, 1, 1]), 4)
    both = a | b
    assert both.map == bytes([1, 0, 1, 0, 0, 0, 0, 1, 1])
    assert both.block_pages == 4
    assert both.pages() == [0, 2, 7, 8]
    assert (a.map, b.map) == (bytes([1, 0, 0, 0, 0, 0, 0, 1, 0]),
                              bytes([0, 0, 1, 0, 0, 0, 0, 1, 1]))  # neither changed
    assert not Dirty(bytes(9), 4)
    assert not (Dirty(bytes(9), 4) | Dirty(bytes(9), 4))
    assert Dirty(bytes(8) + b"\x01", 4)  # the very last page alone
    whole = Dirty(b"\x01" * 9, 4)
    assert whole.count == 9 and [whole.ranges(b) for b in range(3)] == [None] * 3


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9).flatmap(lambda bp: st.tuples(
    st.just(bp), st.binary(min_size=1, max_size=60), st.binary(min_size=1, max_size=60))))
def test_dirty_matches_a_page_by_page_reference(case):
    bp, a_bits, b_bits = case
    n = min(len(a_bits), len(b_bits))
    a = bytes(x & 1 for x in a_bits[:n])
    b = bytes(x & 1 for x in b_bits[:n])
    dirty = Dirty(a, bp)
    nblocks = -(-n // bp)
    assert dirty.count == sum(a)
    assert dirty.pages() == [p for p in range(n) if a[p]]
    assert dirty.blocks() == [(blk, sum(a[blk * bp:(blk + 1) * bp])) for blk in range(nblocks)
                              if any(a[blk * bp:(blk + 1) * bp])]
    for blk in range(nblocks):
        assert dirty.ranges(blk) == naive_ranges(a, blk, bp), (a, blk, bp)
    assert (dirty | Dirty(b, bp)).map == bytes(x | y for x, y in zip(a, b))
    assert bool(dirty) == any(a)


# ------------------------------------------------------------------------------ unpack_runs

def test_an_all_data_packed_run_is_one_run_per_range():
    assert unpack_runs(((0, 6, D),), ((1, 2), (5, 3), (9, 1))) == [
        (1, 2, D), (5, 3, D), (9, 1, D)]
    assert unpack_runs(((0, 3, Z),), ((0, 1), (7, 2))) == [(0, 1, Z), (7, 2, Z)]


def test_a_zero_run_straddling_two_ranges_becomes_one_run_in_each():
    # Ranges: block pages 0-1 and 4-6, packed as pages 0-4. Packed page 1 (block page 1) to
    # packed page 3 (block page 5) are zero: the zero run is cut at the range boundary.
    packed = ((0, 1, D), (1, 3, Z), (4, 1, D))
    assert unpack_runs(packed, ((0, 2), (4, 3))) == [(0, 1, D), (1, 1, Z), (4, 2, Z), (6, 1, D)]
    # A zero run across three ranges, the middle one swallowed whole.
    assert unpack_runs(((0, 1, D), (1, 4, Z)), ((0, 2), (3, 1), (6, 2))) == [
        (0, 1, D), (1, 1, Z), (3, 1, Z), (6, 2, Z)]


def _maximal_runs(kinds):
    runs, at = [], 0
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        runs.append((at, n, kind))
        at += n
    return tuple(runs)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40).filter(any), st.data())
def test_unpack_runs_matches_a_page_by_page_reference(mask, data):
    # Ranges as Dirty gives them (maximal, so never adjacent); packed runs as the scanner
    # gives them (maximal over the packed pages).
    ranges = Dirty(bytes(mask), len(mask)).ranges(0) or ((0, len(mask)),)
    where = [first + i for first, n in ranges for i in range(n)]
    which = [r for r, (_, n) in enumerate(ranges) for _ in range(n)]
    kinds = data.draw(st.lists(st.sampled_from([D, Z]), min_size=len(where),
                               max_size=len(where)))
    expected: list[list] = []
    for page, r, kind in zip(where, which, kinds):
        if expected and expected[-1][3] == r and expected[-1][2] == kind:
            expected[-1][1] += 1
        else:
            expected.append([page, 1, kind, r])
    assert unpack_runs(_maximal_runs(kinds), ranges) == [tuple(e[:3]) for e in expected]


# ------------------------------------------------------------------------------ PageTerms

PAGE = 4096
BP = 8  # pages per block


def _image(rng: random.Random, npages: int, tail: int) -> bytearray:
    """npages pages, a third of them zero, then a short last page of `tail` bytes of data."""
    image = bytearray()
    for _ in range(npages):
        image += bytes(PAGE) if rng.random() < 0.33 else rng.randbytes(PAGE)
    return image + b"\x01" + rng.randbytes(tail - 1)


def _take_whole(terms: PageTerms, image: bytes, block: int) -> int:
    npages = min(BP, -(-len(image) // PAGE) - block * BP)
    runs, data = naive_runs(image, block, PAGE, BP, ((0, npages),))
    return terms.take(data, block, runs)


def test_page_terms_of_a_whole_image_equal_the_reference():
    rng = random.Random(1)
    image = bytes(_image(rng, 3 * BP + 4, 1234))  # 4 blocks, the last short (5 pages)
    npages = -(-len(image) // PAGE)
    terms = PageTerms(npages, PAGE, BP)
    for block in range(4):
        got = _take_whole(terms, image, block)
        # The packet's digest: the sum of the terms of the pages it carries.
        assert got == sum(page_term(image, p, PAGE)
                          for p in range(block * BP, min((block + 1) * BP, npages)))
    assert terms.sum().value == page_sum(image, PAGE)
    assert terms.sum().digest() == page_sum(image, PAGE).to_bytes(16, "big")
    # The short last page is hashed as it is, not padded.
    tail = image[(npages - 1) * PAGE:]
    assert len(tail) == 1234
    assert terms.terms[npages - 1] == xxhash.xxh3_64_intdigest(tail, seed=npages - 1)
    assert terms.terms[npages - 1] != xxhash.xxh3_64_intdigest(tail + bytes(PAGE - 1234),
                                                               seed=npages - 1)
    assert list(terms.terms) == [page_term(image, p, PAGE) for p in range(npages)]


def test_terms_for_picks_the_table_of_the_session():
    paged = terms_for(wire.Session(10 * PAGE + 1, PAGE, BP, DigestAlg.XXH3_64_PAGE_SUM))
    assert isinstance(paged, PageTerms) and len(paged.terms) == 11
    assert len(paged.block_sums) == 2 and paged.name == "xxh3-64-page-sum"
    assert not isinstance(terms_for(wire.Session(10 * PAGE, PAGE, BP)), PageTerms)


@pytest.mark.parametrize("seed", range(5))
def test_page_terms_after_random_partial_updates_equal_the_final_image(seed):
    rng = random.Random(seed)
    image = _image(rng, 4 * BP + 2, 777)  # 5 blocks, the last short (3 pages)
    npages = -(-len(image) // PAGE)
    nblocks = -(-npages // BP)
    terms = PageTerms(npages, PAGE, BP)
    for block in range(nblocks):
        _take_whole(terms, bytes(image), block)
    for _ in range(6):  # rounds: some pages rewritten, some zeroed, then their runs taken
        mask = bytearray(npages)
        for p in rng.sample(range(npages), rng.randint(1, npages // 2)):
            size = len(image[p * PAGE:(p + 1) * PAGE])  # the short last page included
            image[p * PAGE:p * PAGE + size] = bytes(size) if rng.random() < 0.4 else \
                rng.randbytes(size)
            mask[p] = 1
        dirty, now = Dirty(bytes(mask), BP), bytes(image)
        for block, _ in dirty.blocks():
            ranges = dirty.ranges(block)
            if ranges is None:
                _take_whole(terms, now, block)
                continue
            runs, data = naive_runs(now, block, PAGE, BP, ranges)
            got = terms.take(data, block, runs)
            assert got == sum(page_term(now, block * BP + f + i, PAGE)
                              for f, n, _ in runs for i in range(n)) & MASK
        # Each block's running sum, and the total, are those of the final image.
        assert terms.block_sums == [
            sum(page_term(now, p, PAGE) for p in range(b * BP, min((b + 1) * BP, npages)))
            for b in range(nblocks)]
        assert terms.sum().value == page_sum(now, PAGE)
    # A block sent whole again after its partial updates replaces every term it had.
    image[BP * PAGE:2 * BP * PAGE] = rng.randbytes(BP * PAGE)
    _take_whole(terms, bytes(image), 1)
    assert terms.sum().value == page_sum(bytes(image), PAGE)


# ------------------------------------------------------------------------------ _batches

def _check_batches(work, batch_bytes):
    batches = list(_batches(work, batch_bytes))
    weights = dict(work)
    blocks = [b for b, _ in work]
    got = []
    for first, last, weight in batches:
        inside = [b for b in blocks if first <= b < last]
        assert inside and inside[0] == first and inside[-1] == last - 1, (first, last)
        assert weight == sum(weights[b] for b in inside)
        assert weight <= batch_bytes or len(inside) == 1, (first, last, weight)
        assert last - first <= MAX_SPAN
        got += inside
    assert got == blocks  # every block once, in order
    for (first, last, weight), (nxt, _, _) in zip(batches, batches[1:]):
        # Greedy: the next batch's first block would not have fitted in this one.
        assert weight + weights[nxt] > batch_bytes or nxt - first >= MAX_SPAN
    return batches


def test_batches_respect_the_weight():
    work = [(b, 10) for b in range(5)]
    assert _check_batches(work, 20) == [(0, 2, 20), (2, 4, 20), (4, 5, 10)]
    assert _check_batches(work, 29) == [(0, 2, 20), (2, 4, 20), (4, 5, 10)]
    assert _check_batches(work, 1000) == [(0, 5, 50)]
    # Scattered blocks: a batch reaches across the clean ones between them.
    assert _check_batches([(1, 5), (7, 5), (9, 30)], 12) == [(1, 8, 10), (9, 10, 30)]
    assert list(_batches([], 10)) == []


def test_a_block_heavier_than_a_batch_goes_alone():
    assert _check_batches([(0, 5), (1, 100), (2, 5), (3, 5)], 20) == [
        (0, 1, 5), (1, 2, 100), (2, 4, 10)]
    assert _check_batches([(4, 100)], 1) == [(4, 5, 100)]


def test_a_batch_spans_at_most_max_span_blocks():
    assert _check_batches([(0, 1), (MAX_SPAN - 1, 1)], 1 << 30) == [(0, MAX_SPAN, 2)]
    assert _check_batches([(0, 1), (MAX_SPAN, 1)], 1 << 30) == [
        (0, 1, 1), (MAX_SPAN, MAX_SPAN + 1, 1)]
    work = [(b, 1) for b in range(3 * MAX_SPAN + 7)]
    assert [(f, l) for f, l, _ in _check_batches(work, 1 << 30)] == [
        (0, MAX_SPAN), (MAX_SPAN, 2 * MAX_SPAN), (2 * MAX_SPAN, 3 * MAX_SPAN),
        (3 * MAX_SPAN, 3 * MAX_SPAN + 7)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 5000)), max_size=60),
       st.integers(1, 20000))
def test_batches_hold_every_block_once_in_order(steps, batch_bytes):
    block, work = -1, []
    for gap, nbytes in steps:
        block += gap
        work.append((block, nbytes))
    _check_batches(work, batch_bytes)


# ------------------------------------------------------------------------------ the pumps

FAST = Timeouts(connect=1, handshake=1, idle=5)
TAIL = 1234  # bytes in the image's short last page
NBLOCKS = 5  # 4 whole blocks of 8 pages, and a last one of 3 pages and the short one


@pytest.fixture
def links():
    """make(faults=...) -> (sender's Conn, receiver's Conn) over a fresh socketpair."""
    socks = []

    def make(faults: Faults = Faults()):
        a, b = socket.socketpair()
        socks.extend((a, b))
        return (Conn(a, "data channel 0", side=Side("sender", FAST, faults=faults), timeout=5),
                Conn(b, "data channel 0", side=Side("receiver", FAST), timeout=5))

    yield make
    for s in socks:
        s.close()


def _page(kind: str, rng: random.Random, size: int = PAGE) -> bytes:
    if kind == "Z":
        return bytes(size)
    if kind == "C":  # compressible data (zstd shrinks it)
        return bytes([rng.randrange(1, 256)]) * (size // 2) + rng.randbytes(size - size // 2)
    return rng.randbytes(size)


# Per block: D random data, C compressible data, Z zero. The last block is 3 pages and the
# short one.
BEFORE = ["DCZDZZCD", "CDDZDCDD", "ZZZZDDDD", "DCDZZCDD", "DZC"]
# What round 1 leaves: '.' unchanged. Block 0 partly (data to zero, zero to data), block 1
# clean, block 2 wholly rewritten (a whole block in round 1), block 3 partly, the last block
# partly (LAST), its short page rewritten (TAILS: with data; or zeroed after a data page, so
# that it travels as a data page, pages.py, and must still count as a zero page).
AFTER = ["Z.DD..Z.", "........", "DDZZCDZD", ".Z.D...Z"]
TAILS = {"data": (".DZ", "D"), "zero": (".ZD", "Z")}


def _images(rng: random.Random, last: str, tail_after: str) -> tuple[bytes, bytes, bytes]:
    """(image before, image after round 1's changes, the dirty map of those changes)."""
    before, after, mask = bytearray(), bytearray(), bytearray()
    for old, new in zip(BEFORE, AFTER + [last]):
        for o, n in zip(old, new):
            page = _page(o, rng)
            before += page
            after += page if n == "." else _page(n, rng)
            mask.append(n != ".")
    tail = _page("D", rng, TAIL)
    before += tail
    after += _page(tail_after, rng, TAIL)
    mask.append(1)
    return bytes(before), bytes(after), bytes(mask)


def _session(size: int, digest=DigestAlg.XXH3_64_PAGE_SUM, compression=Compression.NONE):
    return wire.Session(size, PAGE, BP, digest, compression)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", [codec.Method(), codec.Method(Compression.ZSTD, 3)],
                         ids=["plain", "zstd"])
async def test_the_final_image_arrives_through_partial_packets(links, tmp_path, method, tail):
    before, after, mask = _images(random.Random(5), *TAILS[tail])
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(before)
    session = _session(len(before), compression=method.compression)
    assert session.nblocks == NBLOCKS and len(before) % PAGE
    dirty = Dirty(mask, BP)
    assert dirty.ranges(1) == () and dirty.ranges(2) is None and dirty.ranges(0)
    tx, rx = links()
    markers = []
    with SourceImage(str(src)) as source, OutputFile(str(out), session.image_size) as output:
        arrivals = LastRoundWins(session.nblocks)
        sender = BlockSender(tx, source, session, method, live=True)
        receiver = BlockReceiver(rx, session, output, arrivals)
        round0 = {}

        async def send():
            await tx.run(Stage.DATA, sender.send_blocks, 0, session.nblocks, 0)
            await tx.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, 0)
            round0.update(packets=sender.counters.packets, pages=sender.counters.pages,
                          wire=sender.counters.wire_bytes)
            with open(src, "r+b") as f:  # the guest writes between the rounds
                f.write(after)
            await tx.run(Stage.DATA, sender.send_blocks, 0, session.nblocks, 1, dirty)
            await tx.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, 1)
            await tx.run(Stage.FINISH, sender.finish, 2)

        async def receive():
            for round in range(3):
                markers.append(await rx.run(Stage.DATA, receiver.receive_round, round))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
        arrivals.check()
        output.publish()
    assert [(m.kind, m.round) for m in markers] == [
        (wire.PacketKind.SYNC, 0), (wire.PacketKind.SYNC, 1), (wire.PacketKind.END, 2)]
    assert out.read_bytes() == after
    reference = page_sum(after, PAGE).to_bytes(16, "big")
    assert sender.terms.sum().digest() == receiver.terms.sum().digest() == reference
    assert totals([sender])[0].digest() == totals([receiver])[0].digest() == reference
    # Round 1 sent one packet per dirty block, and only the dirty pages: partial packets.
    assert sender.counters.packets - round0["packets"] == len(dirty.blocks()) == 4
    assert sender.counters.pages - round0["pages"] == dirty.count < 4 * BP
    for name in ("packets", "pages", "zero_pages", "payload_bytes", "wire_bytes",
                 "image_bytes"):
        assert getattr(receiver.counters, name) == getattr(sender.counters, name), name
    if method.compression is not Compression.NONE:
        assert sender.counters.wire_bytes < sender.counters.payload_bytes  # it did compress


async def test_a_partial_packet_in_round_0_is_refused(links, tmp_path):
    before, _, _ = _images(random.Random(6), *TAILS["data"])
    src = tmp_path / "src.img"
    src.write_bytes(before)
    session = _session(len(before))
    tx, rx = links()
    with SourceImage(str(src)) as source:
        sender = BlockSender(tx, source, session, live=True)
        receiver = BlockReceiver(rx, session, None, LastRoundWins(session.nblocks))
        dirty = Dirty(bytes([0, 1, 1, 0, 0, 0, 0, 1]) + bytes(session.npages - BP), BP)
        with trio.fail_after(10):
            await tx.run(Stage.DATA, sender.send_blocks, 0, 1, 0, dirty)
            with pytest.raises(E.RemoteProtocolError) as caught:
                await rx.run(Stage.DATA, receiver.receive_round, 0)
    assert str(caught.value) == (
        "data channel 0, data: packet 0: flags 0x01 (expected whole blocks with digests, "
        "0x03, or after round 0 some pages of one with its digest, 0x01)")
    assert receiver.counters.packets == 0


async def test_a_partial_packet_in_a_block_digest_session_is_refused(links, tmp_path):
    before, _, _ = _images(random.Random(7), *TAILS["data"])
    src = tmp_path / "src.img"
    src.write_bytes(before)
    tx, rx = links()
    with SourceImage(str(src)) as source:
        # Same geometry, but the receiver's session sums block terms: it cannot check a
        # packet that carries some of a block's pages.
        sender = BlockSender(tx, source, _session(len(before)), live=True)
        block_session = _session(len(before), DigestAlg.XXH3_128_BLOCK_SUM)
        receiver = BlockReceiver(rx, block_session, None, LastRoundWins(NBLOCKS))
        dirty = Dirty(bytes([1, 0, 0, 0, 0, 0, 0, 1]) + bytes(block_session.npages - BP), BP)
        with trio.fail_after(10):
            await tx.run(Stage.DATA, sender.send_blocks, 0, 1, 1, dirty)
            with pytest.raises(E.RemoteProtocolError) as caught:
                await rx.run(Stage.DATA, receiver.receive_round, 1)
    assert str(caught.value) == ("data channel 0, data: packet 0: flags 0x01 (expected whole "
                                 "blocks with digests, 0x03)")
    assert receiver.counters.packets == 0


async def test_a_corrupted_partial_packet_is_a_checksum_mismatch_and_never_written(
        links, tmp_path):
    before, after, mask = _images(random.Random(8), *TAILS["zero"])
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(before)
    session = _session(len(before))
    dirty = Dirty(mask, BP)
    # Round 0 is NBLOCKS packets and a SYNC: the first packet of round 1 (block 0, partial,
    # with data pages) is packet NBLOCKS + 1.
    tx, rx = links(faults=Faults([parse(f"corrupt-payload@0:packet={NBLOCKS + 1}", "send")]))
    with SourceImage(str(src)) as source, OutputFile(str(out), session.image_size) as output:
        sender = BlockSender(tx, source, session, live=True)
        receiver = BlockReceiver(rx, session, output, LastRoundWins(session.nblocks))

        async def send():
            await tx.run(Stage.DATA, sender.send_blocks, 0, session.nblocks, 0)
            await tx.run(Stage.SYNC, sender.send_marker, wire.PacketKind.SYNC, 0)
            with open(src, "r+b") as f:
                f.write(after)
            await tx.run(Stage.DATA, sender.send_blocks, 0, session.nblocks, 1, dirty)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await rx.run(Stage.DATA, receiver.receive_round, 0)
                with pytest.raises(E.ChecksumMismatch) as caught:
                    await rx.run(Stage.DATA, receiver.receive_round, 1)
                nursery.cancel_scope.cancel()
        written = os.pread(output.fd, session.image_size, 0)
    assert str(caught.value).startswith(f"data channel 0, data: packet {NBLOCKS + 1} "
                                        f"(offset 0): checksum ")
    assert dirty.ranges(0) and before[:BP * PAGE] != after[:BP * PAGE]
    assert written == before  # round 0 whole; nothing of the corrupted packet
    assert receiver.counters.packets == NBLOCKS
