"""Shared helpers: real CLI processes on 127.0.0.1 with port 0, always bounded in time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from multifd.tools.mkimage import write_image

PROC_TIMEOUT = 60
_LISTENING = re.compile(r"listening on (.+):(\d+)$")


def cli(name: str) -> list[str]:
    module = {"send": "multifd.send_cli", "recv": "multifd.recv_cli"}[name]
    return [sys.executable, "-m", module]


@dataclass
class Receiver:
    proc: subprocess.Popen
    host: str
    port: int
    early_stderr: str

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def finish(self, timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"receiver still running after {timeout}s: {err}") from None
        return self.proc.returncode, out, self.early_stderr + err


def start_receiver(*args: str, listen: str = "127.0.0.1:0") -> Receiver:
    proc = subprocess.Popen([*cli("recv"), "--listen", listen, "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = _LISTENING.search(line.strip())
        if m:
            host = m.group(1).strip("[]")
            return Receiver(proc, host, int(m.group(2)), "".join(lines))
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"receiver did not start: {''.join(lines)}{err}")


def run_sender(*args: str, timeout: float = PROC_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*cli("send"), "--quiet", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def make_image(tmp_path):
    def make(size: int, kind: str = "random", seed: int = 1, name: str | None = None) -> str:
        path = str(tmp_path / (name or f"{kind}-{size}-{seed}.img"))
        write_image(path, size, kind, seed)
        return path
    return make


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


def writing_into(proc: subprocess.Popen, directory) -> bool:
    """Whether the process holds a file in `directory` open: its temporary output, unnamed
    (shown by the kernel as "DIR/#INODE (deleted)") or not."""
    prefix = f"{os.path.realpath(directory)}/"
    fds = f"/proc/{proc.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}").startswith(prefix):
                return True
        except FileNotFoundError:  # closed meanwhile
            pass
    return False


def unnamed_files_in(directory) -> bool:
    """Whether the file system of `directory` has unnamed files (O_TMPFILE). Where it has
    none, the receiver's temporary output is a hidden .part file, which only a crash leaves
    behind; the tests then expect that instead."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True
