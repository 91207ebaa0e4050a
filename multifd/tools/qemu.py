"""A real QEMU for tests and benchmarks: start qemu-system-x86_64 as a migration source or as
a `-incoming defer` destination, drive it over QMP, read its memory back, and end it.

    with Guest(image="pat.img", image_addr=0x1000000) as src, Guest(incoming=True) as dst:
        dst.migrate_incoming("tcp:127.0.0.1:4444", channels=2)
        src.migrate("tcp:127.0.0.1:4444", channels=2)
        print(src.wait_completed(timeout=60)["total-time"], "ms")

Plain blocking standard-library code, without trio: QMP is one request and one answer at a
time on a unix socket, every call here is bounded by a timeout, and the callers (tests, a
benchmark's setup and teardown) have nothing else to do meanwhile. Kept apart from the
package's own I/O, a fault in that I/O cannot hide in the harness that measures it.

What QEMU 7.2 needs and shows:
- Both sides of a migration need the same "multifd" capability and "multifd-channels"; the
  parameters "multifd-compression", "max-bandwidth" (bytes/s, also throttling multifd) and
  "tls-creds" (the id of a tls-creds-x509 object, "" for none) are set before `migrate`.
- pmemsave reads guest-physical memory, which is not a RAM block: on `pc`, 0xc0000-0xfffff
  shows pc.rom and pc.bios until the firmware turns on shadow RAM there. dump_block() follows
  the current memory map and returns which parts of the block it could read.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

QEMU = os.environ.get("MULTIFD_QEMU", "qemu-system-x86_64")
ACCEL_ENV = "MULTIFD_QEMU_ACCEL"  # "kvm" or "tcg": overrides accel()'s choice
# Above the legacy hole, where guest-physical addresses are pc.ram offsets, and far below the
# top of RAM, where the firmware puts its tables when the guest runs.
IMAGE_ADDR = 0x1000000
UNLIMITED = 10**12  # bytes/s: max-bandwidth that never throttles on one machine
PAGE = 4096


class QemuError(Exception):
    """QEMU did not start, died, or a migration did not end as asked."""


class QmpError(QemuError):
    """A QMP command failed; the message carries QEMU's own description."""


def accel() -> str:
    """"kvm" if /dev/kvm can be opened read-write (what QEMU needs), else "tcg"."""
    forced = os.environ.get(ACCEL_ENV)
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValueError(f"{ACCEL_ENV} must be kvm or tcg, not {forced!r}")
        return forced
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return "tcg"
    return "kvm"


_accel = accel  # Guest's keyword argument of the same name hides it


