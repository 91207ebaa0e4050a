"""The wire format (multifd/wire.py) against docs/PROTOCOL.md: purity, byte layouts, round
trips, the incremental control decoder, every typed error and hostile input.

All pure: no event loop, no sockets.
"""

from __future__ import annotations

import ast
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from multifd import errors as E
from multifd import wire as W
from multifd.wire import (
    Complete, ControlDecoder, Done, ErrorCode, ErrorMessage, Hello, HelloStatus, PacketHeader,
    PacketKind, Ready, Role, RunKind, Session,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
WIRE_PY = ROOT / "multifd" / "wire.py"
FORBIDDEN = {"trio", "socket", "ssl", "selectors", "asyncio"}

SID = bytes(range(0xA0, 0xB0))  # a 16-byte session id whose bytes are all distinct
DIGEST = bytes(range(0x10, 0x20))
PAGE = 4096
BLOCK_PAGES = 128
BLOCK = PAGE * BLOCK_PAGES  # 512 KiB
# 10 full blocks, then a short last block (index 10) of 3 full pages and a partial page.
SIZE = 10 * BLOCK + 3 * PAGE + 100
S = Session(SIZE, PAGE, BLOCK_PAGES)
LAST = 10
LAST_PAGES = 4
# An image that is an exact multiple of the block size (so offset == image size is aligned).
S_EXACT = Session(4 * BLOCK, PAGE, BLOCK_PAGES)

# make test: a short, repeatable run; make fuzz: MULTIFD_FUZZ_EXAMPLES=N, new inputs each time.
_LONG = int(os.environ.get("MULTIFD_FUZZ_EXAMPLES", "0"))
HYPO = settings(max_examples=_LONG or 300, deadline=None, database=None, derandomize=not _LONG)


# ------------------------------------------------------------------------------------ helpers


def hello_raw(*, magic=W.MAGIC, version=W.VERSION, role=Role.DATA, flags=0, session=SID,
              channel=0, channels=4, reserved=0) -> bytes:
    return W.HELLO.pack(magic, version, role, flags, session, channel, channels, reserved)


def reply_raw(*, magic=W.MAGIC, version=W.VERSION, status=HelloStatus.OK, reserved=0) -> bytes:
    return W.HELLO_REPLY.pack(magic, version, status, reserved)


def frame_raw(kind, body=b"", *, flags=0, reserved=0, length=None) -> bytes:
    return W.FRAME.pack(kind, flags, reserved, len(body) if length is None else length) + body


def session_body(*, size=SIZE, page=PAGE, block_pages=BLOCK_PAGES, digest=1, compression=0,
                 flags=0, reserved=0) -> bytes:
    return W.SESSION.pack(size, page, block_pages, digest, compression, flags, reserved)


def packet_raw(*, magic=W.PACKET_MAGIC, kind=PacketKind.PAGES, flags=3, nruns=1, seq=5,
               round=0, offset=0, payload=BLOCK, compression=0, reserved=b"\0\0\0",
               digest=DIGEST) -> bytes:
    return W.PACKET.pack(magic, kind, flags, nruns, seq, round, offset, payload, compression,
                         reserved, digest)


def marker_raw(kind, **over) -> bytes:
    fields = dict(kind=kind, flags=0, nruns=0, payload=0, digest=bytes(16))
    fields.update(over)
    return packet_raw(**fields)


def runs_raw(*runs) -> bytes:
    """Run entries; each run is (first, count, kind) or (first, count, kind, reserved)."""
    return b"".join(W.RUN.pack(*(tuple(r) + (0,) * (4 - len(r)))) for r in runs)


def pages_header(*, flags=3, nruns=1, offset=0, payload=BLOCK, seq=5) -> PacketHeader:
    return PacketHeader(PacketKind.PAGES, flags, nruns, seq, 0, offset, payload, DIGEST)


def decode_all(data: bytes) -> list:
    dec = ControlDecoder()
    dec.feed(data)
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    return out


def decode_one(data: bytes):
    dec = ControlDecoder()
    dec.feed(data)
    return dec.next_message()


# ------------------------------------------------------------------------------------ purity


def _imported_modules(path: pathlib.Path, package: str, seen: set[str]) -> set[str]:
    """Absolute names of everything `path` imports, following imports inside `package`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import errors` / `from .x import y`
                base = package if node.module is None else f"{package}.{node.module}"
                if node.module is None:
                    names.update(f"{base}.{alias.name}" for alias in node.names)
                else:
                    names.add(base)
            else:
                names.add(node.module)
    result = set(names)
    for name in names:
        if name.startswith(package + ".") and name not in seen:
            seen.add(name)
            sub = ROOT.joinpath(*name.split(".")).with_suffix(".py")
            if sub.exists():
                result |= _imported_modules(sub, package, seen)
    return result


def test_wire_imports_no_networking_statically():
    imported = _imported_modules(WIRE_PY, "multifd", set())
    tops = {name.split(".")[0] for name in imported}
    assert not tops & FORBIDDEN, f"multifd/wire.py (or its package imports) imports {tops & FORBIDDEN}"
    # Nothing dodges the AST check through dynamic imports either.
    source = WIRE_PY.read_text()
    assert "importlib" not in source and "__import__" not in source


def test_wire_imports_no_networking_at_runtime():
    # Meaningful as written: a bare interpreter plus enum/struct/dataclasses (what wire.py
    # uses) loads none of these modules, which the first print checks, so any of them showing
    # up afterwards was pulled in by multifd.wire or multifd.errors.
    code = (
        "import sys\n"
        f"bad = {sorted(FORBIDDEN | {'_socket', '_ssl'})!r}\n"
        "before = [m for m in bad if m in sys.modules]\n"
        "import multifd.wire\n"
        "after = [m for m in bad if m in sys.modules]\n"
        "print(before, after)\n"
        "sys.exit(1 if before or after else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------------ layouts


def test_struct_sizes_match_the_document():
    assert W.HELLO.size == 32
    assert W.HELLO_REPLY.size == 8
    assert W.FRAME.size == 8
    assert W.SESSION.size == 24
    assert W.COMPLETE.size == 48
    assert W.DONE.size == 32
    assert W.PACKET.size == 48
    assert W.RUN.size == 8
    assert W.ERROR.size == 4


def test_magic_constants_spell_their_names():
    assert W.MAGIC.to_bytes(4, "big") == b"MFD1"
    assert W.PACKET_MAGIC.to_bytes(4, "big") == b"MFDP"


def test_encoded_sizes():
    assert len(W.encode_hello(Hello(Role.CONTROL, SID, 0, 1))) == 32
    assert len(W.encode_hello_reply(HelloStatus.OK)) == 8
    assert len(W.encode_control(Ready())) == 8
    assert len(W.encode_control(S)) == 8 + 24
    assert len(W.encode_control(Complete(1, 2, 3, 4, DIGEST))) == 8 + 48
    assert len(W.encode_control(Done(5, DIGEST))) == 8 + 32
    assert len(W.encode_control(ErrorMessage(ErrorCode.FAILED, "abc"))) == 8 + 4 + 3
    assert len(W.encode_packet(PacketKind.SYNC, seq=0, round=0)) == 48
    runs = ((0, 1, RunKind.DATA), (1, 127, RunKind.ZERO))
    assert len(W.encode_packet(PacketKind.PAGES, seq=0, round=0, runs=runs, page_size=PAGE,
                               flags=3)) == 48 + 2 * 8


def test_hello_layout():
    b = W.encode_hello(Hello(Role.DATA, SID, 3, 40))
    assert b[0:4] == b"MFD1"
    assert b[4:6] == b"\x00\x02"  # version 2, big-endian
    assert b[6] == 2  # role: data
    assert b[7] == 0  # flags
    assert b[8:24] == SID
    assert b[24:26] == b"\x00\x03"  # channel
    assert b[26:28] == b"\x00\x28"  # channels = 40
    assert b[28:32] == b"\x00\x00\x00\x00"
    c = W.encode_hello(Hello(Role.CONTROL, SID, 0, 64))
    assert c[6] == 1 and c[24:26] == b"\x00\x00" and c[26:28] == b"\x00\x40"
    # Network byte order with two distinct non-zero bytes (the encoder does not validate).
    assert W.encode_hello(Hello(Role.DATA, SID, 0x0102, 0x0304))[24:28] == b"\x01\x02\x03\x04"


def test_hello_reply_layout():
    assert W.encode_hello_reply(HelloStatus.OK) == b"MFD1\x00\x02\x00\x00"
    assert W.encode_hello_reply(HelloStatus.BUSY) == b"MFD1\x00\x02\x05\x00"
    assert W.encode_hello_reply(HelloStatus.BAD_HELLO) == b"MFD1\x00\x02\x06\x00"


def test_hello_status_and_enum_values_match_the_document():
    assert [int(s) for s in HelloStatus] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert (Role.CONTROL, Role.DATA) == (1, 2)
    assert [int(t) for t in W.ControlType] == [1, 2, 3, 4, 5, 6]
    assert (PacketKind.PAGES, PacketKind.SYNC, PacketKind.END) == (1, 2, 3)
    assert (RunKind.DATA, RunKind.ZERO) == (1, 2)
    assert [int(c) for c in ErrorCode] == [1, 2, 3, 4, 5, 6]
    assert (W.FLAG_DIGEST, W.FLAG_FULL_BLOCK) == (1, 2)


def test_frame_and_session_layout():
    s = Session(0x0002030405060708, 0x1000, 0x0102)
    b = W.encode_control(s)
    assert b[:8] == b"\x01\x00\x00\x00\x00\x00\x00\x18"  # type 1, flags, reserved, length 24
    body = b[8:]
    assert body[0:8] == b"\x00\x02\x03\x04\x05\x06\x07\x08"  # image size u64
    assert body[8:12] == b"\x00\x00\x10\x00"  # page size u32
    assert body[12:16] == b"\x00\x00\x01\x02"  # pages per packet u32
    assert body[16] == 1  # digest algorithm
    assert body[17] == 0  # compression
    assert body[18:20] == b"\x00\x00"  # flags
    assert body[20:24] == b"\x00\x00\x00\x00"  # reserved


def test_ready_layout():
    assert W.encode_control(Ready()) == b"\x02\x00\x00\x00\x00\x00\x00\x00"


def test_complete_layout():
    b = W.encode_control(Complete(0x01020304, 0x0102030405060708, 0x1112131415161718,
                                  0x2122232425262728, DIGEST))
    assert b[:8] == b"\x03\x00\x00\x00\x00\x00\x00\x30"
    body = b[8:]
    assert body[0:4] == b"\x01\x02\x03\x04"  # rounds
    assert body[4:8] == b"\x00\x00\x00\x00"  # reserved
    assert body[8:16] == bytes.fromhex("0102030405060708")  # packets
    assert body[16:24] == bytes.fromhex("1112131415161718")  # pages
    assert body[24:32] == bytes.fromhex("2122232425262728")  # zero pages
    assert body[32:48] == DIGEST


def test_done_layout():
    b = W.encode_control(Done(0x0102030405060708, DIGEST, 0x1112131415161718))
    assert b[:8] == b"\x04\x00\x00\x00\x00\x00\x00\x20"
    assert b[8:16] == bytes.fromhex("0102030405060708")
    assert b[16:32] == DIGEST
    assert b[32:40] == bytes.fromhex("1112131415161718")  # the last round's microseconds


def test_error_layout():
    b = W.encode_control(ErrorMessage(ErrorCode.TIMEOUT, "hé"))
    assert b[:8] == b"\x05\x00\x00\x00\x00\x00\x00\x07"  # 4 + 3 bytes of UTF-8
    assert b[8:10] == b"\x00\x05"  # code
    assert b[10:12] == b"\x00\x00"  # reserved
    assert b[12:] == "hé".encode()


def test_packet_layout():
    runs = ((0, 0x0102, RunKind.DATA), (0x0102, 3, RunKind.ZERO))
    b = W.encode_packet(PacketKind.PAGES, seq=0x01020304, round=0x05060708,
                        offset=0x1112131415161718, runs=runs, page_size=PAGE, flags=3,
                        digest=DIGEST)
    assert len(b) == 48 + 16
    assert b[0:4] == b"MFDP"
    assert b[4] == 1  # kind
    assert b[5] == 3  # flags
    assert b[6:8] == b"\x00\x02"  # runs
    assert b[8:12] == b"\x01\x02\x03\x04"  # packet number
    assert b[12:16] == b"\x05\x06\x07\x08"  # round
    assert b[16:24] == bytes.fromhex("1112131415161718")  # offset
    assert b[24:28] == (0x0102 * PAGE).to_bytes(4, "big")  # payload: data pages only
    assert b[28] == 0  # compression
    assert b[29:32] == b"\x00\x00\x00"  # reserved
    assert b[32:48] == DIGEST
    # run entries: first u32, count u16, kind u8, reserved u8
    assert b[48:56] == b"\x00\x00\x00\x00" + b"\x01\x02" + b"\x01" + b"\x00"
    assert b[56:64] == b"\x00\x00\x01\x02" + b"\x00\x03" + b"\x02" + b"\x00"


def test_marker_layout():
    b = W.encode_packet(PacketKind.END, seq=9, round=2)
    assert b == b"MFDP\x03\x00\x00\x00" + b"\x00\x00\x00\x09" + b"\x00\x00\x00\x02" + bytes(32)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("hello", [
    Hello(Role.CONTROL, SID, 0, 1),
    Hello(Role.CONTROL, SID, 0, 64),
    Hello(Role.DATA, SID, 0, 1),
    Hello(Role.DATA, SID, 3, 4),
    Hello(Role.DATA, bytes(16), 63, 64),  # the highest valid id: channels - 1
    Hello(Role.DATA, b"\xff" * 16, 17, 32),
], ids=repr)
def test_hello_round_trip(hello):
    back = W.decode_hello(W.encode_hello(hello))
    assert back == hello
    assert back.role is hello.role


def test_hello_labels():
    assert Hello(Role.CONTROL, SID, 0, 4).label() == "control channel"
    assert Hello(Role.DATA, SID, 2, 4).label() == "data channel 2"


def test_encode_hello_rejects_a_short_session_id():
    with pytest.raises(E.LocalProtocolError):
        W.encode_hello(Hello(Role.DATA, b"short", 0, 1))


@pytest.mark.parametrize("status", [s for s in HelloStatus if s is not HelloStatus.BAD_VERSION],
                         ids=lambda s: s.name)
def test_hello_reply_round_trip(status):
    back = W.decode_hello_reply(W.encode_hello_reply(status))
    assert back is status


def test_hello_reply_bad_version_status_raises_bad_version():
    # Status 1 ("unsupported version") is the receiver refusing our version: a BadVersion.
    with pytest.raises(E.BadVersion):
        W.decode_hello_reply(W.encode_hello_reply(HelloStatus.BAD_VERSION))


CONTROL_MESSAGES = [
    S,
    Session(1),
    Session(W.MAX_IMAGE_SIZE, 65536, 128),  # exactly 8 MiB per packet, largest image
    Session(12345, 512, 16384),
    Session(1 << 30, 4096, 512, W.DigestAlg.XXH3_64_PAGE_SUM, W.Compression.ZSTD),
    Ready(),
    W.Working(),
    Complete(3, 1 << 40, 1 << 50, 7, DIGEST),
    Complete(0, 0, 0, 0, bytes(16)),
    Done(SIZE, DIGEST),
    Done((1 << 64) - 1, b"\xff" * 16, (1 << 64) - 1),
    *[ErrorMessage(code, f"{code.name.lower()} happened") for code in ErrorCode],
    ErrorMessage(ErrorCode.PROTOCOL, ""),
    ErrorMessage(ErrorCode.IMAGE, "disque plein: é, ü, 日本語, emoji \U0001F4BE, ∑"),
]


@pytest.mark.parametrize("msg", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_control_round_trip(msg):
    data = W.encode_control(msg)
    dec = ControlDecoder()
    dec.feed(data)
    back = dec.next_message()
    assert back == msg
    assert type(back) is type(msg)
    assert dec.pending() == 0
    assert dec.next_message() is None


def test_error_text_exactly_1024_bytes_survives():
    text = "x" * 1024
    assert decode_one(W.encode_control(ErrorMessage(ErrorCode.FAILED, text))).text == text


def test_error_text_is_truncated_to_1024_bytes():
    msg = ErrorMessage(ErrorCode.FAILED, "a" * 2000)
    data = W.encode_control(msg)
    assert len(data) == 8 + 4 + 1024
    assert data[4:8] == (4 + 1024).to_bytes(4, "big")
    back = decode_one(data)
    assert back == ErrorMessage(ErrorCode.FAILED, "a" * 1024)


def test_error_text_truncation_keeps_valid_utf8():
    # The body carries "up to 1024 bytes of UTF-8 text": a cut in the middle of a multi-byte
    # character would put invalid UTF-8 on the wire (and a U+FFFD at the peer).
    text = "€" * 400  # 3 bytes each: 1200 bytes, and 1024 is not a multiple of 3
    data = W.encode_control(ErrorMessage(ErrorCode.FAILED, text))
    body_text = data[8 + 4:]
    assert len(body_text) <= 1024
    decoded = body_text.decode("utf-8")  # strict: must not raise
    assert text.startswith(decoded)
    back = decode_one(data)
    assert "\ufffd" not in back.text
    assert text.startswith(back.text)


def test_unicode_error_text_round_trips_exactly():
    text = "échec: 日本語 \U0001F4BE"
    assert decode_one(W.encode_control(ErrorMessage(ErrorCode.VERIFY, text))).text == text


def test_encode_control_rejects_non_messages():
    with pytest.raises(E.LocalProtocolError):
        W.encode_control("SESSION")  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [(0, 4096, 128), (1, 1000, 128), (1, 4096, 0),
                                  (1, 65536, 129), (W.MAX_IMAGE_SIZE + 1, 4096, 128)])
def test_session_constructor_validates_locally(args):
    with pytest.raises(E.LocalProtocolError):
        Session(*args)


def test_session_geometry():
    assert S.block_bytes == BLOCK
    assert S.nblocks == 11
    assert S.npages == 10 * BLOCK_PAGES + LAST_PAGES
    assert S.block_len(0) == BLOCK
    assert S.block_len(LAST) == 3 * PAGE + 100
    assert S.block_page_count(0) == BLOCK_PAGES
    assert S.block_page_count(LAST) == LAST_PAGES
    tiny = Session(100, 4096, 128)
    assert (tiny.nblocks, tiny.npages, tiny.block_len(0), tiny.block_page_count(0)) == (1, 1, 100, 1)


def _decode_packet(data: bytes, session: Session):
    h = W.decode_packet_header(data[:W.PACKET.size], session)
    runs = W.decode_runs(data[W.PACKET.size:W.PACKET.size + h.runs_len], h, session)
    return h, runs


def test_pages_packet_round_trip_full_block():
    runs = ((0, 3, RunKind.DATA), (3, 5, RunKind.ZERO), (8, 119, RunKind.DATA),
            (127, 1, RunKind.ZERO))
    data = W.encode_packet(PacketKind.PAGES, seq=17, round=2, offset=2 * BLOCK, runs=runs,
                           page_size=PAGE, flags=W.FLAG_DIGEST | W.FLAG_FULL_BLOCK,
                           digest=DIGEST)
    assert len(data) == 48 + 4 * 8
    h, back = _decode_packet(data, S)
    assert h == PacketHeader(PacketKind.PAGES, 3, 4, 17, 2, 2 * BLOCK, 122 * PAGE, DIGEST)
    assert h.kind is PacketKind.PAGES
    assert h.runs_len == 32
    assert back == list(runs)


def test_pages_packet_all_zero_block_has_no_payload():
    data = W.encode_packet(PacketKind.PAGES, seq=0, round=0, offset=0,
                           runs=((0, BLOCK_PAGES, RunKind.ZERO),), page_size=PAGE, flags=3,
                           digest=DIGEST)
    h, runs = _decode_packet(data, S)
    assert h.payload_len == 0 and runs == [(0, BLOCK_PAGES, RunKind.ZERO)]


def test_partial_block_packet_without_full_block_flag_may_have_gaps():
    # Reserved for later rounds (flags bit 1 clear): the wire decoder allows sorted runs with
    # gaps; the version 1 receiver rejects the flags elsewhere (pump.py).
    runs = ((2, 3, RunKind.DATA), (10, 1, RunKind.ZERO), (100, 28, RunKind.DATA))
    data = W.encode_packet(PacketKind.PAGES, seq=1, round=1, offset=BLOCK, runs=runs,
                           page_size=PAGE, flags=W.FLAG_DIGEST, digest=DIGEST)
    h, back = _decode_packet(data, S)
    assert h.flags == W.FLAG_DIGEST and back == list(runs) and h.payload_len == 31 * PAGE


@pytest.mark.parametrize("kind", [PacketKind.SYNC, PacketKind.END])
def test_marker_round_trip(kind):
    data = W.encode_packet(kind, seq=41, round=3)
    assert len(data) == 48
    h, runs = _decode_packet(data, S)
    assert h == PacketHeader(kind, 0, 0, 41, 3, 0, 0, bytes(16))
    assert h.kind is kind
    assert runs == []


def test_short_last_block_round_trip():
    # The image's size is not a multiple of the page size: the last block has 3 full pages and
    # one partial page; the partial page is sent in full.
    runs = ((0, 1, RunKind.DATA), (1, 2, RunKind.ZERO), (3, 1, RunKind.DATA))
    data = W.encode_packet(PacketKind.PAGES, seq=0, round=0, offset=LAST * BLOCK, runs=runs,
                           page_size=PAGE, flags=3, digest=DIGEST)
    h, back = _decode_packet(data, S)
    assert h.offset == LAST * BLOCK and h.payload_len == 2 * PAGE
    assert back == list(runs)
    full = W.encode_packet(PacketKind.PAGES, seq=0, round=0, offset=LAST * BLOCK,
                           runs=((0, LAST_PAGES, RunKind.DATA),), page_size=PAGE, flags=3,
                           digest=DIGEST)
    h, back = _decode_packet(full, S)
    assert h.payload_len == LAST_PAGES * PAGE and back == [(0, LAST_PAGES, RunKind.DATA)]


def test_image_smaller_than_one_page():
    tiny = Session(100, 4096, 128)
    data = W.encode_packet(PacketKind.PAGES, seq=0, round=0, offset=0,
                           runs=((0, 1, RunKind.DATA),), page_size=4096, flags=3, digest=DIGEST)
    h, runs = _decode_packet(data, tiny)
    assert h.payload_len == 4096 and runs == [(0, 1, RunKind.DATA)]
    with pytest.raises(E.OutOfRange):
        W.decode_runs(runs_raw((0, 2, RunKind.DATA)), pages_header(payload=2 * 4096), tiny)


# ------------------------------------------------------------------------------------ ControlDecoder


def _expected_needed(total: int, have: int) -> int:
    return W.FRAME.size - have if have < W.FRAME.size else total - have


@pytest.mark.parametrize("msg", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_control_decoder_byte_at_a_time(msg):
    data = W.encode_control(msg)
    dec = ControlDecoder()
    assert dec.bytes_needed() == W.FRAME.size
    for i in range(len(data)):
        assert dec.bytes_needed() == _expected_needed(len(data), i), i
        dec.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert dec.next_message() is None, i
            assert dec.pending() == i + 1, "bytes consumed although no message came out"
    assert dec.pending() == len(data)
    assert dec.next_message() == msg
    assert dec.pending() == 0
    assert dec.bytes_needed() == W.FRAME.size
    assert dec.next_message() is None


def test_control_decoder_reading_bytes_needed_never_overreads():
    # The control channel's reader asks for exactly bytes_needed(): it must land on each frame
    # boundary exactly, never reading into the next message.
    stream = b"".join(W.encode_control(m) for m in CONTROL_MESSAGES)
    dec = ControlDecoder()
    pos, out = 0, []
    while pos < len(stream):
        if (msg := dec.next_message()) is not None:
            out.append(msg)
            assert dec.pending() == 0
            continue
        n = dec.bytes_needed()
        assert n >= 1
        dec.feed(stream[pos:pos + n])
        pos += n
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    assert out == CONTROL_MESSAGES


def test_control_decoder_two_messages_in_one_feed():
    a, b = Ready(), Done(SIZE, DIGEST)
    dec = ControlDecoder()
    dec.feed(W.encode_control(a) + W.encode_control(b))
    assert dec.next_message() == a
    assert dec.next_message() == b
    assert dec.next_message() is None
    assert dec.pending() == 0


def test_control_decoder_message_then_partial_next():
    nxt = W.encode_control(S)
    dec = ControlDecoder()
    dec.feed(W.encode_control(Ready()) + nxt[:3])
    assert dec.next_message() == Ready()
    assert dec.next_message() is None
    assert dec.pending() == 3
    assert dec.bytes_needed() == 5
    dec.feed(nxt[3:10])
    assert dec.next_message() is None
    assert dec.pending() == 10
    assert dec.bytes_needed() == len(nxt) - 10
    dec.feed(nxt[10:])
    assert dec.next_message() == S


def test_control_decoder_random_splits():
    stream = b"".join(W.encode_control(m) for m in CONTROL_MESSAGES)
    rng = random.Random(1234)
    for _ in range(50):
        dec = ControlDecoder()
        out, pos = [], 0
        while pos < len(stream):
            n = rng.randint(1, 40)
            dec.feed(stream[pos:pos + n])
            pos += n
            while (msg := dec.next_message()) is not None:
                out.append(msg)
        assert out == CONTROL_MESSAGES
        assert dec.pending() == 0


# ------------------------------------------------------------------------------------ typed errors


def assert_error(exc_type, fn, got, want):
    """`fn` raises exactly `exc_type`; its message matches every regex in got and want."""
    with pytest.raises(E.MultifdError) as info:
        fn()
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__} ({err}), expected {exc_type.__name__}"
    msg = str(err)
    for pattern in got:
        assert re.search(pattern, msg), f"message {msg!r} does not say what was received ({pattern!r})"
    for pattern in want:
        assert re.search(pattern, msg), f"message {msg!r} does not say what was expected ({pattern!r})"


HELLO_ERRORS = {
    "bad-magic": (hello_raw(magic=0x4D464432), E.BadMagic, [r"0x4d464432"], [r"0x4d464431"]),
    "bad-magic-http": (b"GET / HTTP/1.1\r\n" + bytes(16), E.BadMagic, [r"0x47455420"],
                       [r"0x4d464431"]),
    "bad-magic-packet": (hello_raw(magic=W.PACKET_MAGIC), E.BadMagic, [r"0x4d464450"],
                         [r"0x4d464431"]),
    "version-1": (hello_raw(version=1), E.BadVersion, [r"version 1\b"], [r"expected 2\b"]),
    "version-0": (hello_raw(version=0), E.BadVersion, [r"version 0\b"], [r"expected 2\b"]),
    "role-0": (hello_raw(role=0), E.RemoteProtocolError, [r"role 0\b"], [r"1 control", r"2 data"]),
    "role-3": (hello_raw(role=3), E.RemoteProtocolError, [r"role 3\b"], [r"1 control", r"2 data"]),
    "role-255": (hello_raw(role=255), E.RemoteProtocolError, [r"role 255\b"],
                 [r"1 control", r"2 data"]),
    "flags": (hello_raw(flags=1), E.RemoteProtocolError, [r"flags", r"\b1\b"],
              [r"expected zero"]),
    "reserved": (hello_raw(reserved=5), E.RemoteProtocolError, [r"\b5\b"], [r"expected zero"]),
    "channels-0": (hello_raw(channels=0), E.BadChannelId, [r"count 0\b"], [r"1\.\.64"]),
    "channels-65": (hello_raw(channels=65, channel=0), E.BadChannelId, [r"count 65\b"],
                    [r"1\.\.64"]),
    "channels-65-control": (hello_raw(role=Role.CONTROL, channels=65), E.BadChannelId,
                            [r"count 65\b"], [r"1\.\.64"]),
    "data-id-equals-count": (hello_raw(channel=4, channels=4), E.BadChannelId, [r"id 4\b"],
                             [r"0\.\.3\b"]),
    "data-id-equals-64": (hello_raw(channel=64, channels=64), E.BadChannelId, [r"id 64\b"],
                          [r"0\.\.63\b"]),
    "data-id-beyond": (hello_raw(channel=0xFFFF, channels=1), E.BadChannelId, [r"id 65535\b"],
                       [r"0\.\.0\b"]),
    "control-id-1": (hello_raw(role=Role.CONTROL, channel=1), E.BadChannelId, [r"id 1\b"],
                     [r"expected 0\b"]),
    "short": (hello_raw()[:31], E.RemoteProtocolError, [r"\b31 bytes"], [r"expected 32\b"]),
    "long": (hello_raw() + b"\0", E.RemoteProtocolError, [r"\b33 bytes"], [r"expected 32\b"]),
    "empty": (b"", E.RemoteProtocolError, [r"\b0 bytes"], [r"expected 32\b"]),
}


@pytest.mark.parametrize("case", HELLO_ERRORS.values(), ids=HELLO_ERRORS.keys())
def test_hello_errors(case):
    data, exc, got, want = case
    assert_error(exc, lambda: W.decode_hello(data), got, want)


def test_hello_bad_version_carries_the_version():
    with pytest.raises(E.BadVersion) as info:
        W.decode_hello(hello_raw(version=7))
    assert info.value.version == 7


def test_hello_magic_is_checked_before_anything_else():
    # A peer that does not speak the protocol gets no reply: wrong magic must win over every
    # other defect in the same hello.
    with pytest.raises(E.BadMagic):
        W.decode_hello(hello_raw(magic=0, version=9, role=9, flags=1, channels=0, reserved=1))


REPLY_ERRORS = {
    "bad-magic": (reply_raw(magic=0x48545450), E.BadMagic, [r"0x48545450"], [r"0x4d464431"]),
    "bad-magic-packet": (reply_raw(magic=W.PACKET_MAGIC), E.BadMagic, [r"0x4d464450"],
                         [r"0x4d464431"]),
    "version-1": (reply_raw(version=1), E.BadVersion, [r"version 1\b"],
                  [r"(expected|we speak) 2\b"]),
    "version-0-busy": (reply_raw(version=0, status=HelloStatus.BUSY), E.BadVersion,
                       [r"version 0\b"], [r"(expected|we speak) 2\b"]),
    "unknown-status": (reply_raw(status=9), E.RemoteProtocolError, [r"status 9\b"],
                       [r"expected|0\.\.8"]),
    "reserved": (reply_raw(reserved=1), E.RemoteProtocolError, [r"\b1\b"], [r"expected zero"]),
}


@pytest.mark.parametrize("case", REPLY_ERRORS.values(), ids=REPLY_ERRORS.keys())
def test_hello_reply_errors(case):
    data, exc, got, want = case
    assert_error(exc, lambda: W.decode_hello_reply(data), got, want)


CT = W.ControlType
CONTROL_ERRORS = {
    # frame header
    "frame-flags": (frame_raw(CT.SESSION, session_body(), flags=1), E.RemoteProtocolError,
                    [r"flags", r"\b1\b"], [r"expected zero"]),
    "frame-reserved": (frame_raw(CT.READY, reserved=0x0100), E.RemoteProtocolError,
                       [r"\b256\b"], [r"expected zero"]),
    "type-0": (frame_raw(0), E.RemoteProtocolError, [r"type 0\b"], [r"expected"]),
    "type-7": (frame_raw(7), E.RemoteProtocolError, [r"type 7\b"], [r"expected"]),
    "type-255": (frame_raw(255), E.RemoteProtocolError, [r"type 255\b"], [r"expected"]),
    "length-4097-header-only": (frame_raw(CT.ERROR, length=4097), E.LimitExceeded,
                                [r"\b4097\b"], [r"\b4096\b"]),
    "length-max-header-only": (frame_raw(CT.SESSION, length=0xFFFFFFFF), E.LimitExceeded,
                               [r"\b4294967295\b"], [r"\b4096\b"]),
    # fixed body sizes
    "session-23": (frame_raw(CT.SESSION, session_body()[:23]), E.RemoteProtocolError,
                   [r"\b23 bytes"], [r"expected 24\b"]),
    "session-25": (frame_raw(CT.SESSION, session_body() + b"\0"), E.RemoteProtocolError,
                   [r"\b25 bytes"], [r"expected 24\b"]),
    "ready-1": (frame_raw(CT.READY, b"\0"), E.RemoteProtocolError, [r"\b1 bytes?"],
                [r"expected 0\b"]),
    "complete-47": (frame_raw(CT.COMPLETE, bytes(47)), E.RemoteProtocolError, [r"\b47 bytes"],
                    [r"expected 48\b"]),
    "done-25": (frame_raw(CT.DONE, bytes(25)), E.RemoteProtocolError, [r"\b25 bytes"],
                [r"expected 32\b"]),
    "error-3": (frame_raw(CT.ERROR, bytes(3)), E.RemoteProtocolError, [r"\b3 bytes"],
                [r"4\.\.1028"]),
    "error-1029": (frame_raw(CT.ERROR, bytes(4) + b"x" * 1025), E.RemoteProtocolError,
                   [r"\b1029 bytes"], [r"4\.\.1028"]),
    # SESSION contents
    "page-not-power-of-two": (frame_raw(CT.SESSION, session_body(page=1000)), E.LimitExceeded,
                              [r"page size 1000\b"], [r"power of two", r"512\.\.65536"]),
    "page-256": (frame_raw(CT.SESSION, session_body(page=256)), E.LimitExceeded,
                 [r"page size 256\b"], [r"512\.\.65536"]),
    "page-131072": (frame_raw(CT.SESSION, session_body(page=131072)), E.LimitExceeded,
                    [r"page size 131072\b"], [r"512\.\.65536"]),
    "page-0": (frame_raw(CT.SESSION, session_body(page=0)), E.LimitExceeded,
               [r"page size 0\b"], [r"512\.\.65536"]),
    "block-pages-0": (frame_raw(CT.SESSION, session_body(block_pages=0)), E.LimitExceeded,
                      [r"\b0 pages"], [r"\b65535 pages"]),
    "block-pages-65536": (frame_raw(CT.SESSION, session_body(page=512, block_pages=65536)),
                          E.LimitExceeded, [r"\b65536 pages"], [r"\b65535 pages"]),
    "block-too-large": (frame_raw(CT.SESSION, session_body(page=65536, block_pages=129)),
                        E.LimitExceeded, [r"\b129 pages of 65536 bytes"], [r"\b8388608\b"]),
    "image-size-0": (frame_raw(CT.SESSION, session_body(size=0)), E.LimitExceeded,
                     [r"image size 0\b"], [rf"1\.\.{1 << 56}\b"]),
    "image-size-too-big": (frame_raw(CT.SESSION, session_body(size=(1 << 56) + 1)),
                           E.LimitExceeded, [rf"image size {(1 << 56) + 1}\b"],
                           [rf"1\.\.{1 << 56}\b"]),
    "digest-0": (frame_raw(CT.SESSION, session_body(digest=0)), E.RemoteProtocolError,
                 [r"algorithm 0\b"], [r"expected"]),
    "digest-3": (frame_raw(CT.SESSION, session_body(digest=3)), E.RemoteProtocolError,
                 [r"algorithm 3\b"], [r"1 xxh3_128_block_sum, 2 xxh3_64_page_sum"]),
    "compression-3": (frame_raw(CT.SESSION, session_body(compression=3)), E.RemoteProtocolError,
                      [r"compression 3\b"], [r"expected"]),
    "session-flags": (frame_raw(CT.SESSION, session_body(flags=1)), E.RemoteProtocolError,
                      [r"flags", r"\b1\b"], [r"expected zero"]),
    "session-reserved": (frame_raw(CT.SESSION, session_body(reserved=7)), E.RemoteProtocolError,
                         [r"\b7\b"], [r"expected zero"]),
    "complete-reserved": (frame_raw(CT.COMPLETE, W.COMPLETE.pack(1, 9, 2, 3, 4, DIGEST)),
                          E.RemoteProtocolError, [r"\b9\b"], [r"expected zero"]),
    # docs/PROTOCOL.md: ERROR is "code u16, reserved u16, ..." and reserved fields must be zero.
    "error-reserved": (frame_raw(CT.ERROR, W.ERROR.pack(1, 3) + b"boom"), E.RemoteProtocolError,
                       [r"\b3\b"], [r"expected zero"]),
}


@pytest.mark.parametrize("case", CONTROL_ERRORS.values(), ids=CONTROL_ERRORS.keys())
def test_control_errors(case):
    data, exc, got, want = case
    assert_error(exc, lambda: decode_one(data), got, want)


@pytest.mark.parametrize("kind", list(CT), ids=lambda k: k.name)
def test_oversized_frame_rejected_before_the_body(kind):
    dec = ControlDecoder()
    dec.feed(frame_raw(kind, length=W.MAX_CONTROL_BODY + 1))
    with pytest.raises(E.LimitExceeded):
        dec.next_message()


def test_frame_of_exactly_4096_bytes_waits_for_its_body():
    dec = ControlDecoder()
    dec.feed(frame_raw(CT.ERROR, length=4096))
    assert dec.next_message() is None  # 4096 is allowed (the ERROR body check comes later)
    assert dec.bytes_needed() == 4096


def test_unknown_control_type_rejected_from_the_header_alone():
    dec = ControlDecoder()
    dec.feed(frame_raw(9, length=100))
    with pytest.raises(E.RemoteProtocolError):
        dec.next_message()


PACKET_ERRORS = {
    "bad-magic": (packet_raw(magic=W.MAGIC), S, E.BadMagic, [r"0x4d464431"], [r"0x4d464450"]),
    "bad-magic-zero": (bytes(48), S, E.BadMagic, [r"0x00000000"], [r"0x4d464450"]),
    "kind-0": (packet_raw(kind=0), S, E.RemoteProtocolError, [r"kind 0\b"], [r"expected"]),
    "kind-4": (packet_raw(kind=4), S, E.RemoteProtocolError, [r"kind 4\b"], [r"expected"]),
    "flags-7": (packet_raw(flags=7), S, E.RemoteProtocolError, [r"0x07"], [r"expected|0x03"]),
    "flags-0x80": (packet_raw(flags=0x80), S, E.RemoteProtocolError, [r"0x80"],
                   [r"expected|0x03"]),
    "compression-3": (packet_raw(compression=3), S, E.RemoteProtocolError, [r"compression 3\b"],
                      [r"expected"]),
    # The session S sends plain pages: a zlib packet in it is refused by name.
    "compression-not-the-sessions": (packet_raw(compression=1), S, E.RemoteProtocolError,
                                     [r"compressed with zlib", r"method is none"], []),
    "reserved": (packet_raw(reserved=b"\0\0\1"), S, E.RemoteProtocolError, [r"x01"],
                 [r"expected zero"]),
    "misaligned-page": (packet_raw(offset=PAGE), S, E.Misaligned, [r"\b4096\b"],
                        [rf"\b{BLOCK}\b"]),
    "misaligned-1": (packet_raw(offset=BLOCK + 1), S, E.Misaligned, [rf"\b{BLOCK + 1}\b"],
                     [rf"\b{BLOCK}\b"]),
    "offset-equals-size": (packet_raw(offset=4 * BLOCK), S_EXACT, E.OutOfRange,
                           [rf"\b{4 * BLOCK}\b"], [rf"\b{4 * BLOCK} bytes"]),
    "offset-beyond": (packet_raw(offset=11 * BLOCK), S, E.OutOfRange, [rf"\b{11 * BLOCK}\b"],
                      [rf"\b{SIZE} bytes"]),
    "offset-huge": (packet_raw(offset=BLOCK << 40), S, E.OutOfRange, [rf"\b{BLOCK << 40}\b"],
                    [rf"\b{SIZE} bytes"]),
    "nruns-0": (packet_raw(nruns=0), S, E.LimitExceeded, [r"\b0 runs"], [r"1\.\.128\b"]),
    "nruns-129": (packet_raw(nruns=129), S, E.LimitExceeded, [r"\b129 runs"], [r"1\.\.128\b"]),
    "nruns-last-block": (packet_raw(nruns=5, offset=LAST * BLOCK, payload=0), S, E.LimitExceeded,
                         [r"\b5 runs"], [r"1\.\.4\b"]),
    "payload-too-big": (packet_raw(payload=BLOCK + 1), S, E.LimitExceeded, [rf"\b{BLOCK + 1}\b"],
                        [rf"\b{BLOCK}-byte"]),
    "payload-too-big-last": (packet_raw(payload=5 * PAGE, offset=LAST * BLOCK), S,
                             E.LimitExceeded, [rf"\b{5 * PAGE}\b"], [rf"\b{4 * PAGE}-byte"]),
    # markers: runs, payload, offset, flags and digest must all be zero
    "sync-runs": (marker_raw(PacketKind.SYNC, nruns=1), S, E.RemoteProtocolError,
                  [r"SYNC", r"runs|pages"], [r"zero|expected"]),
    "sync-payload": (marker_raw(PacketKind.SYNC, payload=PAGE), S, E.RemoteProtocolError,
                     [r"SYNC", r"payload"], [r"zero|expected"]),
    "sync-offset": (marker_raw(PacketKind.SYNC, offset=BLOCK), S, E.RemoteProtocolError,
                    [r"SYNC", r"offset"], [r"zero|expected"]),
    "sync-flags": (marker_raw(PacketKind.SYNC, flags=3), S, E.RemoteProtocolError,
                   [r"SYNC", r"flags"], [r"zero|expected"]),
    "sync-digest": (marker_raw(PacketKind.SYNC, digest=DIGEST), S, E.RemoteProtocolError,
                    [r"SYNC", r"digest"], [r"zero|expected"]),
    "end-payload": (marker_raw(PacketKind.END, payload=1), S, E.RemoteProtocolError,
                    [r"END", r"payload"], [r"zero|expected"]),
    "end-digest": (marker_raw(PacketKind.END, digest=b"\0" * 15 + b"\1"), S,
                   E.RemoteProtocolError, [r"END", r"digest"], [r"zero|expected"]),
}


@pytest.mark.parametrize("case", PACKET_ERRORS.values(), ids=PACKET_ERRORS.keys())
def test_packet_header_errors(case):
    data, session, exc, got, want = case
    assert_error(exc, lambda: W.decode_packet_header(data, session), got, want)


@pytest.mark.parametrize("kind", [PacketKind.SYNC, PacketKind.END], ids=lambda k: k.name)
@pytest.mark.parametrize("field", [dict(nruns=1), dict(payload=PAGE), dict(offset=BLOCK),
                                   dict(flags=W.FLAG_DIGEST), dict(flags=W.FLAG_FULL_BLOCK),
                                   dict(digest=DIGEST)], ids=lambda f: next(iter(f)))
def test_markers_carry_nothing(kind, field):
    with pytest.raises(E.RemoteProtocolError) as info:
        W.decode_packet_header(marker_raw(kind, **field), S)
    assert type(info.value) is E.RemoteProtocolError
    # seq and round are what a marker does carry
    h = W.decode_packet_header(marker_raw(kind, seq=123, round=45), S)
    assert (h.kind, h.seq, h.round) == (kind, 123, 45)


def test_packet_header_boundaries_accepted():
    # Last valid offset, nruns == block pages, payload == block: all fine.
    h = W.decode_packet_header(packet_raw(offset=LAST * BLOCK, nruns=LAST_PAGES,
                                          payload=LAST_PAGES * PAGE), S)
    assert (h.offset, h.nruns, h.payload_len) == (LAST * BLOCK, LAST_PAGES, LAST_PAGES * PAGE)
    h = W.decode_packet_header(packet_raw(offset=3 * BLOCK, nruns=BLOCK_PAGES), S_EXACT)
    assert h.nruns == BLOCK_PAGES


D, Z = RunKind.DATA, RunKind.ZERO
RUN_ERRORS = {
    "kind-0": (runs_raw((0, 128, 0)), pages_header(), E.RemoteProtocolError,
               [r"kind 0\b"], [r"expected"]),
    "kind-3": (runs_raw((0, 128, 3)), pages_header(), E.RemoteProtocolError,
               [r"kind 3\b"], [r"expected"]),
    "reserved": (runs_raw((0, 128, D, 1)), pages_header(), E.RemoteProtocolError,
                 [r"\b1\b"], [r"expected zero"]),
    "empty-run": (runs_raw((0, 3, D), (3, 0, Z), (3, 125, D)),
                  pages_header(nruns=3, flags=1, payload=128 * PAGE), E.RemoteProtocolError,
                  [r"empty|\b0 pages"], [r"expected|at least 1"]),
    "overlapping": (runs_raw((0, 4, D), (2, 4, D)), pages_header(nruns=2, flags=1,
                                                                 payload=8 * PAGE),
                    E.RemoteProtocolError, [r"page 2\b"], [r"expected|page 4\b"]),
    "overlapping-full": (runs_raw((0, 64, D), (63, 65, Z)), pages_header(nruns=2,
                                                                         payload=64 * PAGE),
                         E.RemoteProtocolError, [r"page 63\b"], [r"expected|page 64\b"]),
    "out-of-order": (runs_raw((4, 2, D), (0, 2, D)), pages_header(nruns=2, flags=1,
                                                                  payload=4 * PAGE),
                     E.RemoteProtocolError, [r"page 0\b"], [r"expected|page 6\b"]),
    "beyond-block": (runs_raw((0, 120, D), (120, 9, Z)), pages_header(nruns=2,
                                                                      payload=120 * PAGE),
                     E.OutOfRange, [r"\b120\.\.128\b"], [r"\b128 pages"]),
    "starts-beyond-block": (runs_raw((128, 1, D)), pages_header(flags=1, payload=PAGE),
                            E.OutOfRange, [r"\b128\.\.128\b"], [r"\b128 pages"]),
    "beyond-last-block": (runs_raw((0, 5, D)), pages_header(offset=LAST * BLOCK,
                                                            payload=5 * PAGE),
                          E.OutOfRange, [r"\b0\.\.4\b"], [r"\b4 pages"]),
    "huge-run": (runs_raw((0xFFFFFFFF, 0xFFFF, D)), pages_header(flags=1), E.OutOfRange,
                 [r"\b4294967295\b"], [r"\b128 pages"]),
    "full-block-gap": (runs_raw((0, 4, D), (5, 123, Z)), pages_header(nruns=2, payload=4 * PAGE),
                       E.RemoteProtocolError, [r"page 5\b"], [r"expected|page 4\b"]),
    "full-block-gap-at-start": (runs_raw((1, 127, D)), pages_header(payload=127 * PAGE),
                                E.RemoteProtocolError, [r"page 1\b"], [r"expected|page 0\b"]),
    "full-block-short": (runs_raw((0, 100, D)), pages_header(payload=100 * PAGE),
                         E.RemoteProtocolError, [r"covers 100\b"], [r"\b128 pages"]),
    "full-block-short-last": (runs_raw((0, 3, D)), pages_header(offset=LAST * BLOCK,
                                                                payload=3 * PAGE),
                              E.RemoteProtocolError, [r"covers 3\b"], [r"\b4 pages"]),
    "payload-short": (runs_raw((0, 128, D)), pages_header(payload=127 * PAGE),
                      E.RemoteProtocolError, [rf"\b{127 * PAGE} bytes"], [rf"\b{128 * PAGE} bytes"]),
    "payload-counts-zero-runs": (runs_raw((0, 28, Z), (28, 100, D)),
                                 pages_header(nruns=2, payload=128 * PAGE),
                                 E.RemoteProtocolError, [rf"\b{128 * PAGE} bytes"],
                                 [rf"\b{100 * PAGE} bytes"]),
    "no-data-but-payload": (runs_raw((0, 128, Z)), pages_header(payload=PAGE),
                            E.RemoteProtocolError, [r"\b4096 bytes"], [r"\b0 data pages"]),
    "no-runs-but-payload": (b"", pages_header(flags=1, nruns=0, payload=PAGE), E.RemoteProtocolError,
                            [r"\b4096 bytes"], [r"\b0 data pages"]),
}


@pytest.mark.parametrize("case", RUN_ERRORS.values(), ids=RUN_ERRORS.keys())
def test_run_errors(case):
    data, header, exc, got, want = case
    assert_error(exc, lambda: W.decode_runs(data, header, S), got, want)


# ------------------------------------------------------------------------------------ wrong lengths
# decode_hello checks its length itself; decode_hello_reply, decode_packet_header and decode_runs
# rely on their callers (send.py, pump.py) to pass exactly the right number of bytes. The module
# promises typed errors from its decoders, so these tests hold them to it.


@pytest.mark.parametrize("n", [0, 7, 9, 32])
def test_hello_reply_wrong_length_raises_a_typed_error(n):
    data = (reply_raw() * 5)[:n]
    with pytest.raises(E.MultifdError):
        W.decode_hello_reply(data)


@pytest.mark.parametrize("n", [0, 8, 47, 49, 56])
def test_packet_header_wrong_length_raises_a_typed_error(n):
    data = (packet_raw() + bytes(16))[:n]
    with pytest.raises(E.MultifdError):
        W.decode_packet_header(data, S)


@pytest.mark.parametrize("data", [runs_raw((0, 128, D))[:7], runs_raw((0, 128, D)) + b"\0",
                                  runs_raw((0, 64, D), (64, 64, D))],
                         ids=["7-bytes", "9-bytes", "2-runs-for-nruns-1"])
def test_run_table_length_must_match_the_header(data):
    with pytest.raises(E.MultifdError):
        W.decode_runs(data, pages_header(nruns=1, payload=128 * PAGE), S)


# ------------------------------------------------------------------------------------ hostile bytes


def _typed_or_record(fn, *args):
    try:
        return fn(*args)
    except E.MultifdError:
        return None


def _check_hello(data: bytes) -> None:
    """decode_hello on hostile bytes: a typed error, or a hello that is valid (its fields in
    range) and the one encoding of exactly these bytes (the decoder accepts no other)."""
    hello = _typed_or_record(W.decode_hello, data)
    if hello is None:
        return
    assert hello.role in (Role.CONTROL, Role.DATA) and len(hello.session) == 16
    assert 1 <= hello.channels <= 64
    assert hello.channel == 0 if hello.role is Role.CONTROL else hello.channel < hello.channels
    assert W.encode_hello(hello) == data


def _check_hello_reply(data: bytes) -> None:
    """decode_hello_reply on hostile bytes: a typed error, or a status other than "bad
    version" (always an error) that encodes back to exactly these bytes."""
    status = _typed_or_record(W.decode_hello_reply, data)
    if status is None:
        return
    assert status is not HelloStatus.BAD_VERSION
    assert W.encode_hello_reply(status) == data


@HYPO
@given(st.binary(min_size=32, max_size=32))
def test_hostile_hello_32_bytes(data):
    _check_hello(data)


@HYPO
@given(st.binary(max_size=80))
def test_hostile_hello_any_length(data):
    _check_hello(data)


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4)


