"""QEMU's migration stream as a destination reads it (multifd/qemu/wire.py), against the
independent encoder of qemu_streams.py: every layout from 7.2 to 10.x fed whole, byte by
byte and in random pieces; the 7.2 quirks; the end of the stream and its truncations; every
typed error; hostile bytes; purity.

All pure: no event loop, no sockets.
"""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
import zlib

import pytest
from hypothesis import given, strategies as st

import qemu_streams as Q
from multifd import errors as E
from multifd.qemu import wire as W
from test_wire import EDITS, FORBIDDEN, HYPO, ROOT, _imported_modules, _mutate, assert_error

PAGE = Q.PAGE
QEMU_WIRE_PY = ROOT / "multifd" / "qemu" / "wire.py"
FEEDS = ("whole", "bytes", "random")


# ------------------------------------------------------------------------------------ helpers


def records_of(events) -> list[tuple]:
    """The decoder's events as qemu_streams' records (a ZeroPages is one record per page:
    how zero records group into events depends on how the bytes arrived)."""
    out: list[tuple] = []
    for ev in events:
        match ev:
            case W.Configuration():
                out.append(("configuration", ev.machine, ev.capabilities, ev.uuid))
            case W.Command():
                out.append(("command", ev.command, ev.data))
            case W.RamBlocks():
                out.append(("blocks", ev.blocks))
            case W.ZeroPages():
                assert ev.offsets, ev
                out += [("zero", ev.block, offset) for offset in ev.offsets]
            case W.Page():
                out.append(("page", ev.block, ev.offset, ev.data))
            case W.EndOfSection():
                out.append(("eos",))
            case W.Flush():
                out.append(("flush",))
            case W.End():
                out.append(("end", ev.device_state, ev.vmdescription))
            case _:
                raise AssertionError(f"an event of unknown type: {ev!r}")
    return out


def pieces(data: bytes, feed: str, seed: int = 0):
    """`data` whole, one byte at a time, or in random pieces (mostly small, some large)."""
    if feed == "whole":
        yield data
        return
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        n = 1 if feed == "bytes" else rng.choice([1, 2, 3, 5, 8, 9, 13, 100, 4097, 9000])
        yield data[at:at + n]
        at += n


def pull(stream: W.MainStream, events: list) -> list:
    """Every event the bytes fed so far hold, appended to `events`."""
    while (ev := stream.next_event()) is not W.NEED_DATA:
        events.append(ev)
    return events


def parse(data: bytes, feed: str = "whole", seed: int = 0) -> list[tuple]:
    """The records of a whole main channel: fed as `feed` says, then its end. The End is the
    last event (or comes from end_of_stream() alone, without VMDESCRIPTION)."""
    stream, events = W.MainStream(), []
    for piece in pieces(data, feed, seed):
        stream.feed(piece)
        pull(stream, events)
    end = stream.end_of_stream()
    if events and isinstance(events[-1], W.End):
        assert events[-1] == end
        assert stream.complete
    else:
        events.append(end)
    assert all(not isinstance(ev, W.End) for ev in events[:-1])
    return records_of(events)


def read_channel(data: bytes, blocks: dict[str, int]):
    """A multifd channel as QEMU's destination reads it: the init, then each packet's
    header and payload (zlib: one stream for the whole channel). Each packet comes as
    (Packet, its pages' data, its raw header)."""
    init = W.decode_init(data[:64])
    inflate = zlib.decompressobj()
    at, packets = 64, []
    while at < len(data):
        raw = data[at:at + W.PACKET_HEADER]
        packet = W.decode_packet(raw, blocks)
        at += W.PACKET_HEADER
        payload = data[at:at + packet.payload_size]
        assert len(payload) == packet.payload_size, "the channel ends inside a payload"
        at += packet.payload_size
        pages = inflate.decompress(payload) if packet.compression == "zlib" else payload
        assert len(pages) == PAGE * len(packet.normal)
        packets.append((packet, pages, raw))
    return init, packets


def sent_of(packets) -> list[Q.Sent]:
    return [Q.Sent(p.flags, p.block, p.normal, p.zero, pages) for p, pages, _ in packets]


def rebuild(sc: Q.Scenario, reverse: bool = False) -> dict[str, bytes]:
    """The blocks as QEMU's destination fills them: epoch by epoch. An epoch of a channel
    ends with its SYNC packet; one of the main channel with EOS (7.2) or MULTIFD_FLUSH (8.1
    and later); whatever follows the last is the final epoch. `reverse` applies the epochs
    backwards (a control: it must give another result)."""
    boundary = ("eos",) if sc.layout == "7.2" else ("flush",)
    main: list[list] = [[]]
    for record in parse(sc.main):
        if record == boundary:
            main.append([])
        elif record[0] in ("zero", "page"):
            main[-1].append(record)
    channels = []
    for data in sc.channels:
        _, packets = read_channel(data, sc.blocks)
        epochs: list[list] = [[]]
        for packet, pages, _ in packets:
            epochs[-1].append((packet, pages))
            if packet.sync:
                epochs.append([])
        assert len(epochs) == len(main), "as many SYNCs on every channel as syncs on main"
        channels.append(epochs)
    memory = {name: bytearray(length) for name, length in sc.blocks.items()}
    order = range(len(main))
    for e in reversed(order) if reverse else order:
        for kind, block, offset, *data in main[e]:
            memory[block][offset:offset + PAGE] = data[0] if kind == "page" else bytes(PAGE)
        for epochs in channels:
            for packet, pages in epochs[e]:
                for i, offset in enumerate(packet.normal):
                    memory[packet.block][offset:offset + PAGE] = pages[i * PAGE:(i + 1) * PAGE]
                for offset in packet.zero:
                    memory[packet.block][offset:offset + PAGE] = bytes(PAGE)
    return {name: bytes(m) for name, m in memory.items()}


def drain(data: bytes, chunks=(), end: bool = False) -> list:
    """Feed `data` in pieces of the sizes in `chunks` (then the rest), pulling events."""
    stream, events, at = W.MainStream(), [], 0
    for n in [*chunks, len(data)]:
        stream.feed(data[at:at + n])
        at += n
        pull(stream, events)
    if end:
        events.append(stream.end_of_stream())
    return events


