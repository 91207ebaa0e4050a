"""The guest of a live migration: a process that keeps writing into the sender's copy of the
image, at a set rate and in a set pattern, and logs which pages it dirtied, as a hypervisor's
dirty bitmap does.

The copy and the log are shared memory (memfd), mapped by the sender and by this process. The
workload writes new content into a page (an 8-byte counter at a place that moves, never only
a flag), then marks the page in the active log. The sender reads the log by flipping
it: it makes the other log active, waits until the workload acknowledges the flip (which it
does between two pages, after marking the last), and then reads and clears the log it had.
So a write is either marked in the log the sender reads, or in the next one: a page written
while it is being sent is sent again in a later round, and no mark is ever lost.

Patterns (seeded, reproducible):
    uniform   every page alike
    hot:P%    90% of the writes go to a hot set, the first P% of the pages
    sweep     one byte incremented in every page, page after page, wrapping (QEMU's own
              migration test guest)

    python -m multifd.workload MEMFD LOGFD PAGE_SIZE RATE PATTERN SEED OWNER_PID
(started by `Workload`, which owns the process and its shared memory).
"""

from __future__ import annotations

import mmap
import os
import random
import struct
import subprocess
import sys
import time

from .dirty import Dirty
from .errors import MultifdError
from .image import copy_file

# The log's shared header: which log is active, the flip generation the sender asked for and
# the one the workload acknowledged, pause asked and acknowledged, pages written, and the
# throttle (percent of the rate taken away, as QEMU's cpu-throttle takes vCPU time).
_HEADER = struct.Struct("=QQQQQQQ")
ACTIVE, ASKED, SEEN, PAUSE, PAUSED, WRITTEN, THROTTLE = range(7)
HOT_SHARE = 0.9  # hot:P%: the share of writes that go to the hot set
TICK = 0.002  # seconds: how often the writer catches up with its rate


def parse_pattern(text: str) -> tuple[str, float]:
    """`uniform`, `sweep`, `hot:5%` -> (name, hot fraction); ValueError says what is wrong."""
    name, _, arg = text.partition(":")
    if name in ("uniform", "sweep") and not arg:
        return name, 0.0
    if name == "hot" and arg.endswith("%"):
        try:
            share = float(arg[:-1]) / 100
        except ValueError:
            share = -1.0
        if 0 < share <= 1:
            return name, share
    raise ValueError(f"dirty pattern {text!r}: uniform, sweep, or hot:P% with 0 < P <= 100")


class Log:
    """The shared dirty log: a header and two logs of one byte per page."""

    def __init__(self, fd: int, npages: int) -> None:
        self.npages = npages
        self.map = mmap.mmap(fd, self.size(npages))
        self.view = memoryview(self.map)

    @staticmethod
    def size(npages: int) -> int:
        return _HEADER.size + 2 * npages

    def get(self, field: int) -> int:
        return struct.unpack_from("=Q", self.map, 8 * field)[0]

    def put(self, field: int, value: int) -> None:
        struct.pack_into("=Q", self.map, 8 * field, value)

    def log(self, which: int) -> memoryview:
        start = _HEADER.size + which * self.npages
        return self.view[start:start + self.npages]

    def close(self) -> None:
        self.view.release()
        self.map.close()


