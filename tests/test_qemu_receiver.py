"""multifd/qemu/capture.py against QEMU streams built on paper (qemu_streams.py), sent over
real loopback TCP (and TLS) by threads: the sync rule with skewed channels, every layout and
quirk, the end of a stream with and without a TLS close, the return path, strangers, and
failures that must leave nothing behind. Real QEMU runs in test_qemu_capture.py.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time

import pytest
import trio

import qemu_streams as S
from multifd import errors as E
from multifd import tls as T
from multifd.qemu import blocks as B
from multifd.qemu.capture import receive_qemu
from multifd.settings import Timeouts
from multifd.side import Side

TIMEOUTS = Timeouts(connect=2, handshake=2, idle=2)


def _side(log: list, tls=None, timeouts=TIMEOUTS) -> Side:
    return Side("receiver", timeouts, tls, log=log.append)


def _client(port: int, tls_dir: str | None):
    sock = socket.create_connection(("127.0.0.1", port))
    if tls_dir is None:
        return sock
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(tls_dir, "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(tls_dir, "client-cert.pem"),
                        os.path.join(tls_dir, "client-key.pem"))
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


class Source:
    """A QEMU source on paper: one thread per connection. Every connection is made at once
    and a multifd channel sends its init and setup SYNC at once; the main channel begins only
    once they all have (as QEMU opens them before its main channel's first sync point: else,
    on a loaded machine, the main channel could reach it first and see a late channel). The
    rest of connection i follows `delays[i]` seconds later, so that the channels run skewed;
    a connection in `late` is not waited for."""

    def __init__(self, port: int, streams: list[bytes], delays: list[float], *,
                 tls_dir: str | None = None, close_notify: bool = False,
                 replies: int = 0, late: dict | None = None) -> None:
        self.port, self.streams, self.delays = port, streams, delays
        self.tls_dir, self.close_notify, self.replies = tls_dir, close_notify, replies
        self.late = late or {}  # connection index: seconds before it connects (a proxy)
        self.received = b""  # what came back on the first stream (the return path)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(len(streams))]
        self.opened = [threading.Event() for _ in streams]  # its head is sent (or it failed)

    def start(self) -> "Source":
        for t in self.threads:
            t.start()
        return self

    def _run(self, i: int) -> None:
        try:
            time.sleep(self.late.get(i, 0))
            sock = _client(self.port, self.tls_dir)
            try:
                stream = self.streams[i]
                if stream is None:  # a stranger that says nothing for a while
                    self.opened[i].set()
                    time.sleep(3)
                    return
                head = 0 if stream.startswith(S.MAGIC) else 64 + S.PACKET_HEADER
                sock.sendall(stream[:head])
                self.opened[i].set()
                if i == 0:
                    for j, opened in enumerate(self.opened[1:], 1):
                        if j not in self.late:
                            opened.wait(10)
                time.sleep(self.delays[i])
                sock.sendall(stream[head:])
                if i == 0 and self.replies:
                    while len(self.received) < self.replies:
                        chunk = sock.recv(64)
                        if not chunk:
                            break
                        self.received += chunk
                if self.close_notify and isinstance(sock, ssl.SSLSocket):
                    sock.unwrap()
            finally:
                sock.close()
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
        finally:
            self.opened[i].set()

    def join(self) -> None:
        for t in self.threads:
            t.join(10)


async def capture(tmp_path, streams, delays=None, *, tls=None, tls_dir=None, log=None,
                  channels=None, timeouts=TIMEOUTS, **source) -> tuple[dict, Source, list]:
    """Receive `streams` (the main channel first in the list, connected in `delays` order)
    into tmp_path/guest; returns (manifest, the source, the log)."""
    log = [] if log is None else log
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    sender = Source(port, streams, delays or [0.0] * len(streams), tls_dir=tls_dir,
                    **source).start()
    try:
        with trio.fail_after(20):
            manifest = await receive_qemu(listeners, str(tmp_path / "guest"),
                                          side=_side(log, tls, timeouts), channels=channels)
    finally:
        for listener in listeners:
            await listener.aclose()
        await trio.to_thread.run_sync(sender.join)
    return manifest, sender, log


def read_blocks(tmp_path, scenario) -> dict[str, bytes]:
    return {name: (tmp_path / "guest" / B.block_file(name)).read_bytes()
            for name in scenario.blocks}


def nothing_left(tmp_path) -> bool:
    return os.listdir(tmp_path) == []


def naive(scenario, order) -> dict[str, bytes]:
    """The blocks a receiver without QEMU's sync rule gets if the channels' bytes are applied
    one channel after another, in `order` (indexes into [main, *channels])."""
    memory = {name: bytearray(n) for name, n in scenario.blocks.items()}
    for i in order:
        if i == 0:
            for record in scenario.records:
                if record[0] in ("zero", "page"):
                    data = bytes(S.PAGE) if record[0] == "zero" else record[3]
                    memory[record[1]][record[2]:record[2] + S.PAGE] = data
            continue
        for sent in scenario.sent[i - 1]:
            for k, offset in enumerate(sent.normal):
                memory[sent.block][offset:offset + S.PAGE] = sent.data[k * S.PAGE:
                                                                       (k + 1) * S.PAGE]
            for offset in sent.zero:
                memory[sent.block][offset:offset + S.PAGE] = bytes(S.PAGE)
    return {name: bytes(m) for name, m in memory.items()}


# The channels connect before the main channel and run skewed: the last channel first and
# whole, the main channel next, the first channel last.
SKEW = [0.15, 0.3, 0.0]


@pytest.mark.parametrize("layout", S.LAYOUTS)
async def test_each_layout_is_rebuilt_exactly_with_skewed_channels(tmp_path, layout):
    scenario = S.sample(layout)
    # Without the sync rule this order of application gives another result: the skew matters.
    assert naive(scenario, [2, 0, 1]) != scenario.expected
    manifest, _, _ = await capture(tmp_path, [scenario.main, *scenario.channels], SKEW)
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert manifest["channels"] == 2
    assert all(b["pages_never_sent"] == 0 for b in manifest["blocks"])
    assert (tmp_path / "guest" / "device-state.bin").read_bytes() == scenario.device_state
    assert (tmp_path / "guest" / "vmdescription.json").read_bytes() == scenario.vmdescription
    # Every SYNC was matched by a sync point of the main channel: EOS in 7.2, FLUSH after.
    assert {c["syncs"] for c in manifest["multifd"]} == {manifest["sync_points"]}
    assert manifest["zero_pages"].startswith("in multifd" if layout in ("9.0", "10.x") else
                                             "on the main")
    assert [f for f in os.listdir(tmp_path)] == ["guest"]


@pytest.mark.parametrize("quirk", [S.quirk_sync_with_data, S.quirk_duplicate_page,
                                   S.quirk_zero_then_normal])
async def test_quirks_of_qemu_7_2(tmp_path, quirk):
    scenario = quirk()
    await capture(tmp_path, [scenario.main, *scenario.channels], SKEW)
    assert read_blocks(tmp_path, scenario) == scenario.expected


async def test_a_zero_page_after_data_overwrites_it_and_untouched_pages_stay_holes(tmp_path):
    scenario = S.build([S.Epoch(multifd=[[("pc.ram", 0, S.pattern(1))], []]),
                        S.Epoch(multifd=[[], [("pc.ram", 0, None)]])], "9.0",
                       blocks={"pc.ram": 64 * S.PAGE})
    await capture(tmp_path, [scenario.main, *scenario.channels], SKEW)
    ram = tmp_path / "guest" / "ram" / "pc.ram"
    assert ram.read_bytes() == bytes(64 * S.PAGE)
    assert ram.stat().st_blocks * 512 < 64 * S.PAGE  # sparse: never-written pages are holes


@pytest.mark.parametrize("compression", ["zlib"])
async def test_compressed_channels(tmp_path, compression):
    scenario = S.sample("7.2", compression=compression)
    manifest, _, _ = await capture(tmp_path, [scenario.main, *scenario.channels], SKEW)
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert manifest["compression"] == compression


async def test_multifd_off_pages_on_the_main_channel(tmp_path):
    scenario = S.sample("7.2", channels=0)
    manifest, _, _ = await capture(tmp_path, [scenario.main])
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert manifest["channels"] == 0 and manifest["main"]["pages"] > 0


@pytest.mark.parametrize("close_notify", [False, True], ids=["no-tls-close", "tls-close"])
async def test_tls_with_or_without_a_tls_close(tmp_path, pki, close_notify):
    scenario = S.sample("7.2")
    manifest, _, _ = await capture(tmp_path, [scenario.main, *scenario.channels], SKEW,
                                   tls=T.server_tls(pki.both), tls_dir=pki.both,
                                   close_notify=close_notify)
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert manifest["tls"] is True


async def test_a_channel_cut_inside_a_packet_is_an_error_and_leaves_nothing(tmp_path, pki):
    scenario = S.sample("7.2")
    cut = scenario.channels[1][:-100]
    with pytest.raises(E.TransportError, match="multifd channel 1"):
        await capture(tmp_path, [scenario.main, scenario.channels[0], cut],
                      tls=T.server_tls(pki.both), tls_dir=pki.both)
    assert nothing_left(tmp_path)


async def test_the_return_path_gets_pong_then_shut(tmp_path):
    scenario = S.sample("7.2", return_path=True)
    manifest, source, _ = await capture(tmp_path, [scenario.main, *scenario.channels],
                                        replies=16)
    assert manifest["return_path"] is True
    pong = struct.pack(">HHI", 2, 4, 1)
    assert source.received == pong + bytes.fromhex("0001000400000000")


async def test_a_stranger_is_dropped_and_the_migration_completes(tmp_path):
    scenario = S.sample("9.0")
    log: list = []
    manifest, _, _ = await capture(tmp_path, [scenario.main, *scenario.channels,
                                              b"GET / HTTP/1.0\r\n\r\n"],
                                   [0.1, 0.1, 0.1, 0.0], log=log)
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert any("dropped" in line and "neither QEMU's main channel" in line for line in log), log


async def test_a_missing_channel_is_named(tmp_path):
    scenario = S.sample("7.2", channels=3)
    with pytest.raises(E.RemoteProtocolError, match="multifd channel 1 never arrived"):
        await capture(tmp_path, [scenario.main, scenario.channels[0], scenario.channels[2]])
    assert nothing_left(tmp_path)


async def test_postcopy_is_refused_by_name_and_nothing_is_written(tmp_path):
    scenario = S.sample("7.2")
    main = scenario.main.replace(S.configuration("pc-i440fx-7.2"),
                                 S.configuration("pc-i440fx-7.2") +
                                 S.command(S.CMD_POSTCOPY_ADVISE, bytes(16)), 1)
    with pytest.raises(E.Unsupported, match="postcopy-ram"):
        await capture(tmp_path, [main, *scenario.channels])
    assert nothing_left(tmp_path)


async def test_a_main_channel_cut_before_its_end_is_an_error(tmp_path):
    scenario = S.sample("7.2")
    with pytest.raises(E.RemoteProtocolError, match="main channel"):
        await capture(tmp_path, [scenario.main[:-10], *scenario.channels])
    assert nothing_left(tmp_path)


async def test_a_channel_connected_late_needs_its_count(tmp_path):
    # A proxy between QEMU and the receiver may connect a channel after the main channel's
    # first sync point: counted at that point, it is missing; told the count, it is awaited.
    scenario = S.sample("7.2")
    streams = [scenario.main, *scenario.channels]
    (tmp_path / "a").mkdir()
    with pytest.raises(E.RemoteProtocolError, match=r"^main channel, setup: multifd channel "
                       r"1 connected after the main channel's first sync point, where 1 were "
                       r"counted: .*\(give --qemu-channels\)$"):
        # Channel 0 runs slowly: the migration is still on when channel 1 connects.
        await capture(tmp_path / "a", streams, [0.0, 1.0, 0.0], late={2: 0.3})
    assert os.listdir(tmp_path / "a") == []
    (tmp_path / "b").mkdir()
    manifest, _, _ = await capture(tmp_path / "b", streams, late={2: 0.3}, channels=2)
    assert read_blocks(tmp_path / "b", scenario) == scenario.expected
    assert manifest["channels"] == 2


async def test_pages_never_sent_are_said(tmp_path):
    # The last channel never connects: nothing tells the receiver it existed, but its pages
    # were never sent, and the capture says so.
    scenario = S.sample("7.2")
    log: list = []
    manifest, _, _ = await capture(tmp_path, [scenario.main, scenario.channels[0]], log=log)
    never = {b["name"]: b["pages_never_sent"] for b in manifest["blocks"]}
    assert never["pc.ram"] > 0
    assert any(line.startswith(f"warning: {never['pc.ram']} pages of RAM block 'pc.ram' were "
                               "never sent") for line in log), log


def layout_9_1(return_path: bool = False) -> S.Scenario:
    """QEMU 9.1/9.2: the completion ends with a SYNC on every channel and no FLUSH (the 9.0
    layout with its last FLUSH taken out)."""
    scenario = S.build(S.sample_epochs("9.0"), "9.0", return_path=return_path)
    tail = S.flush() + S.eos() + S.footer(S.RAM_SECTION)
    at = scenario.main.rfind(tail)
    scenario.main = (scenario.main[:at] + S.eos() + S.footer(S.RAM_SECTION) +
                     scenario.main[at + len(tail):])
    return scenario


def sync_ends(stream: bytes) -> list[int]:
    """Where each SYNC packet of a multifd channel's stream ends."""
    at, ends = 64, []
    while at < len(stream):
        flags, normal = struct.unpack_from(">I", stream, at + 8)[0], \
            struct.unpack_from(">I", stream, at + 16)[0]
        at += S.PACKET_HEADER + normal * S.PAGE
        if flags & S.F_SYNC:
            ends.append(at)
    return ends


