"""Zero-page detection (multifd/pages.py) and the image digest (multifd/digest.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import xxhash

from multifd.digest import DigestSum, block_term, image_digest, term_bytes
from multifd.pages import PageScanner
from multifd.wire import RunKind

D, Z = RunKind.DATA, RunKind.ZERO


# ------------------------------------------------------------------------------------ PageScanner


def naive_runs(buf, page_size: int, npages: int):
    """The reference: one page at a time, in plain Python."""
    zero_page = bytes(page_size)
    kinds = [Z if bytes(buf[i * page_size:(i + 1) * page_size]) == zero_page else D
             for i in range(npages)]
    runs = []
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        start = runs[-1][0] + runs[-1][1] if runs else 0
        runs.append((start, n, kind))
    return tuple(runs), kinds.count(Z)


def check_scan(buf, page_size: int, npages: int):
    runs, nzero = PageScanner(page_size, len(buf)).runs(memoryview(buf), 0, npages * page_size)
    # Structure: runs tile [0, npages) exactly, each non-empty, kinds alternate.
    assert runs, "no runs"
    pos = 0
    for first, n, kind in runs:
        assert first == pos and n >= 1 and kind in (D, Z)
        pos += n
    assert pos == npages
    for (_, _, a), (_, _, b) in zip(runs, runs[1:]):
        assert a != b, f"adjacent runs of the same kind: {runs}"
    assert nzero == sum(n for _, n, k in runs if k == Z)
    # Content: identical to the reference.
    assert (runs, nzero) == naive_runs(buf, page_size, npages)
    return runs, nzero


def _fill(buf, page_size: int, i: int, kind: str, rng: random.Random) -> None:
    lo, hi = i * page_size, (i + 1) * page_size
    if kind == "zero":
        buf[lo:hi] = bytes(page_size)
    elif kind == "random":
        buf[lo:hi] = rng.randbytes(page_size)
    elif kind == "first-word-zero":  # first 8 bytes zero, one later byte set: DATA
        buf[lo:hi] = bytes(page_size)
        buf[lo + rng.randrange(8, page_size)] = rng.randrange(1, 256)
    elif kind == "last-byte":
        buf[lo:hi] = bytes(page_size)
        buf[hi - 1] = 1
    elif kind == "first-byte":
        buf[lo:hi] = bytes(page_size)
        buf[lo] = 0x80
    else:
        raise AssertionError(kind)


KINDS = ["zero", "random", "first-word-zero", "last-byte", "first-byte"]


@pytest.mark.parametrize("page_size", [512, 4096])
def test_random_blocks_match_the_reference(page_size):
    rng = random.Random(20240611 + page_size)
    nbuf = 64
    buf = bytearray(nbuf * page_size)
    for _ in range(60):
        for i in range(nbuf):
            _fill(buf, page_size, i, rng.choice(KINDS), rng)
        check_scan(buf, page_size, rng.randint(1, nbuf))
        check_scan(buf, page_size, nbuf)


def test_all_zero():
    buf = bytearray(32 * 4096)
    assert check_scan(buf, 4096, 32) == (((0, 32, Z),), 32)


def test_all_data():
    rng = random.Random(1)
    buf = bytearray(rng.randbytes(32 * 4096))
    assert check_scan(buf, 4096, 32) == (((0, 32, D),), 0)


def test_all_pages_start_with_a_zero_word_but_are_data():
    rng = random.Random(2)
    buf = bytearray(32 * 4096)
    for i in range(32):
        _fill(buf, 4096, i, "first-word-zero", rng)
    assert check_scan(buf, 4096, 32) == (((0, 32, D),), 0)


@pytest.mark.parametrize("position", [0, 7, 8, 9, 63, 64, 2048, 4095])
def test_a_single_nonzero_byte_anywhere_makes_a_data_page(position):
    buf = bytearray(4 * 4096)
    buf[4096 + position] = 1  # page 1 only
    assert check_scan(buf, 4096, 4) == (((0, 1, Z), (1, 1, D), (2, 2, Z)), 3)


@pytest.mark.parametrize("first", ["data", "zero"])
def test_alternating(first):
    rng = random.Random(3)
    buf = bytearray(32 * 4096)
    for i in range(32):
        is_data = (i % 2 == 0) == (first == "data")
        _fill(buf, 4096, i, "random" if is_data else "zero", rng)
    runs, nzero = check_scan(buf, 4096, 32)
    assert len(runs) == 32 and nzero == 16
    assert runs[0][2] == (D if first == "data" else Z)


def test_alternating_with_first_word_zero_data_pages():
    rng = random.Random(4)
    buf = bytearray(16 * 4096)
    for i in range(16):
        _fill(buf, 4096, i, "first-word-zero" if i % 2 else "zero", rng)
    runs, nzero = check_scan(buf, 4096, 16)
    assert len(runs) == 16 and nzero == 8 and runs[0] == (0, 1, Z)


def test_last_page_all_zero():
    rng = random.Random(5)
    buf = bytearray(rng.randbytes(16 * 4096))
    buf[15 * 4096:] = bytes(4096)
    assert check_scan(buf, 4096, 16) == (((0, 15, D), (15, 1, Z)), 1)


def test_first_page_all_zero():
    rng = random.Random(6)
    buf = bytearray(rng.randbytes(16 * 4096))
    buf[:4096] = bytes(4096)
    assert check_scan(buf, 4096, 16) == (((0, 1, Z), (1, 15, D)), 1)


def test_npages_smaller_than_the_buffer_ignores_the_rest():
    rng = random.Random(7)
    buf = bytearray(32 * 4096)
    buf[10 * 4096:] = rng.randbytes(22 * 4096)  # data only beyond the first 10 pages
    assert check_scan(buf, 4096, 10) == (((0, 10, Z),), 10)
    assert check_scan(buf, 4096, 11) == (((0, 10, Z), (10, 1, D)), 10)
    buf = bytearray(rng.randbytes(32 * 4096))
    buf[5 * 4096:] = bytes(27 * 4096)  # zero only beyond the first 5 pages
    assert check_scan(buf, 4096, 5) == (((0, 5, D),), 0)
    assert check_scan(buf, 4096, 1) == (((0, 1, D),), 0)


def test_scanner_is_reusable_and_sees_buffer_changes():
    buf = bytearray(8 * 4096)
    scanner = PageScanner(4096, len(buf))
    size = len(buf)
    assert scanner.runs(memoryview(buf), 0, size) == (((0, 8, Z),), 8)
    buf[3 * 4096 + 100] = 9
    assert scanner.runs(memoryview(buf), 0, size) == (((0, 3, Z), (3, 1, D), (4, 4, Z)), 7)
    buf[3 * 4096 + 100] = 0
    buf[:8] = b"\1" * 8
    assert scanner.runs(memoryview(buf), 0, size) == (((0, 1, D), (1, 7, Z)), 7)
    assert scanner.runs(memoryview(buf), 0, size) == naive_runs(buf, 4096, 8)


# ------------------------------------------------------------------------------------ digest


def _blocks(n=8, size=4096, seed=11):
    rng = random.Random(seed)
    blocks = [rng.randbytes(size) for _ in range(n - 1)]
    blocks.append(rng.randbytes(size // 3))  # a short last block
    return list(enumerate(blocks))


def test_block_term_is_xxh3_128_seeded_with_the_block_index():
    assert block_term(b"", 0) == 0x99AA06D3014798D86001C324468D497F  # XXH3-128 known answer
    data = b"multifd" * 1000
    for b in (0, 1, 7, 1 << 40):
        assert block_term(data, b) == xxhash.xxh3_128_intdigest(data, seed=b)
    assert block_term(data, 0) != block_term(data, 1)
    assert block_term(memoryview(data), 3) == block_term(data, 3)


def test_term_bytes_is_16_bytes_big_endian():
    assert term_bytes(0) == bytes(16)
    assert term_bytes(1) == bytes(15) + b"\x01"
    assert term_bytes(0x0102030405060708090A0B0C0D0E0F10) == bytes(range(1, 17))
    assert term_bytes((1 << 128) - 1) == b"\xff" * 16
    for t in (block_term(b"x", 0), block_term(b"y", 5)):
        assert len(term_bytes(t)) == 16
        assert int.from_bytes(term_bytes(t), "big") == t


def test_image_digest_is_the_sum_mod_2_128():
    """docs: the sum over blocks b of XXH3-128(block b, seed=b), mod 2**128, 16 bytes
    big-endian. Computed here from xxhash itself, not from the module's own helpers."""
    blocks = _blocks()
    terms = [xxhash.xxh3_128_intdigest(data, seed=b) for b, data in blocks]
    assert sum(terms) >= 1 << 128  # these blocks' sum wraps: the modulus matters
    assert image_digest(blocks) == (sum(terms) % (1 << 128)).to_bytes(16, "big")


