"""QEMU's migration stream as a destination reads it: bytes to records, and the few replies.

Pure: no sockets, threads or trio (a test enforces it). Layouts are QEMU 7.2 to 10.x, as
docs/QEMU.md gives them; every integer is big-endian. Two readers:

- `MainStream`, the main channel, incremental in the style of h11: `feed()` bytes as they
  come, take `next_event()` until it says NEED_DATA, and call `end_of_stream()` at EOF. It
  parses the header, the configuration, commands and the RAM section, and keeps the device
  state after the RAM section opaque (it has no length fields: only device knowledge could
  parse it), up to the VMDESCRIPTION that ends the stream.
- `decode_init` and `decode_packet` for a multifd channel: a 64-byte init, then packets of
  a fixed-size header (1344 bytes for 4 KiB pages) and a payload whose size the header gives.

Errors are typed (errors.py) and say what arrived and what was expected; `Unsupported` names
a capability of the source that this receiver cannot honour.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from .. import errors as E

PAGE_SIZE = 4096  # x86's target page: QEMU's RAM records carry flags in the bits below it
PAGE_BITS = 12

# --- the main channel

QEVM = b"QEVM"
STREAM_VERSION = 3

SECTION_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E

# RAM record flags: the low bits of each record's be64 (offset | flags).
FLAG_FULL = 0x01
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
FLAG_XBZRLE = 0x40
FLAG_HOOK = 0x80
FLAG_COMPRESS_PAGE = 0x100
FLAG_MULTIFD_FLUSH = 0x200

CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
CMD_SWITCHOVER_START = 11  # 10.0: a hint for the destination's devices; nothing for RAM
# The commands of postcopy, colo and packaged (postcopy) streams.
UNSUPPORTED_COMMANDS = {3: "postcopy-ram", 4: "postcopy-ram", 5: "postcopy-ram",
                        6: "postcopy-ram", 7: "postcopy-ram (resume)",
                        8: "postcopy-ram (packaged)", 9: "postcopy-ram (recovery)",
                        10: "x-colo"}

MAX_VMDESC = 64 << 20  # the JSON is ~100 KB for a small guest
MAX_DEVICE_STATE = 256 << 20
MAX_BLOCKS = 1024
MAX_RAM = 1 << 40  # 1 TiB of guest RAM: a page history of 256 MiB
MAX_NAME = 256  # a machine type's name
MAX_CAPABILITIES = 256

# The return path, destination to source: be16 type, be16 length, data.
RP_SHUT = 1
RP_PONG = 2


def encode_shut(failed: bool) -> bytes:
    """MIG_RP_MSG_SHUT: the destination is done (0) or failed (1); the source then ends."""
    return struct.pack(">HHI", RP_SHUT, 4, 1 if failed else 0)


def encode_pong(value: int) -> bytes:
    return struct.pack(">HHI", RP_PONG, 4, value)


# Events of the main channel.

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Configuration:
    machine: str  # the machine type, e.g. "pc-i440fx-7.2"
    capabilities: tuple[str, ...] = ()  # only sent when x-ignore-shared is on
    uuid: bytes | None = None  # only sent with validate-uuid


@dataclass(frozen=True)
class Command:
    command: int
    data: bytes


@dataclass(frozen=True)
class RamBlocks:
    blocks: tuple[tuple[str, int], ...]  # (idstr, used_length) in stream order


@dataclass(frozen=True)
class ZeroPages:
    """Pages of one block that are all zero now (consecutive ZERO records, in order)."""
    block: str
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Page:
    """A whole page sent on the main channel (multifd off, or a ZERO record's non-zero fill)."""
    block: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class EndOfSection:
    """RAM_SAVE_FLAG_EOS: the end of one RAM section (setup, an iteration, completion)."""


@dataclass(frozen=True)
class Flush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH (8.1+): the multifd channels were synced here."""


@dataclass(frozen=True)
class End:
    """The stream is complete: the device state after the RAM section (up to and including
    QEMU_VM_EOF) and the VMDESCRIPTION JSON (None when the source suppresses it)."""
    device_state: bytes
    vmdescription: bytes | None


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_CMD = struct.Struct(">HH")
_INSTANCE = struct.Struct(">II")
_VMDESC_START = b'{"page_size"'
_ZERO_RECORD = struct.Struct(">QB")
# Whole ZERO|CONTINUE records with fill 0: any offset bits, then the flags 0x022 (the low
# nibble of byte 6, and byte 7), then the fill byte 0.
_LOW_NIBBLE_ZERO = b"".join(re.escape(bytes([n])) for n in range(0, 256, 16))
_ZERO_RUN = re.compile(b"(?:.{6}[" + _LOW_NIBBLE_ZERO + b"]\x22\x00)+", re.DOTALL)


class MainStream:
    """QEMU's main migration channel, parsed as bytes arrive (see the module docstring).

    The parser is a chain of steps, each of which either consumes a whole item and returns
    True, or consumes nothing and returns False when the item is not all there yet. So a
    record split across two reads is simply parsed again, whole, after the next feed()."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._step = self._header
        self._events: list = []
        self._zeros: list[int] = []
        self._zero_block: str | None = None
        self.blocks: dict[str, int] = {}
        self.ignore_shared = False
        self.ram_section: int | None = None
        self.ram_complete = False  # its END section was read whole
        self._listing = None  # a block list read in part: (bytes done, blocks, their sum)
        self.completing = False  # in the END section (the completion)
        self.sections = 0  # RAM sections, i.e. EOS records
        self.flushes = 0
        self.bytes = 0
        self.records = {"zero": 0, "page": 0}
        self._block: str | None = None  # the block a CONTINUE record refers to
        self._device_state = bytearray()
        self._in_device_state = False
        self._vmdesc_at: int | None = None  # where 00 06 len JSON starts in the device state
        self._vmdesc_search = 0
        self._trailing = 0  # bytes after a VMDESCRIPTION look-alike
        self._ended = False

    # --- the caller's side

    def feed(self, data) -> None:
        if self._ended and len(data):
            raise E.RemoteProtocolError(f"{len(data)} bytes after the end of the stream "
                                        "(the VMDESCRIPTION)")
        self.bytes += len(data)
        if self._in_device_state:
            self._device_state += data
            self._find_vmdesc()
        else:
            self._buf += data

    def next_event(self):
        """The next event, or NEED_DATA when the bytes fed so far hold no whole one more."""
        while not self._events:
            if not self._step():
                self._flush_zeros()
                if not self._events:
                    self._compact()
                    return NEED_DATA
        return self._events.pop(0)

    def end_of_stream(self) -> End:
        """The peer closed the channel: the End, if the stream was complete. Complete means
        its VMDESCRIPTION arrived whole: without it, a cut after any device section's last
        byte would look like a whole stream (QEMU sends one for every machine type it can
        migrate with multifd; only postcopy and the oldest machine types suppress it)."""
        if not self._in_device_state:
            left = len(self._buf) - self._pos
            raise E.RemoteProtocolError(
                "the main channel ended before the device state began" +
                (f" ({left} bytes of an unfinished record)" if left else ""))
        end = self._end()
        if end is None:
            if self._trailing:
                raise E.RemoteProtocolError(f"{self._trailing} bytes after the end of the "
                                            "stream (the VMDESCRIPTION)")
            raise E.RemoteProtocolError(
                f"the main channel ended in the device state ({len(self._device_state)} "
                "bytes, no QEMU_VM_EOF and VMDESCRIPTION)")
        return end

    @property
    def complete(self) -> bool:
        """Whether the VMDESCRIPTION that ends the stream has arrived whole."""
        return self._ended

    # --- reading helpers: None (and nothing consumed) when the bytes are not there yet

    def _have(self, n: int) -> bool:
        return len(self._buf) - self._pos >= n

    def _compact(self) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0

    def _emit(self, event) -> None:
        self._flush_zeros()
        self._events.append(event)

    def _flush_zeros(self) -> None:
        if self._zeros:
            self._events.append(ZeroPages(self._zero_block, tuple(self._zeros)))
            self._zeros = []

    # --- the steps

    def _header(self) -> bool:
        if not self._have(8):
            return False
        magic, version = bytes(self._buf[0:4]), _U32.unpack_from(self._buf, 4)[0]
        if magic != QEVM:
            raise E.BadMagic(f"magic {magic.hex()} is not QEVM "
                             f"({QEVM.hex()})")
        if version != STREAM_VERSION:
            raise E.BadVersion(f"stream version {version} (this receiver reads "
                               f"version {STREAM_VERSION}, QEMU 2.x and later)")
        self._pos = 8
        self._step = self._top
        return True

    def _top(self) -> bool:
        """One top-level item: configuration, command, section, or the device state."""
        if not self._have(1):
            return False
        kind = self._buf[self._pos]
        if kind == CONFIGURATION:
            return self._configuration()
        if kind == COMMAND:
            return self._command()
        if kind in (SECTION_START, SECTION_FULL):
            return self._section_start(kind)
        if kind in (SECTION_PART, SECTION_END):
            return self._section_part(kind)
        if kind == SECTION_EOF:
            return self._begin_device_state("QEMU_VM_EOF")
        raise E.RemoteProtocolError(f"unknown item type 0x{kind:02x} at stream "
                                    f"byte {self._offset()}")

    def _offset(self) -> int:
        return self.bytes - (len(self._buf) - self._pos)

    def _string(self, at: int, size_len: int = 1) -> tuple[str, int] | None:
        """A length-prefixed string at buffer position `at`: (text, position after)."""
        if len(self._buf) - at < size_len:
            return None
        n = (_U8 if size_len == 1 else _U32).unpack_from(self._buf, at)[0]
        if len(self._buf) - at - size_len < n:
            return None
        raw = bytes(self._buf[at + size_len:at + size_len + n])
        try:
            return raw.decode("ascii"), at + size_len + n
        except UnicodeDecodeError:
            raise E.RemoteProtocolError(f"a name that is not ASCII: "
                                        f"{raw[:64]!r}") from None

    def _configuration(self) -> bool:
        if self._have(5) and _U32.unpack_from(self._buf, self._pos + 1)[0] > MAX_NAME:
            raise E.LimitExceeded(f"a machine type name of "
                                  f"{_U32.unpack_from(self._buf, self._pos + 1)[0]} bytes")
        got = self._string(self._pos + 1, 4)
        if got is None:
            return False
        machine, at = got
        capabilities, uuid = (), None
        while at < len(self._buf) and self._buf[at] == SUBSECTION:
            name = self._string(at + 1)
            if name is None or len(self._buf) - name[1] < 4:
                return False
            sub, body = name[0], name[1] + 4
            if sub == "configuration/target-page-bits":
                if len(self._buf) - body < 4:
                    return False
                bits = _U32.unpack_from(self._buf, body)[0]
                if bits != PAGE_BITS:
                    raise E.Unsupported(f"target pages of 2**{bits} bytes (this receiver "
                                        f"reads {PAGE_SIZE}-byte pages)")
                at = body + 4
            elif sub == "configuration/capabilities":
                if len(self._buf) - body < 4:
                    return False
                count, at, names = _U32.unpack_from(self._buf, body)[0], body + 4, []
                if count > MAX_CAPABILITIES:
                    raise E.LimitExceeded(f"{count} capabilities in the "
                                          "configuration")
                for _ in range(count):
                    got = self._string(at)
                    if got is None:
                        return False
                    names.append(got[0])
                    at = got[1]
                capabilities = tuple(names)
            elif sub == "configuration/uuid":
                if len(self._buf) - body < 16:
                    return False
                uuid, at = bytes(self._buf[body:body + 16]), body + 16
            else:
                raise E.Unsupported(f"configuration subsection {sub!r}")
        if at == len(self._buf):
            return False  # a subsection may follow: decide once the next byte is here
        self._pos = at
        self.ignore_shared = "x-ignore-shared" in capabilities
        self._emit(Configuration(machine, capabilities, uuid))
        return True

    def _command(self) -> bool:
        if not self._have(5):
            return False
        command, length = _CMD.unpack_from(self._buf, self._pos + 1)
        if not self._have(5 + length):
            return False
        if command in UNSUPPORTED_COMMANDS:
            raise E.Unsupported(f"the source uses {UNSUPPORTED_COMMANDS[command]} "
                                f"(migration command {command})")
        data = bytes(self._buf[self._pos + 5:self._pos + 5 + length])
        self._pos += 5 + length
        if command not in (CMD_OPEN_RETURN_PATH, CMD_PING, CMD_SWITCHOVER_START):
            raise E.Unsupported(f"migration command {command}")
        self._emit(Command(command, data))
        return True

    def _section_start(self, kind: int) -> bool:
        """START or FULL: type, be32 id, u8 len, idstr, be32 instance, be32 version."""
        if not self._have(6):
            return False
        got = self._string(self._pos + 5)
        if got is None or len(self._buf) - got[1] < 8:
            return False
        idstr, at = got
        section = _U32.unpack_from(self._buf, self._pos + 1)[0]
        if kind == SECTION_FULL:
            if self.ram_section is None:
                raise E.Unsupported(f"device state before RAM (section {idstr!r}: "
                                    "early-setup devices such as virtio-mem)")
            return self._begin_device_state(f"device section {idstr!r}")
        if idstr != "ram":
            raise E.Unsupported(f"iterable section {idstr!r} (block migration, dirty "
                                "bitmaps or VFIO): this receiver takes RAM only")
        if self.ram_section is not None:
            raise E.RemoteProtocolError("a second RAM section start")
        instance, version = _INSTANCE.unpack_from(self._buf, at)
        if version != 4:
            raise E.Unsupported(f"RAM section version {version} (this receiver reads 4)")
        self.ram_section = section
        self._pos = at + 8
        self._step = self._ram
        return True

    def _section_part(self, kind: int) -> bool:
        if not self._have(5):
            return False
        section = _U32.unpack_from(self._buf, self._pos + 1)[0]
        if self.ram_complete:
            raise E.RemoteProtocolError("a RAM section after its completion")
        if section != self.ram_section:
            raise E.Unsupported(f"a section part for section {section}, which is not RAM "
                                "(another iterable section: block migration, dirty bitmaps "
                                "or VFIO)")
        self._pos += 5
        self.completing = kind == SECTION_END
        self._step = self._ram
        return True

    def _footer(self) -> bool:
        if not self._have(5):
            return False
        kind, section = self._buf[self._pos], _U32.unpack_from(self._buf, self._pos + 1)[0]
        if kind != SECTION_FOOTER or section != self.ram_section:
            raise E.RemoteProtocolError(
                f"after the RAM section's end, 0x{kind:02x} (section "
                f"{section}) instead of its footer 0x7e (section {self.ram_section})")
        self._pos += 5
        self.ram_complete = self.completing
        self._step = self._top
        return True

    def _begin_device_state(self, what: str) -> bool:
        if not self.ram_complete:
            raise E.RemoteProtocolError(f"{what} before the end of the RAM "
                                        "section (its completion, SECTION_END)")
        self._device_state += self._buf[self._pos:]
        self._buf = bytearray()
        self._pos = 0
        self._step = self._opaque
        self._in_device_state = True
        self._find_vmdesc()
        return True

    def _opaque(self) -> bool:
        end = self._end() if not self._ended else None
        if end is not None:
            self._emit(end)
            return True
        return False

    def _find_vmdesc(self) -> None:
        """Look for `00 06 be32 len {"page_size"...`: QEMU_VM_EOF, then the VMDESCRIPTION."""
        state = self._device_state
        if len(state) > MAX_DEVICE_STATE + MAX_VMDESC:
            raise E.LimitExceeded(f"device state over {MAX_DEVICE_STATE >> 20} MiB")
        if self._vmdesc_at is not None:
            return
        need = 6 + len(_VMDESC_START)
        at = state.find(b"\x00\x06", self._vmdesc_search)
        while at >= 0 and len(state) - at >= need:
            if state[at + 6:at + need] == _VMDESC_START:
                self._vmdesc_at = at
                return
            at = state.find(b"\x00\x06", at + 1)
        # Resume at an undecided candidate, or where one could still begin.
        self._vmdesc_search = at if at >= 0 else max(0, len(state) - 1)

    def _end(self) -> End | None:
        """The End, once the VMDESCRIPTION found is whole and nothing follows it. Bytes
        after it, or a length no VMDESCRIPTION has, make it a look-alike inside device data:
        the search goes on after it."""
        while self._vmdesc_at is not None:
            state, at = self._device_state, self._vmdesc_at
            length = _U32.unpack_from(state, at + 2)[0]
            if length <= MAX_VMDESC and len(state) <= at + 6 + length:
                break
            if length <= MAX_VMDESC:
                self._trailing = len(state) - (at + 6 + length)
            self._vmdesc_at, self._vmdesc_search = None, at + 1
            self._find_vmdesc()
        else:
            return None
        if len(state) < at + 6 + length:
            return None
        vmdesc = bytes(state[at + 6:])
        try:
            page_size = json.loads(vmdesc).get("page_size")
        except (ValueError, AttributeError, RecursionError) as exc:
            raise E.RemoteProtocolError(f"the VMDESCRIPTION is not a JSON object: "
                                        f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if page_size != PAGE_SIZE:
            raise E.Unsupported(f"pages of {page_size} bytes in the VMDESCRIPTION (this "
                                f"receiver reads {PAGE_SIZE}-byte pages)")
        self._ended = True
        return End(bytes(state[:at + 1]), vmdesc)

    # --- the RAM section's records

    def _ram(self) -> bool:
        """RAM records until EOS (then the section's footer)."""
        buf = self._buf
        while len(buf) - self._pos >= 8:
            value = _U64.unpack_from(buf, self._pos)[0]
            flags, offset = value & (PAGE_SIZE - 1), value & ~(PAGE_SIZE - 1)
            kind = flags & ~FLAG_CONTINUE
            if flags == FLAG_ZERO | FLAG_CONTINUE and self._block is not None and \
                    self._zero_block == self._block and self._zero_run():
                continue
            if kind == FLAG_ZERO:
                if not self._zero(flags, offset):
                    return False
            elif kind == FLAG_PAGE:
                if not self._page(flags, offset):
                    return False
            elif flags == FLAG_EOS:
                self._pos += 8
                self.sections += 1
                self._step = self._footer
                self._emit(EndOfSection())
                return True
            elif flags == FLAG_MULTIFD_FLUSH:
                self._pos += 8
                self.flushes += 1
                self._emit(Flush())
                return True
            elif flags == FLAG_MEM_SIZE:
                if not self._mem_size(offset):
                    return False
                return True
            else:
                raise self._bad_flags(flags)
        return False

    def _bad_flags(self, flags: int) -> E.MultifdError:
        kind = flags & ~FLAG_CONTINUE
        names = {FLAG_XBZRLE: "xbzrle", FLAG_COMPRESS_PAGE: "compress (the old "
                 "compression threads)", FLAG_HOOK: "rdma"}
        if kind in names:
            return E.Unsupported(f"the source uses {names[kind]}")
        return E.RemoteProtocolError(f"a RAM record with flags 0x{flags:03x} "
                                     f"at stream byte {self._offset()}")

    def _record_block(self, flags: int) -> tuple[str, int] | None:
        """The block of a ZERO/PAGE record at self._pos and where its body starts."""
        at = self._pos + 8
        if flags & FLAG_CONTINUE:
            if self._block is None:
                raise E.RemoteProtocolError("a CONTINUE record before any "
                                            "block was named")
            return self._block, at
        got = self._string(at)
        if got is None:
            return None
        name, at = got
        if name not in self.blocks:
            raise E.RemoteProtocolError(f"a page of unknown RAM block "
                                        f"{name!r}")
        self._block = name
        return name, at

    def _check_offset(self, block: str, offset: int) -> None:
        if offset > self.blocks[block] - PAGE_SIZE:
            raise E.OutOfRange(f"page offset 0x{offset:x} beyond RAM block "
                               f"{block!r} (0x{self.blocks[block]:x} bytes)")

    def _zero_run(self) -> int:
        """Consecutive zero pages of the current block (ZERO|CONTINUE, fill 0: nine bytes
        each, most of a precopy's main channel) taken at once, found and decoded in C rather
        than record by record. Returns how many bytes it took (0: none)."""
        match = _ZERO_RUN.match(self._buf, self._pos)
        if match is None:
            return 0
        end = match.end()
        offsets = [value & ~(PAGE_SIZE - 1) for value, _ in
                   _ZERO_RECORD.iter_unpack(memoryview(self._buf)[self._pos:end])]
        self._check_offset(self._block, max(offsets))
        self._zeros += offsets
        self.records["zero"] += len(offsets)
        self._pos = end
        return end

    def _zero(self, flags: int, offset: int) -> bool:
        got = self._record_block(flags)
        if got is None or len(self._buf) - got[1] < 1:
            return False
        block, at = got
        self._check_offset(block, offset)
        fill = self._buf[at]
        self._pos = at + 1
        self.records["zero"] += 1
        if fill:  # an old source's fill byte: the page is that byte, not zero
            self._emit(Page(block, offset, bytes([fill]) * PAGE_SIZE))
            return True
        if block != self._zero_block:
            self._flush_zeros()
            self._zero_block = block
        self._zeros.append(offset)
        return True

    def _page(self, flags: int, offset: int) -> bool:
        got = self._record_block(flags)
        if got is None or len(self._buf) - got[1] < PAGE_SIZE:
            return False
        block, at = got
        self._check_offset(block, offset)
        self._pos = at + PAGE_SIZE
        self.records["page"] += 1
        self._emit(Page(block, offset, bytes(self._buf[at:at + PAGE_SIZE])))
        return True

    def _mem_size(self, total: int) -> bool:
        """The block list: u8 len, idstr, be64 used_length (+ be64 address with
        x-ignore-shared) until the lengths add up to `total`. A list split across reads is
        resumed where it stopped (`_listing`), not parsed again from its start."""
        if self.blocks or total == 0:
            raise E.RemoteProtocolError("a second RAM block list" if self.blocks
                                        else "an empty RAM block list")
        if total > MAX_RAM:
            raise E.LimitExceeded(f"RAM blocks of {total} bytes in all (at most "
                                  f"{MAX_RAM >> 30} GiB)")
        if self._listing is None:
            self._listing = (8, {}, 0)
        done, blocks, seen = self._listing
        while seen < total:
            at = self._pos + done
            got = self._string(at)
            tail = 16 if self.ignore_shared else 8
            if got is None or len(self._buf) - got[1] < tail:
                self._listing = (done, blocks, seen)
                return False
            name, at = got
            length = _U64.unpack_from(self._buf, at)[0]
            done = at + tail - self._pos
            if not name or name in blocks:
                raise E.RemoteProtocolError(f"RAM block name {name!r} is empty "
                                            "or given twice")
            if length == 0 or length % PAGE_SIZE:
                raise E.Misaligned(f"RAM block {name!r}: {length} bytes is not a whole "
                                   f"number of {PAGE_SIZE}-byte pages")
            blocks[name] = length
            seen += length
            if len(blocks) > MAX_BLOCKS:
                raise E.LimitExceeded(f"more than {MAX_BLOCKS} RAM blocks")
        if seen != total:
            raise E.RemoteProtocolError(f"RAM blocks of {seen} bytes in all, "
                                        f"announced as {total}")

        self._pos += done
        self._listing = None
        self.blocks = blocks
        self._emit(RamBlocks(tuple(blocks.items())))
        return True


# --- a multifd channel

MULTIFD_MAGIC = 0x11223344
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")
MULTIFD_VERSION = 1
INIT = struct.Struct(">II16sB7s32s")  # MultiFDInit_t: 64 bytes
PACKET_PAGES = 128  # MULTIFD_PACKET_SIZE (512 KiB) of 4 KiB pages
RAMBLOCK_NAME = 256
_HEAD = struct.Struct(">IIIIIIQI")  # magic ... packet_num, then zero_pages (9.0+)
PACKET_HEADER = 64 + RAMBLOCK_NAME + 8 * PACKET_PAGES  # 1344

FLAG_SYNC = 0x01
COMPRESSION_MASK = 0x3E
COMPRESSION = {0x00: "none", 0x02: "zlib", 0x04: "zstd", 0x08: "qpl", 0x10: "uadk",
               0x20: "qatzip"}
FLAG_DEVICE_STATE = 0x40
KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
# A compressed payload never needs more than its pages plus the codecs' framing.
MAX_PAYLOAD = PACKET_PAGES * PAGE_SIZE + (64 << 10)


@dataclass(frozen=True)
class ChannelInit:
    uuid: bytes
    id: int


def decode_init(data) -> ChannelInit:
    """MultiFDInit_t, the first 64 bytes of a multifd channel."""
    if len(data) != INIT.size:
        raise E.RemoteProtocolError(f"a multifd init of {len(data)} bytes ({INIT.size} "
                                    "expected)")
    magic, version, uuid, channel, _, _ = INIT.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise E.BadMagic(f"multifd init: magic 0x{magic:08x} (0x{MULTIFD_MAGIC:08x} "
                         "expected)")
    if version != MULTIFD_VERSION:
        raise E.BadVersion(f"multifd init: version {version} ({MULTIFD_VERSION} expected)")
    return ChannelInit(uuid, channel)


@dataclass(frozen=True)
class Packet:
    flags: int
    packet_num: int
    block: str | None  # None when the packet carries no pages (its name may be stale)
    normal: tuple[int, ...]  # offsets of the pages in the payload, in payload order
    zero: tuple[int, ...]  # offsets of pages that are zero now (9.0+)
    payload_size: int
    compression: str

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)


def decode_packet(data, blocks: dict[str, int]) -> Packet:
    """A multifd packet header (PACKET_HEADER bytes), checked as QEMU's destination checks
    it and against the RAM blocks the main channel announced."""
    if len(data) != PACKET_HEADER:
        raise E.RemoteProtocolError(f"a multifd packet header of {len(data)} bytes "
                                    f"({PACKET_HEADER} expected)")
    magic, version, flags, alloc, normal, next_size, num, zero = _HEAD.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise E.BadMagic(f"packet magic 0x{magic:08x} (0x{MULTIFD_MAGIC:08x} expected)")
    if version != MULTIFD_VERSION:
        raise E.BadVersion(f"packet version {version} ({MULTIFD_VERSION} expected)")
    if flags & ~KNOWN_FLAGS:
        raise E.RemoteProtocolError(f"packet flags 0x{flags:x}: unknown bits "
                                    f"0x{flags & ~KNOWN_FLAGS:x}")
    if flags & FLAG_DEVICE_STATE:
        raise E.Unsupported("device state in multifd packets (VFIO)")
    method = COMPRESSION.get(flags & COMPRESSION_MASK)
    if method is None:
        raise E.RemoteProtocolError(f"packet flags 0x{flags:x}: more than one compression")
    if alloc > PACKET_PAGES:
        raise E.LimitExceeded(f"packet of {alloc} pages (at most {PACKET_PAGES})")
    if normal > alloc or zero > alloc - normal:
        raise E.LimitExceeded(f"packet with {normal} normal and {zero} zero pages in a "
                              f"packet of {alloc}")
    if normal + zero == 0:
        # Nothing to apply: 7.2 leaves the name, the offsets and next_packet_size of the
        # packet before in an empty one (and then sends no payload).
        return Packet(flags, num, None, (), (), 0, method)
    raw = bytes(data[64:64 + RAMBLOCK_NAME]).split(b"\0", 1)[0]
    block = raw.decode("ascii", "replace")
    used = blocks.get(block)
    if used is None:
        raise E.RemoteProtocolError(f"packet for unknown RAM block {block!r}")
    count = normal + zero
    offsets = struct.unpack_from(f">{count}Q", data, 64 + RAMBLOCK_NAME)
    if max(offsets) > used - PAGE_SIZE:
        raise E.OutOfRange(f"page offset 0x{max(offsets):x} beyond RAM block {block!r} "
                           f"(0x{used:x} bytes)")
    # Aligned: the low 12 bits of every be64 are 0, i.e. its last byte and the low half of
    # the one before (checked on the bytes, at C speed).
    raw = bytes(data[64 + RAMBLOCK_NAME:64 + RAMBLOCK_NAME + 8 * count])
    if raw[7::8].count(0) != count or raw[6::8].translate(_LOW_NIBBLE).count(0) != count:
        raise E.Misaligned(f"a page offset in RAM block {block!r} is not a multiple of "
                           f"{PAGE_SIZE}")
    if normal == 0:
        size = 0
    elif method == "none":
        size = normal * PAGE_SIZE
    else:
        size = next_size
        if not 0 < size <= MAX_PAYLOAD:
            raise E.LimitExceeded(f"compressed payload of {size} bytes for {normal} pages")
    return Packet(flags, num, block, offsets[:normal], offsets[normal:], size, method)


class _TooMuch(Exception):
    pass


class _BoundedSink:
    """Where zstd writes what it decodes, up to `limit` bytes: a payload that would decode
    to more stops at the limit instead of filling memory."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.limit = 0

    def write(self, data) -> int:
        if len(self.out) + len(data) > self.limit:
            raise _TooMuch
        self.out += data
        return len(data)


class Inflater:
    """One multifd channel's decompression: QEMU keeps one zlib or zstd stream per channel
    for the whole migration and flushes it at the end of every packet, so each payload
    decodes to exactly its pages, given the payloads before it in order. What a payload may
    decode to is bounded by its pages, for either codec."""

    def __init__(self, method: str) -> None:
        self.method = method
        if method == "zlib":
            import zlib
            self._stream = zlib.decompressobj()
        elif method == "zstd":
            import zstandard  # only a zstd migration pays for loading it
            self._sink = _BoundedSink()
            # An output buffer larger than a packet's pages: with a smaller one, what
            # decodes past its last fill stays inside the decoder until more input comes.
            self._stream = zstandard.ZstdDecompressor().stream_writer(
                self._sink, write_size=PACKET_PAGES * PAGE_SIZE + PAGE_SIZE)
        else:
            raise E.Unsupported(f"multifd-compression {method}")

    def inflate(self, payload, pages: int) -> bytes:
        want = pages * PAGE_SIZE
        try:
            if self.method == "zlib":
                out = self._stream.decompress(payload, want + 1)
            else:
                self._sink.out.clear()
                self._sink.limit = want
                self._stream.write(payload)
                out = bytes(self._sink.out)
        except _TooMuch:
            raise E.RemoteProtocolError(f"zstd payload decodes to more than the {pages} "
                                        "pages of its packet") from None
        except Exception as exc:  # each codec has its own error type
            raise E.RemoteProtocolError(f"{self.method} payload does not decode: {exc}") \
                from None
        if len(out) != want:
            raise E.RemoteProtocolError(f"{self.method} payload decodes to {len(out)} bytes, "
                                        f"not the {pages} pages of its packet")
        return out
