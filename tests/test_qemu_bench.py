"""multifd-bench --qemu (multifd.tools.qemubench) on a small guest: QEMU into a QEMU
destination (default memory and -mem-prealloc) and into multifd-recv --qemu, plain and with
TLS from the same credentials, timed by QEMU's own total-time. With --live-rates, QEMU's own
live migration of a guest writing at each rate (multifd.tools.qemulive), beside multifd's."""

from __future__ import annotations

import os
import re

import pytest

from multifd.tools import benchplot, livebench, qemubench, qemulive
from multifd.tools.mkimage import write_image


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
    for name, case in result["cases"].items():
        assert case["runs"] == 1 and case["total_time_s"] > 0 and case["gb_per_s"] > 0
        # every QEMU of the case (source, destination) migrated with TLS, or none did
        assert case["tls_creds"] == (["tls0"] if tls else [""]), name
    assert result["ratios"]["multifd-recv/qemu-dst"] > 0
    assert all(("TLS" in line) is tls for line in lines) and len(lines) == 4
    assert os.listdir(tmp_path) == []  # the image and the captures are gone
    table = qemubench.table(result)
    assert ("multifd channels, TLS," in table) is tls


# ------------------------------------------------------------------ live, QEMU beside multifd

@pytest.mark.timeout(180)
def test_live_sweep_has_qemus_own_migration_at_each_rate(tmp_path):
    lines = []
    result = livebench.run(32 << 20, 2, [0, 50e6], "uniform", str(tmp_path), 60, lines.append,
                           qemu=True)
    still, moving = result["live"]
    for r in (still, moving):
        assert "error" not in r, r
        q = r["qemu"]
        assert q["converged"] is True, q
        assert q["seconds"] > 0 and q["downtime"] >= 0 and q["syncs"] >= 2
        assert q["pages"] >= (32 << 20) // 4096  # the image at least, and the rest of RAM
    assert still["qemu"]["guest_rate"] == 0 and moving["qemu"]["guest_rate"] > 0
    assert sum("QEMU" in line for line in lines) == 2
    table = livebench.table(result)
    assert "| QEMU total time | QEMU downtime | QEMU syncs | QEMU guest's rate |" in table
    rows = [line for line in table.splitlines() if line.startswith("| 50 MB/s")]
    assert len(rows) == 1 and rows[0].count("|") == 11
    assert os.listdir(tmp_path) == []
    png = tmp_path / "live.png"  # QEMU's downtime drawn beside multifd's
    benchplot.plot({"points": [], "size": 32 << 20, "cpu": "test", "live": [result]}, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_a_qemu_migration_that_cannot_converge_is_cancelled_and_said(tmp_path):
    image = tmp_path / "image"
    write_image(str(image), 32 << 20, "random", 1)
    # 1 MB/s cannot even carry the 32 MiB within the 4 s, let alone what the guest writes
    # meanwhile: QEMU would go on for ever
    result = qemulive.run(str(image), 1, 100e6, 4, max_bandwidth=1_000_000)
    assert result["converged"] is False
    assert result["why"] == "QEMU had not converged after 4s (cancelled)"
    assert result["guest_rate"] == pytest.approx(100e6, rel=0.2)
    table = livebench.table({"size": 32 << 20, "channels": 1, "pattern": "uniform", "live": [
        {"dirty_rate": 100e6, "rounds": 3, "converged": True, "seconds": 0.5, "downtime": 0.01,
         "receiver_downtime": 0.012, "qemu": result}]})
    assert re.search(r"\| QEMU had not converged after 4s \(cancelled\) \| \| \| \d+ MB/s \|$",
                     table, re.M)


def test_qemus_guest_writes_uniformly_only(tmp_path):
    assert livebench._qemu("unused", 1e6, 1, "hot:5%", 10) == {
        "skipped": "QEMU's guest writes uniformly, not hot:5%"}


def test_what_the_guest_cannot_do_is_skipped_not_a_crash(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: beyond the 3 GiB the guest's flat memory reaches
    skipped = livebench._qemu(str(big), 100e6, 1, "uniform", 10)
    assert skipped["skipped"].startswith("QEMU's guest: 786432 pages at 0x1000000: must lie")
    small = tmp_path / "small"
    write_image(str(small), 1 << 20, "random", 1)
    slow = livebench._qemu(str(small), 1e6, 1, "uniform", 10)
    assert "too slow for the guest's fixed point" in slow["skipped"]


def _chosen(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "all"}


def test_the_median_run_is_reported_whole():
    runs = [{"downtime": 0.3, "seconds": 1.0, "converged": True}, {"error": "boom"},
            {"downtime": 0.1, "seconds": 2.0, "converged": True},
            {"downtime": 0.2, "seconds": 3.0, "converged": True}]
    result = livebench.median_run(runs)
    assert _chosen(result) == {"downtime": 0.2, "seconds": 3.0, "converged": True, "runs": 4,
                               "converged_runs": 3, "failed_runs": 1}
    assert result["all"] == runs
    still = [{"downtime": None, "seconds": s, "converged": True} for s in (0.5, 0.4, 0.6)]
    assert _chosen(livebench.median_run(still)) == {
        "downtime": None, "seconds": 0.5, "converged": True, "runs": 3, "converged_runs": 3,
        "failed_runs": 0}
    assert _chosen(livebench.median_run([{"error": "a"}, {"error": "b"}])) == {
        "error": "a", "runs": 2, "converged_runs": 0, "failed_runs": 2}


def test_runs_that_did_not_converge_rank_as_the_longest_downtime():
    cancelled = {"converged": False, "seconds": 4.0, "why": "QEMU had not converged after 4s "
                 "(cancelled)", "guest_rate": 100e6}
    ran = {"converged": True, "seconds": 0.9, "downtime": 0.9, "syncs": 4, "guest_rate": 100e6}
    result = livebench.median_run([cancelled, ran, dict(cancelled)])
    assert result["converged"] is False and result["converged_runs"] == 1
    cells = livebench._qemu_cells(result)
    assert cells.startswith("QEMU had not converged after 4s (cancelled) (1/3 converged) |")
    failed = livebench.median_run([{"error": "boom"}, ran, {"error": "boom"}])
    assert failed["converged"] is True and failed["failed_runs"] == 2
    assert "0.90 s (1/3 converged, 2 failed) | 900 ms |" in livebench._qemu_cells(failed)


def test_an_interrupt_while_the_image_is_written_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(path, *args):
        open(path, "wb").close()
        raise KeyboardInterrupt  # as multifd-bench's SIGTERM handler raises mid-write
    monkeypatch.setattr(qemubench, "write_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qemubench.QemuBench(64 << 20, 1, str(tmp_path), 10)
    assert os.listdir(tmp_path) == []
