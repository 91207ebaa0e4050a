"""The one home of the suite's shared fixtures and helpers: real CLI processes on 127.0.0.1
with port 0 (every wait bounded in time), session-wide images and credentials, the `clean`
fixture, and waits for events (a line on stderr, a file, a socket's state, a condition polled
against a deadline) instead of sleeps.

It is also the one place that names the multifd tools the tests use rather than test: the
credentials and image generators.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import trio

import multifd

# ------------------------------------------------------------------ multifd's tools, named once

from multifd.tools import certs, mkimage  # noqa: E402
from multifd.tools import qemu as qemu_tools  # noqa: E402

write_image = mkimage.write_image
MKIMAGE_MODULE = mkimage.__name__  # for `python -m`


# ------------------------------------------------------------------ waiting for things

PROC_TIMEOUT = 60


def wait_until(predicate, timeout: float, what: str | None = None, interval: float = 0.01):
    """Poll `predicate` until it returns something true, and return that; fail the test if it
    has not after `timeout` seconds. Waiting for a condition, not sleeping for luck."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        time.sleep(interval)


async def trio_wait_until(predicate, timeout: float, what: str | None = None,
                          interval: float = 0.01):
    """wait_until inside a trio test: the polling yields to the other tasks."""
    deadline = trio.current_time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if trio.current_time() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        await trio.sleep(interval)


class Lines:
    """The lines of a child's text pipe, read by a thread as they come, so that a test can
    wait for one (and the child never blocks on a full pipe)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):  # closed under us: the test is over
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()
            stream.close()

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait(self, predicate, timeout: float) -> bool:
        """Until predicate(lines) holds (True) or the pipe closed or time ran out (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or predicate(self.lines), timeout)
            return bool(predicate(self.lines))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# ------------------------------------------------------------------ the CLIs as processes

_LISTENING = re.compile(r"listening on (.+):(\d+)$")
_started: list = []  # Receivers and Popens, ended by the _no_process_outlives_its_test fixture


def cli(name: str) -> list[str]:
    module = {"send": "multifd.send_cli", "recv": "multifd.recv_cli"}[name]
    return [sys.executable, "-m", module]


