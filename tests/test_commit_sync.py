"""The receiver's output is on disk before it is put in place: every write is followed by an
fsync that ends before the rename, for a still image and for a live one. A slow disk makes the
sender wait, never give up: WORKING keeps its wait alive.

In-process over real loopback TCP, the output file's writes, syncs and publish recorded.
"""

from __future__ import annotations

import threading
import time

import pytest
import trio

from multifd import precopy
from multifd.image import OutputFile
from multifd.recv import open_listeners, receive_image
from multifd.send import send_image
from multifd.settings import Timeouts

MiB = 1 << 20


@pytest.fixture
def journal(monkeypatch):
    """What the output file went through, in order: ("write" | "sync start" | "sync end" |
    "publish", thread-safe); its syncs take `journal.slow` seconds."""
    events: list[str] = []
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            events.append(what)

    write, sync, publish = OutputFile.write, OutputFile.sync, OutputFile.publish

    def traced_write(self, view, offset):
        write(self, view, offset)
        note("write")

    def traced_sync(self):
        note("sync start")
        time.sleep(events_slow[0])
        sync(self)
        note("sync end")

    def traced_publish(self):
        note("publish")
        publish(self)

    events_slow = [0.0]
    monkeypatch.setattr(OutputFile, "write", traced_write)
    monkeypatch.setattr(OutputFile, "sync", traced_sync)
    monkeypatch.setattr(OutputFile, "publish", traced_publish)

    class Journal:
        @property
        def events(self) -> list[str]:
            with lock:
                return list(events)

        @property
        def slow(self) -> float:
            return events_slow[0]

        @slow.setter
        def slow(self, seconds: float) -> None:
            events_slow[0] = seconds

    return Journal()


async def _migrate(image: str, out: str, sender_idle: float, live=None, bandwidth=None):
    listeners = await open_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    result = {}
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                async def receive() -> None:
                    result["recv"] = await receive_image(listeners, out, log=lambda m: None)
                nursery.start_soon(receive)
                result["send"] = await send_image(
                    "127.0.0.1", port, image, channels=2, block_pages=64, live=live,
                    max_bandwidth=bandwidth,
                    timeouts=Timeouts(connect=5, handshake=5, idle=sender_idle))
    finally:
        for listener in listeners:
            await listener.aclose()
    return result["send"], result["recv"]


def _synced_before_publish(events: list[str]) -> None:
    assert events.count("publish") == 1 and events[-1] == "publish", events[-6:]
    last_write = max(i for i, e in enumerate(events) if e == "write")
    # A sync that started after the last write ended before the publish.
    starts = [i for i, e in enumerate(events) if e == "sync start" and i > last_write]
    assert starts and "sync end" in events[starts[0]:-1], events[last_write:]


@pytest.mark.timeout(60)
async def test_a_still_image_is_synced_before_it_is_put_in_place(journal, make_image,
                                                                   tmp_path):
    image = make_image(8 * MiB, "mixed")
    sent, received = await _migrate(image, str(tmp_path / "out.img"), sender_idle=5)
    assert sent.ok and received.digest == sent.digest
    _synced_before_publish(journal.events)


@pytest.mark.timeout(60)
async def test_a_live_image_is_synced_before_it_is_put_in_place_on_a_slow_disk(
        journal, make_image, tmp_path):
    # The fsync takes longer than the sender's idle timeout: only WORKING keeps it waiting.
    journal.slow = 1.5
    image = make_image(8 * MiB, "mixed")
    # Never converges (a millisecond at 16 MB/s is 4 pages): four rounds.
    live = precopy.Live(rate=20e6, pattern="hot:10%", downtime_limit=0.001, max_rounds=4,
                        save_final=str(tmp_path / "final.img"))
    sent, received = await _migrate(image, str(tmp_path / "out.img"), sender_idle=1.0,
                                    live=live, bandwidth=16e6)
    assert sent.ok and received.digest == sent.digest
    assert len(sent.live["rounds"]) == 4
    events = journal.events
    _synced_before_publish(events)
    with open(tmp_path / "out.img", "rb") as got, open(tmp_path / "final.img", "rb") as want:
        assert got.read() == want.read()
