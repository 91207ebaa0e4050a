"""multifd.recv.RoundBarrier: round r is released on every channel only once all N synced it.

Pure trio with the autojump clock: the waits are virtual, so skewed channels cost no real time.
"""

from __future__ import annotations

import trio
import trio.testing

from multifd.recv import RoundBarrier


async def _sync_and_record(barrier: RoundBarrier, round: int, channel: int, left: dict) -> None:
    await barrier.sync(round, channel)
    left[channel] = trio.current_time()


async def test_no_channel_passes_until_all_have_synced(autojump_clock):
    barrier = RoundBarrier(4)
    left: dict[int, float] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for channel in (2, 0, 3):
                nursery.start_soon(_sync_and_record, barrier, 0, channel, left)
            await trio.testing.wait_all_tasks_blocked()
            assert left == {}
            assert not barrier.released(0)
            assert barrier.missing(0) == [1]
            nursery.start_soon(_sync_and_record, barrier, 0, 1, left)
        assert sorted(left) == [0, 1, 2, 3]
        assert barrier.released(0)


async def test_missing_names_the_late_channels(autojump_clock):
    barrier = RoundBarrier(5)
    assert barrier.missing(0) == [0, 1, 2, 3, 4]  # nobody has arrived
    assert not barrier.released(0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for channel in (1, 3):
                nursery.start_soon(barrier.sync, 0, channel)
            await trio.testing.wait_all_tasks_blocked()
            assert barrier.missing(0) == [0, 2, 4]
            assert barrier.missing(1) == [0, 1, 2, 3, 4]  # another round is its own
            nursery.cancel_scope.cancel()
    assert not barrier.released(0)


async def test_a_late_channel_is_reported_by_a_bounded_wait(autojump_clock):
    """As the receiver uses it: a wait bounded by the idle timeout, then missing()."""
    barrier = RoundBarrier(3)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(barrier.sync, 0, 0)
            start = trio.current_time()
            with trio.move_on_after(2):
                await barrier.sync(0, 2)
            assert trio.current_time() - start == 2
            assert not barrier.released(0)
            assert barrier.missing(0) == [1]
            nursery.cancel_scope.cancel()


async def test_channels_at_the_next_round_are_not_released_by_this_one(autojump_clock):
    barrier = RoundBarrier(3)
    left0: dict[int, float] = {}
    left1: dict[int, float] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for channel in (0, 1):
                nursery.start_soon(_sync_and_record, barrier, 1, channel, left1)
            await trio.testing.wait_all_tasks_blocked()
            for channel in (0, 1, 2):
                nursery.start_soon(_sync_and_record, barrier, 0, channel, left0)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(left0) == [0, 1, 2]
            assert barrier.released(0)
            assert left1 == {}
            assert not barrier.released(1)
            assert barrier.missing(1) == [2]
            nursery.start_soon(_sync_and_record, barrier, 1, 2, left1)
        assert sorted(left1) == [0, 1, 2]
        assert barrier.released(1)


async def test_one_channel_is_released_at_once(autojump_clock):
    barrier = RoundBarrier(1)
    with trio.fail_after(1):
        start = trio.current_time()
        await barrier.sync(0, 0)
        await barrier.sync(1, 0)
        assert trio.current_time() == start
    assert barrier.released(0) and barrier.released(1)


async def test_skewed_channels_all_leave_together(autojump_clock):
    barrier = RoundBarrier(4)
    delays = {0: 3.0, 1: 0.5, 2: 7.25, 3: 1.0}
    left: dict[int, float] = {}
    start = trio.current_time()

    async def channel(c: int) -> None:
        for round in range(3):
            await trio.sleep(delays[c] * (round + 1))
            await barrier.sync(round, c)
            left[(c, round)] = trio.current_time() - start

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            for c in delays:
                nursery.start_soon(channel, c)
    # Each round ends when the slowest channel (2) syncs it: at 7.25, then +14.5, then +21.75.
    for round, ends in enumerate((7.25, 21.75, 43.5)):
        assert {left[(c, round)] for c in delays} == {ends}, round
