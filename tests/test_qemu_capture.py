"""multifd-recv --qemu DIR against a real, unmodified QEMU source (qemu-system-x86_64; KVM
where /dev/kvm works, TCG otherwise).

The oracle is always the source: its RAM read back by pmemsave once the migration is over
(dump_block), the image it loaded, and `info ramblock`; never a destination QEMU. A live guest
is migrated through a proxy that delivers one multifd channel after all the others, chosen for
its copies of pages sent again later on other channels: a receiver that did not keep QEMU's
sync rule would apply them last and differ from the source. Its recorded streams are checked
once more offline: replayed epoch by epoch they rebuild the same RAM, and replayed in reverse
order they do not.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import socket
import subprocess
import threading
import time

import pytest
import xxhash

from conftest import (GUEST_IMAGE_ADDR, assert_each_dropped, cli, qemu_tools, start_guest,
                      start_receiver, strangers_during_a_migration, wait_until, written_into)
from multifd.qemu import wire

# QEMU is installed by `make qemu` (a dependency of `make test`): missing, these fail.
pytestmark = pytest.mark.timeout(60)

PAGE = qemu_tools.PAGE
MIB = 1 << 20
ZERO_PAGE = bytes(PAGE)
# The boot-sector guest's loop: the first byte of each of these pages, incremented for ever.
LOOP_BASE, LOOP_PAGES = 0x10000, 128


# ------------------------------------------------------------------ comparing big files

def differing_pages(a, b, ranges) -> list[int]:
    """Offsets of the pages that differ between the buffers `a` and `b` within `ranges`
    ((offset, length) pairs); compared a MiB at a time, so a difference is named by page
    (an assert on two 256 MiB byte strings would have pytest diff them)."""
    found = []
    for start, length in ranges:
        for chunk in range(start, start + length, MIB):
            end = min(chunk + MIB, start + length)
            if a[chunk:end] != b[chunk:end]:
                found += [page for page in range(chunk, end, PAGE)
                          if a[page:page + PAGE] != b[page:page + PAGE]]
    return found


def mapped(path):
    """A file's bytes, read-only and without copying them."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


def assert_digests(path, block: dict) -> None:
    """The block's manifest entry gives its file's XXH3-128 (as xxh128sum prints it)."""
    with mapped(path) as data:
        assert xxhash.xxh3_128_hexdigest(data) == block["xxh3_128"], block["name"]


def leftovers(directory) -> list[str]:
    """The hidden directories a capture builds its output in (`.DIR.*.part`)."""
    return [name for name in os.listdir(directory) if name.endswith(".part")]


# ------------------------------------------------------------------ one capture

def capture(tmp_path, guest, *recv_args, **migration):
    """Migrate `guest` into a new receiver writing tmp_path/vm; both must succeed.
    Returns (output directory, the receiver's --json report)."""
    out = tmp_path / "vm"
    recv = start_receiver("--qemu", str(out), "--json", *recv_args)
    guest.migrate(f"tcp:{recv.address}", **migration)
    guest.wait_status("completed", timeout=30)
    code, stdout, stderr = recv.finish(timeout=30)
    assert code == 0, stderr
    return out, json.loads(stdout)


def assert_pc_ram_is_the_source(guest, out, tmp_path, whole: bool = False) -> None:
    """The captured pc.ram equals the source's, wherever the source can read it back
    (`whole`: everywhere, as once the firmware has run)."""
    source = tmp_path / "source-pc.ram"
    ranges = guest.dump_block("pc.ram", source)
    size = guest.ramblocks()["pc.ram"]
    assert sum(length for _, length in ranges) >= size - 0x40000  # at most the ROM hole
    if whole:
        assert ranges == [(0, size)]
    with mapped(out / "ram/pc.ram") as got, mapped(source) as want:
        wrong = differing_pages(got, want, ranges)
    os.unlink(source)
    assert not wrong, f"{len(wrong)} pages of pc.ram differ from the source's, the first " \
                      f"at {wrong[0]:#x}"