# ------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("feed", FEEDS)
@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_each_layout_parses_to_its_records(layout, feed):
    sc = Q.sample(layout, return_path=True)
    assert parse(sc.main, feed, seed=7) == sc.records


def test_the_layouts_differ_as_documented():
    """The encoder's layouts, in the terms a receiver counts: EOS, FLUSH and SYNC."""
    counts = {}
    for layout in Q.LAYOUTS:
        sc = Q.sample(layout)
        kinds = [r[0] for r in sc.records]
        syncs = [sum(s.flags & Q.F_SYNC != 0 for s in sent) for sent in sc.sent]
        zero_in_packets = any(s.zero for sent in sc.sent for s in sent)
        counts[layout] = (kinds.count("eos"), kinds.count("flush"), syncs, zero_in_packets,
                          "zero" in kinds)
    # 3 rounds: 7.2 = setup + 3 sections, each EOS with its SYNC; 8.1+: one more iteration
    # (EOS) per round, a FLUSH with SYNC at setup and at each round's end; 10.x: none at the
    # completion.
    assert counts == {"7.2": (4, 0, [4, 4], False, True), "8.1": (5, 4, [4, 4], False, True),
                      "9.0": (5, 4, [4, 4], True, False), "10.x": (5, 3, [3, 3], True, False)}


@pytest.mark.parametrize("feed", FEEDS)
def test_multifd_off_everything_on_main(feed):
    sc = Q.sample("7.2", channels=0)
    records = parse(sc.main, feed, seed=3)
    assert records == sc.records
    assert {r[0] for r in records} >= {"page", "zero"} and not sc.channels
    assert rebuild(sc) == sc.expected


@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_the_block_named_on_every_record(layout):
    sc = Q.sample(layout, use_continue=False, zero_on_main=True)
    assert parse(sc.main, "random", seed=5) == sc.records


def test_configuration_subsections_and_ignore_shared_block_list():
    uuid = bytes(range(0x30, 0x40))
    caps = ("x-ignore-shared", "events")
    sc = Q.sample("8.1", page_bits=True, capabilities=caps, uuid=uuid)
    for feed in FEEDS:
        records = parse(sc.main, feed, seed=11)
        assert records == sc.records
    assert records[0] == ("configuration", "pc-i440fx-8.1", caps, uuid)
    assert records[1] == ("blocks", tuple(Q.BLOCKS.items()))


def test_commands_of_the_return_path_and_switchover():
    commands = [ev for ev in drain(Q.sample("10.x", return_path=True).main)
                if isinstance(ev, W.Command)]
    assert commands == [W.Command(Q.CMD_OPEN_RETURN_PATH, b""),
                        W.Command(Q.CMD_PING, b"\0\0\0\1"),
                        W.Command(Q.CMD_SWITCHOVER_START, b"")]


def test_zero_records_of_one_block_make_one_event():
    sc = Q.build([Q.Epoch(main=[("pc.ram", o * PAGE, None) for o in range(24)]
                          + [("pc.bios", 0, None), ("pc.bios", PAGE, None)])], "7.2")
    zeros = [ev for ev in drain(sc.main) if isinstance(ev, W.ZeroPages)]
    assert zeros == [W.ZeroPages("pc.ram", tuple(o * PAGE for o in range(24))),
                     W.ZeroPages("pc.bios", (0, PAGE))]


def test_a_zero_record_with_a_fill_byte_is_a_page_of_it():
    sc = Q.build([Q.Epoch(main=[("pc.ram", 0, None), ("pc.ram", PAGE, 0xAA),
                                ("pc.ram", 2 * PAGE, None)])], "7.2")
    records = parse(sc.main)
    assert ("page", "pc.ram", PAGE, b"\xaa" * PAGE) in records
    assert records == sc.records
    assert rebuild(sc)["pc.ram"][PAGE:2 * PAGE] == b"\xaa" * PAGE


def test_the_counters():
    sc = Q.sample("8.1")
    stream = W.MainStream()
    stream.feed(sc.main)
    pull(stream, [])
    kinds = [r[0] for r in sc.records]
    assert stream.complete and stream.bytes == len(sc.main)
    assert (stream.sections, stream.flushes) == (kinds.count("eos"), kinds.count("flush"))
    assert stream.records == {"zero": kinds.count("zero"), "page": kinds.count("page")}
    assert stream.blocks == Q.BLOCKS and stream.ram_section == Q.RAM_SECTION


# ------------------------------------------------------------------------------------ channels


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_each_layout_rebuilds_every_block(layout, compression):
    sc = Q.sample(layout, compression=compression, channels=3)
    for c, data in enumerate(sc.channels):
        init, packets = read_channel(data, sc.blocks)
        assert init == W.ChannelInit(bytes(16), c)
        assert sent_of(packets) == sc.sent[c]
        assert {p.compression for p, *_ in packets if p.normal} == {compression or "none"}
    assert rebuild(sc) == sc.expected
    assert rebuild(sc, reverse=True) != sc.expected  # the order of epochs matters here


def test_the_9_0_zero_page_detection_legacy():
    sc = Q.sample("9.0", zero_on_main=True)
    assert not any(s.zero for sent in sc.sent for s in sent)
    assert rebuild(sc) == sc.expected


@pytest.mark.parametrize("layout", ["7.2", "8.1"])
def test_quirk_sync_with_data_then_a_stale_empty_packet(layout):
    sc = Q.quirk_sync_with_data(layout)
    _, packets = read_channel(sc.channels[0], sc.blocks)
    assert sent_of(packets) == sc.sent[0]
    # setup SYNC; 128 pages with SYNC; the empty packet; then the next epoch's data + SYNC
    (first, _, _), (ride, _, ride_raw), (stale, _, raw) = packets[:3]
    assert first.sync and not first.normal
    assert ride.sync and len(ride.normal) == Q.PACKET_PAGES and ride.payload_size == 0x80000
    assert (stale.flags, stale.block, stale.normal, stale.payload_size) == (0, None, (), 0)
    assert raw[16:24] == b"\0\0\0\0\x00\x08\x00\x00"  # no pages, next_packet_size left over
    assert raw[24:32] == ride_raw[24:32]  # packet_num repeated
    assert raw[64:] == ride_raw[64:]  # name and offsets left over
    assert rebuild(sc) == sc.expected


