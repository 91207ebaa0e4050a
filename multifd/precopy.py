"""Live precopy on the sender: rounds of dirtied blocks while the guest (workload.py) keeps
writing, until what is left fits the allowed downtime; then stop-and-copy.

Round 0 sends every block. After each round the sender reads and clears the dirty log (the
blocks written since it was last read, including those written while they were being sent)
and estimates the downtime: those blocks' bytes over the bandwidth the round just measured.
When the estimate fits --downtime-limit, or at --max-rounds, the workload is paused, the log is
read one last time, and the last round sends what it holds; the guest stays paused until the
process ends, so the receiver's image equals the state at the pause (--save-final writes it).
The downtime is measured from the pause to the receiver's DONE: the digest is kept per block
as blocks travel (digest.BlockTerms), so verifying reads nothing again inside it.
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
    blocks: int  # blocks sent in it
    bytes: int  # image bytes sent in it
    seconds: float
    dirty_blocks: int  # blocks dirtied meanwhile: the next round's work
    bandwidth: float  # image bytes/s the round moved
    expected_downtime: float  # the dirty blocks over that bandwidth
    throttle: int = 0  # percent of the dirty rate taken away during it (--auto-converge)
    pages: int = 0
    zero_pages: int = 0
    wire_bytes: int = 0  # the data pages' bytes on the wire (compressed, if they were)
    dirty_rate: float = 0.0  # bytes/s of blocks dirtied while it ran


@dataclass
class Outcome:
    rounds: list[Round] = field(default_factory=list)
    converged: bool = False
    throttle: int = 0  # the highest throttle --auto-converge needed
    paused_at: float = 0.0  # trio time of the pause: the downtime starts there
    downtime: float = 0.0  # set once the receiver's DONE came
    why: str = ""  # when it did not converge: the one line that says why

    def as_dict(self) -> dict:
        return {"rounds": [asdict(r) for r in self.rounds], "converged": self.converged,
                "throttle": self.throttle,
                "downtime": round(self.downtime, 6), "why": self.why or None}


async def run(send_round, workload, counters, block_bytes: int, live: Live) -> Outcome:
    """The rounds. send_round(blocks, round) sends a round (blocks None: all of them);
    counters() is what has been sent so far (pump.Counters)."""
    out = Outcome()
    blocks, round, throttle = None, 0, 0
    while True:
        start, before = trio.current_time(), counters()
        await send_round(blocks, round)
        seconds = max(trio.current_time() - start, 1e-6)
        sent = _delta(before, counters())
        dirty = await trio.to_thread.run_sync(workload.sync)
        bandwidth = sent["bytes"] / seconds
        expected = len(dirty) * block_bytes / bandwidth if bandwidth else float("inf")
        out.rounds.append(Round(round, workload.nblocks if blocks is None else len(blocks),
                                seconds=seconds, dirty_blocks=len(dirty), bandwidth=bandwidth,
                                expected_downtime=expected, throttle=throttle,
                                dirty_rate=len(dirty) * block_bytes / seconds, **sent))
        round += 1
        if expected <= live.downtime_limit:
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
            out.why = (f"did not converge in {live.max_rounds} rounds: the guest dirtied "
                       f"{rate / 1e6:.0f} MB/s of blocks while the link drained "
                       f"{bandwidth / 1e6:.0f} MB/s (lower --dirty-rate, raise "
                       f"--downtime-limit or --max-rounds, or add bandwidth)")
            break
        blocks = dirty
    # Stop-and-copy: the guest pauses, the log is read a last time, the rest goes.
    await trio.to_thread.run_sync(workload.pause)
    out.paused_at = trio.current_time()
    last = sorted(set(dirty) | set(await trio.to_thread.run_sync(workload.sync)))
    start, before = trio.current_time(), counters()
    await send_round(last, round)
    seconds = max(trio.current_time() - start, 1e-6)
    sent = _delta(before, counters())
    out.rounds.append(Round(round, len(last), seconds=seconds, dirty_blocks=0,
                            bandwidth=sent["bytes"] / seconds, expected_downtime=0.0,
                            throttle=throttle, **sent))
    return out


def _delta(before, after) -> dict:
    return {"bytes": after.image_bytes - before.image_bytes,
            "pages": after.pages - before.pages,
            "zero_pages": after.zero_pages - before.zero_pages,
            "wire_bytes": after.wire_bytes - before.wire_bytes}
