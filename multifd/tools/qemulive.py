"""multifd-bench --qemu --live-rates: QEMU's own live migration at the dirty rates multifd's
live sweep runs, for the same image, channel count and downtime limit.

The source guest (`pc`, the image's size plus 64 MiB of RAM, KVM where /dev/kvm works) has the
live sweep's random image loaded at 16 MiB and boots the dirtying sector (dirtyguest), which
writes uniformly over the image's pages at the rate, as `multifd-send --live --dirty-pattern
uniform` does. Once it runs, a QEMU destination (-incoming defer, default memory) listens on
127.0.0.1 and the source migrates into it with multifd, unthrottled, downtime-limit 300 ms
(QEMU's default, and multifd-send's). What is reported is QEMU's own: total-time (from
`migrate` to completed), downtime (from the source's stop to the end of the migration, as the
source sees it), the number of dirty-bitmap syncs (one at setup, one per iteration, one at
the stop), the pages sent, and the rate the guest actually wrote at while it ran during the
migration (its counter in guest memory over total-time less downtime). QEMU never gives up
on a migration that does not converge: after `timeout` seconds it is cancelled and reported
as not converged.
"""

from __future__ import annotations

import os
import tempfile
import time

from ..precopy import DEFAULT_DOWNTIME
from .benchproc import free_port
from .dirtyguest import PAGE, dirtied, wait_ready, write_disk
from .qemu import Guest, QemuError

IMAGE_ADDR = 0x1000000
HEADROOM = 64 << 20  # guest RAM above the image: the firmware's tables live at its top
BOOT_TIMEOUT = 30  # seconds: the firmware boots the sector in 0.5-3 s here


def run(image: str, channels: int, rate: float, timeout: float,
        max_bandwidth: int | None = None) -> dict:
    """One migration; `max_bandwidth` (bytes/s) throttles it, to make one that cannot end."""
    size = os.path.getsize(image)
    mem = f"{(IMAGE_ADDR + size + HEADROOM) >> 20}M"
    with tempfile.TemporaryDirectory(prefix="multifd-qemulive-") as work:
        disk = os.path.join(work, "dirty.img")
        write_disk(disk, rate, IMAGE_ADDR, size // PAGE)
        with Guest(mem=mem, image=image, image_addr=IMAGE_ADDR, boot_disk=disk) as source, \
                Guest(mem=mem, incoming=True) as dest:
            source.cont()
            wait_ready(source, BOOT_TIMEOUT)
            port = free_port()
            dest.migrate_incoming(f"tcp:127.0.0.1:{port}", channels=channels)
            source.set_migration(channels=channels, max_bandwidth=max_bandwidth)
            source.cmd("migrate-set-parameters", downtime_limit=round(DEFAULT_DOWNTIME * 1e3))
            start = time.monotonic()
            source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            before = dirtied(source)  # after `migrate`: total-time starts there too
            try:
                info = source.wait_completed(timeout=timeout)
            except QemuError:
                status = source.query_migrate().get("status")
                if status == "completed":  # it ended as the time ran out
                    info = source.wait_completed(timeout=10)
                elif status in ("active", "device"):
                    wrote = (dirtied(source) - before) % 2**32
                    seconds = time.monotonic() - start
                    source.cancel()
                    source.wait_status("cancelled", timeout=10)
                    return {"converged": False, "seconds": round(seconds, 3),
                            "guest_rate": round(wrote * PAGE / seconds),
                            "why": f"QEMU had not converged after {timeout:g}s (cancelled)"}
                else:
                    raise
            wrote = (dirtied(source) - before) % 2**32  # the source is stopped now
            dest.wait_status("completed", timeout=timeout)
    seconds, downtime = info["total-time"] / 1e3, info["downtime"] / 1e3
    ram = info["ram"]
    return {"converged": True, "seconds": seconds, "downtime": downtime,
            "setup": info["setup-time"] / 1e3, "syncs": ram["dirty-sync-count"],
            "pages": ram["normal"] + ram["duplicate"],
            "guest_rate": round(wrote * PAGE / max(seconds - downtime, 1e-3))}
