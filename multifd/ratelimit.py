"""--max-bandwidth: one budget shared by all channels, paced from trio.

Used only from trio tasks (one thread), so it needs no lock. A channel reserves the next slot
for a batch before sending it and gives back what it did not send (zero pages cost nothing on
the wire). Idle time earns no credit, so there is never a burst above the rate beyond one batch
per channel.
"""

from __future__ import annotations

import trio


class RateLimiter:
    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._next: float | None = None

    async def acquire(self, nbytes: int) -> None:
        now = trio.current_time()
        if self._next is None or self._next < now:
            self._next = now
        start = self._next
        self._next += nbytes / self.rate
        await trio.sleep_until(start)

    def refund(self, nbytes: int) -> None:
        if self._next is not None:
            self._next -= nbytes / self.rate


def batch_bytes_for(rate: float | None, default: int) -> int:
    """Smaller hops under a low rate, so pacing stays smooth (about 50 ms of budget each)."""
    if rate is None:
        return default
    return max(1, min(default, int(rate * 0.05)))
