"""multifd.tools.dirtyguest, the guest of the QEMU live benchmark: its bytes are what binutils
makes of dirtyguest.S, its parameters land where the code reads them, and in a real QEMU it
writes the set rate, only into its region, one byte per write, and counts every write."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time

import pytest

from multifd.tools import dirtyguest as dg
from multifd.tools import qemu

pytestmark = pytest.mark.timeout(90)

SOURCE = os.path.join(os.path.dirname(dg.__file__), "dirtyguest.S")
MIB = 1 << 20


def test_the_embedded_bytes_are_the_assembled_source(tmp_path):
    # binutils comes with `make qemu` (a dependency of `make test`): missing, this fails.
    obj, out = tmp_path / "d.o", tmp_path / "d.bin"
    subprocess.run([shutil.which("as") or "as", "--32", "-o", obj, SOURCE], check=True)
    subprocess.run([shutil.which("ld") or "ld", "-m", "elf_i386", "-Ttext", "0x7c00",
                    "--oformat", "binary", "-o", out, obj], check=True)
    built = out.read_bytes()
    assert len(built) == 512
    assert built == dg.sector(0, dg.LOWEST, 1, 0)[:dg.PARAMS] + struct.pack(
        "<IIII", 0, 0, 0, 0) + b"\x55\xaa"


def test_parameters_sit_before_the_signature():
    sector = dg.sector(100e6, 0x1000000, 4096, seed=7)
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    assert sector.startswith(dg.CODE) and not any(sector[len(dg.CODE):dg.PARAMS])
    fx, pages, base, seed = struct.unpack_from("<IIII", sector, dg.PARAMS)
    assert (pages, base, seed) == (4096, 0x1000000, 7)
    # 100 MB/s = 24414 pages/s = 0.02046 pages per tick of the 1193182 Hz clock
    assert fx == dg.rate_fx(100e6) == 1341
    assert fx / 65536 * dg.CLOCK_HZ * dg.PAGE == pytest.approx(100e6, rel=1e-3)


@pytest.mark.parametrize("rate, base, pages", [
    (1e6, 0x1000000 + 1, 10),        # not on a page
    (1e6, 0x80000, 10),              # in the firmware's first megabyte
    (1e6, 0x1000000, 0),
    (1e6, (3 << 30) - 4096, 2),      # into the PCI hole
    (-1, 0x1000000, 10),
    (5e9, 0x1000000, 10),            # beyond the fixed point's range
    (30e3, 0x1000000, 10),           # rounds to nothing
    (1e6, 0x1000000, 10),            # a fixed-point step is 7% of it
])
def test_out_of_range_parameters_are_refused(rate, base, pages):
    with pytest.raises(ValueError):
        dg.sector(rate, base, pages)


def _firsts(guest, base: int, pages: int, path) -> tuple[bytes, bytes]:
    """The first byte of every page of the region, and the bytes around the region."""
    guest.pmemsave(base - dg.PAGE, (pages + 2) * dg.PAGE, path)
    mem = path.read_bytes()
    inside = mem[dg.PAGE:-dg.PAGE]
    rest = b"".join(inside[at + 1:at + dg.PAGE] for at in range(0, len(inside), dg.PAGE))
    return inside[::dg.PAGE], mem[:dg.PAGE] + rest + mem[-dg.PAGE:]


@pytest.mark.parametrize("rate", [0, 40e6])
def test_the_guest_writes_its_rate_into_its_region_only(tmp_path, rate):
    base, pages = 0x1000000, 4096  # 16 MiB at 16 MiB: about 2.4 writes a page a second
    dg.write_disk(tmp_path / "disk", rate, base, pages, seed=3)
    with qemu.Guest(mem="64M", boot_disk=tmp_path / "disk") as guest:
        guest.cont()
        dg.wait_ready(guest, 30)
        before, start = dg.dirtied(guest), time.monotonic()
        time.sleep(1.5)
        after, seconds = dg.dirtied(guest), time.monotonic() - start
        guest.stop()
        total = dg.dirtied(guest)
        firsts, rest = _firsts(guest, base, pages, tmp_path / "mem")
    measured = (after - before) * dg.PAGE / seconds
    print(f"{qemu.accel()}: asked {rate / 1e6:.0f} MB/s, wrote {measured / 1e6:.1f} MB/s")
    assert measured == pytest.approx(rate, rel=0.15, abs=1)
    # one increment per write, no page written 256 times: the bytes add up to the counter
    assert sum(firsts) == total
    assert not any(rest)  # nothing beyond the first byte of a page, nothing outside
    if rate:
        assert sum(1 for b in firsts if b) > pages * 0.9  # uniform: nearly every page hit
