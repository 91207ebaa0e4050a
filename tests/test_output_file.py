"""The output file: nothing under the final name (or any name) before publish()."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from conftest import unnamed_files_in
from multifd.errors import ImageError
from multifd.image import OutputFile


def test_unnamed_until_published(tmp_path):
    out = tmp_path / "vm.img"
    with OutputFile(str(out), 3 * 4096) as f:
        f.write(memoryview(b"x" * 4096), 4096)
        if unnamed_files_in(tmp_path):
            assert os.listdir(tmp_path) == [] and f.tmp_path is None
        else:  # this file system has no unnamed files: a hidden .part file
            assert os.listdir(tmp_path) == [os.path.basename(f.tmp_path)]
        f.sync()
        f.publish()
    assert os.listdir(tmp_path) == ["vm.img"]
    assert out.read_bytes() == bytes(4096) + b"x" * 4096 + bytes(4096)


def test_publish_replaces_an_existing_output(tmp_path):
    out = tmp_path / "vm.img"
    out.write_bytes(b"old")
    with OutputFile(str(out), 4096) as f:
        f.write(memoryview(b"n" * 4096), 0)
        f.publish()
    assert os.listdir(tmp_path) == ["vm.img"] and out.read_bytes() == b"n" * 4096


def test_discard_leaves_nothing(tmp_path):
    with OutputFile(str(tmp_path / "vm.img"), 1 << 20) as f:
        f.write(memoryview(b"y" * 4096), 0)
    assert os.listdir(tmp_path) == []


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with OutputFile(str(tmp_path / "vm.img"), 4096) as f:
            f.publish()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "vm.img").st_mode) == 0o640


def test_without_unnamed_files_a_hidden_part_file_is_used_and_removed(tmp_path, monkeypatch):
    real_open = os.open

    def no_tmpfile(path, flags, *args):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_tmpfile)
    with OutputFile(str(tmp_path / "vm.img"), 4096) as f:
        names = os.listdir(tmp_path)
        assert len(names) == 1 and names[0].startswith(".vm.img.") and \
            names[0].endswith(".part")
    assert os.listdir(tmp_path) == []
    with OutputFile(str(tmp_path / "vm.img"), 4096) as f:
        f.publish()
    assert os.listdir(tmp_path) == ["vm.img"]


def test_a_failed_write_names_the_directory(tmp_path):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with OutputFile(str(tmp_path / "vm.img"), 4096, pwrite=full) as f:
        with pytest.raises(ImageError) as info:
            f.write(memoryview(b"z" * 16), 0)
        what = f.tmp_path or f"the temporary output in {tmp_path}"
    assert str(info.value) == f"writing {what}: No space left on device"
    assert os.listdir(tmp_path) == []
