"""A QEMU migration source on paper: the bytes QEMU 7.2 to 10.x writes on its main channel and
on its multifd channels, for the tests of multifd/qemu.

Written from the wire format, not from the decoder, so that each checks the other. Every
integer is big-endian. Two levels:

- one function per wire item (header, configuration and its subsections, command, section
  headers and footers, RAM records, MultiFDInit_t, multifd packet header), every field
  overridable so that a test can break any of them;
- `build(epochs, layout)`: a whole migration as a source of that QEMU version lays it out,
  with what a decoder must read from each channel and the final content of every RAM block.

A page is named by (block, offset) and given with its content: `bytes` (PAGE of them, sent as
a normal page), `None` (a zero page: a ZERO record on the main channel, or an entry of a
packet's zero list from 9.0 on) or an `int` (a ZERO record whose fill byte is that value,
which only old sources send; main channel only).
"""

from __future__ import annotations

import itertools
import json
import random
import struct
import zlib
from dataclasses import dataclass, field

PAGE = 4096

# --- the main channel

MAGIC = b"QEVM"
VERSION = 3

EOF = 0x00
START = 0x01
PART = 0x02
END = 0x03
FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E

RAM_FULL = 0x01  # obsolete
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200

CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
CMD_POSTCOPY_ADVISE = 3
CMD_POSTCOPY_LISTEN = 4
CMD_POSTCOPY_RUN = 5
CMD_POSTCOPY_RAM_DISCARD = 6
CMD_POSTCOPY_RESUME = 7
CMD_PACKAGED = 8
CMD_RECV_BITMAP = 9
CMD_ENABLE_COLO = 10
CMD_SWITCHOVER_START = 11

RAM_SECTION = 2  # "ram" registers after "timer" (0) and another device (1)

# --- a multifd channel

MF_MAGIC = 0x11223344
MF_VERSION = 1
PACKET_PAGES = 128
RAMBLOCK_NAME = 256
PACKET_HEADER = 64 + RAMBLOCK_NAME + 8 * PACKET_PAGES  # 1344

F_SYNC = 0x01
F_ZLIB = 0x02
F_ZSTD = 0x04
F_QPL = 0x08
F_UADK = 0x10
F_QATZIP = 0x20
F_DEVICE_STATE = 0x40

LAYOUTS = ("7.2", "8.1", "9.0", "10.x")
MACHINES = {"7.2": "pc-i440fx-7.2", "8.1": "pc-i440fx-8.1", "9.0": "pc-q35-9.0",
            "10.x": "pc-q35-10.0"}


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def be16(n: int) -> bytes:
    return struct.pack(">H", n)


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def name8(name: str | bytes) -> bytes:
    """u8 length, then the name."""
    raw = name.encode() if isinstance(name, str) else name
    return u8(len(raw)) + raw


def pattern(*key) -> bytes:
    """A page of content that depends on `key` only (and is never all zero)."""
    data = bytearray(random.Random(repr(key)).randbytes(PAGE))
    data[0] |= 1
    return bytes(data)


# --- main channel items

