"""Zero-page detection at C speed: a block's pages become runs of data and zero pages.

No Python loop runs per page. `find` looks for a page's worth of zero bytes anywhere in the
block (on data without zero pages it strides through the block a page at a time, in C), and a
candidate run is confirmed by comparing it with a zero buffer (memcmp). A zero run is measured
by galloping (1, 2, 4, ... pages, then bisection), so the Python work is proportional to the
number of runs times log(run length), not to the number of pages. Only pathological data with
many unaligned page-sized zero stretches costs a step per page.

The source is anything with find() and slicing: a bytearray, or the sender's mmap of the
image, which is scanned and sent without being copied.
"""

from __future__ import annotations

from .wire import RunKind


class PageScanner:
    """Reusable scanner (owned by one thread) for blocks of up to `max_bytes`."""

    def __init__(self, page_size: int, max_bytes: int) -> None:
        self.page_size = page_size
        self._zeros = bytes(max_bytes)
        self._zero_page = self._zeros[:page_size]

    def runs(self, src, start: int, length: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
        """Runs covering the pages of src[start:start+length] (the last page may be partial)
        and the number of zero pages among them."""
        p = self.page_size
        npages = -(-length // p)
        end = start + length

        def zero(first: int, count: int) -> bool:
            lo = start + first * p
            hi = min(start + (first + count) * p, end)
            return src[lo:hi] == self._zeros[:hi - lo]

        runs: list[tuple[int, int, int]] = []
        data_start = 0  # first page not yet assigned to a run
        page = 0  # where the search for the next zero page starts
        zero_pages = 0
        while page < npages:
            hit = src.find(self._zero_page, start + page * p, end)
            if hit < 0:
                break
            first = -(-(hit - start) // p)  # the first aligned page that can be all zero
            if first >= npages:
                break
            if not zero(first, 1):
                page = first + 1
                continue
            # Gallop, then bisect: pages [first, first+good) are zero, [first, first+bad) not.
            good, bad = 1, 0
            while first + good < npages:
                step = min(good * 2, npages - first)
                if not zero(first, step):
                    bad = step
                    break
                good = step
            while bad - good > 1:
                mid = (good + bad) // 2
                if zero(first, mid):
                    good = mid
                else:
                    bad = mid
            if first > data_start:
                runs.append((data_start, first - data_start, RunKind.DATA))
            runs.append((first, good, RunKind.ZERO))
            zero_pages += good
            data_start = page = first + good
        if data_start < npages:
            runs.append((data_start, npages - data_start, RunKind.DATA))
        return tuple(runs), zero_pages
