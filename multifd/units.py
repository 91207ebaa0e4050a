"""Sizes, rates and durations as users write them: the one grammar every CLI and --fault uses.

The rule is dd's and QEMU's:

    K M G T  and  KiB MiB GiB TiB   powers of 1024  (1G = 1GiB = 1073741824 bytes)
    KB MB GB TB                     powers of 1000  (1GB = 1000000000 bytes)
    B or nothing                    bytes           (4096 = 4096B)

Prefix letters may be lower case (1g = 1G); `B` means bytes. A number may have a fraction
(1.5G) when the size it names is a whole number of bytes. A rate is a size with an optional
`/s` (1G, 500MB/s, 1GiB/s). Bits are refused, never misread as bytes: `1Gbit/s` and `100Mb/s`
get an error that gives the same rate in bytes. A duration is seconds, written bare or with
`ms`, `s`, `min` or `h` (300ms, 2.5, 2.5s, 1min).

Pure: no I/O. Every parser raises ValueError with a message fit for a one-line error.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_QUANTITY = re.compile(rf"^\s*{_NUMBER}\s*([A-Za-z]*)\s*$")
_PREFIXES = "KMGT"
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "min": 60.0, "h": 3600.0}


def _multiplier(unit: str) -> int | None:
    """Bytes per `unit`, or None if `unit` is not a byte unit."""
    if unit in ("", "B"):
        return 1
    prefix, rest = unit[0].upper(), unit[1:]
    if prefix not in _PREFIXES:
        return None
    power = _PREFIXES.index(prefix) + 1
    if rest in ("", "iB"):
        return 1024 ** power
    if rest == "B":
        return 1000 ** power
    return None


def _bits(unit: str) -> int | None:
    """Bits per `unit` where `unit` names bits (Gbit, Mb, kbit): network rates are decimal."""
    m = re.fullmatch(r"([KkMmGgTt]?)(bit|b|bits)", unit)
    if not m:
        return None
    prefix = m.group(1).upper()
    return 1000 ** (_PREFIXES.index(prefix) + 1) if prefix else 1


def _bytes(text: str, body: str, what: str, per: str = "") -> Fraction:
    """The number of bytes (per second, with per="/s") that `body`, the text of `text`
    without its "/s", names."""
    m = _QUANTITY.match(body)
    if m is None:
        example = "500MB/s, 1GiB/s, 100M" if per else "4096, 64MiB, 1G, 500MB"
        raise ValueError(f"{text!r} is not a {what} (e.g. {example})")
    # A Fraction, not a float: a size of any length is exact, and so is its fraction.
    number, unit = Fraction(m.group(1)), m.group(2)
    mult = _multiplier(unit)
    if mult is not None:
        return number * mult
    bits = _bits(unit)
    if bits is not None:
        raise ValueError(f"{text!r} is in bits: give bytes{' per second' if per else ''} "
                         f"({_human(float(number) * bits / 8)}{per})")
    raise ValueError(f"{text!r}: unknown unit {unit!r} (K, M, G, T or KiB..TiB are powers "
                     f"of 1024; KB, MB, GB, TB powers of 1000)")


def parse_size(text: str) -> int:
    """'4096', '64MiB', '1G', '1.5GB' -> bytes."""
    size = _bytes(text, text, "size")
    if size != int(size):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def parse_rate(text: str) -> float:
    """'500MB/s', '1GiB/s', '100M', '2500000' -> bytes per second."""
    body = text.strip()
    return float(_bytes(text, body[:-2] if body.endswith("/s") else body, "rate", "/s"))


def parse_duration(text: str) -> float:
    """'300ms', '2.5', '2.5s', '1min', '1h' -> seconds."""
    m = _QUANTITY.match(text)
    seconds = float(m.group(1)) * _SECONDS[m.group(2)] if m and m.group(2) in _SECONDS else None
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a duration (e.g. 30, 2.5s, 300ms, 1min)")
    return seconds


def _human(size: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:g}{unit}"
    return f"{size:g}B"
