"""multifd/codec.py: the --compress grammar, and per-packet compression that only ever
shrinks a packet and decodes to exactly its pages (hostile payloads included)."""

from __future__ import annotations

import os
import re
import zlib

import pytest
import zstandard

from multifd import codec
from multifd import errors as E
from multifd.wire import Compression

Z, S = Compression.ZLIB, Compression.ZSTD
PAGES = b"".join(bytes([n % 7]) * 512 + os.urandom(16) for n in range(64))  # compressible


@pytest.mark.parametrize("spec, method", [
    ("none", codec.Method()), ("zlib", codec.Method(Z, 1)), ("ZLIB:9", codec.Method(Z, 9)),
    ("zstd", codec.Method(S, 3)), ("zstd:19", codec.Method(S, 19)), (" zstd:1 ", codec.Method(S, 1)),
])
def test_specs(spec, method):
    assert codec.parse(spec) == method


@pytest.mark.parametrize("spec, said", [
    ("gzip", "not one of none, zlib[:LEVEL], zstd[:LEVEL]"), ("zlib:0", "level is 1..9"),
    ("zlib:10", "level is 1..9"), ("zstd:x", "level is 1..19"), ("none:1", "takes no level"),
    ("", "not one of"),
])
def test_bad_specs_say_what_is_wrong(spec, said):
    with pytest.raises(E.UsageError, match=re.escape(said)):
        codec.parse(spec)


@pytest.mark.parametrize("method", [codec.Method(Z, 1), codec.Method(S, 3)])
def test_round_trip_and_incompressible_pages_stay_plain(method):
    packed = codec.Compressor(method).compress(PAGES)
    assert packed is not None and len(packed) < len(PAGES)
    assert codec.Decompressor(method.compression).decompress(packed, len(PAGES), 7) == PAGES
    assert codec.Compressor(method).compress(os.urandom(64 << 10)) is None


@pytest.mark.parametrize("compression", [Z, S])
def test_a_payload_that_decodes_to_more_than_its_pages_is_refused(compression):
    big = bytes(64 << 20)
    bomb = zlib.compress(big) if compression is Z else zstandard.ZstdCompressor().compress(big)
    with pytest.raises(E.RemoteProtocolError, match=r"^packet 3: "):
        codec.Decompressor(compression).decompress(bomb, 4096, 3)


@pytest.mark.parametrize("compression", [Z, S])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "trailing", "short"])
def test_damaged_payloads_are_protocol_errors_naming_the_packet(compression, damage):
    method = codec.Method(compression, 1)
    packed = codec.Compressor(method).compress(PAGES)
    size = len(PAGES)
    if damage == "garbage":
        packed = os.urandom(len(packed))
    elif damage == "truncated":
        packed = packed[:-5]
    elif damage == "trailing":
        packed = packed + b"\x00\x01"
    else:
        size += 4096  # decodes to fewer bytes than the packet's pages
    with pytest.raises(E.RemoteProtocolError, match=r"^packet 9: "):
        codec.Decompressor(compression).decompress(packed, size, 9)