def header(magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return magic + be32(version)


def subsection(name: str, body: bytes, version: int = 1) -> bytes:
    return u8(SUBSECTION) + name8(name) + be32(version) + body


def page_bits_subsection(bits: int = 12) -> bytes:
    return subsection("configuration/target-page-bits", be32(bits))


def capabilities_subsection(names, count: int | None = None) -> bytes:
    names = list(names)
    return subsection("configuration/capabilities",
                      be32(len(names) if count is None else count)
                      + b"".join(name8(n) for n in names))


def uuid_subsection(uuid: bytes) -> bytes:
    return subsection("configuration/uuid", uuid)


def configuration(machine: str, *subsections: bytes) -> bytes:
    raw = machine.encode()
    return u8(CONFIGURATION) + be32(len(raw)) + raw + b"".join(subsections)


def command(cmd: int, data: bytes = b"", length: int | None = None) -> bytes:
    return u8(COMMAND) + be16(cmd) + be16(len(data) if length is None else length) + data


def section_start(section_id: int, idstr: str, *, instance: int = 0, version: int = 4,
                  kind: int = START) -> bytes:
    """START or FULL: kind, be32 section id, u8 len + idstr, be32 instance, be32 version."""
    return u8(kind) + be32(section_id) + name8(idstr) + be32(instance) + be32(version)


def section_full(section_id: int, idstr: str, *, instance: int = 0, version: int = 1) -> bytes:
    return section_start(section_id, idstr, instance=instance, version=version, kind=FULL)


def section_part(section_id: int, kind: int = PART) -> bytes:
    """PART or END: kind, be32 section id."""
    return u8(kind) + be32(section_id)


def footer(section_id: int) -> bytes:
    return u8(FOOTER) + be32(section_id)


def ram_record(flags: int, offset: int = 0, name: str | bytes | None = None,
               body: bytes = b"") -> bytes:
    """be64 (offset | flags), the block's name (u8 len + idstr) unless None, then `body`."""
    return be64(offset | flags) + (b"" if name is None else name8(name)) + body


def mem_size(blocks: dict[str, int], addresses: dict[str, int] | None = None,
             total: int | None = None) -> bytes:
    """The MEM_SIZE record: the total, then per block u8 len, idstr, be64 used_length (and be64
    the block's address with x-ignore-shared)."""
    body = b""
    for name, length in blocks.items():
        body += name8(name) + be64(length)
        if addresses is not None:
            body += be64(addresses[name])
    return ram_record(RAM_MEM_SIZE, sum(blocks.values()) if total is None else total, None,
                      body)


class RamWriter:
    """RAM records as a source writes them: a page record names its block unless it is the
    block of the previous page record (then it sets CONTINUE instead)."""

    def __init__(self, use_continue: bool = True) -> None:
        self.use_continue = use_continue
        self.last: str | None = None

    def _record(self, flags: int, block: str, offset: int, body: bytes) -> bytes:
        if self.use_continue and block == self.last:
            return ram_record(flags | RAM_CONTINUE, offset, None, body)
        self.last = block
        return ram_record(flags, offset, block, body)

    def zero(self, block: str, offset: int, fill: int = 0) -> bytes:
        return self._record(RAM_ZERO, block, offset, u8(fill))

    def page(self, block: str, offset: int, data: bytes) -> bytes:
        assert len(data) == PAGE
        return self._record(RAM_PAGE, block, offset, data)


def eos() -> bytes:
    return be64(RAM_EOS)


def flush() -> bytes:
    return be64(RAM_MULTIFD_FLUSH)


@dataclass(frozen=True)
class Device:
    """A non-iterable device section: opaque bytes between its FULL header and its footer."""
    idstr: str
    section_id: int
    body: bytes
    instance: int = 0
    version: int = 1

    def encode(self) -> bytes:
        return (section_full(self.section_id, self.idstr, instance=self.instance,
                             version=self.version) + self.body + footer(self.section_id))


# Device state as opaque as QEMU's: zeros, a footer of section 0 (ends in 00), bytes that
# look like the start of a VMDESCRIPTION (00 06 be32) without its JSON.
DEVICES = (
    Device("timer", 0, be64(0) + be64(0x1122334455667788) + be64(0), version=2),
    Device("cpu", 1, bytes(range(1, 40)) + b"\x00\x06\x00\x00\x00\x10" + b"\xff" * 16,
           version=12),
    Device("apic", 3, b"\xfe" * 8 + be32(0) + b"\x01", version=3),
)


def vmdescription_json(devices=DEVICES) -> bytes:
    desc = {"page_size": PAGE,
            "devices": [{"name": d.idstr, "instance_id": d.instance, "vmsd_name": d.idstr,
                         "version": d.version, "fields": []} for d in devices]}
    return json.dumps(desc).encode()


def vmdescription(text: bytes) -> bytes:
    return u8(VMDESCRIPTION) + be32(len(text)) + text


# --- multifd channel items

def multifd_init(channel: int, uuid: bytes = bytes(16), *, magic: int = MF_MAGIC,
                 version: int = MF_VERSION) -> bytes:
    """MultiFDInit_t: be32 magic, be32 version, uuid[16], u8 id, 7 + 32 unused bytes."""
    return be32(magic) + be32(version) + uuid + u8(channel) + bytes(7) + bytes(32)


def packet_header(*, flags: int = 0, normal=(), zero=(), block: str | bytes = "",
                  packet_num: int = 0, next_size: int | None = None,
                  pages_alloc: int = PACKET_PAGES, normal_count: int | None = None,
                  zero_count: int | None = None, offsets=None, magic: int = MF_MAGIC,
                  version: int = MF_VERSION) -> bytes:
    """MultiFDPacket_t for 4 KiB pages: be32 magic, version, flags, pages_alloc, normal_pages,
    next_packet_size, be64 packet_num, be32 zero_pages (9.0+; unused before), 28 unused
    bytes, ramblock[256], be64 offset[128] (the normal pages', then the zero pages')."""
    offs = list(normal) + list(zero) if offsets is None else list(offsets)
    raw = block.encode() if isinstance(block, str) else block
    return (be32(magic) + be32(version) + be32(flags) + be32(pages_alloc)
            + be32(len(normal) if normal_count is None else normal_count)
            + be32(PAGE * len(normal) if next_size is None else next_size)
            + be64(packet_num)
            + be32(len(zero) if zero_count is None else zero_count) + bytes(28)
            + raw.ljust(RAMBLOCK_NAME, b"\0")
            + b"".join(be64(o) for o in offs).ljust(8 * PACKET_PAGES, b"\0"))


@dataclass(frozen=True)
class Sent:
    """What one packet says, as a decoder must read it: its flags, its block (None when it
    carries no pages), the offsets of its normal and zero pages, the normal pages' data."""
    flags: int
    block: str | None
    normal: tuple[int, ...]
    zero: tuple[int, ...]
    data: bytes


class ChannelWriter:
    """One multifd channel of a source: the init, then packets. A packet header is rewritten
    in place by the source, so an empty packet keeps the previous packet's block name and
    offsets (and before 9.0 its next_packet_size). zlib: one deflate stream for the whole
    channel, Z_SYNC_FLUSH at the end of every packet."""

    def __init__(self, channel: int, *, compression: str | None = None,
                 uuid: bytes = bytes(16), v9: bool = False) -> None:
        self.data = bytearray(multifd_init(channel, uuid))
        self.sent: list[Sent] = []
        self.compression = compression
        self.v9 = v9  # 9.0+: next_packet_size 0 without normal pages; zlib flag on all data
        self._z = zlib.compressobj() if compression == "zlib" else None
        self._block = b""
        self._offsets: tuple[int, ...] = ()
        self._size = 0
        self.number = 0  # the packet_num of the last packet

    def send(self, packet_num: int, block: str, pages, zeros=(), *, sync: bool = False) -> None:
        """A data packet: `pages` are (offset, data) of its normal pages, `zeros` offsets."""
        normal = tuple(o for o, _ in pages)
        data = b"".join(d for _, d in pages)
        flags = F_SYNC if sync else 0
        if self._z is not None and (normal or self.v9):
            flags |= F_ZLIB
        if not normal:
            payload = b""
        elif self._z is not None:
            payload = self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        else:
            payload = data
        if normal or self.v9:
            self._size = len(payload)
        self._block, self._offsets = block.encode(), normal + tuple(zeros)
        self.number = packet_num
        self.data += packet_header(flags=flags, normal=normal, zero=zeros, block=block,
                                   packet_num=packet_num, next_size=self._size) + payload
        self.sent.append(Sent(flags, block, normal, tuple(zeros), data))

    def empty(self, packet_num: int, *, sync: bool) -> None:
        """A packet without pages: a SYNC, or the empty packet 7.2 sends after a SYNC that
        carried data. Name, offsets and (before 9.0) next_packet_size are left over."""
        flags = F_SYNC if sync else 0
        if self.v9:
            self._size = 0
        self.number = packet_num
        self.data += packet_header(flags=flags, normal_count=0, zero_count=0,
                                   block=self._block, offsets=self._offsets,
                                   packet_num=packet_num, next_size=self._size)
        self.sent.append(Sent(flags, None, (), (), b""))


# --- whole migrations

@dataclass
class Epoch:
    """What is sent between two synchronizations: `main` the pages of the main channel,
    `multifd[c]` those of multifd channel c, each a list of (block, offset, content)."""
    main: list = field(default_factory=list)
    multifd: list = field(default_factory=list)


@dataclass
class Scenario:
    layout: str
    blocks: dict[str, int]
    main: bytes
    channels: list[bytes]
    records: list[tuple]  # what the main channel says, in order (see MainWriter)
    sent: list[list[Sent]]  # per channel, what each packet says
    expected: dict[str, bytes]  # the final content of every block
    marks: list[int]  # where each item of the main channel begins (and its length at the end)
    device_state: bytes  # from the first device section through QEMU_VM_EOF
    vmdescription: bytes | None


class MainWriter:
    """The main channel being written: its bytes, where each item begins, and the records a
    decoder must read from it:

        ("configuration", machine, capabilities, uuid)  ("command", cmd, data)
        ("blocks", ((name, length), ...))  ("zero", block, offset)
        ("page", block, offset, data)  ("eos",)  ("flush",)  ("end", device_state, vmdesc)
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.marks: list[int] = []
        self.records: list[tuple] = []

    def put(self, raw: bytes, *record) -> None:
        self.marks.append(len(self.data))
        self.data += raw
        if record:
            self.records.append(record)


def _content(data) -> bytes:
    if data is None:
        return bytes(PAGE)
    if isinstance(data, int):
        return bytes([data]) * PAGE
    assert len(data) == PAGE, "a page is 4096 bytes"
    return bytes(data)


def expected_content(blocks: dict[str, int], epochs) -> dict[str, bytes]:
    """Every block after the epochs, applied in order onto zeroed memory. Within an epoch the
    order of the channels is QEMU's to choose, so a page sent twice there must not differ."""
    memory = {name: bytearray(length) for name, length in blocks.items()}
    for n, epoch in enumerate(epochs):
        seen: dict = {}
        for block, offset, data in [*epoch.main, *(p for ch in epoch.multifd for p in ch)]:
            if block not in blocks or offset % PAGE or not 0 <= offset < blocks[block]:
                raise ValueError(f"epoch {n}: no page {block}@{offset:#x}")
            content = _content(data)
            if seen.setdefault((block, offset), content) != content:
                raise ValueError(f"epoch {n}: {block}@{offset:#x} sent twice, differently")
            memory[block][offset:offset + PAGE] = content
    return {name: bytes(m) for name, m in memory.items()}


def _packets(pages, packet_pages: int):
    """A channel's pages of an epoch as packets: one block each, at most packet_pages."""
    batch: list = []
    for page in pages:
        if batch and (page[0] != batch[0][0] or len(batch) == packet_pages):
            yield batch
            batch = []
        batch.append(page)
    if batch:
        yield batch


def build(epochs, layout: str = "7.2", *, blocks: dict[str, int] | None = None,
          channels: int = 2, compression: str | None = None, machine: str | None = None,
          capabilities=(), uuid: bytes | None = None, page_bits: bool = False,
          return_path: bool = False, switchover: bool | None = None,
          sync_with_data: bool = False, packet_pages: int = PACKET_PAGES,
          use_continue: bool = True, devices=DEVICES, with_vmdescription: bool = True,
          channel_uuid: bytes = bytes(16)) -> Scenario:
    """A whole migration of `epochs` (a list of Epoch) as a source of `layout` sends it.

    7.2   legacy: a SYNC on every channel at the end of every RAM section (setup, each
          iteration, completion), matched by the section's EOS on the main channel; zero
          pages only on the main channel; with sync_with_data the SYNC rides on a channel's
          last data packet of the epoch, and an empty packet with a stale size follows.
    8.1   modern: SYNC on every channel and MULTIFD_FLUSH on main at setup and at the end of
          each dirty round (in the middle of a section); each iteration ends with EOS and
          no sync; zero pages still only on main; sync_with_data as in 7.2.
    9.0   8.1, plus zero pages in multifd packets (the zero_pages field); SYNC packets are
          always separate and empty.
    10.x  9.0 without the SYNC (and FLUSH) at completion: the last epoch ends with EOS only;
          MIG_CMD_SWITCHOVER_START before the completion section.

    The setup epoch (block list, first SYNC) comes before `epochs`, and carries no pages.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}, not one of {LAYOUTS}")
    blocks = dict(blocks or BLOCKS)
    epochs = list(epochs)
    if not epochs:
        raise ValueError("a migration has at least one epoch (its completion)")
    v9 = layout in ("9.0", "10.x")
    if sync_with_data and v9:
        raise ValueError("from 9.0 on, a SYNC packet never carries pages")
    for n, epoch in enumerate(epochs):
        if len(epoch.multifd) > channels:
            raise ValueError(f"epoch {n}: pages for {len(epoch.multifd)} channels")
        for pages in epoch.multifd:
            for block, offset, data in pages:
                if data is None and not v9:
                    raise ValueError(f"{layout}: zero pages go on the main channel")
                if isinstance(data, int):
                    raise ValueError("a fill byte exists on the main channel only")
    expected = expected_content(blocks, epochs)
    sent, channel_data = _multifd_channels(epochs, layout, channels, compression,
                                           sync_with_data, packet_pages, channel_uuid)
    out = MainWriter()
    machine = MACHINES[layout] if machine is None else machine
    subs = []
    if page_bits:
        subs.append(page_bits_subsection())
    if capabilities:
        subs.append(capabilities_subsection(capabilities))
    if uuid is not None:
        subs.append(uuid_subsection(uuid))
    out.put(header())
    out.put(configuration(machine, *subs), "configuration", machine, tuple(capabilities),
            uuid)
    if return_path:
        out.put(command(CMD_OPEN_RETURN_PATH), "command", CMD_OPEN_RETURN_PATH, b"")
        out.put(command(CMD_PING, be32(1)), "command", CMD_PING, be32(1))
    addresses = None
    if "x-ignore-shared" in capabilities:
        addresses = {name: (i + 1) << 32 for i, name in enumerate(blocks)}
    setup = [(mem_size(blocks, addresses), ("blocks", tuple(blocks.items())))]
    if layout != "7.2" and channels:
        setup.append((flush(), ("flush",)))
    sections = [setup] + _ram_sections(epochs, layout, channels, RamWriter(use_continue))
    for n, section in enumerate(sections):
        if n == 0:
            out.put(section_start(RAM_SECTION, "ram"))
        else:
            last = n == len(sections) - 1
            if last and (layout == "10.x" if switchover is None else switchover):
                out.put(command(CMD_SWITCHOVER_START), "command", CMD_SWITCHOVER_START, b"")
            out.put(section_part(RAM_SECTION, END if last else PART))
        for raw, record in section:
            out.put(raw, *record)
        out.put(eos(), "eos")
        out.put(footer(RAM_SECTION))

    start = len(out.data)
    for device in devices:
        out.put(device.encode())
    out.put(u8(EOF))
    device_state = bytes(out.data[start:])
    text = vmdescription_json(devices) if with_vmdescription else None
    if text is not None:
        out.put(vmdescription(text))
    out.records.append(("end", device_state, text))
    out.marks.append(len(out.data))
    return Scenario(layout, blocks, bytes(out.data), channel_data, out.records, sent,
                    expected, out.marks, device_state, text)


def _multifd_channels(epochs, layout, channels, compression, sync_with_data, packet_pages,
                      uuid):
    """The channels' bytes and what their packets say: a SYNC at setup, then each epoch's
    pages in packets, and its SYNC (none after the last epoch in 10.x)."""
    writers = [ChannelWriter(c, compression=compression, uuid=uuid,
                             v9=layout in ("9.0", "10.x")) for c in range(channels)]
    numbers = itertools.count(1)  # packet_num: one count for all channels
    for w in writers:
        w.empty(next(numbers), sync=True)
    for n, epoch in enumerate(epochs):
        ends_in_sync = n < len(epochs) - 1 or layout != "10.x"
        for c, w in enumerate(writers):
            pages = epoch.multifd[c] if c < len(epoch.multifd) else []
            batches = list(_packets(pages, packet_pages))
            for i, batch in enumerate(batches):
                ride = sync_with_data and ends_in_sync and i == len(batches) - 1
                w.send(next(numbers), batch[0][0],
                       [(o, d) for _, o, d in batch if d is not None],
                       [o for _, o, d in batch if d is None], sync=ride)
                if ride:  # the empty packet after it repeats its number
                    w.empty(w.number, sync=False)
            if ends_in_sync and not (sync_with_data and batches):
                w.empty(next(numbers), sync=True)
    return [w.sent for w in writers], [bytes(w.data) for w in writers]


def _main_pages(epoch: Epoch, ram: RamWriter):
    """The main channel's page records of an epoch: (bytes, record)."""
    for block, offset, data in epoch.main:
        if data is None or isinstance(data, int):
            fill = data or 0
            yield ram.zero(block, offset, fill), (("page", block, offset, _content(fill))
                                                  if fill else ("zero", block, offset))
        else:
            yield ram.page(block, offset, data), ("page", block, offset, bytes(data))


def _ram_sections(epochs, layout, channels, ram: RamWriter) -> list[list]:
    """The RAM sections after setup, each a list of (bytes, record) before its EOS.

    7.2: one section per epoch. Later: an epoch (a dirty round) spans two iterations: the
    first half of its pages ends one section; the second half, the round's MULTIFD_FLUSH and
    the first half of the next round's pages make the next one."""
    if layout == "7.2":
        return [list(_main_pages(epoch, ram)) for epoch in epochs]
    sections: list[list] = [[]]
    for n, epoch in enumerate(epochs):
        mine = list(_main_pages(epoch, ram))
        half = (len(mine) + 1) // 2
        sections[-1] += mine[:half]
        sections.append(mine[half:])
        if channels and (n < len(epochs) - 1 or layout != "10.x"):
            sections[-1].append((flush(), ("flush",)))
    return sections


# --- typical migrations

BLOCKS = {"pc.ram": 24 * PAGE, "/rom@etc/acpi/tables": 2 * PAGE, "pc.bios": 4 * PAGE}


def sample_epochs(layout: str, channels: int = 2, *, blocks: dict[str, int] | None = None,
                  batch: int = 3, zero_on_main: bool | None = None) -> list[Epoch]:
    """Three dirty rounds of a small guest, the way `layout` routes pages: the first sends
    every page (every 5th is zero), the second re-sends some (zero pages that now hold data,
    pages that became zero, pages that changed), the third a few again.

    Zero pages go on the main channel before 9.0 and in multifd packets from 9.0 on (unless
    `zero_on_main` says otherwise: 9.0's zero-page-detection=legacy); data pages are dealt to
    the channels `batch` at a time (all on main when channels is 0)."""
    blocks = dict(blocks or BLOCKS)
    if zero_on_main is None:
        zero_on_main = layout in ("7.2", "8.1")
    zero_on_main = zero_on_main or not channels
    rounds = []
    all_pages = [(b, i * PAGE) for b, length in blocks.items() for i in range(length // PAGE)]
    rounds.append([(b, o, None if (o // PAGE) % 5 == 0 else pattern(b, o, 1))
                   for b, o in all_pages])
    second = []
    for b, o in all_pages:
        i = o // PAGE
        if i % 5 == 0 and i % 2 == 0:
            second.append((b, o, pattern(b, o, 2)))  # was zero, now data
        elif i % 7 == 3:
            second.append((b, o, None))  # held data, now zero
        elif i % 4 == 1:
            second.append((b, o, pattern(b, o, 2)))
    rounds.append(second)
    rounds.append([(b, o, pattern(b, o, 3) if (o // PAGE) % 2 else None)
                   for b, o in all_pages if (o // PAGE) % 6 == 0])
    epochs = []
    for pages in rounds:
        epoch = Epoch(multifd=[[] for _ in range(channels)])
        dealt = 0
        for page in pages:
            if (page[2] is None and zero_on_main) or not channels:
                epoch.main.append(page)
            else:
                epoch.multifd[(dealt // batch) % channels].append(page)
                dealt += 1
        epochs.append(epoch)
    return epochs


def sample(layout: str, *, zero_on_main: bool | None = None, **kw) -> Scenario:
    """build() of sample_epochs(): the typical migration of `layout`."""
    epochs = sample_epochs(layout, kw.get("channels", 2), blocks=kw.get("blocks"),
                           zero_on_main=zero_on_main)
    return build(epochs, layout, **kw)


# --- the 7.2 quirks a receiver must tolerate

def quirk_sync_with_data(layout: str = "7.2", **kw) -> Scenario:
    """A SYNC that carries a full packet of data, then the empty packet that follows it
    (normal_pages 0, next_packet_size 0x80000 left over, no payload)."""
    b = "pc.ram"
    full = [(b, i * PAGE, pattern(b, i, "sync")) for i in range(PACKET_PAGES)]
    later = [(b, i * PAGE, pattern(b, i, "later")) for i in range(0, PACKET_PAGES, 9)]
    epochs = [Epoch(multifd=[full, []]), Epoch(multifd=[later[:5], later[5:]])]
    return build(epochs, layout, blocks={b: PACKET_PAGES * PAGE}, sync_with_data=True, **kw)


def quirk_duplicate_page(layout: str = "7.2", **kw) -> Scenario:
    """The last page of one batch queued again as the first of the next, on another channel,
    in the same epoch."""
    b = "pc.ram"
    first = [(b, i * PAGE, pattern(b, i)) for i in range(4)]
    second = [first[-1]] + [(b, i * PAGE, pattern(b, i)) for i in range(4, 8)]
    return build([Epoch(multifd=[first, second])], layout, blocks={b: 8 * PAGE}, **kw)


def quirk_zero_then_normal(layout: str = "7.2", **kw) -> Scenario:
    """A page sent as a zero page on the main channel in one epoch, then as a normal page on
    a multifd channel in the next: only the epoch order gives the right content."""
    b = "pc.ram"
    pages = range(4)
    epochs = [Epoch(main=[(b, i * PAGE, None) for i in pages]),
              Epoch(multifd=[[], [(b, i * PAGE, pattern(b, i, "live")) for i in pages]])]
    return build(epochs, layout, blocks={b: 4 * PAGE}, **kw)
