"""The processes multifd-bench times: a server and a client, each reaped with wait4 for its
own CPU time, and each watched for its peak anonymous memory (RssAnon in /proc, sampled every
10 ms: the memory a process allocates, not the page cache or the image it maps).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

LISTENING = re.compile(r"listening on (\S+):(\d+)")
SAMPLE = 0.01  # seconds between two reads of RssAnon


class BenchError(Exception):
    pass


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the bench dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def rss_anon(pid: int) -> int:
    """The process's RssAnon in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class _Held:
    """Signals caught while a child starts, to be acted on once it is ours."""

    def __init__(self) -> None:
        self.caught: list[int] = []
        self.handlers: dict[int, object] = {}

    def catch(self, signum: int, frame) -> None:
        self.caught.append(signum)

    def act(self) -> None:
        """Run the handler each caught signal had (SIG_DFL: the signal itself, again)."""
        for signum in self.caught:
            handler = self.handlers[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


@contextlib.contextmanager
def _signals_held():
    """Hold ^C and SIGTERM while a child starts. A Python signal handler raises wherever the
    main thread happens to be: inside Popen, after the fork and before Popen returns, it would
    lose the only handle on a child that then runs on (until the bench's own death kills it),
    unended and unreaped."""
    held = _Held()
    if threading.current_thread() is not threading.main_thread():
        yield held  # handlers run in the main thread only: nothing can land here
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        held.handlers[signum] = signal.signal(signum, held.catch)
    try:
        yield held
    finally:
        for signum, handler in held.handlers.items():
            signal.signal(signum, handler)


class Child:
    """A process whose output goes to unlinked temp files, so no pipe can fill up and stall
    it, and which we reap ourselves with wait4 to get its own rusage."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.start = time.perf_counter()
        self.seconds = self.cpu = None
        self.peak_rss = 0
        self.proc = None
        failure = None
        with _signals_held() as held:
            try:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                             stderr=self.err, preexec_fn=_die_with_parent)
                self.pidfd = os.pidfd_open(self.proc.pid)
            except BaseException as exc:  # the child must not outlive this
                if self.proc is not None:
                    self.proc.kill()
                    self.proc.wait()
                failure = exc
        if failure is not None:
            self.out.close()
            self.err.close()
            held.act()  # a ^C or SIGTERM that came meanwhile wins over the failure
            raise failure
        try:
            held.act()  # a ^C or SIGTERM that came meanwhile acts now, the child ours
        except BaseException:
            self.close()
            raise

    def sample(self) -> None:
        if self.proc.returncode is None:
            self.peak_rss = max(self.peak_rss, rss_anon(self.proc.pid))

    def exited(self, timeout: float) -> bool:
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def reap(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.seconds = time.perf_counter() - self.start
        self.cpu = usage.ru_utime + usage.ru_stime
        self.proc.returncode = os.waitstatus_to_exitcode(status)

    def check(self) -> None:
        if self.proc.returncode != 0:
            raise BenchError(f"{self.label} exited {self.proc.returncode}: {self.tail()}")

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.reap()

    def text(self, stream) -> str:
        # pread: the child shares the file offset, so seeking here would move its writes.
        return os.pread(stream.fileno(), os.fstat(stream.fileno()).st_size, 0).decode(
            errors="replace")

    def stdout(self) -> str:
        return self.text(self.out)

    def tail(self) -> str:
        lines = self.text(self.err).strip().splitlines()
        return lines[-1] if lines else "(no message)"

    def json(self) -> dict:
        try:
            return json.loads(self.stdout())
        except ValueError:
            raise BenchError(f"{self.label} printed no JSON: {self.stdout()[:200]!r}") from None

    def close(self) -> None:
        self.kill()
        os.close(self.pidfd)
        self.out.close()
        self.err.close()


def wait_all(children: list[Child], timeout: float) -> None:
    """Reap every child within `timeout` (sampling their memory meanwhile) and require exit 0
    of each; a child that does not end in time is killed and named."""
    deadline = time.monotonic() + timeout
    alive = [c for c in children if c.proc.returncode is None]
    while alive:
        for child in alive:
            child.sample()
        ready = select.select([c.pidfd for c in alive], [], [], SAMPLE)[0]
        for child in [c for c in alive if c.pidfd in ready]:
            child.reap()
            child.check()  # a failed client leaves its server waiting: the raise ends both
        alive = [c for c in alive if c.proc.returncode is None]
        if alive and time.monotonic() > deadline:
            raise BenchError(f"{alive[0].label} did not finish within {timeout:g} s")


@contextlib.contextmanager
def pair(server: tuple, ready, client: tuple, timeout: float):
    """Start the server (label, argv); once ready(server) gives its port, time the client
    (label, argv_for(port)). Both are reaped before the body runs; any failure kills both."""
    children = []
    try:
        children.append(srv := Child(*server))
        deadline = time.monotonic() + timeout
        while (port := ready(srv)) is None:
            srv.sample()
            if srv.exited(0.005):
                srv.reap()
                srv.check()
                raise BenchError(f"{srv.label} exited before listening")
            if time.monotonic() > deadline:
                raise BenchError(f"{srv.label} not listening after {timeout:g} s")
        children.append(Child(client[0], client[1](port)))
        wait_all(children, timeout)
        yield children[0], children[1]
    finally:
        for child in children:
            child.close()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a program that cannot pick one and tell us."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stderr_port(server: Child) -> int | None:
    m = LISTENING.search(server.text(server.err))
    return int(m.group(2)) if m else None


def tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, found without connecting: iperf3 -1
    would take a probe connection for its one client."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return True
    return False


def tool(name: str, module: str) -> list[str]:
    """The installed command beside our interpreter, else the same code via -m."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return [path] if os.access(path, os.X_OK) else [sys.executable, "-m", module]


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
