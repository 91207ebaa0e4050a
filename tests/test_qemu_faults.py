"""`multifd-recv --qemu` under an injected fault on one channel of a real QEMU migration.

For each fault, on QEMU's multifd channel 1 and on its main channel (4 multifd channels, a
paused 256 MiB guest with a 64 MiB image loaded, max-bandwidth 200 MB/s), the receiver's
guarantees are asserted: it exits 1 within its bounds (--handshake-timeout 2
--idle-timeout 2), its last line names the channel and the stage, and nothing is left of the
output directory, not even a hidden `.part` one.

QEMU's side is recorded, never asserted: what a source does when one of its channels breaks
is QEMU's own bug class (channel creation against cleanup, a TLS handshake thread never
joined, the yank registration), and it differs between versions. Each case records the
source's migration status a little after the receiver exited, whether migrate_cancel ends a
migration still under way, and whether a second `migrate` from the same QEMU to a fresh
plaintext receiver completes. The record is a property of the test (`qemu_behaviour`, in a
JUnit XML report) and, if MULTIFD_QEMU_FAULTS_LOG names a file, one JSON line per case
appended to it, from which the table of QEMU's behaviour can be rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

from conftest import start_guest, start_receiver
from multifd.tools import qemu

# QEMU is installed by `make qemu` (a dependency of `make test`): missing, these fail.
pytestmark = pytest.mark.timeout(60)

LOG_ENV = "MULTIFD_QEMU_FAULTS_LOG"
CHANNELS = 4
BANDWIDTH = 200_000_000  # bytes/s
BOUND = 2.0  # --handshake-timeout and --idle-timeout, seconds
SLACK = 3.0  # how much later than its bound the receiver may exit
WATCH = 3.0  # how long QEMU is watched after the receiver's exit, and after migrate_cancel
NEXT_TIMEOUT = 15.0  # for the second migration to end
ENDED = ("completed", "failed", "cancelled")
PREFIX = "multifd-recv: receiver: "

MAIN = "main channel"
ONE = "multifd channel 1"
LOST_SYNC = r"no SYNC \d+ from multifd channels? (\d+, )*1\b"


# The fault, TLS, the receiver's bound (how long after the fault can strike it may wait
# before it notices: 0 when the fault is its own failure), and its last line (a regular
# expression after "multifd-recv: receiver: ").
CASES = [
    # reset at creation: the receiver resets the channel as its data begins
    pytest.param("reset@1", False, 0, f"{ONE}, data: connection reset by an injected fault",
                 id="reset-at-creation@1"),
    pytest.param("reset@1:after=1M", False, 0,
                 f"{ONE}, data: connection reset by an injected fault",
                 id="reset-mid-stream@1"),
    # A stalled channel is for the main channel to notice, at its sync point, waiting for
    # the stalled channel's SYNC. QEMU, with no return path, says completed once its last
    # bytes are in the sockets' buffers (0.13-0.17 s here) and closes its channels: when
    # that close ends the stall before the main channel is at its sync point (seen under
    # CPU load, about 1 run in 16: the receiver exited at 0.17 s, as QEMU said completed),
    # the channel's loss is the first error.
    pytest.param("stall@1:after=1M", False, BOUND,
                 f"({MAIN}, sync: {LOST_SYNC} within 2s|{ONE}, data: connection lost "
                 f"\\(a stalled channel was ended\\))$", id="stall-mid-stream@1"),
    pytest.param("tls-stall@1", True, BOUND,
                 f"{ONE}, tls: no TLS handshake and first bytes within 2s$",
                 id="tls-stall@1"),
    pytest.param("tls-abort@1", True, 0,
                 f"{ONE}, tls: TLS handshake aborted by an injected fault$",
                 id="tls-abort@1"),
    # The main channel carries about 600 KiB (zero pages, then the device state).
    pytest.param("reset@main", False, 0, f"{MAIN}, data: connection reset by an injected fault",
                 id="reset-at-creation@main"),
    pytest.param("reset@main:after=256K", False, 0,
                 f"{MAIN}, data: connection reset by an injected fault",
                 id="reset-mid-stream@main"),
    # The main channel stalled: the multifd channels wait for its sync point in vain.
    pytest.param("stall@main:after=256K", False, BOUND,
                 f"{MAIN}, sync: silent for 2s before sync point \\d+, where multifd "
                 f"channel \\d+ waits$", id="stall-mid-stream@main"),
    pytest.param("tls-stall@main", True, BOUND,
                 f"{MAIN}, tls: no TLS handshake and first bytes within 2s$",
                 id="tls-stall@main"),
    pytest.param("tls-abort@main", True, 0,
                 f"{MAIN}, tls: TLS handshake aborted by an injected fault$",
                 id="tls-abort@main"),
]


# ------------------------------------------------------------------ watching QEMU

def _gone(guest) -> str | None:
    """How QEMU ended, if it did (it should not: a broken channel must not kill it)."""
    code = guest.proc.poll() if guest.proc is not None else None
    if code is None:
        return None
    if code < 0:
        try:
            return f"QEMU died of {signal.Signals(-code).name}"
        except ValueError:
            return f"QEMU died of signal {-code}"
    return f"QEMU exited with code {code}"


def _stderr_tail(guest, lines: int = 5) -> list[str]:
    try:
        with open(guest.stderr_path, errors="replace") as f:
            return [line.rstrip() for line in f.readlines()[-lines:]]
    except OSError:
        return []


def _status(guest) -> tuple[str, str | None]:
    """(status, error-desc); QEMU's end, or a QMP failure, is a status of its own."""
    try:
        info = guest.query_migrate()
    except qemu.QemuError as exc:
        if guest.proc.poll() is None:
            time.sleep(0.2)  # the QMP socket may close a moment before QEMU is gone
        return _gone(guest) or f"query-migrate failed: {str(exc).splitlines()[0]}", None
    return info.get("status", "none"), info.get("error-desc")