def assert_image_in_pc_ram(out, image: str) -> None:
    size = os.path.getsize(image)
    with mapped(out / "ram/pc.ram") as ram, mapped(image) as want:
        wrong = differing_pages(ram[GUEST_IMAGE_ADDR:GUEST_IMAGE_ADDR + size], want,
                                [(0, size)])
    assert not wrong, f"{len(wrong)} pages of the loaded image differ, the first at " \
                      f"image offset {wrong[0]:#x}"


def check_capture(tmp_path, out, report, guest, *, channels: int, image: str | None = None,
                  whole: bool = False) -> dict:
    """What every successful capture must show; returns its manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert report == {**manifest, "ok": True, "side": "receiver"}
    assert manifest["output"] == str(out)
    assert sorted(os.listdir(out)) == ["device-state.bin", "manifest.json", "ram",
                                       "vmdescription.json"]
    assert os.path.getsize(out / "device-state.bin") == manifest["device_state"]["bytes"] > 0
    json.loads((out / "vmdescription.json").read_text())
    assert [(b["name"], b["bytes"]) for b in manifest["blocks"]] == \
        list(guest.ramblocks().items())
    assert sorted(os.listdir(out / "ram")) == sorted(
        os.path.basename(b["file"]) for b in manifest["blocks"])
    for block in manifest["blocks"]:
        assert block["pages_never_sent"] == 0, block
        assert os.path.getsize(out / block["file"]) == block["bytes"]
        assert_digests(out / block["file"], block)
    assert manifest["machine"].startswith("pc-i440fx-")
    assert manifest["channels"] == len(manifest["multifd"]) == channels
    assert [c["channel"] for c in manifest["multifd"]] == list(range(channels))
    # QEMU 7.2: one SYNC per channel at the end of every RAM section
    assert manifest["iterations"] == manifest["sync_points"] >= 2
    assert all(c["syncs"] == manifest["iterations"] for c in manifest["multifd"]), \
        manifest["multifd"]
    assert_pc_ram_is_the_source(guest, out, tmp_path, whole)
    if image is not None:
        assert_image_in_pc_ram(out, image)
    assert not leftovers(tmp_path)
    return manifest


def error_lines(stderr: str) -> list[str]:
    """What the receiver said besides the address it listened on."""
    return [line for line in stderr.splitlines() if " listening on " not in line]


def assert_failed_cleanly(code: int, stderr: str, tmp_path) -> str:
    """Exit 1, one line saying why, nothing left where the output was to go; the line."""
    lines = error_lines(stderr)
    assert code == 1 and len(lines) == 1, (code, stderr)
    assert lines[0].startswith("multifd-recv: receiver: "), stderr
    assert os.listdir(tmp_path) == [], stderr
    return lines[0]


# ------------------------------------------------------------------ a paused guest

@pytest.mark.parametrize("channels", [1, 2, 4, 16])
def test_multifd_channels(tmp_path, guest_image, channels):
    guest = start_guest(image=guest_image)
    out, report = capture(tmp_path, guest, channels=channels)
    manifest = check_capture(tmp_path, out, report, guest, channels=channels,
                             image=guest_image)
    assert manifest["main"]["pages"] == 0  # 7.2: every non-zero page goes to multifd
    assert sum(c["pages"] for c in manifest["multifd"]) > 0
    assert manifest["main"]["zero_pages"] > 0  # 7.2: zero pages on the main channel
    assert (manifest["compression"], manifest["tls"], manifest["return_path"]) == \
        ("none", False, False)


def test_multifd_off_pages_on_the_main_channel(tmp_path, guest_image):
    guest = start_guest(image=guest_image)
    out, report = capture(tmp_path, guest, multifd=False)
    manifest = check_capture(tmp_path, out, report, guest, channels=0, image=guest_image)
    assert manifest["main"]["pages"] >= os.path.getsize(guest_image) // PAGE // 4
    assert manifest["main"]["zero_pages"] > 0


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_multifd_compression(tmp_path, guest_image, compression):
    guest = start_guest(image=guest_image)
    out, report = capture(tmp_path, guest, channels=2, compression=compression)
    manifest = check_capture(tmp_path, out, report, guest, channels=2, image=guest_image)
    assert manifest["compression"] == compression


def test_tls(tmp_path, guest_image, pki):
    guest = start_guest(image=guest_image, tls_dir=pki.both)
    out, report = capture(tmp_path, guest, "--tls", pki.both, channels=2, tls=True)
    manifest = check_capture(tmp_path, out, report, guest, channels=2, image=guest_image)
    assert manifest["tls"] is True


def test_return_path_completes_on_our_shut(tmp_path, guest_image):
    # Without the receiver's SHUT, QEMU would wait and then mark the migration failed:
    # capture() waits for "completed".
    guest = start_guest(image=guest_image)
    out, report = capture(tmp_path, guest, channels=2, return_path=True)
    manifest = check_capture(tmp_path, out, report, guest, channels=2, image=guest_image)
    assert manifest["return_path"] is True


# ------------------------------------------------------------------ a live guest

class _Connection:
    """One connection through the proxy: what the source sent on it, and how much of that
    went on to the destination."""

    def __init__(self, source: socket.socket, dest: socket.socket) -> None:
        self.source, self.dest = source, dest
        self.stream = bytearray()  # everything the source sent
        self.ended = False  # the source has ended it (or it broke)
        self.sent = 0  # bytes of `stream` forwarded to the destination
        self.released = False  # forwarded as far as it goes, not only its setup


class LateChannelProxy:
    """A TCP proxy on 127.0.0.1 in front of `target`, for one QEMU 7.2 migration with multifd,
    that delivers one multifd channel after all the others.

    What the source sends on each connection is read at once, whatever the destination does
    (QEMU is never slowed by the proxy), and kept in `streams`, in order of arrival. The main
    channel is forwarded as it comes; a multifd channel, its init and its first packet (the
    setup's SYNC, with no pages: so the destination can count the channels at its first sync
    point). The rest of every multifd channel is held until the source has ended all the
    connections. Then `choose_last(streams)` names one multifd channel (its index in
    `streams`, kept in `last`); the others are forwarded whole, and that one once nothing more
    of theirs has gone out for SETTLE seconds: they are all sent and had time to be read, or
    the destination takes no more of them. A receiver that keeps QEMU's sync rule takes each
    of the others up to its second SYNC and waits there for the last one, then applies every
    epoch in order; one that ignores the rule applies the last channel's pages after all the
    others, its stale copies of pages sent again later included."""

    SETTLE = 0.5
    CHUNK = 1 << 18

    def __init__(self, target: tuple[str, int], choose_last) -> None:
        self.target = target
        self.choose_last = choose_last
        self.streams: list[bytearray] = []
        self.last: int | None = None
        self.errors: list[BaseException] = []
        self._connections: list[_Connection] = []
        self._changed = threading.Condition()
        self._progress = 0.0  # when a forwarded chunk last went out
        self._threads: list[threading.Thread] = []
        self._closed = False  # accepting no more connections
        self._aborted = False  # forwarding no more
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self._arrivals = threading.Lock()  # held while taking new connections
        self.port = self._listener.getsockname()[1]
        self._start(self._accept)
        self._start(self._release)

    def _start(self, target, *args) -> None:
        def run():
            try:
                target(*args)
            except Exception as exc:  # raised again by close()
                self.errors.append(exc)
                self.abort()
        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                select.select([self._listener], [], [], 0.05)
                self._connect_arrivals()
            except (OSError, ValueError):
                if self._closed:
                    return
                raise

    def _connect_arrivals(self) -> None:
        """Connect every connection the source has made so far on to the destination. Each
        reader calls this before it keeps what it read: a connection the source made before
        it sent some bytes reaches the destination before them, as without the proxy (QEMU
        connects every multifd channel before the main channel's first sync point, where
        the receiver counts them)."""
        with self._arrivals:
            while not self._closed:
                try:
                    source, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                source.settimeout(None)
                dest = socket.create_connection(self.target, timeout=10)
                dest.settimeout(None)
                conn = _Connection(source, dest)
                with self._changed:
                    self._connections.append(conn)
                    self.streams.append(conn.stream)
                self._start(self._read, conn)
                self._start(self._forward, conn)
                self._start(self._backward, conn)

    def _read(self, conn: _Connection) -> None:
        """Everything the source sends, as it comes."""
        while True:
            try:
                data = conn.source.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                break
            self._connect_arrivals()
            with self._changed:
                conn.stream += data
                self._changed.notify_all()
        with self._changed:
            conn.ended = True
            self._changed.notify_all()

    def _limit(self, conn: _Connection) -> int:
        """How far `conn` may be forwarded now."""
        stream = conn.stream
        if conn.released or stream.startswith(wire.QEVM):
            return len(stream)
        setup = wire.INIT.size + wire.PACKET_HEADER
        return setup if len(stream) >= setup else 0

    def _forward(self, conn: _Connection) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._aborted or conn.sent < self._limit(conn)
                                       or conn.ended and conn.sent == len(conn.stream))
                if self._aborted:
                    return
                chunk = bytes(conn.stream[conn.sent:min(self._limit(conn),
                                                        conn.sent + self.CHUNK)])
            try:
                if not chunk:  # all of it, and the source has ended it
                    conn.dest.shutdown(socket.SHUT_WR)
                    return
                conn.dest.sendall(chunk)
            except OSError:  # a reset (_backward passes it on)
                return
            with self._changed:
                conn.sent += len(chunk)
                self._progress = time.monotonic()
                self._changed.notify_all()

    def _backward(self, conn: _Connection) -> None:
        """Whatever the destination sends back (nothing, without the return path)."""
        try:
            while data := conn.dest.recv(1 << 16):
                conn.source.sendall(data)
            conn.source.shutdown(socket.SHUT_WR)
        except OSError:  # a reset: pass it on to both ends
            for sock in (conn.source, conn.dest):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _release(self) -> None:
        def source_done():
            conns = self._connections
            return any(c.stream.startswith(wire.QEVM) for c in conns) and \
                all(c.ended for c in conns)
        with self._changed:
            self._changed.wait_for(lambda: self._aborted or source_done())
            if self._aborted:
                return
            streams = list(self.streams)
        try:
            self.last = self.choose_last(streams)
        finally:  # whatever the choice did, nothing stays held
            with self._changed:
                for i, conn in enumerate(self._connections):
                    conn.released = i != self.last
                self._progress = time.monotonic()
                self._changed.notify_all()
        with self._changed:
            while not self._aborted and time.monotonic() < self._progress + self.SETTLE:
                self._changed.wait(self._progress + self.SETTLE - time.monotonic())
            for conn in self._connections:
                conn.released = True
            self._changed.notify_all()

    def close(self, timeout: float = 10) -> None:
        """Stop accepting and wait until every connection has ended in both directions;
        raises what went wrong in the proxy, if anything did."""
        self._closed = True
        for thread in self._threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self._threads), "proxy still busy"
        for sock in self._sockets():
            sock.close()
        if self.errors:
            raise self.errors[0]

    def abort(self) -> None:
        self._closed = self._aborted = True
        with self._changed:
            self._changed.notify_all()
        for sock in self._sockets():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _sockets(self) -> list[socket.socket]:
        with self._changed:
            return [self._listener, *(sock for conn in self._connections
                                      for sock in (conn.source, conn.dest))]


def main_epochs(stream) -> tuple[dict[str, int], list[list[tuple[str, int, bytes | None]]]]:
    """A recorded QEMU 7.2 main channel: the RAM blocks it announced, and its pages cut into
    epochs, (block, offset, data or None for a zero page) before its e+1-th EndOfSection in
    epochs[e]."""
    epochs: list[list] = [[]]
    parser, blocks = wire.MainStream(), {}
    parser.feed(bytes(stream))
    while (event := parser.next_event()) is not wire.NEED_DATA:
        if isinstance(event, wire.RamBlocks):
            blocks = dict(event.blocks)
        elif isinstance(event, wire.ZeroPages):
            epochs[-1] += [(event.block, offset, None) for offset in event.offsets]
        elif isinstance(event, wire.Page):
            epochs[-1].append((event.block, event.offset, event.data))
        elif isinstance(event, wire.EndOfSection):
            epochs.append([])
    assert parser.complete and parser.flushes == 0  # a whole 7.2 stream
    return blocks, epochs


def channel_epochs(stream, blocks) -> list[list[tuple[str, int, bytes | None]]]:
    """A recorded multifd channel's pages, cut into epochs: epochs[e] up to and including its
    e+1-th SYNC."""
    wire.decode_init(stream[:wire.INIT.size])
    epochs: list[list] = [[]]
    at = wire.INIT.size
    while at < len(stream):
        packet = wire.decode_packet(stream[at:at + wire.PACKET_HEADER], blocks)
        at += wire.PACKET_HEADER
        assert packet.compression == "none"
        epochs[-1] += [(packet.block, offset, bytes(stream[at + i * PAGE:at + (i + 1) * PAGE]))
                       for i, offset in enumerate(packet.normal)]
        epochs[-1] += [(packet.block, offset, None) for offset in packet.zero]
        at += packet.payload_size
        if packet.sync:
            epochs.append([])
    return epochs


def main_stream(streams) -> bytes:
    return next(bytes(s) for s in streams if s.startswith(wire.QEVM))


def epochs_of(streams) -> list[list[tuple[str, int, bytes | None]]]:
    """The pages of a recorded QEMU 7.2 migration, cut into its epochs: epochs[e] holds those
    of the main channel before its e+1-th EndOfSection and of every multifd channel up to and
    including its e+1-th SYNC."""
    blocks, epochs = main_epochs(main_stream(streams))
    for stream in streams:
        if not stream.startswith(wire.QEVM):
            for e, pages in enumerate(channel_epochs(stream, blocks)):
                epochs += [[] for _ in range(e + 1 - len(epochs))]
                epochs[e] += pages
    while epochs and not epochs[-1]:
        epochs.pop()
    return epochs


def replay(epochs) -> dict[tuple[str, int], bytes | None]:
    """Apply the epochs in the order given: the last copy of each page wins."""
    ram: dict = {}
    for epoch in epochs:
        for block, offset, data in epoch:
            ram[block, offset] = data
    return ram


def stale_if_last(streams) -> dict[int, list[tuple[str, int]]]:
    """For each multifd channel (by its index in `streams`): the pages that applying its pages
    after all the others' would get wrong, those whose last copy on it is not their last
    copy in the migration."""
    blocks = main_epochs(main_stream(streams))[0]
    final = replay(epochs_of(streams))
    return {i: [page for page, data in replay(channel_epochs(stream, blocks)).items()
                if (data or ZERO_PAGE) != (final[page] or ZERO_PAGE)]
            for i, stream in enumerate(streams) if not stream.startswith(wire.QEVM)}


def most_stale_if_last(streams) -> int:
    """The multifd channel whose late delivery would get the most pages wrong."""
    stale = stale_if_last(streams)
    return max(stale, key=lambda i: len(stale[i]))


def pages_differing(ram: dict, out, manifest: dict) -> list[tuple[str, int]]:
    """The pages of a replay that differ from the capture in `out`, and the pages of the
    capture that the replay never set."""
    wrong = []
    for block in manifest["blocks"]:
        name, pages = block["name"], range(0, block["bytes"], PAGE)
        with mapped(out / block["file"]) as got:
            wrong += [(name, offset) for offset in pages if (name, offset) not in ram or
                      got[offset:offset + PAGE] != (ram[name, offset] or ZERO_PAGE)]
    return wrong


def dirty_syncs(guest) -> int:
    """How many times the migration synced the dirty bitmap: once at its setup, then at the
    end of each pass over RAM."""
    return guest.query_migrate().get("ram", {}).get("dirty-sync-count", 0)


def test_live_guest_dirtying_memory(tmp_path):
    qemu_tools.write_boot_disk(tmp_path / "boot.img", LOOP_PAGES, LOOP_BASE)
    guest = start_guest(boot_disk=tmp_path / "boot.img")
    guest.cont()

    def loop_firsts() -> bytes:
        guest.pmemsave(LOOP_BASE, LOOP_PAGES * PAGE, tmp_path / "loop")
        return (tmp_path / "loop").read_bytes()[::PAGE]
    first = loop_firsts()
    wait_until(lambda: loop_firsts() != first, 30, "the boot sector's loop running",
               interval=0.05)
    os.unlink(tmp_path / "loop")

    out = tmp_path / "vm"
    # The receiver waits at its second sync point for the multifd channels the proxy holds
    # until QEMU is done: its idle timeout must outlast the whole migration.
    recv = start_receiver("--qemu", str(out), "--json", "--idle-timeout", "30")
    proxy = LateChannelProxy((recv.host, recv.port), most_stale_if_last)
    try:
        # Slowly (4 MB/s: a multifd packet of 128 pages about every 100 ms, each RAM
        # section cut short by the rate limit), and with a downtime limit of 1 ms, which
        # QEMU cannot meet while the loop's pages are dirty: it sends them again in pass
        # after pass over RAM, on whichever channel is next in turn, until the limit is
        # QEMU's default again. So their copies are spread over the channels, and the
        # channels without their last copies have older ones.
        guest.cmd("migrate-set-parameters", **{"downtime-limit": 1})
        guest.migrate(f"tcp:127.0.0.1:{proxy.port}", channels=4, max_bandwidth=4e6)
        wait_until(lambda: dirty_syncs(guest) >= 5, 20,
                   "the loop's pages sent again in three passes", interval=0.01)
        guest.cmd("migrate-set-parameters", **{"downtime-limit": 300})
        guest.wait_status("completed", timeout=30)
        code, stdout, stderr = recv.finish(timeout=30)
        proxy.close()
    finally:
        proxy.abort()
    assert code == 0, stderr
    assert guest.query_migrate()["status"] == "completed"  # and the source is stopped
    assert not guest.cmd("query-status")["running"]
    manifest = check_capture(tmp_path, out, json.loads(stdout), guest, channels=4,
                             whole=True)
    assert manifest["iterations"] > 2

    # Offline: the recorded streams, epoch by epoch.
    assert len(proxy.streams) == 5
    epochs = epochs_of(proxy.streams)
    assert len(epochs) <= manifest["iterations"]  # no page after the last sync point
    loop_offsets = {LOOP_BASE + i * PAGE for i in range(LOOP_PAGES)}
    sent_in: dict[int, set[int]] = {offset: set() for offset in loop_offsets}
    for e, pages in enumerate(epochs):
        for block, offset, _ in pages:
            if block == "pc.ram" and offset in sent_in:
                sent_in[offset].add(e)
    assert all(len(epochs_seen) >= 3 for epochs_seen in sent_in.values()), sent_in

    assert pages_differing(replay(epochs), out, manifest) == []
    wrong = pages_differing(replay(reversed(epochs)), out, manifest)
    assert wrong, "applying the epochs in reverse order gave the same RAM: this guest " \
                  "does not test the order in which pages are applied"
    # The channel the proxy delivered last had stale copies: a receiver that did not wait
    # for it at its sync points would have applied them over the later ones.
    stale = stale_if_last(proxy.streams)
    assert stale[proxy.last], "no multifd channel carried a page that another one sent " \
        "again later: the late channel did not test that the receiver waits at its sync points"


# ------------------------------------------------------------------ a migration that fails

def test_migrate_cancel_halfway(tmp_path, guest_image):
    guest = start_guest(image=guest_image)
    recv = start_receiver("--qemu", str(tmp_path / "vm"))
    guest.migrate(f"tcp:{recv.address}", channels=4, max_bandwidth=10e6)  # ~3 s
    wait_until(lambda: written_into(recv.proc, tmp_path), 20, "the migration under way")
    guest.cancel()
    guest.wait_status("cancelled", timeout=20)
    code, _, stderr = recv.finish(timeout=20)
    assert_failed_cleanly(code, stderr, tmp_path)


def test_source_killed_halfway(tmp_path, guest_image):
    guest = start_guest(image=guest_image)
    recv = start_receiver("--qemu", str(tmp_path / "vm"))
    guest.migrate(f"tcp:{recv.address}", channels=4, max_bandwidth=10e6)
    wait_until(lambda: written_into(recv.proc, tmp_path), 20, "the migration under way")
    os.kill(guest.pid, signal.SIGKILL)
    guest.close()
    code, _, stderr = recv.finish(timeout=20)
    assert_failed_cleanly(code, stderr, tmp_path)


def test_strangers_mid_migration_are_dropped(tmp_path, guest_image):
    guest = start_guest(image=guest_image)
    out = tmp_path / "vm"
    recv = start_receiver("--qemu", str(out), "--json", "--handshake-timeout", "1")
    guest.migrate(f"tcp:{recv.address}", channels=2, max_bandwidth=20e6)  # ~1.5 s
    socks: list[socket.socket] = []

    def strangers():
        garbage = socket.create_connection((recv.host, recv.port))
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
        silent = socket.create_connection((recv.host, recv.port))
        socks.extend([garbage, silent])
        return [(garbage.getsockname()[1], r"first bytes 47455420"),
                (silent.getsockname()[1], r"no first bytes within 1s")]
    try:
        # QEMU is stopped (SIGSTOP) while they are greeted: they come mid-migration
        met = strangers_during_a_migration(recv, guest.proc, tmp_path, strangers)
    finally:
        for sock in socks:
            sock.close()
    guest.wait_status("completed", timeout=30)
    code, stdout, stderr = recv.finish(timeout=30)
    assert code == 0, stderr
    assert_each_dropped(stderr, met)
    check_capture(tmp_path, out, json.loads(stdout), guest, channels=2, image=guest_image)


# ------------------------------------------------------------------ what it cannot honour

@pytest.mark.parametrize("multifd", [True, False], ids=["multifd", "multifd-off"])
def test_postcopy_is_refused(tmp_path, multifd):
    # QEMU 7.2 accepts postcopy-ram together with multifd; it announces it on the main
    # channel (POSTCOPY_ADVISE) before any RAM, either way.
    guest = start_guest()
    recv = start_receiver("--qemu", str(tmp_path / "vm"))
    guest.set_migration(channels=2, multifd=multifd)
    guest.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "postcopy-ram", "state": True}])
    guest.cmd("migrate", uri=f"tcp:{recv.address}")
    code, _, stderr = recv.finish(timeout=20)
    assert "postcopy" in assert_failed_cleanly(code, stderr, tmp_path)


def test_old_compress_capability_is_refused(tmp_path, guest_image):
    # QEMU 7.2 refuses compress together with multifd ("Multifd is not compatible with
    # compress"): it is tried with multifd off, where its pages go on the main channel.
    guest = start_guest(image=guest_image)
    recv = start_receiver("--qemu", str(tmp_path / "vm"))
    guest.set_migration(multifd=False)
    guest.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "compress", "state": True}])
    guest.cmd("migrate", uri=f"tcp:{recv.address}")
    code, _, stderr = recv.finish(timeout=20)
    assert "compress" in assert_failed_cleanly(code, stderr, tmp_path)


# ------------------------------------------------------------------ usage

def run_receiver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cli("recv"), "--listen", "127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=20)


def test_usage_output_directory_not_empty(tmp_path):
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "keep").write_bytes(b"mine")
    done = run_receiver("--qemu", str(tmp_path / "vm"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "not empty" in done.stderr, done.stderr
    assert "listening" not in done.stderr  # refused before any network wait
    assert os.listdir(tmp_path / "vm") == ["keep"] and os.listdir(tmp_path) == ["vm"]


def test_usage_qemu_and_output_exclude_each_other(tmp_path):
    done = run_receiver("--qemu", str(tmp_path / "vm"), str(tmp_path / "out.img"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "exclude each other" in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []
