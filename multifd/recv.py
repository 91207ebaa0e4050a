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
from .conn import collapse_group
from .digest import DigestSum
from .faults import Plan
from .image import OutputFile
from .pump import BlockReceiver, Counters
from .registry import open_registry, wait_for_channels
from .report import Report
from .settings import Timeouts
from .tls import ServerTls

SIDE = "receiver"
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


class RoundBarrier:
    """Releases round r on every channel only once all N channels have delivered its SYNC.

    Used only from trio tasks; the waits are bounded by the caller.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self._arrived: dict[int, set[int]] = {}
        self._released: dict[int, trio.Event] = {}

    async def sync(self, round: int, channel: int) -> None:
        event = self._released.setdefault(round, trio.Event())
        arrived = self._arrived.setdefault(round, set())
        arrived.add(channel)
        if len(arrived) == self.channels:
            event.set()
            del self._arrived[round]
        await event.wait()

    def missing(self, round: int) -> list[int]:
        """The channels whose SYNC of `round` has not arrived (all of them, if none has)."""
        arrived = self._arrived.get(round, set())
        return [c for c in range(self.channels) if c not in arrived]

    def released(self, round: int) -> bool:
        return round in self._released and self._released[round].is_set()


async def _receive_channel(receiver: BlockReceiver, barrier: RoundBarrier,
                           timeouts: Timeouts, faults: Plan) -> int:
    """Run one data channel to its END; return the number of rounds it carried."""
    conn = receiver.conn
    round = 0
    while True:
        faults.crash("round", conn.label, round=round)
        marker = await conn.run("data", receiver.receive_round, round)
        if marker.kind is wire.PacketKind.END:
            return round
        faults.crash("sync", conn.label)
        with trio.move_on_after(timeouts.idle):
            await barrier.sync(round, receiver.channel)
        if not barrier.released(round):
            missing = barrier.missing(round)
            raise E.PeerTimeout(f"data channel{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(map(str, missing))} did not finish round {round} "
                                f"within {timeouts.idle:g}s", side=SIDE, channel=conn.label,
                                stage="sync")
        round += 1


async def _sync(ctl, output: OutputFile, timeouts: Timeouts) -> None:
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
            await control.send(ctl, "finish", wire.Working())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keepalive)
        try:
            await trio.to_thread.run_sync(output.sync)
        finally:
            committed.set()


def _verify(session: wire.Session, complete: wire.Complete, counters: Counters,
            total: DigestSum, rounds: set[int], seen: bytearray) -> None:
    def fail(message: str) -> None:
        raise E.VerificationError(message, side=SIDE, stage="verify")

    if complete.rounds < 1 or rounds != {complete.rounds}:
        fail(f"channels ended after rounds {sorted(rounds)} (sender says {complete.rounds}; "
             f"expected at least 1)")
    if counters.blocks != session.nblocks or seen.count(0):
        fail(f"received {counters.blocks} blocks covering {session.nblocks - seen.count(0)} "
             f"of the {session.nblocks} blocks (expected each exactly once)")
    for name, got, announced in (("packets", counters.packets, complete.packets),
                                 ("pages", counters.pages, complete.pages),
                                 ("zero pages", counters.zero_pages, complete.zero_pages)):
        if got != announced:
            fail(f"received {got} {name} (sender announced {announced})")
    if total.digest() != complete.digest:
        fail(f"image digest {total.hexdigest()} (sender announced {complete.digest.hex()})")


async def _migrate(registry, session: wire.Session | None, output_path: str | None,
                   timeouts: Timeouts, faults: Plan, on_progress, on_complete) -> Report:
    ctl = registry.control
    started = trio.current_time()
    faults.crash("setup")
    if session is None:
        session = await control.receive(ctl, "setup", wire.Session, "sender")
    output = OutputFile(output_path, session.image_size,
                        faults.wrap_pwrite(os.pwrite)) if output_path else None
    with output if output is not None else nullcontext():
        seen = bytearray(session.nblocks)
        receivers = [BlockReceiver(registry.data[i], session, output, seen, channel=i)
                     for i in range(registry.channels)]
        await control.send(ctl, "setup", wire.Ready())
        barrier = RoundBarrier(len(receivers))
        rounds: set[int] = set()

        async def run_channel(receiver: BlockReceiver) -> None:
            rounds.add(await _receive_channel(receiver, barrier, timeouts, faults))

        async with trio.open_nursery() as nursery:
            if on_progress is not None:
                nursery.start_soon(on_progress, lambda: sum(
                    r.counters.image_bytes for r in receivers), session.image_size)
            # A sender that fails says why there, even while its data channels hang; one that
            # is done sends COMPLETE, possibly before we have read all it sent.
            async with control.heeding(ctl, "data", wire.Complete, "sender") as heard:
                async with trio.open_nursery() as channels:
                    for receiver in receivers:
                        channels.start_soon(run_channel, receiver)
            nursery.cancel_scope.cancel()
        complete = heard.message or await control.receive(ctl, "finish", wire.Complete,
                                                          "sender")
        total, counters = DigestSum(), Counters()
        for r in receivers:
            total.merge(r.sum)
            counters.merge(r.counters)
        _verify(session, complete, counters, total, rounds, seen)
        faults.crash("completion")
        if output is not None:
            await _sync(ctl, output, timeouts)
        # The point of no return: once the output is renamed into place the sender must hear
        # DONE, so a cancellation arriving now waits for both (each is bounded).
        with trio.CancelScope(shield=True):
            if output is not None:
                output.publish()
            await control.send(ctl, "finish", wire.Done(session.image_size, total.digest()))
            report = Report(SIDE, ok=True, bytes=session.image_size,
                            payload_bytes=counters.payload_bytes, pages=counters.pages,
                            zero_pages=counters.zero_pages, packets=counters.packets,
                            channels=registry.channels, seconds=trio.current_time() - started,
                            digest=total.hexdigest(), output=output_path)
            if on_complete is not None:  # the outcome is decided: no later signal undoes it
                on_complete(report)
        # Not shielded: the sender has DONE, and a signal or a failed TLS close now cannot
        # undo the outcome.
        with contextlib.suppress(E.MultifdError):
            await ctl.end_stream("finish")
    return report


async def receive_image(listeners: list[trio.SocketListener], output_path: str | None, *,
                        timeouts: Timeouts = Timeouts(), tls: ServerTls | None = None,
                        faults: Plan = Plan(), log=print, on_progress=None,
                        on_complete=None) -> Report:
    """Accept exactly one migration and write it to output_path (None: verify and discard).

    on_complete(report) is called the moment the outcome is decided (output renamed into
    place, DONE sent), before the cleanup that a late cancellation could still interrupt."""
    with collapse_group():
        async with open_registry(listeners, timeouts, log, tls, faults) as registry:
            try:
                session = await wait_for_channels(registry, timeouts)
                return await _migrate(registry, session, output_path, timeouts, faults,
                                      on_progress, on_complete)
            except BaseException as exc:
                reported = await control.conclude_failure(registry.control, exc, "sender")
                if reported is exc:
                    raise
                raise reported from None