def test_sum_wraps_modulo_2_128():
    s = DigestSum()
    s.add((1 << 128) - 1)
    s.add(2)
    assert s.value == 1
    assert s.digest() == bytes(15) + b"\x01"
    assert s.hexdigest() == "0" * 31 + "1"


def test_order_independence():
    blocks = _blocks(16)
    expected = image_digest(blocks)
    terms = [block_term(data, b) for b, data in blocks]
    rng = random.Random(12)
    for _ in range(50):
        shuffled = blocks[:]
        rng.shuffle(shuffled)
        assert image_digest(shuffled) == expected
        rng.shuffle(terms)
        s = DigestSum()
        for t in terms:
            s.add(t)
        assert s.digest() == expected


def test_a_changed_byte_changes_the_digest():
    blocks = _blocks()
    expected = image_digest(blocks)
    rng = random.Random(13)
    for _ in range(20):
        b = rng.randrange(len(blocks))
        data = bytearray(blocks[b][1])
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        changed = blocks[:b] + [(b, bytes(data))] + blocks[b + 1:]
        assert image_digest(changed) != expected


def test_swapped_blocks_change_the_digest():
    blocks = _blocks()
    expected = image_digest(blocks)
    swapped = blocks[:]
    swapped[1], swapped[3] = (1, blocks[3][1]), (3, blocks[1][1])
    assert image_digest(swapped) != expected


