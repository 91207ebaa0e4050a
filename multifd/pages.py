"""Zero-page detection at C speed: a block's pages become runs of data and zero pages.

No Python loop runs per page. Most pages of real images have a non-zero first word, so the
first word of every page is checked at once and only the rare pages that start with a zero
word are scanned in full.
"""

from __future__ import annotations

import numpy as np

from .wire import RunKind


class PageScanner:
    """Reusable scanner over one block buffer (owned by one thread)."""

    def __init__(self, buf: bytearray, page_size: int) -> None:
        self.page_size = page_size
        self._words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, page_size // 8)

    def runs(self, npages: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
        """Runs covering pages [0, npages) and the number of zero pages among them."""
        pages = self._words[:npages]
        cand = np.flatnonzero(pages[:, 0] == 0)
        if cand.size == 0:
            return ((0, npages, RunKind.DATA),), 0
        zero = np.zeros(npages, dtype=bool)
        zero[cand[~pages[cand].any(axis=1)]] = True
        nzero = int(np.count_nonzero(zero))
        if nzero == 0:
            return ((0, npages, RunKind.DATA),), 0
        if nzero == npages:
            return ((0, npages, RunKind.ZERO),), nzero
        edges = np.flatnonzero(zero[1:] != zero[:-1]) + 1
        starts = [0, *edges.tolist()]
        ends = [*edges.tolist(), npages]
        kinds = (RunKind.ZERO, RunKind.DATA) if zero[0] else (RunKind.DATA, RunKind.ZERO)
        return tuple((s, e - s, kinds[i & 1]) for i, (s, e) in
                     enumerate(zip(starts, ends))), nzero
