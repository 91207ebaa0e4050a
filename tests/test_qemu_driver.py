"""multifd.tools.qemu against the real qemu-system-x86_64 (KVM when /dev/kvm is usable, TCG
otherwise; MULTIFD_QEMU_ACCEL=tcg forces TCG): a loaded image reads back, QEMU ends on every
way out, the boot-sector guest dirties exactly its pages, and QEMU migrates to QEMU with
multifd, the baseline a benchmark times."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from conftest import wait_until
from multifd.tools import qemu

# QEMU is installed by `make qemu` (a dependency of `make test`): missing, these fail.
pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
ADDR = qemu.IMAGE_ADDR


@pytest.fixture(scope="module")
def small_image(shared_image) -> str:
    return shared_image(16 * MIB, "mixed", 7)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def free_port() -> int:
    """A port nobody listens on now; QEMU must bind it itself, so ours is closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loaded_image_reads_back_and_qemu_ends(small_image, tmp_path):
    with qemu.Guest(image=small_image) as guest:
        pid, directory = guest.pid, guest.dir
        assert guest.ramblocks()["pc.ram"] == 256 * MIB
        guest.pmemsave(ADDR, 16 * MIB, tmp_path / "mem")
        assert read(tmp_path / "mem") == read(small_image)
        # Never ran: the legacy hole shows ROMs, so pc.ram cannot be read there.
        ram = tmp_path / "pc.ram"
        assert guest.dump_block("pc.ram", ram) == [(0, 0xc0000), (0x100000, 255 * MIB)]
        assert read(ram)[ADDR:ADDR + 16 * MIB] == read(small_image)
        with pytest.raises(qemu.QmpError, match="has not been found"):
            guest.cmd("no-such-command")
        assert guest.query_migrate() == {}  # no status before a first migration
    assert gone(pid) and not os.path.exists(directory)


def test_a_qemu_that_does_not_answer_is_killed():
    with qemu.Guest() as guest:
        os.kill(guest.pid, signal.SIGSTOP)
        started = time.monotonic()
        guest.close()
        assert gone(guest.pid) and time.monotonic() - started < 5


def test_completed_is_awaited_until_qemu_has_its_times(monkeypatch):
    # QEMU's migration thread says "completed" a moment before it computes total-time and
    # downtime; a query in between reads 0 for both.
    answers = iter([{"status": "active"}, {"status": "completed", "total-time": 0},
                    {"status": "completed", "total-time": 0, "downtime": 0},
                    {"status": "completed", "total-time": 812, "downtime": 31}])
    guest = qemu.Guest.__new__(qemu.Guest)  # no QEMU: only the polling is under test
    monkeypatch.setattr(guest, "query_migrate", lambda: next(answers), raising=False)
    assert guest.wait_completed(timeout=5) == {"status": "completed", "total-time": 812,
                                               "downtime": 31}


def test_boot_sector():
    sector = qemu.boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    for pages, base in ((1, 0x7000), (160, 0x10000), (0, 0x10000), (1, 0x10800)):
        with pytest.raises(ValueError):
            qemu.boot_sector(pages, base)


def test_boot_sector_guest_dirties_the_first_byte_of_each_page(tmp_path):
    base, pages = 0x10000, 128
    qemu.write_boot_disk(tmp_path / "boot.img", pages, base)
    with qemu.Guest(boot_disk=tmp_path / "boot.img") as guest:
        def dump() -> bytes:
            guest.pmemsave(base, pages * qemu.PAGE, tmp_path / "mem")
            return read(tmp_path / "mem")

        def firsts(mem: bytes) -> bytes:
            return mem[::qemu.PAGE]
        guest.cont()
        # SeaBIOS first boots (about 1 s under KVM); the pages are zero until the loop runs
        wait_until(lambda: any(firsts(dump())), 30, "the boot sector running", interval=0.05)
        one, two = dump(), dump()
        assert firsts(one) != firsts(two)
        for mem in (one, two):
            assert all(not any(mem[at + 1:at + qemu.PAGE])
                       for at in range(0, len(mem), qemu.PAGE))


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_qemu_to_qemu_multifd(small_image, tmp_path, pki, tls):
    uri = f"tcp:127.0.0.1:{free_port()}"
    creds = pki.both if tls else None
    with qemu.Guest(image=small_image, tls_dir=creds) as src, \
            qemu.Guest(incoming=True, tls_dir=creds) as dst:
        dst.migrate_incoming(uri, channels=2, tls=tls)
        src.migrate(uri, channels=2, tls=tls)
        done = src.wait_completed(timeout=40)
        assert done["total-time"] > 0
        dst.wait_status("completed", timeout=10)
        dst.pmemsave(ADDR, 16 * MIB, tmp_path / "mem")
        assert read(tmp_path / "mem") == read(small_image)
        print(f"{qemu.accel()} tls={tls}: total-time {done['total-time']} ms, "
              f"{done['ram']['normal']} normal pages, {done['ram']['duplicate']} zero pages")
