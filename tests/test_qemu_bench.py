"""multifd-bench --qemu (multifd.tools.qemubench) on a small guest: QEMU into a QEMU
destination (default memory and -mem-prealloc) and into multifd-recv --qemu, plain and with
TLS from the same credentials, timed by QEMU's own total-time."""

from __future__ import annotations

import os

import pytest

from multifd.tools import qemubench


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_qemu_side_by_side(tmp_path, pki, tls):
    lines = []
    result = qemubench.run(64 << 20, 2, str(tmp_path), 1, 60, lines.append,
                           tls_dir=pki.both if tls else None)
    assert result["errors"] == {}, result["errors"]
    assert result["tls"] is tls and result["channels"] == 2
    want = {"qemu-dst", "qemu-dst-prealloc", "multifd-recv"} | (set() if tls else {"qemucopy"})
    assert set(result["cases"]) == want
    for case in result["cases"].values():
        assert case["runs"] == 1 and case["total_time_s"] > 0 and case["gb_per_s"] > 0
    assert result["ratios"]["multifd-recv/qemu-dst"] > 0
    assert all(("TLS" in line) is tls for line in lines) and len(lines) == 4
    assert os.listdir(tmp_path) == []  # the image and the captures are gone
    table = qemubench.table(result)
    assert ("multifd channels, TLS," in table) is tls
