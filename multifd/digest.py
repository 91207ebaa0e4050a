"""The end-to-end image digest.

digest = (sum over blocks b of XXH3-128(content of block b, seed=b)) mod 2**128, as 16 bytes
big-endian. Each term is computed where the block's bytes are already hot (just read on the
sender, just received on the receiver); the sum does not depend on the order in which channels
deliver blocks, and it needs no per-block table, so memory stays flat whatever the image size.
A missing, duplicated or corrupted block changes the sum.
"""

from __future__ import annotations

import xxhash

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
        total.add(block_term(data, b))
    return total.digest()


class BlockTerms:
    """Each block's term as last sent or received: the digest of an image whose blocks may
    travel again in later rounds (live precopy) is the sum of their last terms, which is the
    digest of the final state. Shared by a side's channel threads: each writes only the
    blocks it carries (a block is on one channel at a time), and the sum is taken at the end.
    """

    __slots__ = ("terms",)

    def __init__(self, nblocks: int) -> None:
        self.terms = [0] * nblocks

    def set(self, block: int, term: int) -> None:
        self.terms[block] = term

    def sum(self) -> DigestSum:
        total = DigestSum()
        for term in self.terms:
            total.add(term)
        return total
