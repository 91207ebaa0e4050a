"""multifd/precopy.py with a stand-in guest and link: which rounds run, when precopy stops,
and the one line that says why it did not converge."""

from __future__ import annotations

import pytest
import trio

from multifd import precopy
from multifd.dirty import Dirty
from multifd.pump import Counters

PAGE, NPAGES, BP = 4096, 64, 16


class Guest:
    """Dirties `pages` pages between two reads of its log; pausing stops it."""

    def __init__(self, pages: int) -> None:
        self.pages, self.paused, self.throttles = pages, False, []

    def sync(self) -> Dirty:
        marks = bytearray(NPAGES)
        for p in range(0 if self.paused else self.pages):
            marks[p] = 1
        return Dirty(bytes(marks), BP)

    def pause(self) -> None:
        self.paused = True

    def throttle(self, percent: int) -> None:
        self.throttles.append(percent)


async def _run(guest: Guest, live: precopy.Live, seconds_per_page: float):
    counters = Counters()
    sent = []

    async def send_round(dirty, round):
        pages = NPAGES if dirty is None else dirty.count
        sent.append((round, pages))
        await trio.sleep(pages * seconds_per_page)
        counters.pages += pages
        counters.image_bytes += pages * PAGE
        counters.blocks += 1

    outcome = await precopy.run(send_round, guest, lambda: _copy(counters), PAGE, live)
    return outcome, sent


def _copy(counters: Counters) -> Counters:
    c = Counters()
    c.merge(counters)
    return c


@pytest.mark.timeout(10)
async def test_round_0_alone_never_decides_convergence(autojump_clock):
    # Round 0's estimate fits the limit at once, yet a round of dirty pages runs before the
    # pause: round 0's whole blocks move faster than scattered pages will.
    outcome, sent = await _run(Guest(2), precopy.Live(rate=1.0, downtime_limit=1.0),
                               seconds_per_page=0.001)
    assert [r for r, _ in sent] == [0, 1, 2] and outcome.converged
    assert outcome.rounds[0].expected_downtime <= 1.0


@pytest.mark.timeout(10)
async def test_a_still_guest_converges_after_round_0(autojump_clock):
    outcome, sent = await _run(Guest(0), precopy.Live(rate=1.0), seconds_per_page=0.001)
    assert sent == [(0, NPAGES), (1, 0)] and outcome.converged and not outcome.why


@pytest.mark.timeout(10)
async def test_max_rounds_2_says_convergence_was_never_judged(autojump_clock):
    outcome, sent = await _run(Guest(2), precopy.Live(rate=1.0, max_rounds=2),
                               seconds_per_page=0.001)
    assert [r for r, _ in sent] == [0, 1] and not outcome.converged
    assert "--max-rounds 2 leaves none (use 3 or more)" in outcome.why


@pytest.mark.timeout(10)
async def test_no_convergence_names_the_rates_and_what_to_change(autojump_clock):
    outcome, sent = await _run(Guest(NPAGES), precopy.Live(rate=1.0, downtime_limit=0.001,
                                                           max_rounds=4),
                               seconds_per_page=0.001)
    assert len(sent) == 4 and not outcome.converged
    assert outcome.why.startswith("did not converge in 4 rounds: the guest dirtied ")
    assert "(lower --dirty-rate, raise --downtime-limit or --max-rounds" in outcome.why
    assert sent[-1] == (3, NPAGES)  # stop-and-copy: what was dirty, and what the pause left


@pytest.mark.timeout(10)
async def test_auto_converge_throttles_like_qemu(autojump_clock):
    guest = Guest(NPAGES)
    await _run(guest, precopy.Live(rate=1.0, downtime_limit=0.001, max_rounds=6,
                                   auto_converge=True), seconds_per_page=0.001)
    assert guest.throttles == [20, 30, 40, 50]  # from round 2 on, 10% more each round
