"""Compression of a packet's data pages: `multifd-send --compress none|zlib[:LEVEL]|zstd[:LEVEL]`.

Each packet is compressed on its own (no stream across packets, so channels and packets stay
independent), in the channel's worker thread, and only where that makes it smaller: a packet
that does not shrink goes plain, marked so in its header. Zero pages never reach a codec (they
are runs in the header). The receiver learns the method from the SESSION and decodes each
payload into exactly its data pages: a payload that would decode to more, or to anything but
its pages, is a protocol error naming the packet, never a larger allocation.

No networking here (like wire.py); zstd comes from the `zstandard` package, loaded only by a
migration that uses it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from . import errors as E
from .wire import Compression

LEVELS = {Compression.ZLIB: (1, 9, 1), Compression.ZSTD: (1, 19, 3)}  # min, max, default


@dataclass(frozen=True)
class Method:
    compression: Compression = Compression.NONE
    level: int = 0

    def __str__(self) -> str:
        name = self.compression.name.lower()
        return name if self.compression is Compression.NONE else f"{name}:{self.level}"


def parse(spec: str) -> Method:
    """`none`, `zlib`, `zlib:6`, `zstd`, `zstd:3`: raises UsageError saying what is wrong."""
    name, _, level = spec.strip().lower().partition(":")
    names = {c.name.lower(): c for c in Compression}
    if name not in names:
        raise E.UsageError(f"--compress {spec!r}: not one of none, zlib[:LEVEL], "
                           "zstd[:LEVEL]")
    compression = names[name]
    if compression is Compression.NONE:
        if level:
            raise E.UsageError(f"--compress {spec!r}: none takes no level")
        return Method()
    low, high, default = LEVELS[compression]
    if not level:
        return Method(compression, default)
    if not level.isdigit() or not low <= int(level) <= high:
        raise E.UsageError(f"--compress {spec!r}: the {name} level is {low}..{high}")
    return Method(compression, int(level))


class Compressor:
    """One channel's compressor (a zstd context serves one thread at a time)."""

    def __init__(self, method: Method) -> None:
        self.method = method
        if method.compression is Compression.ZSTD:
            import zstandard
            self._zstd = zstandard.ZstdCompressor(level=method.level)

    def compress(self, data) -> bytes | None:
        """The compressed bytes, or None where they would not be smaller than `data`."""
        if self.method.compression is Compression.ZLIB:
            out = zlib.compress(data, self.method.level)
        else:
            out = self._zstd.compress(data)
        return out if len(out) < len(data) else None


class Decompressor:
    """One channel's decoder for the session's method."""

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        if compression is Compression.ZSTD:
            try:
                import zstandard
            except ImportError:  # pragma: no cover - a dependency; said clearly if missing
                raise E.UsageError("the sender compresses with zstd, and the zstandard "
                                   "package is not installed here") from None
            self._zstd = zstandard
            self._dctx = zstandard.ZstdDecompressor()

    def decompress(self, payload, size: int, seq: int) -> bytes:
        """Exactly `size` bytes from packet `seq`'s payload, or a RemoteProtocolError."""
        name = self.compression.name.lower()
        try:
            if self.compression is Compression.ZLIB:
                d = zlib.decompressobj()
                out = d.decompress(payload, size + 1)  # bounded: a bomb stops here
                if not d.eof or d.unused_data or d.unconsumed_tail:
                    raise ValueError("not one whole zlib stream")
            else:
                # A frame that declares its size is held to it by the decoder itself, so
                # checking the declaration bounds what decoding can produce.
                declared = self._zstd.frame_content_size(payload)
                if declared != size:
                    raise ValueError(f"its frame says {declared} bytes")
                d = self._dctx.decompressobj()
                out = d.decompress(payload)
                if not d.eof or d.unused_data:
                    raise ValueError("not one whole zstd frame")
        except Exception as exc:  # zlib.error, zstandard.ZstdError, ValueError
            raise E.RemoteProtocolError(f"packet {seq}: {name} payload does not decode: "
                                        f"{exc}") from None
        if len(out) != size:
            raise E.RemoteProtocolError(f"packet {seq}: {name} payload decodes to {len(out)} "
                                        f"bytes, not its {size} bytes of pages")
        return out
