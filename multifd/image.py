"""The source image and the output file.

The output is written into a temporary file beside the target (unnamed where the file system
allows) and put in place only after verification, so a failed migration never leaves a file
under the final name.
"""

from __future__ import annotations

import errno
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
            # The errors it was raised during, or from, hold frames too.
            seen = exc
            while seen is not None:
                traceback.clear_frames(seen.__traceback__)
                seen = seen.__context__ or seen.__cause__
            raise
        finally:
            window.close()

    def next_data(self, offset: int) -> int:
        """Where the first byte at or after `offset` that is not in a hole is (the size when
        none is): the blocks before it are zero and need not be read. Where the file system
        cannot tell, `offset` itself (everything is data)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            return self.size if exc.errno == errno.ENXIO else offset

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SourceImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pwrite_all(pwrite, fd: int, view, offset: int, what: str) -> None:
    """All of `view` at `offset`, however many writes it takes; a failure names `what`."""
    while view:
        try:
            n = pwrite(fd, view, offset)
        except OSError as exc:
            raise ImageError(f"writing {what}: {exc.strerror}") from None
        view = view[n:]
        offset += n


def copy_file(src: int, dst: int) -> int:
    """All of file `src` into `dst` from its current position, in the kernel (no Python loop
    per page); returns the size. OSError if `src` ends early (it shrank meanwhile)."""
    size, done = os.fstat(src).st_size, 0
    while done < size:
        n = os.sendfile(dst, src, done, size - done)
        if n == 0:
            raise OSError(errno.EIO, f"the source ended at {done} of {size} bytes")
        done += n
    return size


def check_output_path(path: str) -> None:
    """Fail early, before any network wait, if OUTPUT can never be written."""
    if not path:
        raise UsageError("output path is empty")
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a directory")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UsageError(f"output {path} exists and is not a regular file")
    check_parent(path)


def check_parent(path: str) -> None:
    """The directory that `path` goes into exists and may get new entries."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {parent} is not writable")


class OutputFile:
    """A temporary file beside `path`, put in place by publish(), gone otherwise.

    Where the file system allows, the file is unnamed (O_TMPFILE) until publish() links it in:
    a receiver that crashes or is killed mid-transfer then leaves nothing behind, since the
    kernel frees an unnamed file with its last descriptor. Elsewhere it is a hidden
    `.NAME.*.part` file, removed on every exit that runs Python's cleanup.

    Positioned writes from any thread. The file is created sparse at the image's final size:
    zero pages are never written and stay holes.
    """

    def __init__(self, path: str, size: int, pwrite=os.pwrite) -> None:
        check_output_path(path)
        self._pwrite = pwrite  # a fault plan may hand in one that fails
        self.path = path
        self.size = size
        self.directory, name = os.path.split(os.path.abspath(path))
        self._prefix = f".{name}."
        self.tmp_path: str | None = None  # the temporary name, while there is one
        self._committed = False
        self.fd = self._open_unnamed()
        if self.fd < 0:
            try:
                self.fd, self.tmp_path = tempfile.mkstemp(prefix=self._prefix, suffix=".part",
                                                          dir=self.directory)
            except OSError as exc:
                raise UsageError(f"cannot create a file in {self.directory}: "
                                 f"{exc.strerror}") from None
        try:
            # The output gets the mode a new file would get from the umask, like cp's (mkstemp
            # makes its file private).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.discard()
            raise ImageError(f"cannot size {self.what} to {size} bytes: {exc.strerror}")

    def _open_unnamed(self) -> int:
        """An O_TMPFILE descriptor in the output's directory, or -1 where there is none."""
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag or not os.path.isdir("/proc/self/fd"):  # publish() links through /proc
            return -1
        try:
            return os.open(self.directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return -1  # this file system (or kernel) has no unnamed files
            raise UsageError(f"cannot create a file in {self.directory}: "
                             f"{exc.strerror}") from None

    @property
    def what(self) -> str:
        return self.tmp_path or f"the temporary output in {self.directory}"

    def write(self, view: memoryview, offset: int) -> None:
        pwrite_all(self._pwrite, self.fd, view, offset, self.what)

    def sync(self) -> None:
        """Make the data durable (slow: run it in a thread). Nothing is published yet."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageError(f"syncing {self.what}: {exc.strerror}") from None

    def publish(self) -> None:
        """Put the synced file in place under the output's name: the point of no return."""
        try:
            if self.tmp_path is None:
                self._link_in()
            else:
                os.rename(self.tmp_path, self.path)
        except OSError as exc:
            raise ImageError(f"committing {self.path}: {exc.strerror}") from None
        self._committed = True
        # The image is in place and its data synced. Making the rename itself durable is
        # best effort: failing here must not report a migration that succeeded as failed.
        try:
            dirfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError:
            pass

    def _link_in(self) -> None:
        """Give the unnamed file the output's name. A link cannot replace a file: an existing
        output is replaced by a rename from a fresh temporary name, which a crash in the
        instant between the two calls would leave behind."""
        # Through /proc, where linkat() follows the descriptor's link to the file; with a
        # src_dir_fd, os.link calls linkat() (plain link() would link the symlink itself).
        procfd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.link(str(self.fd), self.path, src_dir_fd=procfd, follow_symlinks=True)
                return
            except FileExistsError:
                pass
            self.tmp_path = f"{self.directory}/{self._prefix}{os.urandom(6).hex()}.part"
            os.link(str(self.fd), self.tmp_path, src_dir_fd=procfd, follow_symlinks=True)
        finally:
            os.close(procfd)
        os.rename(self.tmp_path, self.path)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._committed and self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