@dataclass
class Receiver:
    proc: subprocess.Popen
    host: str
    port: int
    _out: Lines
    _err: Lines

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def stderr(self) -> str:
        """Everything it wrote to stderr so far (it keeps running)."""
        return self._err.text()

    def wait_for_stderr(self, pattern: str, count: int = 1, timeout: float = 20) -> list[str]:
        """Wait until `count` lines of its stderr match the regular expression `pattern`;
        returns them. Fails the test if the receiver exits or time runs out first."""
        regex = re.compile(pattern)

        def matching(lines):
            return [line for line in lines if regex.search(line)]
        if not self._err.wait(lambda lines: len(matching(lines)) >= count, timeout):
            raise AssertionError(f"receiver stderr has not {count} line(s) matching "
                                 f"{pattern!r} after {timeout}s (exit code "
                                 f"{self.proc.poll()}):\n{self.stderr}")
        return matching(self._err.lines)

    def finish(self, timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
        """Wait for its exit: (exit code, stdout, stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._join()
            raise AssertionError(f"receiver still running after {timeout}s: "
                                 f"{self.stderr}") from None
        self._join()
        return self.proc.returncode, self._out.text(), self.stderr

    def finish_with_usage(self, timeout: float = PROC_TIMEOUT):
        """finish(), with the resource usage of the process: (code, stdout, stderr, rusage)."""
        def reaped():
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            return (status, usage) if pid else None
        try:
            status, usage = wait_until(reaped, timeout, "the receiver's exit", interval=0.02)
        except AssertionError:
            self.proc.kill()
            raise
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._join()
        return self.proc.returncode, self._out.text(), self.stderr, usage

    def stop(self) -> None:
        """Kill it if it still runs (for `finally:` blocks)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._join()

    def _join(self) -> None:
        self._out.join(10)
        self._err.join(10)


def start_receiver(*args: str, listen: str = "127.0.0.1:0") -> Receiver:
    proc = subprocess.Popen([*cli("recv"), "--listen", listen, "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recv = Receiver(proc, "", 0, Lines(proc.stdout), Lines(proc.stderr))
    _started.append(recv)
    try:
        line = recv.wait_for_stderr(_LISTENING.pattern)[0]
    except AssertionError as exc:
        recv.stop()
        raise AssertionError(f"receiver did not start: {recv.stderr}") from exc
    m = _LISTENING.search(line.strip())
    recv.host, recv.port = m.group(1).strip("[]"), int(m.group(2))
    return recv


def run_sender(*args: str, timeout: float = PROC_TIMEOUT,
               quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*cli("send"), *(["--quiet"] if quiet else []), *args],
                          capture_output=True, text=True, timeout=timeout)


def start_sender(*args: str, quiet: bool = True) -> subprocess.Popen:
    """A sender running in the background (stdout and stderr piped: use communicate())."""
    proc = subprocess.Popen([*cli("send"), *(["--quiet"] if quiet else []), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A test that fails half-way must not leave a receiver or sender running into the next
    ones (holding CPU and ports on a busy machine)."""
    yield
    while _started:
        started = _started.pop()
        if isinstance(started, Receiver):
            started.stop()  # its reader threads close its pipes
            continue
        if isinstance(started, qemu_tools.Guest):
            started.close()  # ends QEMU by its PID
            continue
        if started.poll() is None:
            started.kill()
            started.wait()
        for stream in (started.stdout, started.stderr):
            if stream is not None and not stream.closed:
                stream.close()


# ------------------------------------------------------------------ what a process is doing

def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _open_files_in(proc: subprocess.Popen, directory) -> list[str]:
    prefix = f"{os.path.realpath(directory)}/"
    fds = f"/proc/{proc.pid}/fd"
    if proc.poll() is not None:
        raise AssertionError(f"process {proc.pid} exited with {proc.returncode}")
    found = []
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}").startswith(prefix):
                found.append(f"{fds}/{fd}")
        except FileNotFoundError:  # closed meanwhile
            pass
    return found


def writing_into(proc: subprocess.Popen, directory) -> bool:
    """Whether the process holds a file in `directory` open: its temporary output, unnamed
    (shown by the kernel as "DIR/#INODE (deleted)") or not."""
    return bool(_open_files_in(proc, directory))


def written_into(proc: subprocess.Popen, directory) -> int:
    """Bytes of data the process has written so far into the files it holds open in
    `directory` (the output is sparse: only written pages take blocks)."""
    total = 0
    for link in _open_files_in(proc, directory):
        try:
            total += os.stat(link).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


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


def all_threads_asleep(pid: int) -> bool:
    """Whether every thread of the process is asleep (state S: blocked in the kernel, e.g. in
    a socket read or waiting for an event), i.e. it is waiting, not working."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(states) and all(state == "S" for state in states)


def wait_until_idle(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Until the process has been waiting (every thread asleep) for 3 polls in a row."""
    streak = [0]

    def idle() -> bool:
        streak[0] = streak[0] + 1 if all_threads_asleep(proc.pid) else 0
        return streak[0] >= 3
    wait_until(idle, timeout, f"process {proc.pid} waiting", interval=0.02)


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    established: bool
    tx_queue: int  # bytes sent and not yet acknowledged
    rx_queue: int  # bytes received and not yet read by the process


def tcp_sockets_of(port: int, end: str = "server") -> list[TcpSocket]:
    """The established TCP connections of 127.0.0.1:`port`, from the kernel's table:
    end="server" gives the accepting ends (local port `port`), "client" the dialling ends."""
    found = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_ip, local = fields[1].split(":")
            remote_ip, remote = fields[2].split(":")
            tx, rx = fields[4].split(":")
            sock = TcpSocket(int(local, 16), int(remote, 16), fields[3] == "01",
                             int(tx, 16), int(rx, 16))
            ours = (local_ip == "0100007F" and sock.local_port == port) if end == "server" \
                else (remote_ip == "0100007F" and sock.remote_port == port)
            if ours and sock.established:
                found.append(sock)
    return found


def wait_until_blocked(port: int, connections: int, timeout: float = 20) -> None:
    """Until `connections` connections accepted on `port` are blocked: their accepting
    process has stopped reading them (unread bytes that stay the same over 3 polls) and the
    dialling side still has bytes it cannot deliver."""
    last: list = [None, 0]

    def blocked() -> bool:
        waiting = {s.local_port for s in tcp_sockets_of(port, "client") if s.tx_queue}
        queues = sorted((s.remote_port, s.rx_queue) for s in tcp_sockets_of(port)
                        if s.rx_queue and s.remote_port in waiting)
        last[1] = last[1] + 1 if len(queues) >= connections and queues == last[0] else 0
        last[0] = queues
        return last[1] >= 3
    wait_until(blocked, timeout, f"{connections} connections of port {port} blocked",
               interval=0.05)


def wait_until_quiet(procs, port: int, connections: int, timeout: float = 20) -> None:
    """Until `connections` connections of `port` are established and everything is still:
    no byte in flight or unread on any of them, every thread of `procs` asleep (3 polls in a
    row). Whatever those processes had to say to each other is said: what remains is a wait
    (e.g. for a handshake that is never coming)."""
    streak = [0]

    def quiet() -> bool:
        ends = tcp_sockets_of(port) + tcp_sockets_of(port, "client")
        still = len(tcp_sockets_of(port)) >= connections and \
            not any(s.rx_queue or s.tx_queue for s in ends) and \
            all(all_threads_asleep(proc.pid) for proc in procs)
        streak[0] = streak[0] + 1 if still else 0
        return streak[0] >= 3
    wait_until(quiet, timeout, f"{connections} connections of port {port} quiet",
               interval=0.05)


# ------------------------------------------------------------------ strangers at the door

def strangers_during_a_migration(recv, sender, directory, strangers) -> list[tuple[int, str]]:
    """Hold a migration still once under way (its receiver has written data into
    `directory`), so that the strangers arrive mid-migration and it cannot end before the
    receiver dealt with them all; let it go on once the receiver logged a drop for each.
    strangers() connects them and returns (port, what the receiver says of it) for each."""
    wait_until(lambda: written_into(recv.proc, directory), 20, "the migration under way")
    sender.send_signal(signal.SIGSTOP)
    try:
        assert sender.poll() is None and recv.proc.poll() is None
        met = strangers()
        recv.wait_for_stderr(" dropped ", count=len(met))
    finally:
        sender.send_signal(signal.SIGCONT)
    return met


def assert_each_dropped(stderr: str, met: list[tuple[int, str]]) -> None:
    """One drop line for each stranger, naming its port and saying why (a regular
    expression); no other (no channel of the migration was dropped)."""
    dropped = [line for line in stderr.splitlines() if " dropped " in line]
    assert len(dropped) == len(met), stderr
    for port, says in met:
        lines = [line for line in dropped if f" from 127.0.0.1:{port}: " in line]
        assert lines and all(re.search(says, line) for line in lines), (port, says, stderr)


# ------------------------------------------------------------------ images and credentials

@pytest.fixture
def make_image(tmp_path):
    def make(size: int, kind: str = "random", seed: int = 1, name: str | None = None) -> str:
        path = str(tmp_path / (name or f"{kind}-{size}-{seed}.img"))
        write_image(path, size, kind, seed)
        return path
    return make


@pytest.fixture(scope="session")
def shared_image(tmp_path_factory):
    """Read-only images made once per session: shared_image(size, kind, seed) -> path."""
    directory = tmp_path_factory.mktemp("images")
    made: dict = {}

    def get(size: int, kind: str = "random", seed: int = 1) -> str:
        if (size, kind, seed) not in made:
            path = str(directory / f"{kind}-{size}-{seed}.img")
            write_image(path, size, kind, seed)
            os.chmod(path, 0o444)  # shared: no test may change it
            made[size, kind, seed] = path
        return made[size, kind, seed]
    return get


@pytest.fixture(scope="session")
def image(shared_image) -> str:
    """8 MiB of zero and random pages: the image of most migrations."""
    return shared_image(8 << 20, "mixed", 7)


@pytest.fixture(scope="session")
def big_image(shared_image) -> str:
    """64 MiB of random pages: far more than the sockets' buffers hold."""
    return shared_image(64 << 20, "random", 7)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Credential directories for every TLS case, each as a user would lay it out (QEMU's
    file names). `both` serves either side (what `make certs` produces, without the CA key);
    the others hold one side's files, or a flaw."""
    import datetime
    day = datetime.timedelta(days=1)
    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca, other = certs.new_ca(), certs.new_ca("another CA")
    server = certs.new_server(ca, ["localhost", "127.0.0.1", "::1"])
    client = certs.new_client(ca)

    def directory(name: str, *, trust=ca, server=None, client=None) -> str:
        path = str(root / name)
        certs.write_set(path, ca=trust, ca_key=False, server=server, client=client)
        return path

    return SimpleNamespace(
        recv=directory("recv", server=server),
        send=directory("send", client=client),
        both=directory("both", server=server, client=client),
        recv_named=directory("recv-named", server=certs.new_server(ca, ["migration.example"])),
        recv_other_ca=directory("recv-other-ca", trust=other,
                                server=certs.new_server(other, ["127.0.0.1"])),
        recv_expired=directory("recv-expired", server=certs.new_server(
            ca, ["127.0.0.1"], not_before=now - 10 * day, days=1)),
        recv_future=directory("recv-future", server=certs.new_server(
            ca, ["127.0.0.1"], not_before=now + day)),
        send_for_other_ca=directory("send-for-other-ca", trust=other,
                                    client=certs.new_client(other)),
        send_no_cert=directory("send-no-cert"),
        # a client certificate from another CA, trusting ours: a stranger that trusts us
        send_other_ca=directory("send-other-ca", client=certs.new_client(other)),
        send_mallory=directory("send-mallory", client=certs.new_client(ca, "mallory")),
        send_expired=directory("send-expired", client=certs.new_client(
            ca, not_before=now - 10 * day, days=1)),
    )


# ------------------------------------------------------------------ in process

_PKG = os.path.dirname(os.path.abspath(multifd.__file__)) + os.sep


def threads_in_our_code(main_ident: int) -> list[str]:
    """Where threads other than `main_ident` run code of the multifd package."""
    found = []
    for ident, frame in sys._current_frames().items():
        f = frame
        while f is not None:
            if f.f_code.co_filename.startswith(_PKG) and ident != main_ident:
                found.append(f"{f.f_code.co_filename}:{f.f_lineno}")
                break
            f = f.f_back
    return found


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def clean():
    """Assert that the test leaves no busy thread and no open descriptor behind (trio keeps
    idle worker threads cached for reuse; those run none of our code)."""
    main_ident = threading.get_ident()
    before = open_fds()
    yield
    await trio_wait_until(lambda: not threads_in_our_code(main_ident), 5,
                          "no thread left in multifd's code")
    assert open_fds() == before


def migrate_in_process(port: int, image: str, output: str, tls_dir: str | None = None) -> None:
    """One whole migration, both sides in this process, through a new listener on
    127.0.0.1:`port` (the receiver's own listening code); the output must equal the image."""
    from multifd.recv import open_listeners, receive_image
    from multifd.send import send_image
    from multifd.tls import client_tls, server_tls

    async def both() -> None:
        listeners = await open_listeners("127.0.0.1", port)
        received = {}
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    async def receive() -> None:
                        received["report"] = await receive_image(
                            listeners, output, log=lambda line: None,
                            tls=server_tls(tls_dir) if tls_dir else None)
                    nursery.start_soon(receive)
                    sent = await send_image("127.0.0.1", port, image,
                                            tls=client_tls(tls_dir) if tls_dir else None)
        finally:
            for listener in listeners:
                await listener.aclose()
        assert sent.ok and received["report"].digest == sent.digest

    trio.run(both)
    with open(image, "rb") as want, open(output, "rb") as got:
        assert got.read() == want.read()
    os.unlink(output)


# ------------------------------------------------------------------ a real QEMU source

# Guests are small (the suite's budget): 256 MiB of RAM, a 64 MiB patterned image loaded at
# 64 MiB. KVM where /dev/kvm works, TCG elsewhere (qemu_tools.accel()).
GUEST_MEM = "256M"
GUEST_IMAGE_ADDR = 0x4000000


@pytest.fixture(scope="session")
def guest_image(shared_image) -> str:
    """64 MiB of zero, random and repeated pages, for QEMU to load into its RAM."""
    return shared_image(64 << 20, "mixed", 9)


def start_guest(**kwargs) -> qemu_tools.Guest:
    """A paused QEMU (qemu_tools.Guest), ended by its PID after the test whatever happens."""
    kwargs.setdefault("mem", GUEST_MEM)
    if "image" in kwargs:
        kwargs.setdefault("image_addr", GUEST_IMAGE_ADDR)
    guest = qemu_tools.Guest(**kwargs)
    _started.append(guest)
    return guest