def _broken(status: str) -> bool:
    return status.startswith(("query-migrate failed", "QEMU "))


def _watch(guest, seconds: float, until=ENDED, stop=lambda: False,
           since: float | None = None) -> tuple[str, str | None, list]:
    """Poll QEMU's migration status for up to `seconds`, until it is one of `until` or
    stop() is true: (last status, its error-desc, [[seconds since `since` (by default the
    watch's beginning), status], ...] at each change)."""
    start = time.monotonic()
    since = start if since is None else since
    seen: list = []
    while True:
        status, error = _status(guest)
        if not seen or seen[-1][1] != status:
            seen.append([round(time.monotonic() - since, 3), status])
        if status in until or _broken(status) or stop() or \
                time.monotonic() - start >= seconds:
            return status, error, seen
        time.sleep(0.02)


def _cancel(guest, status: str) -> str:
    """migrate_cancel on a migration still under way, and what became of it."""
    if status in ENDED or _broken(status):
        return "-"
    start = time.monotonic()
    try:
        guest.cancel()
    except qemu.QemuError as exc:
        return f"refused: {str(exc).splitlines()[0]}"
    last, _, _ = _watch(guest, WATCH)
    took = time.monotonic() - start
    if last in ENDED:
        return f"{last} in {took:.2f} s"
    return f"stuck in {last!r} ({WATCH:g} s watched)"


