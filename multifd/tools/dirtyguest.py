"""The guest of the QEMU live benchmark: a boot sector that dirties guest RAM at a set rate,
uniformly over a region, as multifd's own workload does for `multifd-send --live`.

    write_disk(path, rate=100e6, base=0x1000000, pages=262144)
    with Guest(mem="1088M", image=image, boot_disk=path) as guest:
        guest.cont()
        wait_ready(guest, timeout=30)
        before = dirtied(guest)   # pages written so far

The machine code and how it keeps time are in dirtyguest.S beside this file (the bytes below
are what binutils makes of it; a test checks that). The vCPU halts between 1 kHz wakes, so the
guest costs the host the CPU its writes need, not a spinning core.
"""

from __future__ import annotations

import os
import struct
import time

from .qemu import QemuError

# as --32 dirtyguest.S; ld -m elf_i386 -Ttext 0x7c00 --oformat binary: the sector up to its
# parameters (what follows is zero up to them)
CODE = bytes.fromhex(
    "fa31c08ed8660f0116387d0f20c00c010f22c0ea187c080066b810008ed88ec08ed08ee08ee8bc00"
    "700000b011e620e6a0b020e621b028e6a1b004e621b002e6a1b001e621e6a1b0fee621b0ffe6a1b0"
    "34e64366b8a904e64088e0e640b0b4e64330c0e642e642e46124fc0c01e6610f011d3e7d00008b35"
    "ee7d00008b0df27d00008b3df67d00008b1dfa7d000031edc7050060000000000000c70508600000"
    "00000000c7050c60000044495254fbf4ebfc83c40cb020e620b080e643e44288c2e44288c60fb7d2"
    "a10060000089150060000029d025ffff0000f7e601e889c581e5ffff0000c1e81074c3a304600000"
    "69db0d66190081c35ff36e3c89d8f7e1c1e20cfe0417ff0508600000ff0d0460000075dceb986690"
    "0000000000000000ffff0000009acf00ffff00000092cf00b27c0800008e00001700187d00000701"
    "307c")
PARAMS = 0x1ee  # RATE_FX, PAGES, BASE, SEED: u32 each, then the 0x55aa signature
CLOCK_HZ = 1193182  # the PIT's input clock
COUNT_ADDR = 0x6008  # u32: pages dirtied so far
READY_ADDR = 0x600c  # b"DIRT" once the loop runs
READY = b"DIRT"
PAGE = 4096
LOWEST = 0x100000  # above the firmware and the sector's own memory (0x6000-0x7fff)
HIGHEST = 3 << 30  # below the PCI hole of the `pc` machine, whatever its RAM
STEP = CLOCK_HZ * PAGE / 65536  # bytes/s: the rate's resolution (one unit of RATE_FX)


def rate_fx(rate: float) -> int:
    """Pages per PIT tick in 16.16 fixed point for `rate` bytes/s."""
    return round(rate / PAGE / CLOCK_HZ * 65536)


def sector(rate: float, base: int, pages: int, seed: int = 1) -> bytes:
    """The 512-byte boot sector writing `rate` bytes/s (pages of 4 KiB a second times 4096)
    into [base, base + pages * 4096). Rates below about 3.7 MB/s, which the fixed point
    cannot hold within 1%, are refused. What the guest reaches at the top depends on the
    host: under KVM here, 1000 MB/s asked gave 650-1000 over 2 s (three runs) and 2 GB/s
    about 1.5; a wake that comes more than 55 ms late loses the time beyond (channel 2
    wraps), so dirtied() is what counts."""
    if base % PAGE or base < LOWEST or pages < 1 or base + pages * PAGE > HIGHEST:
        raise ValueError(f"{pages} pages at {base:#x}: must lie within "
                         f"{LOWEST:#x}-{HIGHEST:#x} on 4 KiB boundaries")
    fx = rate_fx(rate)
    if rate < 0 or fx >= 65536:
        raise ValueError(f"dirty rate {rate:.0f} B/s: must be 0 up to "
                         f"{65535 * PAGE * CLOCK_HZ / 65536 / 1e9:.1f} GB/s")
    if rate and abs(fx / 65536 * CLOCK_HZ * PAGE - rate) > rate / 100:
        raise ValueError(f"dirty rate {rate:.0f} B/s: too slow for the guest's fixed point, "
                         f"which steps by {STEP / 1e3:.1f} KB/s (from {100 * STEP / 1e6:.1f} "
                         f"MB/s on, within 1%)")
    head = CODE + bytes(PARAMS - len(CODE))
    return head + struct.pack("<IIII", fx, pages, base, seed & 0xFFFFFFFF) + b"\x55\xaa"


def write_disk(path, rate: float, base: int, pages: int, seed: int = 1) -> None:
    """A raw one-sector disk holding sector(), for Guest(boot_disk=path)."""
    with open(path, "wb") as f:
        f.write(sector(rate, base, pages, seed))


def _peek(guest, addr: int, size: int) -> bytes:
    path = os.path.join(guest.dir, "peek")
    guest.pmemsave(addr, size, path)
    with open(path, "rb") as f:
        return f.read()


def wait_ready(guest, timeout: float) -> None:
    """Until the sector's loop runs (the firmware has booted it): 0.5-3 s after `cont`."""
    deadline = time.monotonic() + timeout
    while _peek(guest, READY_ADDR, 4) != READY:
        if time.monotonic() > deadline:
            raise QemuError(f"the dirtying guest did not start within {timeout}s")
        time.sleep(0.05)


def dirtied(guest) -> int:
    """Pages the guest has written so far (modulo 2**32)."""
    return struct.unpack("<I", _peek(guest, COUNT_ADDR, 4))[0]
