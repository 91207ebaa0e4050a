"""What a migration reports: progress while it runs, then a human summary or one JSON object."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import trio


@dataclass
class Report:
    side: str
    ok: bool = False
    bytes: int = 0  # image size
    payload_bytes: int = 0  # the data pages' bytes (zero pages excluded)
    wire_payload_bytes: int = 0  # what they took on the wire (less, when compressed)
    compression: str = "none"
    live: dict | None = None  # live precopy: precopy.Outcome.as_dict()
    pages: int = 0
    zero_pages: int = 0
    packets: int = 0
    channels: int = 0
    seconds: float = 0.0
    digest: str | None = None
    digest_name: str = "xxh3-128-sum"  # the session's scheme (digest.py)
    output: str | None = None
    error: str | None = None

    @classmethod
    def finished(cls, side: str, counters, image_size: int, channels: int, seconds: float,
                 digest: str, output: str | None = None, compression: str = "none",
                 live: dict | None = None, digest_name: str = "xxh3-128-sum") -> "Report":
        """The report of a verified migration, from its merged pump.Counters."""
        return cls(side, ok=True, bytes=image_size, payload_bytes=counters.payload_bytes,
                   wire_payload_bytes=counters.wire_bytes, compression=compression, live=live,
                   pages=counters.pages, zero_pages=counters.zero_pages,
                   packets=counters.packets, channels=channels, seconds=seconds,
                   digest=digest, digest_name=digest_name, output=output)

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["throughput"] = round(self.throughput)
        data["seconds"] = round(self.seconds, 6)
        data["compression_ratio"] = round(self.payload_bytes / self.wire_payload_bytes, 3) \
            if self.wire_payload_bytes else None
        return json.dumps(data, sort_keys=True)

    def human(self) -> str:
        head = (f"{self.side}: {'ok' if self.ok else 'FAILED'}, {human_bytes(self.bytes)} "
                f"({self.pages} pages, {self.zero_pages} zero) over {self.channels} channels "
                f"in {self.seconds:.2f} s, {self.throughput / 1e9:.2f} GB/s")
        lines = [head]
        if self.compression != "none" and self.wire_payload_bytes:
            lines.append(f"  compression {self.compression}: {human_bytes(self.payload_bytes)}"
                         f" of data pages in {human_bytes(self.wire_payload_bytes)}, ratio "
                         f"{self.payload_bytes / self.wire_payload_bytes:.2f}")
        if self.live and isinstance(self.live["rounds"], int):  # the receiver's view
            lines.append(f"  live: {self.live['rounds']} rounds, downtime "
                         f"{self.live['downtime'] * 1e3:.0f} ms (from the start of the last "
                         f"round to the verified commit)")
        elif self.live:
            rounds = self.live["rounds"]
            lines.append(f"  live: {len(rounds)} rounds ("
                         + ", ".join(str(r["pages"]) for r in rounds) + " pages), downtime "
                         f"{self.live['downtime'] * 1e3:.0f} ms (receiver: "
                         f"{self.live['receiver_downtime'] * 1e3:.0f} ms)"
                         + (f", throttle {self.live['throttle']}%" if self.live["throttle"]
                            else "")
                         + ("" if self.live["converged"] else f"; {self.live['why']}"))
        if self.digest:
            lines.append(f"  digest {self.digest_name}:{self.digest}")
        if self.output:
            lines.append(f"  output {self.output}")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@asynccontextmanager
async def reporting_progress(on_progress, pumps, total: int):
    """Run on_progress(done, total) beside the body (if given), where done() sums the image
    bytes the pumps (BlockSender / BlockReceiver) have moved so far; it stops with the body."""
    if on_progress is None:
        yield
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_progress, lambda: sum(p.counters.image_bytes for p in pumps),
                           total)
        yield
        nursery.cancel_scope.cancel()