def _writer(image_fd: int, log_fd: int, page_size: int, rate: float, pattern: str, seed: int,
            owner: int) -> None:
    """The workload's loop (in its own process): write, mark, answer flips and pauses; end
    when its owner is gone (a sender that crashed cannot end it)."""
    size = os.fstat(image_fd).st_size
    npages = size // page_size  # whole pages: the short last one is never written
    image = mmap.mmap(image_fd, size)
    log = Log(log_fd, -(-size // page_size))
    name, hot = parse_pattern(pattern)
    rng = random.Random(seed)
    hot_pages = max(1, int(npages * hot))
    per_tick = rate / page_size * TICK
    written, owed, sweep = 0, 0.0, 0
    next_tick = time.monotonic()
    while os.getppid() == owner:
        if log.get(ASKED) != log.get(SEEN):  # a flip: the last mark went to the old log
            log.put(SEEN, log.get(ASKED))
        if log.get(PAUSE):
            log.put(PAUSED, 1)
            time.sleep(0.0005)
            continue
        log.put(PAUSED, 0)
        now = time.monotonic()
        if now < next_tick:
            time.sleep(next_tick - now)
            continue
        next_tick += TICK
        owed += per_tick * (100 - log.get(THROTTLE)) / 100
        active = log.log(log.get(ACTIVE))
        while owed >= 1:
            owed -= 1
            if name == "sweep":
                page, sweep = sweep, (sweep + 1) % npages
                at = page * page_size
                image[at] = (image[at] + 1) & 0xFF
            else:
                if name == "hot" and rng.random() < HOT_SHARE:
                    page = rng.randrange(hot_pages)
                else:
                    page = rng.randrange(npages)
                written += 1
                at = page * page_size + (written * 8) % page_size
                struct.pack_into("=Q", image, at, written)
            active[page] = 1  # after the write: see the module docstring
            log.put(WRITTEN, log.get(WRITTEN) + 1)


class Workload:
    """The workload process and its shared memory, owned by the sender: its own copy of the
    image (IMAGE itself is never written), the log, and the process, ended by close()."""

    def __init__(self, image_path: str, page_size: int, block_pages: int, rate: float,
                 pattern: str, seed: int = 1) -> None:
        parse_pattern(pattern)
        self.page_size, self.block_pages = page_size, block_pages
        self.image_fd = os.memfd_create("multifd-guest")
        self.log_fd = os.memfd_create("multifd-dirty-log")
        self.proc = None
        try:
            with open(image_path, "rb") as src:
                self.size = size = copy_file(src.fileno(), self.image_fd)
            self.npages = -(-size // page_size)
            os.ftruncate(self.log_fd, Log.size(self.npages))
            self.log = Log(self.log_fd, self.npages)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "multifd.workload", str(self.image_fd), str(self.log_fd),
                 str(page_size), repr(rate), pattern, str(seed), str(os.getpid())],
                pass_fds=(self.image_fd, self.log_fd), stdin=subprocess.DEVNULL)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        """The copy, as a path another process or SourceImage can open."""
        return f"/proc/{os.getpid()}/fd/{self.image_fd}"

    def _wait(self, done, what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None:
                raise MultifdError(f"the workload ended (exit {self.proc.returncode}) "
                                   f"while {what}")
            if time.monotonic() > deadline:
                raise MultifdError(f"the workload did not answer within {timeout:g}s: {what}")
            time.sleep(0.0002)

    def sync(self) -> Dirty:
        """The pages dirtied since the last sync (read and cleared, as a dirty bitmap)."""
        log = self.log
        old = log.get(ACTIVE)
        log.put(ACTIVE, 1 - old)
        asked = log.get(ASKED) + 1
        log.put(ASKED, asked)
        self._wait(lambda: log.get(SEEN) == asked, "flipping the dirty log")
        dirty = log.log(old)
        marks = bytes(dirty)
        dirty[:] = bytes(self.npages)
        return Dirty(marks, self.block_pages)

    def pause(self) -> None:
        self.log.put(PAUSE, 1)
        self._wait(lambda: self.log.get(PAUSED), "pausing")

    def resume(self) -> None:
        self.log.put(PAUSE, 0)

    def throttle(self, percent: int) -> None:
        """Take `percent` of the dirty rate away (0..99), from the writer's next tick on."""
        self.log.put(THROTTLE, max(0, min(99, percent)))

    @property
    def written(self) -> int:
        return self.log.get(WRITTEN)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None
        for fd in (self.image_fd, self.log_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    image_fd, log_fd, page = map(int, sys.argv[1:4])
    _writer(image_fd, log_fd, page, float(sys.argv[4]), sys.argv[5], int(sys.argv[6]),
            int(sys.argv[7]))
