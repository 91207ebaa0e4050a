"""The end-to-end image digest, in one of the session's two schemes (wire.DigestAlg).

Block sum (a still image, whole blocks on the wire):
    digest = (sum over non-zero blocks b of XXH3-128(content of block b, seed=b)) mod 2**128
Page sum (live precopy, where a later round re-sends only the dirtied pages of a block):
    digest = (sum over non-zero pages p of XXH3-64(content of page p, seed=p)) mod 2**128
(a block or page of zeros has the term 0: it costs nothing to hash, nor to read where the
image has a hole; the image's short last page is hashed as it is). The sum depends on the
image's content only, as long as the sender classifies pages by content, as ours does: the
receiver takes what comes as data as data. Both are 16 bytes big-endian. Each term is
computed where the bytes are already hot (just read on the sender, just received on the
receiver); the sum does not depend on the order in which channels deliver. A corrupted block or
page changes the sum; a missing or duplicated one is caught by the arrival checks
(pump.LastRoundWins).

Each side keeps a table of the last term of every block (BlockTerms) or page (PageTerms, 8
bytes a page: 2 MiB for 1 GiB of 4 KiB pages): a block or page sent again replaces its term,
so the digest at the end is that of the final state, and taking it reads the table, never the
image (inside a live migration's downtime that matters). A packet's own digest field is the
sum of the terms of what it carries, checked by the receiver before anything is written.
"""

from __future__ import annotations

import array
from itertools import chain

import xxhash

from .wire import DigestAlg, RunKind

_MASK = (1 << 128) - 1


def block_term(data, block: int) -> int:
    return xxhash.xxh3_128_intdigest(data, seed=block)


def term_bytes(term: int) -> bytes:
    return term.to_bytes(16, "big")


class DigestSum:
    """Accumulates block terms; one instance per thread, merged at the end."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def add(self, term: int) -> None:
        self.value = (self.value + term) & _MASK

    def merge(self, other: "DigestSum") -> None:
        self.add(other.value)

    def digest(self) -> bytes:
        return term_bytes(self.value)

    def hexdigest(self) -> str:
        return self.digest().hex()


def image_digest(blocks) -> bytes:
    """Digest of an iterable of (block index, bytes): the reference for tests and tools."""
    total = DigestSum()
    for b, data in blocks:
        if bytes(data).strip(b"\0"):  # a block of zeros adds 0
            total.add(block_term(data, b))
    return total.digest()


class BlockTerms:
    """Each block's term as last sent or received (the block-sum scheme). Shared by a side's
    channel threads: each writes only the blocks it carries (a block is on one channel at a
    time), and the sum is taken at the end."""

    __slots__ = ("terms", "name")

    def __init__(self, nblocks: int) -> None:
        self.terms = [0] * nblocks
        self.name = "xxh3-128-sum"

    def take(self, view, block: int) -> int:
        """The term of the whole block in `view` (None: a block of zeros, whose term is 0),
        kept as the block's; returns it (the packet's digest)."""
        term = self.terms[block] = 0 if view is None else block_term(view, block)
        return term

    def sum(self) -> DigestSum:
        total = DigestSum()
        for term in self.terms:
            total.add(term)
        return total


class PageTerms:
    """Each page's term as last sent or received (the page-sum scheme), shared as BlockTerms
    is. The Python work per packet is one hash call per data page carried."""

    __slots__ = ("terms", "block_sums", "page_size", "block_pages", "name", "_zeros")

    def __init__(self, npages: int, page_size: int, block_pages: int) -> None:
        self.terms = array.array("Q", [0]) * npages  # (no zero bytes object beside it)
        # Each block's sum of terms, kept as they change: the digest at the end (inside a
        # live migration's downtime) adds a few hundred numbers, not every page's.
        self.block_sums = [0] * -(-npages // block_pages)
        self.page_size, self.block_pages = page_size, block_pages
        self._zeros = array.array("Q", bytes(8 * block_pages))
        self.name = "xxh3-64-page-sum"

    def take(self, data, block: int, runs) -> int:
        """The terms of the pages that `runs` name in `block`, kept as theirs; returns their
        sum (the packet's digest). `data` holds the bytes of each data run, one view per run
        in run order (the image's short last page as long as it is)."""
        p, base = self.page_size, block * self.block_pages
        pages = chain.from_iterable((v[i:i + p] for i in range(0, len(v), p)) for v in data)
        seeds = chain.from_iterable(range(base + first, base + first + n)
                                    for first, n, kind in runs if kind == RunKind.DATA)
        new = array.array("Q", map(xxhash.xxh3_64_intdigest, pages, seeds))
        at, terms, old = 0, self.terms, 0
        for first, n, kind in runs:
            lo = base + first
            old += sum(terms[lo:lo + n])
            if kind == RunKind.DATA:
                terms[lo:lo + n] = new[at:at + n]
                at += n
            else:
                terms[lo:lo + n] = self._zeros[:n]
        total = sum(new)
        self.block_sums[block] += total - old  # a block is on one channel at a time
        return total & _MASK

    def sum(self) -> DigestSum:
        return DigestSum(sum(self.block_sums) & _MASK)


def terms_for(session) -> BlockTerms | PageTerms:
    """The table of terms the session's scheme keeps (session: a wire.Session)."""
    if session.digest is DigestAlg.XXH3_64_PAGE_SUM:
        return PageTerms(session.npages, session.page_size, session.block_pages)
    return BlockTerms(session.nblocks)