def test_quirk_the_same_page_twice_in_one_epoch():
    sc = Q.quirk_duplicate_page()
    having = [c for c, data in enumerate(sc.channels)
              for p, *_ in read_channel(data, sc.blocks)[1] if 3 * PAGE in p.normal]
    assert having == [0, 1]
    assert rebuild(sc) == sc.expected


@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_quirk_zero_page_on_main_then_data_on_multifd(layout):
    sc = Q.quirk_zero_then_normal(layout)
    assert rebuild(sc) == sc.expected
    assert rebuild(sc, reverse=True)["pc.ram"] == bytes(4 * PAGE) != sc.expected["pc.ram"]


def test_the_stale_header_of_a_modern_sync_packet_is_ignored():
    sc = Q.sample("10.x")
    stale = 0
    for data in sc.channels:
        for packet, pages, raw in read_channel(data, sc.blocks)[1]:
            if packet.sync:
                assert (packet.block, packet.normal, packet.zero, pages) == (None, (), (), b"")
                stale += raw[64] != 0 and raw[320:328] != bytes(8)
    assert stale  # most carry the name and offsets of the packet before


# ------------------------------------------------------------------------------------ the end


@pytest.mark.parametrize("layout", Q.LAYOUTS)
def test_end_carries_device_state_and_vmdescription(layout):
    sc = Q.sample(layout)
    last = drain(sc.main)[-1]
    assert last == W.End(sc.device_state, sc.vmdescription)
    assert last.device_state.startswith(Q.section_full(0, "timer", version=2))
    assert last.device_state.endswith(Q.footer(3) + b"\x00")
    assert json.loads(last.vmdescription)["page_size"] == PAGE
    assert sc.main.endswith(b"\x00\x06" + len(last.vmdescription).to_bytes(4, "big")
                            + last.vmdescription)


@pytest.mark.parametrize("feed", FEEDS)
def test_without_vmdescription_the_stream_is_not_complete(feed):
    # Without it a cut after any device section's last byte would look whole.
    sc = Q.sample("7.2", with_vmdescription=False)
    stream, events = W.MainStream(), []
    for piece in pieces(sc.main, feed, seed=2):
        stream.feed(piece)
        pull(stream, events)
    assert not any(isinstance(ev, W.End) for ev in events) and not stream.complete
    with pytest.raises(E.RemoteProtocolError, match="no QEMU_VM_EOF and VMDESCRIPTION"):
        stream.end_of_stream()


def test_bytes_after_the_vmdescription_are_an_error():
    main = Q.sample("9.0").main
    # Arriving with it, they make it a look-alike inside device data; at the end of the
    # stream they are the error.
    with pytest.raises(E.RemoteProtocolError, match=r"^1 bytes after the end"):
        drain(main + b"\x00", end=True)
    stream = W.MainStream()
    stream.feed(main)
    assert isinstance(pull(stream, [])[-1], W.End)
    with pytest.raises(E.RemoteProtocolError, match=r"after the end"):
        stream.feed(b"x")


