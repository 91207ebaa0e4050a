"""multifd/ratelimit.py: one bandwidth budget paced in (virtual) trio time.

With the autojump clock every wait is exact: acquire() returns when its slot begins, so the
k-th of several back-to-back acquisitions of B bytes at R bytes/s returns k*B/R after the first.
"""

from __future__ import annotations

import pytest
import trio

from multifd.ratelimit import RateLimiter, batch_bytes_for

RATE = 1000.0  # bytes per second
B = 250  # bytes per acquisition: a quarter of a second each


async def test_acquisitions_are_paced_at_the_rate(autojump_clock):
    limiter = RateLimiter(RATE)
    start = trio.current_time()
    returned = []
    with trio.fail_after(100):
        for _ in range(8):
            await limiter.acquire(B)
            returned.append(trio.current_time() - start)
        await limiter.acquire(0)  # the end of the last slot
        total = trio.current_time() - start
    assert returned == [k * 0.25 for k in range(8)]
    assert total == 8 * B / RATE == 2.0


async def test_channels_share_one_budget(autojump_clock):
    limiter = RateLimiter(RATE)
    start = trio.current_time()
    returned: list[float] = []

    async def channel() -> None:
        for _ in range(3):
            await limiter.acquire(B)
            returned.append(trio.current_time() - start)

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(channel)
    # 12 acquisitions of a quarter second each: slots at 0, 0.25, ..., 2.75, never two at once
    assert sorted(returned) == [k * 0.25 for k in range(12)]


async def test_refund_gives_the_time_back(autojump_clock):
    limiter = RateLimiter(RATE)
    start = trio.current_time()
    with trio.fail_after(100):
        await limiter.acquire(B)
        limiter.refund(B)  # nothing of it went out (all zero pages)
        await limiter.acquire(B)
        assert trio.current_time() == start
        limiter.refund(B // 2)  # half of it went out
        await limiter.acquire(B)
        assert trio.current_time() - start == pytest.approx(0.125)


async def test_refund_before_any_acquisition_is_harmless(autojump_clock):
    limiter = RateLimiter(RATE)
    limiter.refund(10 * B)
    start = trio.current_time()
    with trio.fail_after(100):
        await limiter.acquire(B)
        await limiter.acquire(B)
    assert trio.current_time() - start == 0.25


async def test_idle_time_earns_no_burst_credit(autojump_clock):
    limiter = RateLimiter(RATE)
    with trio.fail_after(100):
        await limiter.acquire(B)
        await trio.sleep(10)  # forty slots' worth of idleness
        resumed = trio.current_time()
        await limiter.acquire(B)
        assert trio.current_time() == resumed  # the first batch after a pause goes at once
        await limiter.acquire(B)
        assert trio.current_time() - resumed == 0.25  # the second waits its full slot
        await limiter.acquire(B)
        assert trio.current_time() - resumed == 0.5


def test_rate_must_be_positive():
    for rate in (0, -1.0):
        with pytest.raises(ValueError):
            RateLimiter(rate)


@pytest.mark.parametrize("rate, default, expected", [
    (None, 8 << 20, 8 << 20),  # no limit: the default hop
    (1e9, 8 << 20, 8 << 20),  # 50 ms at 1 GB/s is more than a default hop
    (1e6, 8 << 20, 50_000),  # 50 ms at 1 MB/s
    (12_345, 8 << 20, 617),  # rounded down
    (10.0, 1000, 1),  # never zero
])
def test_batch_bytes_for(rate, default, expected):
    assert batch_bytes_for(rate, default) == expected