async def test_the_9_1_completion_sync_is_awaited_with_the_return_path(tmp_path):
    # QEMU keeps every connection open until the SHUT: the last epoch's pages, sent late,
    # must be in before the directory is published.
    scenario = layout_9_1(return_path=True)
    manifest, source, _ = await capture(tmp_path, [scenario.main, *scenario.channels],
                                        [0.0, 0.5, 0.5], replies=16)
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert {c["syncs"] for c in manifest["multifd"]} == {manifest["sync_points"] + 1}
    assert source.received.endswith(bytes.fromhex("0001000400000000"))


async def test_a_channel_cut_at_a_packet_boundary_is_an_error(tmp_path):
    # 9.1: its last SYNC has no sync point to wait at, so only the count tells it was cut.
    scenario = layout_9_1()
    cut = scenario.channels[1][:sync_ends(scenario.channels[1])[-2]]
    with pytest.raises(E.RemoteProtocolError, match="different numbers of SYNCs.*cut short"):
        await capture(tmp_path, [scenario.main, scenario.channels[0], cut])
    assert nothing_left(tmp_path)


async def test_a_silent_stranger_while_the_channels_are_counted_breaks_nothing(tmp_path):
    # The count waits for connections still being greeted (bounded); meanwhile the channels
    # parked at their first SYNC must not take the main channel for stalled.
    scenario = S.sample("7.2")
    log: list = []
    manifest, _, _ = await capture(tmp_path, [scenario.main, *scenario.channels, None],
                                   [0.0, 0.0, 0.0, 0.0], log=log,
                                   timeouts=Timeouts(connect=2, handshake=6, idle=1))
    assert read_blocks(tmp_path, scenario) == scenario.expected
    assert manifest["channels"] == 2


def test_a_failed_capture_in_json_says_only_what_failed(tmp_path):
    import json

    from conftest import start_receiver
    recv = start_receiver("--qemu", str(tmp_path / "guest"), "--json")
    with socket.create_connection((recv.host, recv.port)) as sock:
        sock.sendall(S.header(version=2))
        code, stdout, stderr = recv.finish(timeout=30)
    assert code == 1, stderr
    assert json.loads(stdout) == {"side": "receiver", "ok": False, "error": (
        "main channel, data: stream version 2 (this receiver reads version 3, "
        "QEMU 2.x and later)")}
    assert stderr.strip().splitlines()[-1].endswith("stream version 2 (this receiver reads "
                                                    "version 3, QEMU 2.x and later)")
    assert os.listdir(tmp_path) == []