def _cuts(sc: Q.Scenario) -> list[int]:
    """Where to cut the main channel: at every item boundary, one byte either side of it and
    in its middle, and everywhere inside the VMDESCRIPTION's header."""
    marks = sc.marks
    cuts = {0}
    for a, b in zip(marks, marks[1:]):
        cuts |= {a, a + 1, b - 1, (a + b) // 2}
    vmdesc = len(sc.main) - (len(sc.vmdescription) + 5 if sc.vmdescription else 0)
    cuts |= set(range(vmdesc, vmdesc + 5 + len(b'{"page_size"') + 1))
    return sorted(c for c in cuts if 0 <= c < len(sc.main))


def _ending(data: bytes):
    """A prefix of a valid stream: no error before its end; then the End or the error."""
    stream = W.MainStream()
    stream.feed(data)
    pull(stream, [])
    try:
        return stream.end_of_stream()
    except E.MultifdError as exc:
        return exc


def _wrong_endings(sc: Q.Scenario, low: int, high: int) -> list:
    """The cuts in [low, high) that end_of_stream() does not reject with a plain
    RemoteProtocolError saying the channel ended early (the VMDESCRIPTION cut off whole
    too: a stream without one is never taken for complete)."""
    wrong = []
    for cut in _cuts(sc):
        if not low <= cut < high:
            continue
        got = _ending(sc.main[:cut])
        if type(got) is not E.RemoteProtocolError or "ended" not in str(got):
            wrong.append((cut, sc.main[max(0, cut - 8):cut].hex(" "), got))
    return wrong


SCENARIOS_TO_CUT = {"7.2": dict(return_path=True, page_bits=True, uuid=bytes(16)),
                    "10.x": dict(capabilities=("x-ignore-shared",))}


@pytest.mark.parametrize("layout", SCENARIOS_TO_CUT)
def test_truncated_before_the_device_state_is_an_error(layout):
    sc = Q.sample(layout, **SCENARIOS_TO_CUT[layout])
    assert _wrong_endings(sc, 0, len(sc.main) - len(sc.device_state)
                          - len(sc.vmdescription) - 5) == []


@pytest.mark.parametrize("layout", SCENARIOS_TO_CUT)
def test_truncated_in_the_device_state_or_vmdescription_is_an_error(layout):
    sc = Q.sample(layout, **SCENARIOS_TO_CUT[layout])
    assert _wrong_endings(sc, len(sc.main) - len(sc.device_state) - len(sc.vmdescription) - 5,
                          len(sc.main)) == []


@pytest.mark.parametrize("layout", SCENARIOS_TO_CUT)
def test_a_cut_inside_the_vmdescription_is_an_error(layout):
    sc = Q.sample(layout, **SCENARIOS_TO_CUT[layout])
    for cut in range(len(sc.main) - len(sc.vmdescription) + len(b'{"page_size"'),
                     len(sc.main), 97):
        got = _ending(sc.main[:cut])
        assert type(got) is E.RemoteProtocolError and "ended" in str(got), (cut, got)


# ------------------------------------------------------------------------------------ hostile main

BLOCKS = Q.BLOCKS
HEAD = Q.header() + Q.configuration("pc-i440fx-7.2")
RAM0 = HEAD + Q.section_start(Q.RAM_SECTION, "ram") + Q.mem_size(BLOCKS)
SETUP = RAM0 + Q.eos() + Q.footer(Q.RAM_SECTION)
ITER = SETUP + Q.section_part(Q.RAM_SECTION)
DEVICE = (SETUP + Q.section_part(Q.RAM_SECTION, Q.END) + Q.eos() + Q.footer(Q.RAM_SECTION) +
          Q.DEVICES[0].encode())


@pytest.mark.parametrize("ram", ["start-only", "no-end", "part-after-end"])
def test_device_state_comes_after_the_ram_completion(ram):
    setup = HEAD + Q.section_start(2, "ram") + Q.mem_size(BLOCKS) + Q.eos() + Q.footer(2)
    sections = {"start-only": [], "no-end": [Q.PART], "part-after-end": [Q.END, Q.PART]}[ram]
    data = setup + b"".join(Q.section_part(2, kind) + Q.eos() + Q.footer(2)
                            for kind in sections)
    with pytest.raises(E.RemoteProtocolError):
        drain(data + Q.DEVICES[0].encode() + b"\x00" + Q.vmdescription(b'{"page_size": 4096}'),
              end=True)


def test_a_huge_machine_name_is_refused_before_it_arrives():
    stream = W.MainStream()
    with pytest.raises(E.RemoteProtocolError):
        stream.feed(Q.header() + b"\x07" + Q.be32(1 << 31) + b"pc-")
        stream.next_event()


def test_too_many_capabilities_are_refused():
    caps = Q.capabilities_subsection([f"cap{i}" for i in range(300)])
    with pytest.raises(E.MultifdError, match=r"capabilit"):
        drain(Q.header() + Q.configuration("pc", caps) + Q.section_start(2, "ram"))


def rec(flags, offset=0, name=None, body=b""):
    return Q.ram_record(flags, offset, name, body)


def _postcopy(cmd):
    return (HEAD + Q.command(cmd, b"\0\0\0\0"), E.Unsupported, [r"postcopy", rf"\b{cmd}\b"],
            [])


MAIN_ERRORS = {
    "bad-magic": (b"QEVX" + Q.be32(3), E.BadMagic, [r"51455658"], [r"5145564d"]),
    "bad-magic-multifd": (Q.multifd_init(0), E.BadMagic, [r"11223344"], [r"QEVM"]),
    "bad-version-2": (Q.header(version=2), E.BadVersion, [r"version 2\b"], [r"\b3\b"]),
    "bad-version-4": (Q.header(version=4) + b"\x07", E.BadVersion, [r"version 4\b"],
                      [r"\b3\b"]),
    "unknown-item": (HEAD + b"\x09", E.RemoteProtocolError, [r"0x09"], []),
    "subsection-after-a-command": (HEAD + Q.command(1) + b"\x05", E.RemoteProtocolError,
                                   [r"0x05"], []),
    "vmdescription-before-ram": (HEAD + b"\x06", E.RemoteProtocolError, [r"0x06"], []),
    "unknown-subsection": (Q.header() + Q.configuration(
        "pc", Q.subsection("configuration/future", b"")) + b"\x01", E.Unsupported,
        [r"configuration/future"], []),
    "page-bits-16": (Q.header() + Q.configuration("pc", Q.page_bits_subsection(16)) + b"\x01",
                     E.Unsupported, [r"2\*\*16"], [r"4096"]),
    "non-ascii-machine": (Q.header() + b"\x07" + Q.be32(2) + b"\xc3\xa9\x01",
                          E.RemoteProtocolError, [r"ASCII"], []),
    "eof-before-ram": (HEAD + b"\x00", E.RemoteProtocolError,
                       [r"QEMU_VM_EOF before the end of the RAM section"], []),
    "device-before-ram": (HEAD + Q.section_full(0, "virtio-mem"), E.Unsupported,
                          [r"'virtio-mem'"], []),
    "iterable-block": (HEAD + Q.section_start(3, "block"), E.Unsupported, [r"'block'"], []),
    "iterable-after-ram": (SETUP + Q.section_start(4, "dirty-bitmap"), E.Unsupported,
                           [r"'dirty-bitmap'"], []),
    "part-of-another-section": (SETUP + Q.section_part(7), E.Unsupported, [r"section 7\b"],
                                []),
    "end-of-another-section": (SETUP + Q.section_part(7, Q.END), E.Unsupported,
                               [r"section 7\b"], []),
    "ram-version-5": (HEAD + Q.section_start(2, "ram", version=5), E.Unsupported,
                      [r"version 5\b"], [r"\b4\b"]),
    "second-ram-start": (SETUP + Q.section_start(2, "ram"), E.RemoteProtocolError,
                         [r"second RAM section"], []),
    "footer-of-another-section": (RAM0 + Q.eos() + Q.footer(9), E.RemoteProtocolError,
                                  [r"section 9\b"], [r"0x7e", r"section 2\b"]),
    "no-footer": (RAM0 + Q.eos() + Q.section_part(2), E.RemoteProtocolError, [r"0x02"],
                  [r"footer"]),
    "continue-first": (RAM0 + rec(Q.RAM_ZERO | Q.RAM_CONTINUE, 0, None, b"\0"),
                       E.RemoteProtocolError, [r"CONTINUE"], []),
    "unknown-block": (RAM0 + rec(Q.RAM_ZERO, 0, "pc.nope", b"\0"), E.RemoteProtocolError,
                      [r"'pc\.nope'"], []),
    "unknown-block-page": (RAM0 + rec(Q.RAM_PAGE, 0, "", bytes(PAGE)),
                           E.RemoteProtocolError, [r"''"], []),
    "non-ascii-block": (RAM0 + rec(Q.RAM_ZERO, 0, b"\xff\xfe", b"\0"),
                        E.RemoteProtocolError, [r"ASCII"], []),
    "zero-beyond-block": (RAM0 + rec(Q.RAM_ZERO, 2 * PAGE, "/rom@etc/acpi/tables", b"\0"),
                          E.OutOfRange, [r"0x2000\b"], [r"acpi/tables", r"0x2000 bytes"]),
    "page-beyond-block": (RAM0 + rec(Q.RAM_PAGE, 1 << 40, "pc.ram", bytes(PAGE)),
                          E.OutOfRange, [r"0x10000000000\b"], [r"'pc\.ram'"]),
    "continue-beyond-block": (RAM0 + rec(Q.RAM_ZERO, 0, "pc.bios", b"\0")
                              + rec(Q.RAM_ZERO | Q.RAM_CONTINUE, 4 * PAGE, None, b"\0"),
                              E.OutOfRange, [r"0x4000\b"], [r"'pc\.bios'"]),
    "mem-size-lengths-exceed": (HEAD + Q.section_start(2, "ram")
                                + Q.mem_size(BLOCKS, total=sum(BLOCKS.values()) - PAGE),
                                E.RemoteProtocolError, [rf"\b{sum(BLOCKS.values())} bytes"],
                                [rf"announced as {sum(BLOCKS.values()) - PAGE}\b"]),
    "mem-size-lengths-fall-short": (HEAD + Q.section_start(2, "ram")
                                    + Q.mem_size(BLOCKS, total=sum(BLOCKS.values()) + PAGE)
                                    + Q.eos() + Q.footer(2), E.RemoteProtocolError, [r"''"],
                                    []),
    "mem-size-zero-length": (HEAD + Q.section_start(2, "ram")
                             + Q.mem_size({"pc.ram": 0, "pc.bios": PAGE}),
                             E.Misaligned, [r"'pc\.ram'", r"\b0 bytes"], [r"4096"]),
    "mem-size-unaligned": (HEAD + Q.section_start(2, "ram")
                           + Q.mem_size({"a": PAGE, "pc.ram": PAGE + 512}, total=3 * PAGE),
                           E.Misaligned, [r"'pc\.ram'", r"\b4608 bytes"], [r"4096"]),
    "mem-size-duplicate": (HEAD + Q.section_start(2, "ram") + Q.ram_record(
        Q.RAM_MEM_SIZE, 2 * PAGE, None, Q.name8("pc.ram") + Q.be64(PAGE) + Q.name8("pc.ram")
        + Q.be64(PAGE)), E.RemoteProtocolError, [r"'pc\.ram'", r"twice"], []),
    "mem-size-empty-name": (HEAD + Q.section_start(2, "ram") + Q.mem_size({"": PAGE}),
                            E.RemoteProtocolError, [r"''"], []),
    "mem-size-twice": (RAM0 + Q.mem_size(BLOCKS), E.RemoteProtocolError,
                       [r"second RAM block list"], []),
    "mem-size-too-many-blocks": (HEAD + Q.section_start(2, "ram") + Q.mem_size(
        {f"b{i}": PAGE for i in range(1025)}), E.LimitExceeded, [r"1024"], []),
    "xbzrle": (RAM0 + rec(Q.RAM_XBZRLE, 0, "pc.ram", b"\x01" + Q.be16(2) + b"\0\0"),
               E.Unsupported, [r"xbzrle"], []),
    "xbzrle-continue": (RAM0 + rec(Q.RAM_ZERO, 0, "pc.ram", b"\0")
                        + rec(Q.RAM_XBZRLE | Q.RAM_CONTINUE, PAGE), E.Unsupported,
                        [r"xbzrle"], []),
    "compress": (RAM0 + rec(Q.RAM_COMPRESS_PAGE, 0, "pc.ram", Q.be32(2) + b"x\x9c"),
                 E.Unsupported, [r"compress"], []),
    "rdma-hook": (RAM0 + rec(Q.RAM_HOOK), E.Unsupported, [r"rdma"], []),
    "full-flag": (RAM0 + rec(Q.RAM_FULL, 0, "pc.ram", bytes(PAGE)), E.RemoteProtocolError,
                  [r"0x001\b"], []),
    "zero-and-page": (RAM0 + rec(Q.RAM_ZERO | Q.RAM_PAGE, 0, "pc.ram", bytes(PAGE + 1)),
                      E.RemoteProtocolError, [r"0x00a\b"], []),
    "eos-with-continue": (RAM0 + rec(Q.RAM_EOS | Q.RAM_CONTINUE), E.RemoteProtocolError,
                          [r"0x030\b"], []),
    "no-flags": (RAM0 + rec(0), E.RemoteProtocolError, [r"0x000\b"], []),
    "unknown-flag": (RAM0 + rec(0x400), E.RemoteProtocolError, [r"0x400\b"], []),
    **{f"postcopy-command-{cmd}": _postcopy(cmd) for cmd in range(3, 10)},
    "colo-command": (HEAD + Q.command(Q.CMD_ENABLE_COLO), E.Unsupported, [r"colo", r"\b10\b"],
                     []),
    "unknown-command-12": (HEAD + Q.command(12), E.Unsupported, [r"command 12\b"], []),
    "unknown-command-0": (HEAD + Q.command(0), E.Unsupported, [r"command 0\b"], []),
    "ram-too-large": (HEAD + Q.section_start(Q.RAM_SECTION, "ram") +
                      Q.mem_size({"pc.ram": 1 << 41}), E.LimitExceeded, [r"at most 1024 GiB"],
                      []),
    "vmdescription-nested-too-deep": (DEVICE + b"\x00" + Q.vmdescription(
        b'{"page_size": 4096, "devices": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        E.RemoteProtocolError, [r"not a JSON object: RecursionError"], []),
    "vmdescription-not-json": (DEVICE + b"\x00" + Q.vmdescription(b'{"page_size": 4096, x'),
                               E.RemoteProtocolError, [r"not a JSON object"], []),
}


@pytest.mark.parametrize("case", MAIN_ERRORS.values(), ids=MAIN_ERRORS.keys())
def test_main_channel_errors(case):
    """Each error is raised by next_event() as soon as the bad item is whole (no EOF needed),
    however the bytes arrive."""
    data, exc_type, got, want = case
    assert_error(exc_type, lambda: drain(data), got, want)
    small = [1] * len(data) if len(data) < 5000 else [1448] * (len(data) // 1448)
    assert_error(exc_type, lambda: drain(data, chunks=small), got, want)


def test_a_vmdescription_too_long_to_be_one_is_device_data():
    # A length no VMDESCRIPTION has: device data that looks like one; the stream then ends
    # without its end.
    data = DEVICE + b"\x00\x06" + Q.be32(65 << 20) + b'{"page_size": '
    assert not [e for e in drain(data) if isinstance(e, W.End)]
    with pytest.raises(E.RemoteProtocolError, match=r"no QEMU_VM_EOF and VMDESCRIPTION"):
        drain(data, end=True)


def test_an_unknown_flag_is_reported_where_it_is():
    data = RAM0 + rec(0x400)
    with pytest.raises(E.RemoteProtocolError, match=rf"stream byte {len(RAM0)}\b"):
        drain(data, chunks=[5, 9, 100])


# ------------------------------------------------------------------------------------ multifd

PBLOCKS = {"pc.ram": 8 * PAGE, "pc.bios": 2 * PAGE}


def header_raw(**over) -> bytes:
    fields = dict(normal=(0, 3 * PAGE), block="pc.ram", packet_num=9)
    fields.update(over)
    return Q.packet_header(**fields)


def test_multifd_layout_sizes():
    assert len(Q.multifd_init(0)) == W.INIT.size == 64
    assert len(header_raw()) == W.PACKET_HEADER == 1344
    assert W.MULTIFD_MAGIC_BYTES == b"\x11\x22\x33\x44"


@pytest.mark.parametrize("channel", [0, 1, 15, 255])
def test_init_round_trip(channel):
    uuid = bytes(range(16))
    assert W.decode_init(Q.multifd_init(channel, uuid)) == W.ChannelInit(uuid, channel)


PACKETS_OK = {
    "nocomp": (header_raw(), W.Packet(0, 9, "pc.ram", (0, 3 * PAGE), (), 2 * PAGE, "none")),
    "nocomp-sync-with-data": (header_raw(flags=Q.F_SYNC),
                              W.Packet(1, 9, "pc.ram", (0, 3 * PAGE), (), 2 * PAGE, "none")),
    "last-page": (header_raw(normal=(7 * PAGE,)),
                  W.Packet(0, 9, "pc.ram", (7 * PAGE,), (), PAGE, "none")),
    "other-block": (header_raw(block="pc.bios", normal=(PAGE, 0)),
                    W.Packet(0, 9, "pc.bios", (PAGE, 0), (), 2 * PAGE, "none")),
    "zero-pages": (header_raw(normal=(PAGE,), zero=(0, 2 * PAGE)),
                   W.Packet(0, 9, "pc.ram", (PAGE,), (0, 2 * PAGE), PAGE, "none")),
    "only-zero-pages": (header_raw(normal=(), zero=(5 * PAGE,), next_size=0),
                        W.Packet(0, 9, "pc.ram", (), (5 * PAGE,), 0, "none")),
    "only-zero-pages-zlib": (header_raw(flags=Q.F_ZLIB, normal=(), zero=(0,), next_size=0),
                             W.Packet(2, 9, "pc.ram", (), (0,), 0, "zlib")),
    "zlib": (header_raw(flags=Q.F_ZLIB, next_size=77),
             W.Packet(2, 9, "pc.ram", (0, 3 * PAGE), (), 77, "zlib")),
    "zstd-largest": (header_raw(flags=Q.F_ZSTD, next_size=W.MAX_PAYLOAD),
                     W.Packet(4, 9, "pc.ram", (0, 3 * PAGE), (), W.MAX_PAYLOAD, "zstd")),
    "sync": (header_raw(flags=Q.F_SYNC, normal=(), block="", next_size=0),
             W.Packet(1, 9, None, (), (), 0, "none")),
    # 7.2: the empty packet after a SYNC that carried data keeps the name, the offsets and
    # next_packet_size of that packet, and has no payload.
    "stale-empty": (header_raw(normal_count=0, next_size=0x80000, offsets=range(0, 1 << 19,
                                                                               PAGE)),
                    W.Packet(0, 9, None, (), (), 0, "none")),
    "stale-empty-unknown-block": (header_raw(normal_count=0, block="gone", next_size=5,
                                             offsets=[1 << 60]),
                                  W.Packet(0, 9, None, (), (), 0, "none")),
    "full-packet": (header_raw(normal=tuple(range(0, 8 * PAGE, PAGE)) * 8, next_size=0),
                    W.Packet(0, 9, "pc.ram", tuple(range(0, 8 * PAGE, PAGE)) * 8, (),
                             64 * PAGE, "none")),
    "full-with-zero": (header_raw(normal=(0,) * 100, zero=(PAGE,) * 28),
                       W.Packet(0, 9, "pc.ram", (0,) * 100, (PAGE,) * 28, 100 * PAGE, "none")),
    "smaller-alloc": (header_raw(pages_alloc=2),
                      W.Packet(0, 9, "pc.ram", (0, 3 * PAGE), (), 2 * PAGE, "none")),
    "name-fills-the-field": (header_raw(block="r" * 256, normal=(0,)), None),
}


@pytest.mark.parametrize("case", PACKETS_OK.values(), ids=PACKETS_OK.keys())
def test_packet_round_trip(case):
    raw, want = case
    if want is None:  # a name of 256 bytes has no NUL: still the name
        assert W.decode_packet(raw, {"r" * 256: PAGE}).block == "r" * 256
        return
    got = W.decode_packet(raw, PBLOCKS)
    assert got == want
    assert got.sync == bool(want.flags & Q.F_SYNC)


PACKET_ERRORS = {
    "bad-magic": (header_raw(magic=0x5145564D), E.BadMagic, [r"0x5145564d"], [r"0x11223344"]),
    "bad-version": (header_raw(version=2), E.BadVersion, [r"version 2\b"], [r"\b1 expected"]),
    "pages-alloc-129": (header_raw(pages_alloc=129), E.LimitExceeded, [r"\b129 pages"],
                        [r"\b128\b"]),
    "normal-over-alloc": (header_raw(pages_alloc=1), E.LimitExceeded, [r"\b2 normal"],
                          [r"packet of 1\b"]),
    "zero-over-rest": (header_raw(normal_count=100, zero_count=29), E.LimitExceeded,
                       [r"\b100 normal and 29 zero"], [r"\b128\b"]),
    "huge-counts": (header_raw(normal_count=1 << 31, zero_count=1 << 31), E.LimitExceeded,
                    [r"\b2147483648 normal"], []),
    "unknown-block": (header_raw(block="pc.nope"), E.RemoteProtocolError, [r"'pc\.nope'"],
                      []),
    "unknown-block-zero-only": (header_raw(block="", normal=(), zero=(0,)),
                                E.RemoteProtocolError, [r"''"], []),
    "offset-beyond": (header_raw(normal=(0, 8 * PAGE)), E.OutOfRange, [r"0x8000\b"],
                      [r"'pc\.ram'", r"0x8000 bytes"]),
    "zero-offset-beyond": (header_raw(normal=(0,), zero=(1 << 63,)), E.OutOfRange,
                           [r"0x8000000000000000\b"], [r"'pc\.ram'"]),
    "offset-misaligned": (header_raw(normal=(0, PAGE + 8)), E.Misaligned, [r"'pc\.ram'"],
                          [r"4096"]),
    "unknown-flag-0x80": (header_raw(flags=0x80), E.RemoteProtocolError, [r"0x80\b"], []),
    "unknown-flag-high": (header_raw(flags=1 << 31), E.RemoteProtocolError, [r"0x80000000"],
                          []),
    "two-compressions": (header_raw(flags=Q.F_ZLIB | Q.F_ZSTD), E.RemoteProtocolError,
                         [r"0x6\b"], [r"more than one compression"]),
    "device-state": (header_raw(flags=Q.F_DEVICE_STATE), E.Unsupported, [r"device state"],
                     []),
    "device-state-sync": (header_raw(flags=Q.F_DEVICE_STATE | Q.F_SYNC, normal=()),
                          E.Unsupported, [r"device state"], []),
    "compressed-empty": (header_raw(flags=Q.F_ZLIB, next_size=0), E.LimitExceeded,
                         [r"\b0 bytes"], []),
    "compressed-too-large": (header_raw(flags=Q.F_QPL, next_size=W.MAX_PAYLOAD + 1),
                             E.LimitExceeded, [rf"\b{W.MAX_PAYLOAD + 1} bytes"], []),
    "short": (header_raw()[:-1], E.RemoteProtocolError, [r"\b1343 bytes"], [r"\b1344\b"]),
    "long": (header_raw() + b"\0", E.RemoteProtocolError, [r"\b1345 bytes"], [r"\b1344\b"]),
}


@pytest.mark.parametrize("case", PACKET_ERRORS.values(), ids=PACKET_ERRORS.keys())
def test_packet_errors(case):
    raw, exc_type, got, want = case
    assert_error(exc_type, lambda: W.decode_packet(raw, PBLOCKS), got, want)


INIT_ERRORS = {
    "bad-magic": (Q.multifd_init(0, magic=0x5145564D), E.BadMagic, [r"0x5145564d"],
                  [r"0x11223344"]),
    "bad-version": (Q.multifd_init(0, version=2), E.BadVersion, [r"version 2\b"], [r"\b1\b"]),
    "short": (Q.multifd_init(0)[:63], E.RemoteProtocolError, [r"\b63 bytes"], [r"\b64\b"]),
    "long": (Q.multifd_init(0) + b"\0", E.RemoteProtocolError, [r"\b65 bytes"], [r"\b64\b"]),
}


@pytest.mark.parametrize("case", INIT_ERRORS.values(), ids=INIT_ERRORS.keys())
def test_init_errors(case):
    raw, exc_type, got, want = case
    assert_error(exc_type, lambda: W.decode_init(raw), got, want)


def test_return_path_replies():
    assert W.encode_shut(False) == bytes.fromhex("0001 0004 00000000")
    assert W.encode_shut(True) == bytes.fromhex("0001 0004 00000001")
    assert W.encode_pong(0x01020304) == bytes.fromhex("0002 0004 01020304")


# ------------------------------------------------------------------------------------ hostile bytes

PREFIXES = [b"", Q.header(), HEAD, RAM0, ITER, DEVICE]
CHUNKS = st.lists(st.integers(1, 64), max_size=12)


def _typed_only(data: bytes, chunks) -> None:
    """The main channel on hostile bytes: events of known types, or a typed error."""
    try:
        records_of(drain(data, chunks, end=True))
    except E.MultifdError:
        pass


@HYPO
@given(st.sampled_from(PREFIXES), st.binary(max_size=300), CHUNKS)
def test_hostile_main_random(prefix, data, chunks):
    _typed_only(prefix + data, chunks)


# Items that parse, in any order: the parser must refuse every order that is not a stream.
ITEMS = st.sampled_from([
    Q.section_start(2, "ram"), Q.section_part(2), Q.section_part(2, Q.END), Q.footer(2),
    Q.mem_size({"pc.ram": 2 * PAGE}), Q.eos(), Q.flush(), rec(Q.RAM_ZERO, PAGE, "pc.ram", b"\0"),
    rec(Q.RAM_ZERO | Q.RAM_CONTINUE, 0, None, b"\1"), rec(Q.RAM_PAGE, 0, "pc.ram", bytes(PAGE)),
    Q.command(Q.CMD_PING, b"\0\0\0\1"), Q.configuration("pc"), Q.DEVICES[0].encode(), b"\x00",
    Q.vmdescription(b'{"page_size": 4096}'), Q.capabilities_subsection(["x-ignore-shared"]),
])


@HYPO
@given(st.lists(ITEMS, max_size=12), CHUNKS)
def test_hostile_main_items(items, chunks):
    _typed_only(Q.header() + b"".join(items), chunks)


SMALL = {layout: Q.build(Q.sample_epochs(layout, blocks={"pc.ram": 8 * PAGE},
                                         zero_on_main=True), layout,
                         blocks={"pc.ram": 8 * PAGE}, return_path=True, page_bits=True,
                         capabilities=("x-ignore-shared",)).main
         for layout in Q.LAYOUTS}


@HYPO
@given(st.sampled_from(Q.LAYOUTS), EDITS, CHUNKS, st.integers(0, 1 << 16))
def test_hostile_main_mutated(layout, edits, chunks, cut):
    data = _mutate(SMALL[layout], edits)
    _typed_only(data[:len(data) - cut % 64], chunks)


def test_every_single_byte_flip_of_a_main_channel_is_accepted_or_typed():
    data = SMALL["7.2"]
    assert len(data) < 4000
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0xFF
        _typed_only(bytes(mutated), [])


def _check_packet(raw: bytes) -> None:
    """decode_packet on hostile bytes: a typed error, or a packet within QEMU's bounds."""
    try:
        p = W.decode_packet(raw, PBLOCKS)
    except E.MultifdError:
        return
    assert len(p.normal) + len(p.zero) <= Q.PACKET_PAGES
    assert not p.flags & ~0x3F and p.compression in W.COMPRESSION.values()
    if p.block is None:
        assert (p.normal, p.zero, p.payload_size) == ((), (), 0)
        return
    assert p.normal or p.zero
    assert all(o % PAGE == 0 and o + PAGE <= PBLOCKS[p.block] for o in p.normal + p.zero)
    if p.compression == "none" or not p.normal:
        assert p.payload_size == PAGE * len(p.normal)
    else:
        assert 0 < p.payload_size <= W.MAX_PAYLOAD


OFFSETS = st.lists(st.one_of(st.integers(0, 9).map(lambda i: i * PAGE),
                             st.integers(0, (1 << 64) - 1)), max_size=130)
HEADERS = st.builds(
    lambda flags, alloc, n, z, block, offsets, size: Q.packet_header(
        flags=flags, pages_alloc=alloc, normal_count=n, zero_count=z, block=block,
        offsets=offsets[:128], next_size=size),
    st.one_of(st.sampled_from([0, 1, 2, 3, 4, 0x41, 0x22]), st.integers(0, (1 << 32) - 1)),
    st.one_of(st.integers(0, 130), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 130), st.one_of(st.integers(0, 130), st.integers(0, (1 << 32) - 1)),
    st.sampled_from(["pc.ram", "pc.bios", "", "pc.ra", "pc.ram\0x", "\xff"]),
    OFFSETS, st.integers(0, (1 << 32) - 1))


@HYPO
@given(st.binary(min_size=W.PACKET_HEADER, max_size=W.PACKET_HEADER))
def test_hostile_packet_random(raw):
    _check_packet(raw)


@HYPO
@given(HEADERS)
def test_hostile_packet_structured(raw):
    _check_packet(raw)


@HYPO
@given(st.sampled_from([header_raw(), header_raw(flags=3, zero=(PAGE,), next_size=5),
                        PACKETS_OK["stale-empty"][0]]), EDITS)
def test_hostile_packet_mutated(raw, edits):
    _check_packet(_mutate(raw, edits))


@HYPO
@given(st.one_of(st.binary(max_size=80), st.builds(_mutate, st.just(Q.multifd_init(3)),
                                                  EDITS)))
def test_hostile_init(raw):
    try:
        init = W.decode_init(raw)
    except E.MultifdError:
        return
    assert raw[:8] == b"\x11\x22\x33\x44\0\0\0\1" and (init.uuid, init.id) == (raw[8:24],
                                                                             raw[24])


# ------------------------------------------------------------------------------------ purity

NO_IO = FORBIDDEN | {"threading"}


def test_qemu_wire_imports_no_io_statically():
    source = QEMU_WIRE_PY.read_text()
    # _imported_modules resolves a relative import against the package it is given: right
    # for `from .. import x` here (multifd), wrong for `from . import x` (multifd.qemu).
    levels = {node.level for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.ImportFrom) and node.level}
    assert levels <= {2}, "a new kind of relative import: resolve it in _imported_modules"
    tops = {name.split(".")[0] for name in _imported_modules(QEMU_WIRE_PY, "multifd", set())}
    assert "multifd" in tops and not tops & NO_IO, tops & NO_IO
    assert "importlib" not in source and "__import__" not in source


def test_qemu_wire_imports_no_io_at_runtime():
    # A bare interpreter loads none of these, so any that shows up came with the module
    # (or the packages it lives in).
    probe = (f"import sys; bad = {sorted(NO_IO | {'_socket', '_ssl'})!r}; "
             "loaded = lambda: [m for m in bad if m in sys.modules]; before = loaded(); "
             "import multifd.qemu.wire; print(before, loaded()); "
             "sys.exit(bool(before or loaded()))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_inflater_one_stream_per_channel_flushed_per_packet(method):
    import zlib

    import zstandard
    pages = [bytes([n]) * PAGE + bytes(PAGE) for n in range(1, 4)]  # two pages a packet
    if method == "zlib":
        c = zlib.compressobj()
        payloads = [c.compress(p) + c.flush(zlib.Z_SYNC_FLUSH) for p in pages]
    else:
        c = zstandard.ZstdCompressor().compressobj()
        payloads = [c.compress(p) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for p in pages]
    inflater = W.Inflater(method)
    assert [inflater.inflate(p, 2) for p in payloads] == pages


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_inflater_stops_a_payload_that_decodes_to_more_than_its_pages(method):
    import zlib

    import zstandard
    big = bytes(64 << 20)  # 64 MiB of zeros: a few KiB compressed
    bomb = zlib.compress(big) if method == "zlib" else zstandard.ZstdCompressor().compress(big)
    assert len(bomb) < W.MAX_PAYLOAD
    with pytest.raises(E.RemoteProtocolError, match=r"more than|decodes to"):
        W.Inflater(method).inflate(bomb, 1)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_inflater_refuses_garbage(method):
    with pytest.raises(E.RemoteProtocolError, match=f"{method} payload"):
        W.Inflater(method).inflate(b"\x00garbage" * 100, 1)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_inflater_full_packets_of_incompressible_pages(method):
    # A packet's whole 512 KiB decodes from its payload alone, past any output buffer size
    # of the decoder (a zstd decoder with a smaller one kept the tail back).
    import zlib

    import zstandard
    rng = random.Random(5)
    packets = [rng.randbytes(W.PACKET_PAGES * PAGE) for _ in range(3)]
    if method == "zlib":
        c = zlib.compressobj()
        payloads = [c.compress(p) + c.flush(zlib.Z_SYNC_FLUSH) for p in packets]
    else:
        c = zstandard.ZstdCompressor(level=1).compressobj()
        payloads = [c.compress(p) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for p in packets]
    inflater = W.Inflater(method)
    assert [inflater.inflate(p, W.PACKET_PAGES) for p in payloads] == packets
