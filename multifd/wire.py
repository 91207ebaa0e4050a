"""The multifd wire format: bytes to immutable records and back.

This module contains no networking code at all: it never imports trio, socket or ssl (a test
enforces it). Every layout is a `struct.Struct` in network byte order and is documented byte for
byte in docs/PROTOCOL.md. Decoders validate strictly and raise typed errors that say what was
received and what was expected; buffer-level decoders return None for "not enough bytes yet"
and consume nothing in that case.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from . import errors as E

MAGIC = 0x4D464431  # "MFD1": starts every hello and hello reply
MAGIC_BYTES = MAGIC.to_bytes(4, "big")  # as it appears first on the wire
PACKET_MAGIC = 0x4D464450  # "MFDP": starts every data packet
VERSION = 2  # 2: live precopy: compressed payloads, partial packets, page digests, DONE timing

MAX_CHANNELS = 64
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
MAX_BLOCK_PAGES = 65535
MAX_BLOCK_BYTES = 8 << 20  # a receiver holds one block buffer per channel: 64 x 8 MiB at most
MAX_IMAGE_SIZE = 1 << 56
MAX_CONTROL_BODY = 4096
MAX_ERROR_TEXT = 1024
NO_CHANNEL = 0xFFFF


class Role(enum.IntEnum):
    CONTROL = 1
    DATA = 2


class HelloStatus(enum.IntEnum):
    OK = 0
    BAD_VERSION = 1
    UNKNOWN_SESSION = 2
    BAD_CHANNEL = 3
    DUPLICATE_CHANNEL = 4
    BUSY = 5
    BAD_HELLO = 6
    TLS_REQUIRED = 7
    CLIENT_NOT_ALLOWED = 8


HELLO_STATUS_TEXT = {
    HelloStatus.OK: "accepted",
    HelloStatus.BAD_VERSION: "unsupported protocol version",
    HelloStatus.UNKNOWN_SESSION: "unknown session",
    HelloStatus.BAD_CHANNEL: "channel id or count out of range",
    HelloStatus.DUPLICATE_CHANNEL: "duplicate channel id",
    HelloStatus.BUSY: "receiver is busy with another migration",
    HelloStatus.BAD_HELLO: "malformed hello",
    HelloStatus.TLS_REQUIRED: "this receiver accepts TLS connections only (use --tls)",
    HelloStatus.CLIENT_NOT_ALLOWED: "our client certificate's identity is not allowed "
                                    "(--tls-allow-client on the receiver)",
}


class ControlType(enum.IntEnum):
    SESSION = 1
    READY = 2
    COMPLETE = 3
    DONE = 4
    ERROR = 5
    WORKING = 6


class PacketKind(enum.IntEnum):
    PAGES = 1
    SYNC = 2
    END = 3


class RunKind(enum.IntEnum):
    DATA = 1
    ZERO = 2


class DigestAlg(enum.IntEnum):
    XXH3_128_BLOCK_SUM = 1  # a term per block: packets carry whole blocks
    XXH3_64_PAGE_SUM = 2  # a term per page: packets may carry some of a block's pages (live)


class Compression(enum.IntEnum):
    NONE = 0
    ZLIB = 1
    ZSTD = 2


class ErrorCode(enum.IntEnum):
    FAILED = 1
    PROTOCOL = 2
    VERIFY = 3
    IMAGE = 4
    TIMEOUT = 5
    CANCELLED = 6


FLAG_DIGEST = 0x01  # the packet carries the digest term of the pages it carries
FLAG_FULL_BLOCK = 0x02  # the runs tile the whole block
_KNOWN_PACKET_FLAGS = FLAG_DIGEST | FLAG_FULL_BLOCK

HELLO = struct.Struct("!IHBB16sHHI")  # magic version role flags session channel channels reserved
HELLO_REPLY = struct.Struct("!IHBB")  # magic version status reserved
FRAME = struct.Struct("!BBHI")  # type flags reserved length
SESSION = struct.Struct("!QIIBBHI")  # size page_size block_pages digest compression flags reserved
COMPLETE = struct.Struct("!IIQQQ16s")  # rounds reserved packets pages zero_pages digest
DONE = struct.Struct("!Q16sQ")  # bytes digest last-round-microseconds
ERROR = struct.Struct("!HH")  # code reserved, then UTF-8 text
PACKET = struct.Struct("!IBBHIIQIB3s16s")  # see docs/PROTOCOL.md
RUN = struct.Struct("!IHBB")  # first page in block, pages, kind, reserved

_ZERO16 = bytes(16)


def _exact(data, size: int, what: str) -> None:
    if len(data) != size:
        raise E.RemoteProtocolError(f"{what} is {len(data)} bytes (expected {size})")


def _known(enum_cls, value: int, what: str):
    if value not in enum_cls._value2member_map_:
        names = ", ".join(f"{m.value} {m.name.lower()}" for m in enum_cls)
        raise E.RemoteProtocolError(f"unknown {what} {value} (expected {names})")
    return enum_cls(value)


def _canonical(value: int | bytes, zero, what: str) -> None:
    if value != zero:
        raise E.RemoteProtocolError(f"{what}: reserved field is {value!r} (expected zero)")


# ---------------------------------------------------------------- hello


@dataclass(frozen=True, slots=True)
class Hello:
    role: Role
    session: bytes
    channel: int
    channels: int

    def label(self) -> str:
        return "control channel" if self.role is Role.CONTROL else f"data channel {self.channel}"


def encode_hello(hello: Hello, *, magic: int = MAGIC, version: int = VERSION) -> bytes:
    if len(hello.session) != 16:
        raise E.LocalProtocolError("session id must be 16 bytes")
    return HELLO.pack(magic, version, hello.role, 0, hello.session, hello.channel,
                      hello.channels, 0)


def decode_hello(data: bytes) -> Hello:
    """Decode exactly HELLO.size bytes; validation independent of any session."""
    _exact(data, HELLO.size, "hello")
    magic, version, role, flags, session, channel, channels, reserved = HELLO.unpack(data)
    if magic != MAGIC:
        raise E.BadMagic(f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
    if version != VERSION:
        err = E.BadVersion(f"unsupported protocol version {version} (expected {VERSION})")
        err.version = version
        raise err
    if role not in Role._value2member_map_:
        raise E.RemoteProtocolError(f"unknown role {role} (expected 1 control or 2 data)")
    _canonical(flags, 0, "hello flags")
    _canonical(reserved, 0, "hello")
    if not 1 <= channels <= MAX_CHANNELS:
        raise E.BadChannelId(f"channel count {channels} out of range (expected 1..{MAX_CHANNELS})")
    role = Role(role)
    if role is Role.CONTROL and channel != 0:
        raise E.BadChannelId(f"control channel has id {channel} (expected 0)")
    if role is Role.DATA and channel >= channels:
        raise E.BadChannelId(f"channel id {channel} out of range (expected 0..{channels - 1})")
    return Hello(role, session, channel, channels)


def encode_hello_reply(status: HelloStatus) -> bytes:
    return HELLO_REPLY.pack(MAGIC, VERSION, status, 0)


def decode_hello_reply(data: bytes) -> HelloStatus:
    _exact(data, HELLO_REPLY.size, "hello reply")
    magic, version, status, reserved = HELLO_REPLY.unpack(data)
    if magic != MAGIC:
        raise E.BadMagic(f"bad magic 0x{magic:08x} in hello reply (expected 0x{MAGIC:08x})")
    if status not in HelloStatus._value2member_map_:
        raise E.RemoteProtocolError(f"unknown hello status {status} (expected 0..{max(HelloStatus)})")
    status = HelloStatus(status)
    if status is HelloStatus.BAD_VERSION or version != VERSION:
        raise E.BadVersion(f"receiver speaks protocol version {version} (we speak {VERSION})"
                           if version != VERSION else
                           f"receiver refused our protocol version (we speak {VERSION})")
    _canonical(reserved, 0, "hello reply")
    return status


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True)
class Session:
    """The migration's parameters, sent once on the control channel."""

    image_size: int
    page_size: int = 4096
    block_pages: int = 128
    digest: DigestAlg = DigestAlg.XXH3_128_BLOCK_SUM
    compression: Compression = Compression.NONE

    def __post_init__(self) -> None:
        check_geometry(self.image_size, self.page_size, self.block_pages, E.LocalProtocolError)

    @property
    def block_bytes(self) -> int:
        return self.page_size * self.block_pages

    @property
    def nblocks(self) -> int:
        return -(-self.image_size // self.block_bytes)

    @property
    def npages(self) -> int:
        return -(-self.image_size // self.page_size)

    def block_len(self, block: int) -> int:
        """Bytes of the image inside `block` (the last block may be short)."""
        return min(self.block_bytes, self.image_size - block * self.block_bytes)

    def block_page_count(self, block: int) -> int:
        return -(-self.block_len(block) // self.page_size)


def check_geometry(image_size: int, page_size: int, block_pages: int, exc=E.LimitExceeded) -> None:
    if page_size < MIN_PAGE_SIZE or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise exc(f"page size {page_size} invalid (expected a power of two "
                  f"{MIN_PAGE_SIZE}..{MAX_PAGE_SIZE})")
    if not 1 <= block_pages <= MAX_BLOCK_PAGES or page_size * block_pages > MAX_BLOCK_BYTES:
        raise exc(f"packet of {block_pages} pages of {page_size} bytes exceeds the limit "
                  f"({MAX_BLOCK_BYTES} bytes, {MAX_BLOCK_PAGES} pages)")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise exc(f"image size {image_size} out of range (expected 1..{MAX_IMAGE_SIZE})")


# ---------------------------------------------------------------- control messages


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class Working:
    """The receiver is still busy (syncing the output): keeps the sender's wait alive."""


@dataclass(frozen=True, slots=True)
class Complete:
    rounds: int
    packets: int
    pages: int
    zero_pages: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Done:
    bytes: int
    digest: bytes
    # From the release of the barrier before the last round to the verified commit: a live
    # migration's downtime as the receiver saw it (0 for one round).
    last_round_us: int = 0


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    code: ErrorCode
    text: str


ControlMessage = Session | Ready | Working | Complete | Done | ErrorMessage


def _frame(kind: ControlType, body: bytes = b"") -> bytes:
    return FRAME.pack(kind, 0, 0, len(body)) + body


def encode_control(msg: ControlMessage) -> bytes:
    if isinstance(msg, Session):
        return _frame(ControlType.SESSION, SESSION.pack(
            msg.image_size, msg.page_size, msg.block_pages, msg.digest, msg.compression, 0, 0))
    if isinstance(msg, Ready):
        return _frame(ControlType.READY)
    if isinstance(msg, Working):
        return _frame(ControlType.WORKING)
    if isinstance(msg, Complete):
        return _frame(ControlType.COMPLETE, COMPLETE.pack(
            msg.rounds, 0, msg.packets, msg.pages, msg.zero_pages, msg.digest))
    if isinstance(msg, Done):
        return _frame(ControlType.DONE, DONE.pack(msg.bytes, msg.digest, msg.last_round_us))
    if isinstance(msg, ErrorMessage):
        # Cut at a character boundary: the text on the wire is always valid UTF-8.
        text = msg.text.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
        text = text.decode("utf-8", "ignore").encode("utf-8")
        return _frame(ControlType.ERROR, ERROR.pack(msg.code, 0) + text)
    raise E.LocalProtocolError(f"not a control message: {msg!r}")


_FIXED_BODY = {
    ControlType.SESSION: SESSION.size,
    ControlType.READY: 0,
    ControlType.WORKING: 0,
    ControlType.COMPLETE: COMPLETE.size,
    ControlType.DONE: DONE.size,
}


def _decode_body(kind: ControlType, body: bytes) -> ControlMessage:
    fixed = _FIXED_BODY.get(kind)
    if fixed is not None and len(body) != fixed:
        raise E.RemoteProtocolError(
            f"{kind.name} message body is {len(body)} bytes (expected {fixed})")
    if kind is ControlType.SESSION:
        size, page, block_pages, digest, compression, flags, reserved = SESSION.unpack(body)
        check_geometry(size, page, block_pages)
        digest = _known(DigestAlg, digest, "digest algorithm")
        compression = _known(Compression, compression, "compression")
        _canonical(flags, 0, "SESSION flags")
        _canonical(reserved, 0, "SESSION")
        return Session(size, page, block_pages, digest, compression)
    if kind is ControlType.READY:
        return Ready()
    if kind is ControlType.WORKING:
        return Working()
    if kind is ControlType.COMPLETE:
        rounds, reserved, packets, pages, zero_pages, digest = COMPLETE.unpack(body)
        _canonical(reserved, 0, "COMPLETE")
        return Complete(rounds, packets, pages, zero_pages, digest)
    if kind is ControlType.DONE:
        return Done(*DONE.unpack(body))
    # ERROR: variable length text
    if len(body) < ERROR.size or len(body) > ERROR.size + MAX_ERROR_TEXT:
        raise E.RemoteProtocolError(f"ERROR message body is {len(body)} bytes "
                                    f"(expected {ERROR.size}..{ERROR.size + MAX_ERROR_TEXT})")
    code, reserved = ERROR.unpack_from(body)
    _canonical(reserved, 0, "ERROR")
    code = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.FAILED
    return ErrorMessage(code, body[ERROR.size:].decode("utf-8", "replace"))


class ControlDecoder:
    """Incremental decoder for the control channel (sans-I/O).

    feed() bytes as they arrive; next_message() returns a message, or None when more bytes are
    needed (nothing is consumed then). The buffer never holds more than one frame header plus a
    bounded body: a length field over the limit raises before any body byte is awaited.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def pending(self) -> int:
        return len(self._buf)

    def bytes_needed(self) -> int:
        """How many more bytes complete the frame being decoded (at least 1)."""
        if len(self._buf) < FRAME.size:
            return FRAME.size - len(self._buf)
        length = FRAME.unpack_from(self._buf)[3]
        return max(1, FRAME.size + min(length, MAX_CONTROL_BODY) - len(self._buf))

    def next_message(self) -> ControlMessage | None:
        if len(self._buf) < FRAME.size:
            return None
        kind, flags, reserved, length = FRAME.unpack_from(self._buf)
        kind = _known(ControlType, kind, "control message type")
        _canonical(flags, 0, f"{kind.name} flags")
        _canonical(reserved, 0, kind.name)
        if length > MAX_CONTROL_BODY:
            raise E.LimitExceeded(
                f"{kind.name} message of {length} bytes exceeds {MAX_CONTROL_BODY}")
        end = FRAME.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[FRAME.size:end])
        del self._buf[:end]
        return _decode_body(kind, body)


# ---------------------------------------------------------------- data packets


@dataclass(frozen=True, slots=True)
class PacketHeader:
    kind: PacketKind
    flags: int
    nruns: int
    seq: int
    round: int
    offset: int
    payload_len: int  # bytes on the wire after the run table (compressed, if it is)
    digest: bytes
    compression: Compression = Compression.NONE

    @property
    def runs_len(self) -> int:
        return self.nruns * RUN.size


def encode_packet(kind: PacketKind, *, seq: int, round: int, offset: int = 0,
                  runs: tuple[tuple[int, int, int], ...] = (), page_size: int = 0,
                  flags: int = 0, digest: bytes = _ZERO16,
                  compression: Compression = Compression.NONE,
                  payload_len: int | None = None) -> bytes:
    """Header plus run table. `runs` are (first page in block, pages, RunKind). A
    compressed payload gives its own length; a plain one is its data pages."""
    payload = sum(n for _, n, k in runs if k == RunKind.DATA) * page_size
    if compression is not Compression.NONE:
        payload = payload_len
    head = PACKET.pack(PACKET_MAGIC, kind, flags, len(runs), seq, round, offset, payload,
                       compression, b"\0\0\0", digest)
    if not runs:
        return head
    return head + b"".join(RUN.pack(first, n, k, 0) for first, n, k in runs)


def decode_packet_header(data, session: Session) -> PacketHeader:
    """Validate the fixed header of one packet against the session's geometry."""
    _exact(data, PACKET.size, "packet header")
    (magic, kind, flags, nruns, seq, rnd, offset, payload, compression, reserved,
     digest) = PACKET.unpack(data)
    if magic != PACKET_MAGIC:
        raise E.BadMagic(f"bad packet magic 0x{magic:08x} (expected 0x{PACKET_MAGIC:08x})")
    kind = _known(PacketKind, kind, f"packet {seq} kind")
    compression = _known(Compression, compression, f"packet {seq} compression")
    if compression not in (Compression.NONE, session.compression):
        raise E.RemoteProtocolError(
            f"packet {seq}: compressed with {compression.name.lower()}, and the session's "
            f"method is {session.compression.name.lower()}")
    _canonical(reserved, b"\0\0\0", f"packet {seq}")
    if flags & ~_KNOWN_PACKET_FLAGS:
        raise E.RemoteProtocolError(f"packet {seq}: unknown flags 0x{flags:02x} "
                                    f"(expected a subset of 0x{_KNOWN_PACKET_FLAGS:02x})")
    if kind is not PacketKind.PAGES:
        for name, value in (("runs", nruns), ("payload length", payload), ("offset", offset),
                            ("flags", flags), ("digest", int.from_bytes(digest, "big")),
                            ("compression", compression)):
            if value:
                raise E.RemoteProtocolError(
                    f"{kind.name} packet {seq}: {name} is {value} (expected 0)")
        return PacketHeader(kind, 0, 0, seq, rnd, 0, 0, digest)
    if offset % session.block_bytes:
        raise E.Misaligned(f"packet {seq}: offset {offset} is not a multiple of the "
                           f"{session.block_bytes}-byte packet size")
    if offset >= session.image_size:
        raise E.OutOfRange(f"packet {seq}: offset {offset} outside the image "
                           f"({session.image_size} bytes)")
    block_pages = session.block_page_count(offset // session.block_bytes)
    if not 1 <= nruns <= block_pages:
        raise E.LimitExceeded(f"packet {seq}: {nruns} runs (expected 1..{block_pages})")
    if payload > block_pages * session.page_size:
        raise E.LimitExceeded(f"packet {seq}: payload of {payload} bytes exceeds the "
                              f"{block_pages * session.page_size}-byte block")
    return PacketHeader(kind, flags, nruns, seq, rnd, offset, payload, digest, compression)


def decode_runs(data, header: PacketHeader, session: Session) -> list[tuple[int, int, int]]:
    """Validate a run table: sorted, disjoint, inside the block, matching the payload length.

    Returns (first page in block, pages, RunKind) tuples.
    """
    _exact(data, header.runs_len, f"packet {header.seq} run table")
    block_pages = session.block_page_count(header.offset // session.block_bytes)
    runs = []
    end = 0
    data_pages = 0
    for first, n, kind, reserved in RUN.iter_unpack(data):
        if kind != RunKind.DATA and kind != RunKind.ZERO:  # (a run per page is common live)
            _known(RunKind, kind, f"packet {header.seq} run kind")
        if reserved:
            _canonical(reserved, 0, f"packet {header.seq} run")
        if n == 0:
            raise E.RemoteProtocolError(
                f"packet {header.seq}: run at page {first} has 0 pages (expected at least 1)")
        if first < end:
            raise E.RemoteProtocolError(
                f"packet {header.seq}: run at page {first} overlaps or is out of order "
                f"(expected page {end} or later)")
        if first + n > block_pages:
            raise E.OutOfRange(f"packet {header.seq}: run of pages {first}..{first + n - 1} "
                               f"outside the block ({block_pages} pages)")
        if header.flags & FLAG_FULL_BLOCK and first != end:
            raise E.RemoteProtocolError(
                f"packet {header.seq}: full-block packet has a gap: run at page {first} "
                f"(expected page {end})")
        end = first + n
        if kind == RunKind.DATA:
            data_pages += n
        runs.append((first, n, kind))
    if header.flags & FLAG_FULL_BLOCK and end != block_pages:
        raise E.RemoteProtocolError(
            f"packet {header.seq}: full-block packet covers {end} of {block_pages} pages")
    data_len = data_pages * session.page_size
    if header.compression is not Compression.NONE:
        # Compressed only where that is smaller: anything else is sent plain.
        if not 0 < header.payload_len < data_len:
            raise E.RemoteProtocolError(
                f"packet {header.seq}: compressed payload of {header.payload_len} bytes for "
                f"{data_pages} data pages (expected 1..{data_len - 1} bytes)")
    elif header.payload_len != data_len:
        raise E.RemoteProtocolError(
            f"packet {header.seq}: payload of {header.payload_len} bytes does not match "
            f"{data_pages} data pages ({data_len} bytes)")
    return runs
