"""Zero-page detection at C speed: a block's pages become runs of data and zero pages.

No Python loop runs per page. The first 8-byte word of every page is gathered with one strided
memoryview copy, and `find` looks for an aligned zero word among them: on ordinary data there
is none and the block costs a few microseconds whatever its size. A zero run can only reach
as far as the pages whose first words are zero (the next non-zero byte among them, found by a
regex at C speed), so a candidate run is confirmed by one compare with a zero buffer (memcmp,
no copy) over just those pages; only when that fails is the run bisected. The Python work
grows with the number of runs, not with the number of pages, and each zero byte is compared
about once. Only pathological data, with many pages that start with a zero word but are not
zero, costs a few steps per such page.

The source is a memoryview: of a bytearray, or of the sender's mmap of the image, which is
scanned and sent without being copied. The image's partial last page, when all its bytes are
zero, is a zero page like any other (checked on its own: no first word gathers it).
"""

from __future__ import annotations

import functools
import re

from .wire import RunKind

_ZERO_WORD = bytes(8)
_NONZERO = re.compile(rb"[^\x00]")


@functools.lru_cache(maxsize=4)
def zeros(size: int) -> bytes:
    """A shared, immutable run of zero bytes (one per size, not one per channel)."""
    return bytes(size)


class PageScanner:
    """Reusable scanner (owned by one thread) for blocks of up to `max_bytes`."""

    def __init__(self, page_size: int, max_bytes: int) -> None:
        self.page_size = page_size
        self._zeros = zeros(max_bytes)

    def runs(self, view: memoryview, start: int, length: int
             ) -> tuple[tuple[tuple[int, int, int], ...], int]:
        """Runs covering the pages of view[start:start+length] and the number of zero pages."""
        p = self.page_size
        npages = -(-length // p)
        full = length // p
        end = start + length
        zeros = self._zeros

        def zero(first: int, count: int) -> bool:
            return zeros.startswith(view[start + first * p:min(start + (first + count) * p, end)])

        first_words = (view[start:start + full * p].cast("Q")[::p // 8].tobytes()
                       if full else b"")
        runs: list[tuple[int, int, int]] = []
        data_start = 0  # first page not yet assigned to a run
        zero_pages = 0
        pos = 0  # where in first_words the search goes on
        last = 0  # pages [hit's page, last) all begin with a zero word
        while (hit := first_words.find(_ZERO_WORD, pos)) >= 0:
            if hit % 8:  # zero bytes straddling two words: resume at the next word
                pos = hit - hit % 8 + 8
                continue
            first = hit // 8
            # A zero run reaches no further than `last`. Searched once per stretch of pages
            # that begin with a zero word, not once per page: a stretch of data pages that
            # all do would otherwise be rescanned from each of them.
            if first >= last:
                nonzero = _NONZERO.search(first_words, hit)
                last = full if nonzero is None else nonzero.start() // 8
            if zero(first, last - first):  # the usual case: one compare for the whole run
                good = last - first
            elif not zero(first, 1):
                pos = hit + 8
                continue
            else:  # bisect: pages [first, first+good) are zero, [first, first+bad) are not
                good, bad = 1, last - first
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
            data_start = first + good
            pos = data_start * 8
        if data_start < npages:
            if full < npages and zero(full, 1):  # the short last page, all zero
                if full > data_start:
                    runs.append((data_start, full - data_start, RunKind.DATA))
                    runs.append((full, 1, RunKind.ZERO))
                else:  # it continues the zero run before it
                    f, n, kind = runs[-1] if runs else (full, 0, RunKind.ZERO)
                    runs[-1:] = [(f, n + 1, kind)]
                zero_pages += 1
            else:
                runs.append((data_start, npages - data_start, RunKind.DATA))
        return tuple(runs), zero_pages
