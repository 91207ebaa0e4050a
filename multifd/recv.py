"""The receiving side of one migration.

Theory of operation:
1. open_registry() accepts connections in the background for the whole migration, so strangers
   arriving mid-transfer are greeted and dropped without disturbing it.
2. wait_for_channels(): the first valid control hello names the session; then every data
   channel must arrive within the handshake timeout. Meanwhile the control channel is
   heeded (watched without reading): a sender that gives up says why there.
3. SESSION is checked, the temporary output is created, READY is sent.
4. One task per data channel receives packets in its worker thread, one hop per round (the
   control channel heeded meanwhile, as in 2); at each SYNC the task waits at the
   RoundBarrier until every channel has finished that round, so no packet of round r+1 is
   applied while another channel may still deliver round r.
5. After every channel's END: COMPLETE is read, the counts and the digest are compared, the
   file is fsynced and linked (or renamed) into place, and DONE is sent.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import nullcontext

import trio

from . import control
from . import errors as E
from . import wire
from .address import format_address
from .conn import Conn
from .errors import Stage, collapse_group
from .faults import NO_FAULTS, Faults, Phase
from .image import OutputFile
from .digest import terms_for
from .pump import BlockReceiver, LastRoundWins, totals
from .registry import Registry, open_registry, wait_for_channels
from .report import Report, reporting_progress
from .settings import Timeouts
from .side import Side
from .tls import ServerTls

# The sender's idle timeout is its own: WORKING comes often enough for any sane one (>= 1 s).
KEEPALIVE = 0.4


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    except OSError as exc:  # in use, not an address of this host, not allowed, no such name
        raise E.UsageError(f"cannot listen on {format_address(host, port)}: "
                           f"{exc.strerror or exc}") from None
    if port == 0:
        # A name with several addresses gets a different free port on each; only one can be
        # announced, so only one is kept.
        for extra in listeners[1:]:
            await extra.aclose()
        del listeners[1:]
    return listeners


# For tests only: without the barrier an older copy of a block, late on a slow channel, can
# land after a newer one (tests/test_live.py shows that this is then caught).
_NO_BARRIER = os.environ.get("MULTIFD_TEST_NO_ROUND_BARRIER") == "1"


class RoundBarrier:
    """Releases round r on every channel only once all N channels have delivered its SYNC.

    Used only from trio tasks; the waits are bounded by the caller.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self._arrived: dict[int, set[int]] = {}
        self._released: dict[int, trio.Event] = {}
        self.released_at: dict[int, float] = {}  # trio time each round was released

    async def sync(self, round: int, channel: int) -> None:
        event = self._released.setdefault(round, trio.Event())
        arrived = self._arrived.setdefault(round, set())
        arrived.add(channel)
        if len(arrived) == self.channels:
            event.set()
            self.released_at[round] = trio.current_time()
            del self._arrived[round]
        await event.wait()

    def missing(self, round: int) -> list[int]:
        """The channels whose SYNC of `round` has not arrived (all of them, if none has)."""
        arrived = self._arrived.get(round, set())
        return [c for c in range(self.channels) if c not in arrived]

    def released(self, round: int) -> bool:
        return round in self._released and self._released[round].is_set()


async def _receive_channel(receiver: BlockReceiver, barrier: RoundBarrier) -> int:
    """Run one data channel to its END; return the number of rounds it carried."""
    conn = receiver.conn
    side = conn.side
    round = 0
    while True:
        side.faults.phase(Phase.ROUND, conn.label, round=round)
        marker = await conn.run(Stage.DATA, receiver.receive_round, round)
        if marker.kind is wire.PacketKind.END:
            return round
        side.faults.phase(Phase.SYNC, conn.label)
        with trio.move_on_after(side.timeouts.idle):
            if not _NO_BARRIER:
                await barrier.sync(round, receiver.channel)
        if not barrier.released(round) and not _NO_BARRIER:
            missing = barrier.missing(round)
            raise E.PeerTimeout(f"data channel{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(map(str, missing))} did not finish round {round} "
                                f"within {side.timeouts.idle:g}s", side=side.name,
                                channel=conn.label, stage=Stage.SYNC)
        round += 1


async def _receive_rounds(ctl: Conn, receivers: list[BlockReceiver],
                          barrier: RoundBarrier) -> tuple[set[int], wire.Complete]:
    """Every channel to its END, the control channel heeded meanwhile; then COMPLETE.

    Returns the round counts the channels ended with, and the sender's COMPLETE."""
    rounds: set[int] = set()

    async def run_channel(receiver: BlockReceiver) -> None:
        rounds.add(await _receive_channel(receiver, barrier))

    # A sender that fails says why there, even while its data channels hang; one that is done
    # sends COMPLETE, possibly before we have read all it sent.
    async with control.heeding(ctl, Stage.DATA, wire.Complete) as heard:
        async with trio.open_nursery() as channels:
            for receiver in receivers:
                channels.start_soon(run_channel, receiver)
    return rounds, heard.message or await control.receive(ctl, Stage.FINISH, wire.Complete)


