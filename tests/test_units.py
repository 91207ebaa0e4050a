"""The one grammar for sizes, rates and durations (units.py), table by table, and its use by
every command line: the same text means the same number wherever a user writes it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from multifd import units
from multifd.faults import parse as parse_fault

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

size, rate, duration = units.parse_size, units.parse_rate, units.parse_duration

# (parser, text, what it means; None: refused)
TABLE = [
    (size, "0", 0), (size, "4096", 4096), (size, "4096B", 4096), (size, " 12 ", 12),
    (size, "1K", KiB), (size, "1k", KiB), (size, "1KiB", KiB), (size, "1KB", 1000),
    (size, "1kB", 1000), (size, "64M", 64 * MiB), (size, "64MiB", 64 * MiB),
    (size, "64MB", 64 * 10**6), (size, "1G", GiB), (size, "1g", GiB), (size, "1GiB", GiB),
    (size, "1GB", 10**9), (size, "1 GiB", GiB), (size, "2T", 2 * TiB), (size, "2TiB", 2 * TiB),
    (size, "2TB", 2 * 10**12), (size, "1.5G", 3 * GiB // 2), (size, "1.5GB", 1_500_000_000),
    (size, ".5K", 512),
    # exact beyond a float's 53 bits and a Decimal's 28 digits
    (size, "9007199254740993", 2**53 + 1), (size, "1" * 40 + "K", int("1" * 40) * KiB),
    (size, "", None), (size, "G", None), (size, "-1", None), (size, "1X", None),
    (size, "1GiBs", None), (size, "1P", None), (size, "0.1K", None), (size, "1e3", None),
    (size, "nan", None), (size, "3mb", None), (size, "1G/s", None),
    (rate, "1G", GiB), (rate, "1G/s", GiB), (rate, "1GiB/s", GiB), (rate, "1GB/s", 10**9),
    (rate, "500MB/s", 5 * 10**8), (rate, "100M", 100 * MiB), (rate, "2500000", 2_500_000),
    (rate, "0.5K/s", 512),
    (rate, "fast", None), (rate, "1G/h", None), (rate, "/s", None),
    (duration, "30", 30.0), (duration, "2.5", 2.5), (duration, "2.5s", 2.5),
    (duration, "300ms", 0.3), (duration, "1min", 60.0), (duration, "1h", 3600.0),
    (duration, "soon", None), (duration, "1m", None), (duration, "5 sec", None),
    (duration, "-1", None), (duration, "inf", None), (duration, "1" * 400, None),
]


@pytest.mark.parametrize("parse, text, expected", TABLE,
                         ids=[f"{p.__name__}:{t!r}" for p, t, _ in TABLE])
def test_the_grammar(parse, text, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse(text)
    else:
        got = parse(text)
        assert got == (expected if parse is size else pytest.approx(expected))


@pytest.mark.parametrize("parse, text, said", [
    (rate, "1Gbit/s", "give bytes per second (125MB/s)"),
    (rate, "100Mb/s", "give bytes per second (12.5MB/s)"),
    (rate, "8kbit/s", "give bytes per second (1KB/s)"),
    (size, "1Gbit", "give bytes (125MB)"),
])
def test_bits_are_refused_with_their_value_in_bytes(parse, text, said):
    with pytest.raises(ValueError, match="is in bits") as info:
        parse(text)
    assert said in str(info.value)


@pytest.mark.parametrize("text", ["1G", "64MiB", "500MB", "1KB"])
def test_the_fault_grammar_uses_the_same_sizes(text):
    fault = parse_fault(f"reset@1:after={text}", "send")
    assert fault.params["after"] == units.parse_size(text)


def test_mkimage_size_means_what_the_fault_grammar_means(tmp_path):
    """The inconsistency this grammar ended: --size 1M and after=1M are the same number."""
    path = tmp_path / "img"
    res = subprocess.run([sys.executable, "-m", "multifd.tools.mkimage", str(path), "--size",
                          "1M"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert path.stat().st_size == parse_fault("reset@1:after=1M", "send").params["after"] == MiB
