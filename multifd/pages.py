"""Zero-page detection at C speed: a block's pages become runs of data and zero pages.

No Python loop runs per page. Each step is a C-speed scan over the block: `bytearray.find`
looks for a page's worth of zero bytes anywhere (on data without zero pages it skips through
the block in strides of a page), and `bytearray.startswith` against a zero buffer is a memcmp.
A zero run found that way is measured by galloping (1, 2, 4, ... pages, then bisection), so
the Python work is proportional to the number of runs times log(run length), not to pages.
Only pathological data with many unaligned page-sized zero stretches costs a step per page.
"""

from __future__ import annotations

from .wire import RunKind


class PageScanner:
    """Reusable scanner over one block buffer (owned by one thread)."""

    def __init__(self, buf: bytearray, page_size: int) -> None:
        self.buf = buf
        self.page_size = page_size
        self._zeros = memoryview(bytes(len(buf)))
        self._zero_page = self._zeros[:page_size]

    def _zero(self, first: int, count: int) -> bool:
        """Are pages [first, first + count) all zero?"""
        p = self.page_size
        return self.buf.startswith(self._zeros[:count * p], first * p)

    def _zero_run_end(self, first: int, npages: int) -> int:
        """First page >= first that is not zero (page `first` is known to be zero)."""
        good, step = 1, 1
        while first + good < npages:
            step = min(step * 2, npages - first)
            if not self._zero(first, step):
                break
            good = step
        else:
            return npages
        lo, hi = good, step  # pages [first, first+lo) are zero, [first, first+hi) are not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._zero(first, mid):
                lo = mid
            else:
                hi = mid
        return first + lo

    def runs(self, npages: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
        """Runs covering pages [0, npages) and the number of zero pages among them."""
        p = self.page_size
        if self._zero(0, npages):
            return ((0, npages, RunKind.ZERO),), npages
        runs: list[tuple[int, int, int]] = []
        data_start = 0  # first page not yet assigned to a run
        page = 0  # where the search for the next zero page starts
        zero_pages = 0
        limit = npages * p
        while page < npages:
            hit = self.buf.find(self._zero_page, page * p, limit)
            if hit < 0:
                break
            first = -(-hit // p)  # the first aligned page that can be all zero
            if first >= npages:
                break
            if not self._zero(first, 1):
                page = first + 1
                continue
            end = self._zero_run_end(first, npages)
            if first > data_start:
                runs.append((data_start, first - data_start, RunKind.DATA))
            runs.append((first, end - first, RunKind.ZERO))
            zero_pages += end - first
            data_start = page = end
        if data_start < npages:
            runs.append((data_start, npages - data_start, RunKind.DATA))
        return tuple(runs), zero_pages
