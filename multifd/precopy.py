"""Live precopy on the sender: rounds of dirtied blocks while the guest (workload.py) keeps
writing, until what is left fits the allowed downtime; then stop-and-copy.

Round 0 sends every page. After each round the sender reads and clears the dirty log (the
pages written since it was last read, including those written while they were being sent)
and estimates the downtime: those pages' bytes over the bandwidth the round just measured.
A later round sends, per block, only its dirtied pages (a partial packet), or the whole block
when every page of it was dirtied.
When the estimate fits --downtime-limit, or at --max-rounds, the workload is paused, the log is
read one last time, and the last round sends what it holds; the guest stays paused until the
process ends, so the receiver's image equals the state at the pause (--save-final writes it).
The downtime is measured from the pause to the receiver's DONE: the digest is kept per page as
pages travel (digest.PageTerms), so verifying reads nothing again inside it. The receiver
measures its own: from the moment its last round began (the barrier of the one before it
released) to its verified commit, and says it in DONE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import trio

DEFAULT_DOWNTIME = 0.3  # seconds: QEMU's default downtime-limit
DEFAULT_MAX_ROUNDS = 30


@dataclass(frozen=True)
class Live:
    """What --live asks for."""
    rate: float  # bytes/s the workload dirties
    pattern: str = "uniform"
    seed: int = 1
    downtime_limit: float = DEFAULT_DOWNTIME
    max_rounds: int = DEFAULT_MAX_ROUNDS
    save_final: str | None = None
    auto_converge: bool = False


@dataclass
class Round:
    round: int
    blocks: int  # blocks sent in it (whole, or some of their pages)
    bytes: int  # image bytes sent in it
    seconds: float
    dirty_pages: int  # pages dirtied meanwhile: the next round's work
    bandwidth: float  # image bytes/s the round moved
    expected_downtime: float  # the dirty pages over that bandwidth
    throttle: int = 0  # percent of the dirty rate taken away during it (--auto-converge)
    pages: int = 0
    zero_pages: int = 0
    wire_bytes: int = 0  # the data pages' bytes on the wire (compressed, if they were)
    dirty_rate: float = 0.0  # bytes/s of pages dirtied while it ran

    def line(self) -> str:
        """The round in one line, as the sender prints it when the round ends."""
        return (f"round {self.round}: {self.pages} pages ({self.zero_pages} zero), "
                f"{self.wire_bytes / 1e6:.1f} MB on the wire in {self.seconds * 1e3:.0f} ms, "
                f"{self.bandwidth / 1e9:.2f} GB/s; dirtied meanwhile {self.dirty_pages} pages "
                f"({self.dirty_rate / 1e6:.0f} MB/s), expected downtime "
                f"{self.expected_downtime * 1e3:.0f} ms"
                + (f", throttle {self.throttle}%" if self.throttle else ""))


@dataclass
class Outcome:
    rounds: list[Round] = field(default_factory=list)
    converged: bool = False
    throttle: int = 0  # the highest throttle --auto-converge needed
    paused_at: float = 0.0  # trio time of the pause: the downtime starts there
    downtime: float = 0.0  # set once the receiver's DONE came
    receiver_downtime: float | None = None  # as the receiver measured it (its DONE says)
    why: str = ""  # when it did not converge: the one line that says why

    def as_dict(self) -> dict:
        return {"rounds": [asdict(r) for r in self.rounds], "converged": self.converged,
                "throttle": self.throttle, "downtime": round(self.downtime, 6),
                "receiver_downtime": None if self.receiver_downtime is None else
                round(self.receiver_downtime, 6), "why": self.why or None}


async def run(send_round, workload, counters, page_size: int, live: Live,
              on_round=None) -> Outcome:
    """The rounds. send_round(dirty, round) sends a round (dirty None: every page, else the
    pages of a dirty.Dirty); counters() is what has been sent so far (pump.Counters);
    on_round(Round) is told of each round as it ends."""
    out = Outcome()
    dirty, round, throttle = None, 0, 0

    async def send(dirty, round):
        start, before = trio.current_time(), counters()
        await send_round(dirty, round)
        seconds = max(trio.current_time() - start, 1e-6)
        sent = _delta(before, counters())
        return seconds, sent, sent["bytes"] / seconds

    while True:
        seconds, sent, bandwidth = await send(dirty, round)
        dirty = await trio.to_thread.run_sync(workload.sync)
        dirty_bytes = dirty.count * page_size
        expected = dirty_bytes / bandwidth if bandwidth else float("inf")
        out.rounds.append(Round(round, seconds=seconds, dirty_pages=dirty.count,
                                bandwidth=bandwidth, expected_downtime=expected,
                                throttle=throttle, dirty_rate=dirty_bytes / seconds, **sent))
        if on_round is not None:
            on_round(out.rounds[-1])
        round += 1
        # Round 0 moves whole blocks; later rounds move scattered pages, several times
        # slower per byte: its bandwidth would promise a downtime the last round cannot keep.
        if expected <= live.downtime_limit and (round > 1 or not dirty):
            out.converged = True
            break
        if live.auto_converge and round >= 2:
            # QEMU's cpu-throttle: 20% once a round after the first did not converge, then
            # 10% more for each round that still did not, up to 99%.
            throttle = min(99, 20 if throttle == 0 else throttle + 10)
            out.throttle = throttle
            await trio.to_thread.run_sync(workload.throttle, throttle)
        if round + 1 >= live.max_rounds:
            rate = out.rounds[-1].dirty_rate
            if round == 1:  # no round of dirty pages ran: convergence was never judged
                out.why = (f"did not converge in {live.max_rounds} rounds: convergence is "
                           f"judged on a round of dirty pages (round 1 or later), and "
                           f"--max-rounds 2 leaves none (use 3 or more)")
                break
            out.why = (f"did not converge in {live.max_rounds} rounds: the guest dirtied "
                       f"{rate / 1e6:.0f} MB/s of pages while the link drained "
                       f"{bandwidth / 1e6:.0f} MB/s (lower --dirty-rate, raise "
                       f"--downtime-limit or --max-rounds, or add bandwidth)")
            break
    # Stop-and-copy: the guest pauses, the log is read a last time, the rest goes.
    await trio.to_thread.run_sync(workload.pause)
    out.paused_at = trio.current_time()
    last = dirty | await trio.to_thread.run_sync(workload.sync)
    seconds, sent, bandwidth = await send(last, round)
    out.rounds.append(Round(round, seconds=seconds, dirty_pages=0, bandwidth=bandwidth,
                            expected_downtime=0.0, throttle=throttle, **sent))
    if on_round is not None:
        on_round(out.rounds[-1])
    return out


def _delta(before, after) -> dict:
    return {"blocks": after.blocks - before.blocks,
            "bytes": after.image_bytes - before.image_bytes,
            "pages": after.pages - before.pages,
            "zero_pages": after.zero_pages - before.zero_pages,
            "wire_bytes": after.wire_bytes - before.wire_bytes}
