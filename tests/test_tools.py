"""The test-image generator, the progress bar, and memory that does not grow with the image."""

from __future__ import annotations

import hashlib
import os
import pty
import subprocess
import time

from conftest import MKIMAGE_MODULE, cli, start_receiver, write_image

MiB = 1 << 20


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _zero_pages(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read()
    pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    return sum(p == bytes(len(p)) for p in pages), len(pages)


def test_images_are_seeded_and_reproducible(tmp_path):
    for kind in ("random", "mixed"):
        a, b, c = (str(tmp_path / f"{kind}{i}") for i in range(3))
        write_image(a, 3 * MiB + 5, kind, seed=7)
        write_image(b, 3 * MiB + 5, kind, seed=7)
        write_image(c, 3 * MiB + 5, kind, seed=8)
        assert os.path.getsize(a) == 3 * MiB + 5
        assert _digest(a) == _digest(b) != _digest(c)
    zero, total = _zero_pages(str(tmp_path / "mixed0"))
    assert 0.25 * total < zero < 0.75 * total  # runs of zero and random pages
    assert _zero_pages(str(tmp_path / "random0"))[0] == 0
    write_image(str(tmp_path / "z"), MiB, "zero")
    assert _zero_pages(str(tmp_path / "z")) == (256, 256)


def test_mkimage_cli(tmp_path):
    path = tmp_path / "img"
    result = subprocess.run([os.path.join(os.path.dirname(cli("send")[0]), "multifd-mkimage"),
                             str(path), "--size", "64KiB", "--kind", "mixed", "--seed", "3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert path.stat().st_size == 64 * 1024
    bad = subprocess.run([*cli("send")[:1], "-m", MKIMAGE_MODULE, str(path), "--size", "x"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_progress_bar_on_a_terminal_and_not_with_quiet(tmp_path):
    image = tmp_path / "img"
    write_image(str(image), 4 * MiB, "random", seed=1)
    outputs = {}
    for quiet in (False, True):
        recv = start_receiver("--discard")
        master, slave = pty.openpty()
        try:
            args = [*cli("send"), recv.address, str(image), "--max-bandwidth", "6MB/s"]
            sender = subprocess.Popen(args + (["--quiet"] if quiet else []),
                                      stdout=subprocess.DEVNULL, stderr=slave)
            os.close(slave)
            chunks = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the terminal closed: the sender exited
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            sender.wait(timeout=30)
            assert sender.returncode == 0
        finally:
            os.close(master)
            assert recv.finish()[0] == 0
        outputs[quiet] = b"".join(chunks).decode()
    assert "sending [" in outputs[False] and "%" in outputs[False]
    assert outputs[True] == ""


def _peak_rss_kib(size: int, tmp_path) -> tuple[int, int]:
    image = tmp_path / f"img{size}"
    write_image(str(image), size, "random", seed=2)
    recv = start_receiver("--discard")
    sender = subprocess.Popen([*cli("send"), recv.address, str(image), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(sender.pid, 0)
    sender.returncode = os.waitstatus_to_exitcode(status)
    assert sender.returncode == 0
    rc, _, err, recv_usage = recv.finish_with_usage()
    assert rc == 0, err
    image.unlink()
    return usage.ru_maxrss, recv_usage.ru_maxrss


def test_peak_memory_does_not_grow_with_the_image(tmp_path):
    small = _peak_rss_kib(16 * MiB, tmp_path)
    large = _peak_rss_kib(256 * MiB, tmp_path)
    for side, (a, b) in zip(("sender", "receiver"), zip(small, large)):
        # 16x the image; bounded buffers and unmapped windows keep peak RSS within a few MiB.
        assert b - a < 24 * 1024, f"{side}: peak RSS {a} KiB for 16 MiB, {b} KiB for 256 MiB"