@HYPO
@given(st.sampled_from([Role.CONTROL, Role.DATA]), st.integers(1, 64), EDITS)
def test_hostile_hello_mutated(role, channels, edits):
    _check_hello(_mutate(W.encode_hello(Hello(role, SID, 0, channels)), edits))


@HYPO
@given(st.binary(min_size=8, max_size=8))
def test_hostile_hello_reply(data):
    _check_hello_reply(data)


@HYPO
@given(st.sampled_from(list(HelloStatus)), EDITS)
def test_hostile_hello_reply_mutated(status, edits):
    _check_hello_reply(_mutate(W.encode_hello_reply(status), edits))


def _drain(data: bytes, chunks: list[int]) -> None:
    """Feed `data` in chunks, pulling messages; only typed errors may escape."""
    dec = ControlDecoder()
    pos = 0
    try:
        for n in chunks + [len(data)]:
            dec.feed(data[pos:pos + n])
            pos += n
            while (msg := dec.next_message()) is not None:
                assert isinstance(msg, (Session, Ready, W.Working, Complete, Done, ErrorMessage))
            assert dec.bytes_needed() >= 1
    except E.MultifdError:
        pass


@HYPO
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10))
def test_hostile_control_random(data, chunks):
    _drain(data, chunks)


# Frames with a valid-looking header and arbitrary bodies reach every body decoder.
FRAMES = st.builds(
    lambda kind, body, hdr: W.FRAME.pack(kind, *hdr, len(body)) + body,
    st.integers(0, 7),
    st.one_of(st.binary(max_size=60), st.binary(min_size=24, max_size=24),
              st.binary(min_size=48, max_size=48),
              st.builds(lambda s, p, b, d, c: W.SESSION.pack(s, 1 << p, b, d, c, 0, 0),
                        st.integers(0, 1 << 57), st.integers(8, 17), st.integers(0, 70000),
                        st.integers(0, 2), st.integers(0, 1))),
    st.one_of(st.just((0, 0)), st.tuples(st.integers(0, 255), st.integers(0, 65535))),
)