class Qmp:
    """A QMP client on a unix socket; every call is answered within `timeout` seconds."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        self._sock = socket.socket(socket.AF_UNIX)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read(time.monotonic() + timeout, "greeting")
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            self.cmd("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def cmd(self, name: str, **args):
        """Run a command; returns its "return" value. Underscores in argument names become
        hyphens (command_line= for "command-line"); a dict passed as **{...} keeps its keys."""
        self._id += 1
        request: dict = {"execute": name, "id": self._id}
        if args:
            request["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        deadline = time.monotonic() + self.timeout
        self._sock.settimeout(self.timeout)
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read(deadline, name)
            # Events (STOP, SHUTDOWN, ...) come whenever they happen, even before the answer;
            # another id is the late answer to a call that timed out.
            if message.get("id") != self._id:
                continue
            if "error" in message:
                error = message["error"]
                raise QmpError(f"{name}: {error.get('desc', error)}")
            return message["return"]

    def _read(self, deadline: float, what: str) -> dict:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"{what}: no answer from QEMU within {self.timeout}s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise QmpError(f"{what}: QEMU closed its QMP socket")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self._sock.close()


# The kernel sends a parent-death signal when the *thread* that started the child ends, so only
# children of the main thread get one: a test run that is killed on a timeout (os._exit) then
# takes its guests with it, while a worker thread that ends early cannot kill a guest in use.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _opt(path) -> str:
    """A path inside a QEMU option list, where a comma is written twice."""
    return os.path.abspath(path).replace(",", ",,")


class Guest:
    """One qemu-system-x86_64 process (`pc` machine, paused at start by -S), its QMP client and
    its temporary directory (QMP socket, stderr). Use it as a context manager: leaving it
    always ends QEMU, by its PID, and removes the directory."""

    def __init__(self, *, mem: str = "256M", image=None, image_addr: int = IMAGE_ADDR,
                 boot_disk=None, uuid: str | None = None, tls_dir=None,
                 incoming: bool = False, accel: str | None = None,
                 mem_prealloc: bool = False, timeout: float = 10) -> None:
        self.accel = accel or _accel()
        self.incoming = incoming
        self.dir = tempfile.mkdtemp(prefix="multifd-qemu-")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.qmp: Qmp | None = None
        sock = os.path.join(self.dir, "qmp.sock")
        argv = [QEMU, "-machine", f"pc,accel={self.accel}", "-m", str(mem), "-nodefaults",
                "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off"]
        if image is not None:
            argv += ["-device", f"loader,file={_opt(image)},addr={image_addr:#x},force-raw=on"]
        if boot_disk is not None:
            argv += ["-drive", f"file={_opt(boot_disk)},format=raw,if=ide"]
        if uuid is not None:
            argv += ["-uuid", str(uuid)]
        if tls_dir is not None:
            endpoint = "server" if incoming else "client"
            argv += ["-object", f"tls-creds-x509,id=tls0,dir={_opt(tls_dir)},endpoint={endpoint}"]
        if mem_prealloc:  # all guest RAM faulted in at start, not by the first write
            argv += ["-mem-prealloc"]
        if incoming:
            argv += ["-incoming", "defer"]
        try:
            main = threading.current_thread() is threading.main_thread()
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                             stderr=err,
                                             preexec_fn=_die_with_parent if main else None)
            self.pid = self.proc.pid
            self.qmp = self._connect(sock, timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, sock: str, timeout: float) -> Qmp:
        # wait=off: QEMU listens before it is ready to answer, and nothing signals that moment
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with code {self.proc.returncode}{self._tail()}")
            try:
                return Qmp(sock, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket after {timeout}s{self._tail()}") from None
                time.sleep(0.01)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End QEMU: "quit" if it answers within 1 s, else SIGKILL; then reap it."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None and self.qmp is not None:
                self.qmp.timeout = 1
                self.qmp.cmd("quit")
                proc.wait(timeout=5)
        except (QemuError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def _tail(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2000))
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"\nQEMU's stderr (end):\n{text}" if text else ""

    def cmd(self, name: str, **args):
        """A QMP command (see Qmp.cmd); its errors end with the tail of QEMU's stderr."""
        if self.qmp is None:
            raise QemuError(f"{name}: this guest is closed")
        try:
            return self.qmp.cmd(name, **args)
        except (QmpError, OSError) as exc:
            raise QmpError(f"{exc}{self._tail()}") from None

    def hmp(self, command: str) -> str:
        return self.cmd("human-monitor-command", command_line=command)

    # ---------------------------------------------------------------- migration

    def set_migration(self, channels: int = 2, multifd: bool = True, compression=None,
                      return_path: bool = False, max_bandwidth: int | None = None,
                      tls: bool = False) -> None:
        """Capabilities and parameters, each set every time (so that one call's choice does
        not linger into the next migration of the same guest)."""
        self.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "multifd", "state": multifd},
            {"capability": "return-path", "state": return_path}])
        self.cmd("migrate-set-parameters", **{
            "multifd-channels": channels, "multifd-compression": compression or "none",
            "max-bandwidth": UNLIMITED if max_bandwidth is None else int(max_bandwidth),
            "tls-creds": "tls0" if tls else ""})

    def migrate(self, uri: str, channels: int = 2, multifd: bool = True, compression=None,
                return_path: bool = False, max_bandwidth: int | None = None,
                tls: bool = False) -> None:
        """Start an outgoing migration (it runs on: see wait_status)."""
        self.set_migration(channels, multifd, compression, return_path, max_bandwidth, tls)
        self.cmd("migrate", uri=uri)

    def migrate_incoming(self, uri: str, **settings) -> None:
        """Listen for a migration (needs incoming=True) with migrate()'s settings, which
        must match the source's; QEMU is listening when this returns."""
        self.set_migration(**settings)
        self.cmd("migrate-incoming", uri=uri)

    def query_migrate(self) -> dict:
        return self.cmd("query-migrate")

    def wait_status(self, statuses, timeout: float = 60) -> dict:
        """Poll query-migrate until its status is in `statuses` (one str or several); returns
        that answer (status, total-time, ram, ...). Fails on "failed" or "cancelled" unless
        asked for, and after `timeout` seconds, naming the last status."""
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            status = info.get("status")  # none before the first migration
            if status in wanted:
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info.get('error-desc', '')}"
                                f"{self._tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"migration still {status!r} after {timeout}s, waiting "
                                f"for {sorted(wanted)}{self._tail()}")
            time.sleep(0.01)

    def wait_completed(self, timeout: float = 60) -> dict:
        """wait_status("completed"), answered once QEMU has filled in total-time and downtime:
        its migration thread says completed before it computes them (migration_completion,
        then migration_calculate_complete), and a query in between reads 0 for both."""
        info = self.wait_status("completed", timeout)
        deadline = time.monotonic() + 5
        while not info.get("total-time") and time.monotonic() < deadline:
            time.sleep(0.005)
            info = self.query_migrate()
        return info

    def cancel(self) -> None:
        self.cmd("migrate_cancel")

    def cont(self) -> None:
        self.cmd("cont")

    def stop(self) -> None:
        self.cmd("stop")

    # ---------------------------------------------------------------- memory

    def pmemsave(self, addr: int, size: int, path) -> None:
        """Write `size` bytes of guest-physical memory from `addr` into the file `path`."""
        self.cmd("pmemsave", val=addr, size=size, filename=os.path.abspath(path))

    def ramblocks(self) -> dict[str, int]:
        """{RAM block name: used size in bytes}, in QEMU's order (the migration's blocks)."""
        blocks = {}
        # "Block Name  PSize  Offset  Used  Total"; PSize is two words ("4 KiB")
        for line in self.hmp("info ramblock").splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 5:
                blocks[fields[0]] = int(fields[-2], 16)
        return blocks

    def memory_map(self) -> list[tuple[int, int, str, int]]:
        """The guest-physical map now, from `info mtree -f`: (address, length, memory region
        name, offset in that region) for each range of the "memory" address space."""
        found = []
        for view in self.hmp("info mtree -f").split("FlatView #"):
            if '\n AS "memory",' not in view:
                continue
            for m in _MAP_LINE.finditer(view):
                start, end = int(m[1], 16), int(m[2], 16)
                found.append((start, end - start + 1, m[3], int(m[4] or "0", 16)))
        return found

    def dump_block(self, name: str, path) -> list[tuple[int, int]]:
        """Write RAM block `name` (its used size) into the file `path`, read by pmemsave
        wherever the block is mapped now; returns the (offset, length) ranges read, merged.
        The rest of the file is zero and is not the block's: e.g. pc.ram at 0xc0000-0xfffff
        while the guest never ran, or ACPI blobs, which are not mapped at all. Stop a
        running guest first for a consistent copy."""
        size = self.ramblocks()[name]
        part = os.path.join(self.dir, "part")
        read = []
        with open(path, "wb") as out:
            out.truncate(size)
            for addr, length, region, offset in self.memory_map():
                if region != name:
                    continue
                self.pmemsave(addr, length, part)
                with open(part, "rb") as f:
                    out.seek(offset)
                    shutil.copyfileobj(f, out, 1 << 20)
                os.unlink(part)
                read.append((offset, length))
        merged: list[list[int]] = []  # [start, end]: a block can be mapped twice (pc.bios is)
        for offset, length in sorted(read):
            if merged and offset <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], offset + length)
            else:
                merged.append([offset, offset + length])
        return [(start, end - start) for start, end in merged]