async def _sync(ctl: Conn, output: OutputFile) -> None:
    """fsync the output, telling the sender every KEEPALIVE seconds that we are still at it.

    The keepalive task is never cancelled in the middle of a send (that would shut the
    control channel down before DONE): it is told to stop and finishes its current send.
    """
    committed = trio.Event()

    async def keepalive() -> None:
        while True:
            with trio.move_on_after(KEEPALIVE):
                await committed.wait()
            if committed.is_set():
                return
            await control.send(ctl, Stage.FINISH, wire.Working())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keepalive)
        try:
            await trio.to_thread.run_sync(output.sync)
        finally:
            committed.set()


def _verify(session: wire.Session, complete: wire.Complete, receivers: list[BlockReceiver],
            arrivals: LastRoundWins, rounds: set[int]):
    """What the channels delivered against what the sender announced; returns the totals."""
    def fail(message: str) -> None:
        raise E.VerificationError(message, side="receiver", stage=Stage.VERIFY)

    total, counters = totals(receivers)
    if complete.rounds < 1 or rounds != {complete.rounds}:
        fail(f"channels ended after rounds {sorted(rounds)} (sender says {complete.rounds}; "
             f"expected at least 1)")
    arrivals.check()
    for name, got, announced in (("packets", counters.packets, complete.packets),
                                 ("pages", counters.pages, complete.pages),
                                 ("zero pages", counters.zero_pages, complete.zero_pages)):
        if got != announced:
            fail(f"received {got} {name} (sender announced {announced})")
    if total.digest() != complete.digest:
        fail(f"image digest {total.hexdigest()} (sender announced {complete.digest.hex()})")
    return total, counters


async def _migrate(registry: Registry, session: wire.Session | None, output_path: str | None,
                   side: Side, on_progress, on_complete) -> Report:
    ctl = registry.control
    started = trio.current_time()
    side.faults.phase(Phase.SETUP)
    if session is None:
        session = await control.receive(ctl, Stage.SETUP, wire.Session)
    output = OutputFile(output_path, session.image_size,
                        side.faults.pwrite(os.pwrite)) if output_path else None
    with output if output is not None else nullcontext():
        arrivals, terms = LastRoundWins(session.nblocks), terms_for(session)
        barrier = RoundBarrier(registry.channels)
        receivers = [BlockReceiver(registry.data[i], session, output, arrivals, channel=i,
                                   terms=terms) for i in range(registry.channels)]
        await control.send(ctl, Stage.SETUP, wire.Ready())
        async with reporting_progress(on_progress, receivers, session.image_size):
            rounds, complete = await _receive_rounds(ctl, receivers, barrier)
        total, counters = _verify(session, complete, receivers, arrivals, rounds)
        side.faults.phase(Phase.COMPLETION)
        if output is not None:
            await _sync(ctl, output)
        # The point of no return: once the output is renamed into place the sender must hear
        # DONE, so a cancellation arriving now waits for both (each is bounded).
        with trio.CancelScope(shield=True):
            if output is not None:
                output.publish()
            # A live migration's downtime, as seen from here: its last round began when the
            # barrier before it released (the sender pauses its guest about then).
            last_start = barrier.released_at.get(complete.rounds - 2)
            last_round = 0.0 if last_start is None else trio.current_time() - last_start
            await control.send(ctl, Stage.FINISH, wire.Done(
                session.image_size, total.digest(), round(last_round * 1e6)))
            report = Report.finished(
                side.name, counters, session.image_size, registry.channels,
                trio.current_time() - started, total.hexdigest(), output_path,
                session.compression.name.lower(), digest_name=terms.name,
                live=None if last_start is None else {"rounds": complete.rounds,
                                                      "downtime": round(last_round, 6)})
            if on_complete is not None:  # the outcome is decided: no later signal undoes it
                on_complete(report)
        # Not shielded: the sender has DONE, and a signal or a failed TLS close now cannot
        # undo the outcome.
        with contextlib.suppress(E.MultifdError):
            await ctl.end_stream(Stage.FINISH)
    return report


async def receive_image(listeners: list[trio.SocketListener], output_path: str | None, *,
                        timeouts: Timeouts = Timeouts(), tls: ServerTls | None = None,
                        faults: Faults = NO_FAULTS, log=print, on_progress=None,
                        on_complete=None) -> Report:
    """Accept exactly one migration and write it to output_path (None: verify and discard).

    on_complete(report) is called the moment the outcome is decided (output renamed into
    place, DONE sent), before the cleanup that a late cancellation could still interrupt."""
    side = Side("receiver", timeouts, tls, faults, log)
    with collapse_group():
        async with open_registry(listeners, side) as registry:
            async with control.concluding(lambda: registry.control):
                session = await wait_for_channels(registry, side)
                return await _migrate(registry, session, output_path, side, on_progress,
                                      on_complete)
