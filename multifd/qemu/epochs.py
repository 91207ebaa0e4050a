"""QEMU's synchronization rule, as its destination keeps it: which pages may be applied when.

The source cuts every multifd channel into epochs with SYNC packets and marks the matching
points on the main channel: MULTIFD_FLUSH records on 8.1+ streams, the end of every RAM
section (EOS) before (and for old machine types). A channel that delivered its e-th SYNC
waits until the main channel reached its e-th sync point; the main channel at its e-th sync
point waits until every channel delivered its e-th SYNC. So no page of epoch e+1, on any
channel, is applied before every page of epoch e: a later copy of a page is never overwritten
by an older one, however skewed the channels are. SYNCs beyond the main channel's last sync
point (9.1+ sends one at completion with no FLUSH) are released at the end of the stream.

Each wait is bounded by the idle timeout, counted from the last progress of whoever is
waited for: a channel that stops moving is named, never waited on for ever.
"""

from __future__ import annotations

import math

import trio

from .. import errors as E
from ..errors import Stage
from .wire import EndOfSection, Flush


def is_sync_point(event, flushes_seen: int) -> bool:
    """Whether a main-channel marker is a sync point: every FLUSH; an EOS only on a stream
    that has had no FLUSH (the setup section's FLUSH comes before its EOS on 8.1+)."""
    if isinstance(event, Flush):
        return True
    return isinstance(event, EndOfSection) and flushes_seen == 0


class Epochs:
    """The sync barrier between the main channel and the multifd channels (trio tasks of
    one thread; the readers' threads only bump the progress counters)."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.synced: dict[int, int] = {}  # channel id -> SYNCs delivered
        self.released = 0  # up to which SYNC the channels may go on (inf at the end)
        self.passed = 0  # sync points the main channel has passed
        self.main_at: int | None = None  # the sync point the main channel waits at
        self.progress: dict[object, int] = {"main": 0}  # bytes read, per channel
        self.ended: set[int] = set()  # channels whose stream ended
        self._changed = trio.Event()

    def add(self, channel: int) -> None:
        self.synced[channel] = 0
        self.progress[channel] = 0

    def notify(self) -> None:
        """Something a waiter may be waiting for has changed."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, done, stalled, what) -> None:
        """Wait until done(); fail with what() when the channels stalled() names (keys of
        `progress`) made no progress for a whole idle period. While stalled() names none,
        someone else's bounded wait is the one that will fail."""
        while not done():
            watched = stalled()
            before = [self.progress[key] for key in watched]
            with trio.move_on_after(self.idle if watched else math.inf):
                await self._changed.wait()
                continue
            if not done() and [self.progress[key] for key in watched] == before:
                raise what()

    async def channel_synced(self, channel: int, label: str) -> int:
        """Channel `channel` delivered a SYNC: wait for the main channel to match it. Only
        the main channel's own silence on its way there is this wait's to report: once the
        main channel waits at that sync point, it names the channels it waits for."""
        self.synced[channel] += 1
        epoch = self.synced[channel]
        self.notify()
        await self.wait_for(
            lambda: self.released >= epoch,
            lambda: [] if self.main_at == epoch else ["main"],
            lambda: E.PeerTimeout(f"silent for {self.idle:g}s before sync point {epoch}, "
                                  f"where {label} waits", channel="main channel",
                                  stage=Stage.SYNC))
        return epoch

    async def main_sync_point(self) -> int:
        """The main channel reached its next sync point: wait for every channel's SYNC."""
        epoch = self.passed + 1

        def behind():
            return [c for c, n in self.synced.items() if n < epoch]

        def stuck():
            late = behind()
            gone = [c for c in late if c in self.ended]
            if gone:
                return E.RemoteProtocolError(
                    f"multifd channel {gone[0]} ended after {self.synced[gone[0]]} SYNCs; "
                    f"the main channel is at sync point {epoch}", channel="main channel",
                    stage=Stage.SYNC)
            return E.PeerTimeout(
                f"no SYNC {epoch} from multifd channel{'s' if len(late) > 1 else ''} "
                f"{', '.join(map(str, late))} within {self.idle:g}s",
                channel="main channel", stage=Stage.SYNC)

        self.arrive(epoch)
        try:
            while behind():
                if any(c in self.ended for c in behind()):
                    raise stuck()
                await self.wait_for(
                    lambda: not behind() or any(c in self.ended for c in behind()), behind,
                    stuck)
        finally:
            self.main_at = None
        self.released = self.passed = epoch
        self.notify()
        return epoch

    def arrive(self, epoch: int) -> None:
        """The main channel is at sync point `epoch` (before main_sync_point() waits there):
        the channels that wait for it watch no more."""
        self.main_at = epoch
        self.notify()

    def end(self, channel: int) -> None:
        self.ended.add(channel)
        self.notify()

    def release_all(self) -> None:
        """The stream is complete: SYNCs with no sync point to match are let through."""
        self.released = math.inf
        self.notify()