# "  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000 KVM"
_MAP_LINE = re.compile(r"^ +([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, [\w/-]+\): (\S+)"
                       r"(?: @([0-9a-f]+))?", re.M)


def boot_sector(pages: int = 128, base: int = 0x10000) -> bytes:
    """A 512-byte MBR that SeaBIOS loads at 0x7c00 and runs in real mode: forever, it adds 1 to
    the first byte of each 4 KiB page in [base, base + pages * 4096) and touches nothing
    else, so a running guest keeps dirtying exactly those pages (a live-migration load).

            cli                     ; FA          no interrupt handler writes memory either
    outer:  mov ax, base >> 4       ; B8 lo hi    segment of the first page
            mov cx, pages           ; B9 lo hi
    inner:  mov es, ax              ; 8E C0
            inc byte [es:0]         ; 26 FE 06 00 00
            add ax, 0x100           ; 05 00 01    next page: 4096 bytes = 0x100 paragraphs
            loop inner              ; E2 F4       cx -= 1; again while cx != 0
            jmp outer               ; EB EC
    """
    # Above the boot sector and the BIOS data, below the EBDA and video memory at 0x9fc00+
    if base % PAGE or base < 0x8000 or pages < 1 or base + pages * PAGE > 0x9f000:
        raise ValueError(f"pages {pages} at {base:#x}: must lie within 0x8000-0x9f000")
    seg = base >> 4
    code = bytes([0xFA, 0xB8, seg & 0xFF, seg >> 8, 0xB9, pages & 0xFF, pages >> 8,
                  0x8E, 0xC0, 0x26, 0xFE, 0x06, 0x00, 0x00, 0x05, 0x00, 0x01,
                  0xE2, 0xF4, 0xEB, 0xEC])
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def write_boot_disk(path, pages: int = 128, base: int = 0x10000) -> None:
    """A raw one-sector disk holding boot_sector(), for Guest(boot_disk=path)."""
    with open(path, "wb") as f:
        f.write(boot_sector(pages, base))