def _migrate_again(guest, tmp_path) -> dict:
    """A second migration from the same QEMU to a fresh plaintext receiver."""
    if gone := _gone(guest):
        return {"outcome": gone}
    recv = start_receiver("--qemu", str(tmp_path / "again"), "--handshake-timeout", "5",
                          "--idle-timeout", "5")
    try:
        try:
            guest.migrate(f"tcp:{recv.address}", channels=CHANNELS)
        except qemu.QemuError as exc:
            return {"outcome": f"refused: {str(exc).splitlines()[0]}"}
        status, error, seen = _watch(guest, NEXT_TIMEOUT)
        outcome = status if status != "failed" else f"failed: {error}"
        if status not in ENDED:
            outcome = f"still {status!r} after {NEXT_TIMEOUT:g} s"
        result = {"outcome": outcome, "statuses": seen}
        if status == "completed":
            try:
                code, _, err = recv.finish(timeout=10)
            except AssertionError as exc:
                code, err = None, str(exc)
            result["receiver_rc"] = code
            if code != 0:
                result["receiver_line"] = err.strip().splitlines()[-1:]
        return result
    finally:
        recv.stop()


def _qemu_version(guest) -> str:
    try:
        v = guest.cmd("query-version")
    except qemu.QemuError:
        return "unknown"
    q = v["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']} {v.get('package', '').strip()}".strip()


def _log(record: dict) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: the parallel workers' lines stay whole
    finally:
        os.close(fd)


def _leftovers(tmp_path, output) -> list[str]:
    found = []
    if os.path.lexists(output):
        found += [os.path.join(output, name) for name in os.listdir(output)]
    for root, dirs, files in os.walk(tmp_path):
        found += [os.path.join(root, name) for name in dirs + files if ".part" in name]
    return found


# ------------------------------------------------------------------ the cases

@pytest.mark.parametrize("fault, tls, bound, says", CASES)
def test_one_broken_channel(guest_image, pki, tmp_path, record_property, request, fault, tls,
                            bound, says):
    output = tmp_path / "vm"
    args = ["--qemu", str(output), "--handshake-timeout", f"{BOUND:g}",
            "--idle-timeout", f"{BOUND:g}", "--fault", fault]
    if tls:
        args += ["--tls", pki.both]
    recv = start_receiver(*args)
    guest = start_guest(image=guest_image, tls_dir=pki.both if tls else None)
    record: dict = {"case": request.node.callspec.id, "fault": fault, "tls": tls,
                    "channels": CHANNELS, "max_bandwidth": BANDWIDTH, "accel": guest.accel,
                    "qemu": _qemu_version(guest)}

    # The fault can strike as soon as QEMU connects. While the receiver runs, QEMU's status
    # is watched too; the receiver's exit is timed by a thread of its own.
    exited: list[float] = []

    def wait_for_exit() -> None:
        recv.proc.wait()
        exited.append(time.monotonic())
    waiter = threading.Thread(target=wait_for_exit, daemon=True)
    waiter.start()
    start = time.monotonic()
    guest.migrate(f"tcp:{recv.address}", channels=CHANNELS, max_bandwidth=BANDWIDTH, tls=tls)
    record["statuses_before_exit"] = _watch(
        guest, bound + SLACK + 10, until=(), stop=lambda: exited, since=start)[2]
    waiter.join(1)
    took = (exited[0] if exited else time.monotonic()) - start
    code = recv.proc.poll()
    recv.stop()
    lines = recv.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    leftovers = _leftovers(tmp_path, output)
    record["receiver"] = {"rc": code, "seconds": round(took, 3), "line": last}

    # QEMU's side, recorded.
    status, error, seen = _watch(guest, WATCH)
    record["status_after_exit"] = status
    record["statuses_after_exit"] = seen
    if error:
        record["error_desc"] = error
    record["migrate_cancel"] = _cancel(guest, status)
    record["next_migrate"] = _migrate_again(guest, tmp_path)
    if gone := _gone(guest):
        record["qemu_end"] = gone
        record["qemu_stderr"] = _stderr_tail(guest)
    record_property("qemu_behaviour", json.dumps(record, sort_keys=True))
    _log(record)

    # The receiver's guarantees.
    assert code == 1, (code, recv.stderr)
    assert took < bound + SLACK, (took, recv.stderr)
    assert last.startswith(PREFIX) and re.match(says, last[len(PREFIX):]), recv.stderr
    assert not leftovers, leftovers
