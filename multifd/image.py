"""The source image and the output file.

The output is written into a temporary file beside the target and renamed into place only
after verification, so a failed migration never leaves a file under the final name.
"""

from __future__ import annotations

import mmap
import os
import stat
import tempfile
import traceback
from contextlib import contextmanager

from .errors import ImageError, UsageError


class SourceImage:
    """A read-only image file; positioned reads from any thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise UsageError(f"cannot open image {path}: {exc.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode)):
            # A FIFO or a character device would block or cannot be mapped.
            raise UsageError(f"image {path} is not a regular file or a block device")
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise UsageError(f"cannot open image {path}: {exc.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise UsageError(f"image {path} is a directory")
            self.size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, 2)
            if self.size == 0:
                raise UsageError(f"image {path} is empty: nothing to migrate")
        except BaseException:
            os.close(self.fd)
            raise

    @contextmanager
    def mapped(self, offset: int, length: int):
        """Yield (mmap, delta): image bytes [offset, offset+length) are mmap[delta:delta+length].

        The sender scans, hashes and sends straight from the page cache through this window,
        which saves a copy of every byte (half the sender's CPU). Windows are small and
        unmapped after use, so the mapped memory does not grow with the image. The caller must
        drop every memoryview of the window before leaving the block.
        """
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            window = mmap.mmap(self.fd, offset + length - base, prot=mmap.PROT_READ,
                               offset=base)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot map {self.path} at {offset}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            yield window, offset - base
        except BaseException as exc:
            # Finished frames in the traceback may still hold views of the window, and a
            # window with views cannot be closed: that BufferError would replace this error.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            window.close()

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SourceImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_output_path(path: str) -> None:
    """Fail early, before any network wait, if OUTPUT can never be written."""
    if not path:
        raise UsageError("output path is empty")
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a directory")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UsageError(f"output {path} exists and is not a regular file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {parent} is not writable")


class OutputFile:
    """A temporary file beside `path`, renamed over `path` by publish(), removed otherwise.

    Positioned writes from any thread. The file is created sparse at the image's final size:
    zero pages are never written and stay holes.
    """

    def __init__(self, path: str, size: int, pwrite=os.pwrite) -> None:
        check_output_path(path)
        self._pwrite = pwrite  # a fault plan may hand in one that fails
        self.path = path
        self.size = size
        directory, name = os.path.split(os.path.abspath(path))
        try:
            self.fd, self.tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part",
                                                      dir=directory)
        except OSError as exc:
            raise UsageError(f"cannot create a file in {directory}: {exc.strerror}") from None
        self._committed = False
        try:
            # mkstemp makes the file private (0600); the output gets the mode a new file
            # would get from the umask, like cp's.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.discard()
            raise ImageError(f"cannot size {self.tmp_path} to {size} bytes: {exc.strerror}")

    def write(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                n = self._pwrite(self.fd, view, offset)
            except OSError as exc:
                raise ImageError(f"writing {self.tmp_path}: {exc.strerror}") from None
            view = view[n:]
            offset += n

    def sync(self) -> None:
        """Make the data durable (slow: run it in a thread). Nothing is published yet."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageError(f"syncing {self.tmp_path}: {exc.strerror}") from None

    def publish(self) -> None:
        """Rename the synced file over the output: the point of no return (fast)."""
        try:
            os.rename(self.tmp_path, self.path)
        except OSError as exc:
            raise ImageError(f"committing {self.path}: {exc.strerror}") from None
        self._committed = True
        # The image is in place and its data synced. Making the rename itself durable is
        # best effort: failing here must not report a migration that succeeded as failed.
        try:
            dirfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError:
            pass

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._committed:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