@HYPO
@given(st.lists(FRAMES, min_size=1, max_size=4), st.lists(st.integers(1, 50), max_size=10))
def test_hostile_control_frames(frames, chunks):
    _drain(b"".join(frames), chunks)


@HYPO
@given(st.lists(st.sampled_from(CONTROL_MESSAGES), min_size=1, max_size=4), EDITS,
       st.integers(0, 1 << 16))
def test_hostile_control_mutated_and_truncated(msgs, edits, cut):
    data = _mutate(b"".join(W.encode_control(m) for m in msgs), edits)
    _drain(data[:cut % (len(data) + 1)], [])


def _decode_stream(data: bytes, session: Session):
    """What pump.py does: exactly 48 header bytes, then exactly runs_len run bytes. What the
    decoders accept is checked against the protocol's rules, and must be the one encoding of
    the bytes it came from."""
    if len(data) < W.PACKET.size:
        return None
    h = W.decode_packet_header(data[:W.PACKET.size], session)
    assert W.PACKET.pack(W.PACKET_MAGIC, h.kind, h.flags, h.nruns, h.seq, h.round, h.offset,
                         h.payload_len, 0, b"\0\0\0", h.digest) == data[:W.PACKET.size]
    if h.kind is not PacketKind.PAGES:
        assert (h.flags, h.nruns, h.offset, h.payload_len, h.digest) == (0, 0, 0, 0, bytes(16))
        return h
    block = h.offset // session.block_bytes
    pages = session.block_page_count(block)  # in this block (the last may be short)
    assert h.offset % session.block_bytes == 0 and block < session.nblocks
    assert 1 <= h.nruns <= pages and h.payload_len <= pages * session.page_size
    assert not h.flags & ~(W.FLAG_DIGEST | W.FLAG_FULL_BLOCK)
    table = data[W.PACKET.size:W.PACKET.size + h.runs_len]
    if len(table) < h.runs_len:
        return h  # the stream would wait for more bytes
    runs = W.decode_runs(table, h, session)
    assert b"".join(W.RUN.pack(first, n, kind, 0) for first, n, kind in runs) == table
    end = 0
    for first, n, kind in runs:  # sorted, disjoint, inside the block; no gap in a full block
        assert n >= 1 and first >= end and first + n <= pages, runs
        assert first == end or not h.flags & W.FLAG_FULL_BLOCK, runs
        end = first + n
    assert end == pages or not h.flags & W.FLAG_FULL_BLOCK, runs
    assert h.payload_len == session.page_size * sum(n for _, n, kind in runs
                                                    if kind == RunKind.DATA)
    return h, runs