def test_missing_block_changes_the_digest():
    blocks = _blocks()
    expected = image_digest(blocks)
    for b in range(len(blocks)):
        assert image_digest(blocks[:b] + blocks[b + 1:]) != expected


def test_duplicated_block_changes_the_digest():
    blocks = _blocks()
    expected = image_digest(blocks)
    for b in range(len(blocks)):
        assert image_digest(blocks + [blocks[b]]) != expected


def test_zero_padding_the_short_last_block_changes_its_term():
    # The last block is hashed at its true length, not padded to the block size.
    short = _blocks()[-1][1]
    assert block_term(short, 7) != block_term(short + bytes(4096 - len(short)), 7)


def test_merge_equals_adding_terms():
    terms = [block_term(data, b) for b, data in _blocks(24)]
    whole = DigestSum()
    for t in terms:
        whole.add(t)
    parts = [DigestSum() for _ in range(3)]
    for i, t in enumerate(terms):
        parts[i % 3].add(t)
    merged = DigestSum()
    for p in parts:
        merged.merge(p)
    assert merged.value == whole.value
    assert merged.digest() == whole.digest()
    # merge into a non-empty sum, and merging an empty one is neutral
    a, b = DigestSum(), DigestSum()
    for t in terms[:10]:
        a.add(t)
    for t in terms[10:]:
        b.add(t)
    a.merge(b)
    a.merge(DigestSum())
    assert a.digest() == whole.digest()
    assert DigestSum(5).value == 5


def test_scanner_on_an_mmap_window_at_an_offset_with_a_partial_last_page(tmp_path):
    import mmap
    rng = random.Random(5)
    data = bytearray(rng.randbytes(20 * 4096 + 100))
    data[4096:3 * 4096] = bytes(2 * 4096)
    data[19 * 4096:] = bytes(4096 + 100)  # the last full page and the partial page are zero
    path = tmp_path / "img"
    path.write_bytes(bytes(data))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as window, \
            memoryview(window) as view:
        scanner = PageScanner(4096, 16 * 4096)
        # block of 8 pages starting at page 0
        assert scanner.runs(view, 0, 8 * 4096) == (((0, 1, D), (1, 2, Z), (3, 5, D)), 2)
        # the last block: pages 16..20, the last one partial (100 bytes) and zero
        assert scanner.runs(view, 16 * 4096, 4 * 4096 + 100) == (((0, 3, D), (3, 2, Z)), 2)


def test_scanner_matches_the_reference_on_adversarial_pages():
    """Pages built to trip a first-word filter: zero words that straddle page-word boundaries,
    zero first words over non-zero pages, single stray bytes anywhere, partial last pages."""
    rng = random.Random(1234)
    page = 4096

    def make_page(kind):
        if kind == 0:
            return bytes(page)
        if kind == 1:
            return rng.randbytes(page)
        data = bytearray(page)
        if kind == 2:  # zero first word, one stray byte later
            data[rng.randrange(8, page)] = rng.randrange(1, 256)
        elif kind == 3:  # stray byte inside the first word
            data[rng.randrange(0, 8)] = rng.randrange(1, 256)
        else:  # non-zero start, zero tail: zero bytes straddle into the next page's word
            data[:3] = b"\1\2\3"
        return bytes(data)

    for _ in range(300):
        npages = rng.randrange(1, 40)
        buf = bytearray(b"".join(make_page(rng.randrange(5)) for _ in range(npages)))
        length = len(buf) - rng.choice([0, 0, rng.randrange(1, page)])
        scanned = PageScanner(page, len(buf)).runs(memoryview(buf), 0, length)
        reference = buf[:length] + bytes(len(buf) - length)  # a short zero page is zero
        expected = naive_runs(reference, page, -(-length // page))
        assert scanned == expected


@pytest.mark.parametrize("page_size", [512, 4096])
def test_a_stretch_of_pages_beginning_with_zero_words_is_searched_once(monkeypatch, page_size):
    """Data pages that all begin with a zero word (a live guest's counters written into zero
    memory look like this) cost a compare each, not a search of the whole stretch each: the
    search for the stretch's end runs once per stretch, so the scan stays linear."""
    import multifd.pages as pages
    searches = []

    class Counting:
        def search(self, data, pos):
            searches.append(pos)
            return real.search(data, pos)
    real = pages._NONZERO
    monkeypatch.setattr(pages, "_NONZERO", Counting())
    n = 2048
    buf = bytearray(n * page_size)
    for i in range(n):
        buf[(i + 1) * page_size - 1] = 1  # zero but for the last byte: DATA
    buf[5 * page_size:8 * page_size] = bytes(3 * page_size)  # three zero pages among them
    runs, nzero = PageScanner(page_size, len(buf)).runs(memoryview(buf), 0, len(buf))
    assert (runs, nzero) == naive_runs(buf, page_size, n)
    assert runs == ((0, 5, D), (5, 3, Z), (8, n - 8, D))
    assert len(searches) == 1
