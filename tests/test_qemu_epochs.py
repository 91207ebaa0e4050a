"""multifd/qemu/epochs.py: QEMU's sync rule between the main channel and the multifd
channels, and its bounds; and multifd/qemu/blocks.py's page history and atomic directory."""

from __future__ import annotations

import os
import subprocess

import pytest
import trio
import trio.testing

from multifd import errors as E
from multifd.qemu import blocks as B
from multifd.qemu.epochs import Epochs, is_sync_point
from multifd.qemu.wire import EndOfSection, Flush


def test_which_markers_are_sync_points():
    assert is_sync_point(EndOfSection(), flushes_seen=0)  # 7.2: every section's end
    assert not is_sync_point(EndOfSection(), flushes_seen=1)  # 8.1+: the FLUSHes only
    assert is_sync_point(Flush(), flushes_seen=1)


async def test_no_channel_passes_a_sync_before_the_main_channel_and_all_channels_are_there():
    epochs, order = Epochs(idle=5), []
    for c in (0, 1):
        epochs.add(c)

    async def channel(c: int, delay: float):
        await trio.sleep(delay)
        order.append(f"sync {c}")
        await epochs.channel_synced(c, f"multifd channel {c}")
        order.append(f"go {c}")

    async def main():
        order.append("main at 1")
        await epochs.main_sync_point()
        order.append("main past 1")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel, 0, 0.0)
            nursery.start_soon(main)
            nursery.start_soon(channel, 1, 0.2)  # a skewed channel: everyone waits for it
    assert order.index("main past 1") > order.index("sync 1")
    assert order.index("go 0") > order.index("main past 1")
    assert epochs.passed == 1


async def test_a_channel_that_makes_no_progress_is_named_after_the_idle_timeout():
    epochs = Epochs(idle=0.2)
    epochs.add(0)
    epochs.add(3)
    epochs.synced[0] = 1
    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout, match=r"no SYNC 1 from multifd channel 3 within 0.2s"):
            await epochs.main_sync_point()


async def test_a_channel_still_receiving_is_waited_for():
    epochs = Epochs(idle=0.2)
    epochs.add(0)

    async def trickle():
        for _ in range(6):  # 0.6 s of progress: three idle periods
            await trio.sleep(0.1)
            epochs.progress[0] += 1
        epochs.synced[0] += 1
        epochs.notify()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await epochs.main_sync_point() == 1


async def test_a_channel_that_ended_short_of_a_sync_is_an_error_at_once():
    epochs = Epochs(idle=30)
    epochs.add(2)
    epochs.end(2)
    with trio.fail_after(5):
        with pytest.raises(E.RemoteProtocolError, match="multifd channel 2 ended after 0 SYNC"):
            await epochs.main_sync_point()


async def test_the_main_channel_that_stops_is_named_by_a_waiting_channel():
    epochs = Epochs(idle=0.2)
    epochs.add(0)
    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout, match=r"^main channel, sync: silent for 0.2s before "
                           r"sync point 1, where multifd channel 0 waits$"):
            await epochs.channel_synced(0, "multifd channel 0")


async def test_a_channel_waiting_at_a_sync_never_blames_a_waiting_main_channel():
    # Channel 0 synced; channel 1 stalls. Only the main channel's wait may fail, naming 1.
    epochs = Epochs(idle=0.2)
    epochs.add(0)
    epochs.add(1)

    async def channel_0():
        await epochs.channel_synced(0, "multifd channel 0")

    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout, match=r"^main channel, sync: no SYNC 1 from "
                           r"multifd channel 1 within 0.2s$"):
            with E.collapse_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(channel_0)
                    await trio.testing.wait_all_tasks_blocked()
                    await epochs.main_sync_point()


async def test_release_all_lets_trailing_syncs_through():
    epochs = Epochs(idle=30)
    epochs.add(0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(epochs.channel_synced, 0, "multifd channel 0")
            await trio.testing.wait_all_tasks_blocked()
            epochs.release_all()


# --- blocks.py

def test_zero_pages_overwrite_data_only(tmp_path):
    out = B.OutputDir(str(tmp_path / "guest"))
    try:
        out.create_blocks([("pc.ram", 8 * 4096), ("/rom@etc/acpi/tables", 4096)])
        ram = out.blocks["pc.ram"]
        ram.write_pages((0, 4096, 3 * 4096), b"a" * 4096 + b"b" * 4096 + b"c" * 4096)
        ram.zero_pages((4096, 5 * 4096))
        assert ram.never_sent() == 8 - 4
        out.publish()
    finally:
        out.discard()
    data = (tmp_path / "guest" / "ram" / "pc.ram").read_bytes()
    assert data == b"a" * 4096 + bytes(2 * 4096) + b"c" * 4096 + bytes(4 * 4096)
    assert sorted(os.listdir(tmp_path / "guest" / "ram")) == ["%2From@etc%2Facpi%2Ftables",
                                                              "pc.ram"]
    assert os.listdir(tmp_path) == ["guest"]


def test_a_discarded_capture_leaves_nothing(tmp_path):
    with B.OutputDir(str(tmp_path / "guest")) as out:
        out.create_blocks([("pc.ram", 4096)])
        out.blocks["pc.ram"].write_pages((0,), b"x" * 4096)
    assert os.listdir(tmp_path) == []


def test_an_empty_directory_is_replaced_and_a_full_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with B.OutputDir(str(tmp_path / "empty")) as out:
        out.create_blocks([("pc.ram", 4096)])
        out.publish()
    assert os.listdir(tmp_path / "empty") == ["ram"]
    with pytest.raises(E.UsageError, match="exists and is not empty"):
        B.OutputDir(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(E.UsageError, match="not a directory"):
        B.check_output_dir(str(tmp_path / "file"))
    with pytest.raises(E.UsageError, match="does not exist"):
        B.check_output_dir(str(tmp_path / "no" / "guest"))


def test_a_write_error_names_the_block(tmp_path):
    def full(fd, data, offset):
        raise OSError(28, "No space left on device")
    with B.OutputDir(str(tmp_path / "guest"), pwrite=full) as out:
        out.create_blocks([("pc.ram", 4096)])
        with pytest.raises(E.ImageError, match="RAM block 'pc.ram': No space left"):
            out.blocks["pc.ram"].write_pages((0,), b"x" * 4096)


def test_an_abandoned_hidden_directory_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid, name in ((dead.pid, ".guest.abandoned.part"), (os.getpid(), ".guest.live.part")):
        (tmp_path / name).mkdir()
        (tmp_path / name / B.OWNER).write_text(f"{pid}\n")
    said: list = []
    with B.OutputDir(str(tmp_path / "guest"), log=said.append) as out:
        assert not (tmp_path / ".guest.abandoned.part").exists()
        assert (tmp_path / ".guest.live.part").exists()
        assert said and "left by a receiver that ended" in said[0]
        out.create_blocks([("pc.ram", 4096)])
        out.publish()
    assert not (tmp_path / "guest" / B.OWNER).exists()