@HYPO
@given(st.binary(min_size=48, max_size=48 + 8 * 130))
def test_hostile_packet_random(data):
    _typed_or_record(_decode_stream, data, S)


PACKETS = st.builds(
    lambda kind, flags, nruns, offset, payload, digest, table: W.PACKET.pack(
        W.PACKET_MAGIC, kind, flags, nruns, 0, 0, offset, payload, 0, b"\0\0\0", digest) + table,
    st.integers(0, 4), st.integers(0, 4), st.integers(0, 130),
    st.one_of(st.integers(0, 12).map(lambda b: b * BLOCK), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 129).map(lambda p: p * PAGE), st.integers(0, (1 << 32) - 1)),
    st.sampled_from([bytes(16), DIGEST]),
    st.lists(st.builds(lambda f, n, k, r: W.RUN.pack(f, n, k, r), st.integers(0, 140),
                       st.integers(0, 140), st.integers(0, 3),
                       st.sampled_from([0, 0, 0, 1])), max_size=130).map(b"".join),
)


@HYPO
@given(PACKETS, st.sampled_from([S, S_EXACT, Session(100, 512, 1)]))
def test_hostile_packet_structured(data, session):
    _typed_or_record(_decode_stream, data, session)


def test_every_single_byte_flip_of_a_packet_is_accepted_or_typed():
    runs = ((0, 3, D), (3, 5, Z), (8, 100, D), (108, 20, Z))
    packet = W.encode_packet(PacketKind.PAGES, seq=3, round=1, offset=2 * BLOCK, runs=runs,
                             page_size=PAGE, flags=3, digest=DIGEST)
    stream = packet + bytes(range(256)) * 16  # payload bytes follow in a real stream
    assert _decode_stream(stream, S) == (
        PacketHeader(PacketKind.PAGES, 3, 4, 3, 1, 2 * BLOCK, 103 * PAGE, DIGEST), list(runs))
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(len(packet)):
        mutated = bytearray(stream)
        mutated[i] ^= 0xFF
        try:
            _decode_stream(bytes(mutated), S)
            outcomes["accepted"] += 1
        except E.MultifdError:
            outcomes["rejected"] += 1
    # Flipping seq, round or digest bytes is structurally fine; nearly everything else is not.
    assert outcomes["accepted"] >= 4 + 4 + 16
    assert outcomes["rejected"] > 0
    for kind in (PacketKind.SYNC, PacketKind.END):
        marker = W.encode_packet(kind, seq=1, round=1)
        for i in range(len(marker)):
            mutated = bytearray(marker + bytes(64))
            mutated[i] ^= 0xFF
            _typed_or_record(_decode_stream, bytes(mutated), S)
