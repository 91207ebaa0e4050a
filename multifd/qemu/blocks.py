"""The capture's output: a directory with one raw file per RAM block, put in place whole.

Everything is written into a hidden `.NAME.*.part` directory beside NAME, and renamed to NAME
only once the stream was complete and checked; any failure removes it. NAME may exist only as
an empty directory (rename(2) replaces an empty directory, never a full one).

    NAME/ram/<block>        one sparse file per RAM block, its used length long; the block's
                            name percent-quoted (/rom@etc/acpi/tables -> %2From@etc%2Facpi%2Ftables)
    NAME/device-state.bin   the main channel from the first device section to QEMU_VM_EOF
    NAME/vmdescription.json QEMU's description of that device state
    NAME/manifest.json      what was received (see capture.py)

Each page's history is one byte per page (never sent, zero, data): a zero page that arrives
after data for the same page overwrites it, a zero page on a page never written is left a
hole, and a page never sent at all is counted.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from urllib.parse import quote

import xxhash

from ..errors import ImageError, UsageError
from ..image import check_parent, pwrite_all
from .wire import PAGE_BITS, PAGE_SIZE

NEVER, ZERO, DATA = 0, 1, 2
_ZEROS = bytes(PAGE_SIZE)
_CHUNK = 8 << 20
_ZERO_CHUNK = memoryview(bytes(_CHUNK))



def check_output_dir(path: str) -> None:
    """Fail early, before any network wait, if the directory can never be put in place."""
    if not path:
        raise UsageError("output directory is empty")
    if os.path.lexists(path):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UsageError(f"output {path} exists and is not a directory")
        if os.listdir(path):
            raise UsageError(f"output directory {path} exists and is not empty")
    check_parent(path)


def block_file(name: str) -> str:
    return "ram/" + quote(name, safe="@.+,=-_")


class Block:
    """One RAM block's file and page history; pages are written from any thread (a page is
    touched by one channel at a time: QEMU's sync rule sees to it)."""

    def __init__(self, directory: str, name: str, size: int, pwrite) -> None:
        self.name = name
        self.size = size
        self.file = block_file(name)
        self.pages = bytearray(size >> PAGE_BITS)
        self._pwrite = pwrite
        self.fd = os.open(os.path.join(directory, self.file),
                          os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        os.ftruncate(self.fd, size)

    def _write(self, view, offset: int) -> None:
        pwrite_all(self._pwrite, self.fd, view, offset, f"RAM block {self.name!r}")

    def write_pages(self, offsets, payload) -> None:
        """Pages in payload order at `offsets`. A run of contiguous pages (what a packet of
        a paused guest's RAM is) is one write and one slice of the history, checked and done
        at C speed: a Python loop per page here holds the GIL that the other channels'
        threads need to return from their reads."""
        n = len(offsets)
        first = offsets[0]
        if offsets == tuple(range(first, first + n * PAGE_SIZE, PAGE_SIZE)):
            self._write(memoryview(payload), first)
            index = first >> PAGE_BITS
            self.pages[index:index + n] = bytes([DATA]) * n
            return
        view, pages, i = memoryview(payload), self.pages, 0
        while i < n:
            j = i + 1
            while j < n and offsets[j] == offsets[j - 1] + PAGE_SIZE:
                j += 1
            self._write(view[i * PAGE_SIZE:j * PAGE_SIZE], offsets[i])
            i = j
        for offset in offsets:
            pages[offset >> PAGE_BITS] = DATA

    def zero_pages(self, offsets) -> None:
        pages = self.pages
        first, n = offsets[0], len(offsets)
        if offsets == tuple(range(first, first + n * PAGE_SIZE, PAGE_SIZE)):
            index = first >> PAGE_BITS
            if DATA not in pages[index:index + n]:  # nothing to overwrite: holes stay holes
                pages[index:index + n] = bytes([ZERO]) * n
                return
        for offset in offsets:
            index = offset >> PAGE_BITS
            if pages[index] == DATA:
                self._write(memoryview(_ZEROS)[:PAGE_SIZE], offset)
            pages[index] = ZERO

    def never_sent(self) -> int:
        return self.pages.count(NEVER)

    def xxh3_128(self) -> str:
        """The file's XXH3-128 (what `xxh128sum` prints). Holes are hashed from a buffer of
        zeros rather than read: reading a hole costs a page fault per page (0.6 s a GiB
        here), and most of a guest's RAM is holes."""
        digest, pos, end = xxhash.xxh3_128(), 0, self.size
        buf = memoryview(bytearray(_CHUNK))
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole to the end
                data = end
            while pos < data:
                n = min(_CHUNK, data - pos)
                digest.update(_ZERO_CHUNK[:n])
                pos += n
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE) if pos < end else end
            while pos < hole:
                n = os.preadv(self.fd, [buf[:min(_CHUNK, hole - pos)]], pos)
                if n <= 0:
                    raise ImageError(f"RAM block {self.name!r} is shorter than {end} bytes")
                digest.update(buf[:n])
                pos += n
        return digest.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OutputDir:
    """The hidden directory under construction, put in place by publish(), gone otherwise."""

    def __init__(self, path: str, pwrite=os.pwrite, log=None) -> None:
        check_output_dir(path)
        self.path = path
        parent, name = os.path.split(os.path.abspath(path))
        _remove_abandoned(parent, name, log)
        try:
            self.tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=parent)
            with open(os.path.join(self.tmp, OWNER), "x") as f:
                f.write(f"{os.getpid()}\n")
            os.mkdir(os.path.join(self.tmp, "ram"))
        except OSError as exc:
            raise UsageError(f"cannot create a directory in {parent}: {exc.strerror}") \
                from None
        self._pwrite = pwrite
        self.blocks: dict[str, Block] = {}
        self._published = False

    def create_blocks(self, blocks) -> None:
        files = {block_file(name) for name, _ in blocks}
        if len(files) != len(blocks):
            raise ImageError("two RAM block names map to one file name")
        try:
            for name, size in blocks:
                self.blocks[name] = Block(self.tmp, name, size, self._pwrite)
        except OSError as exc:
            raise ImageError(f"cannot create the RAM block files in {self.tmp}: "
                             f"{exc.strerror}") from None

    def write_file(self, name: str, data: bytes) -> None:
        try:
            with open(os.path.join(self.tmp, name), "xb") as f:
                f.write(data)
                os.fsync(f.fileno())
        except OSError as exc:
            raise ImageError(f"writing {name} in {self.tmp}: {exc.strerror}") from None

    def publish(self) -> None:
        """Make every file and directory durable, then rename the directory into place (the
        files beside the blocks were synced as they were written)."""
        try:
            for block in self.blocks.values():
                os.fsync(block.fd)
            os.unlink(os.path.join(self.tmp, OWNER))
            _fsync_dir(os.path.join(self.tmp, "ram"))
            _fsync_dir(self.tmp)
            os.chmod(self.tmp, 0o777 & ~_umask())
            os.rename(self.tmp, self.path)
        except OSError as exc:
            raise ImageError(f"putting {self.path} in place: {exc.strerror}") from None
        self._published = True
        try:  # the rename itself: best effort, the capture is in place either way
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            pass

    def discard(self) -> None:
        for block in self.blocks.values():
            block.close()
        if not self._published:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


OWNER = "owner.pid"  # in the hidden directory: the receiver writing it


def _remove_abandoned(parent: str, name: str, log) -> None:
    """Remove the hidden directories of earlier captures into `name` whose receiver is gone
    (killed, or crashed on purpose: --fault crash); a live receiver's is left alone."""
    for entry in os.listdir(parent):
        if not (entry.startswith(f".{name}.") and entry.endswith(".part")):
            continue
        path = os.path.join(parent, entry)
        try:
            with open(os.path.join(path, OWNER)) as f:
                pid = int(f.read())
            os.kill(pid, 0)
            continue  # its receiver still runs
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not ours to judge
        shutil.rmtree(path, ignore_errors=True)
        if log is not None:
            log(f"removed {path}, left by a receiver that ended before its capture was "
                "complete")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
