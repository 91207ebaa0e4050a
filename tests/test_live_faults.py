"""multifd-send --live when a side dies in a later round, and the rounds the sender prints.

Real CLIs on 127.0.0.1. The live options below never converge (the guest dirties far more
than the link drains), so round 2 is always the stop-and-copy round: the workload is paused
and the last dirty pages go. Proves: a sender that crashes (--fault crash:round=R) in a
middle round or in the stop-and-copy round, plain or TLS, or that is killed with SIGKILL in a
later round, leaves a receiver that exits 1 with a one-line reason and nothing under the
output's directory; a receiver that crashes in a later round or in the last one leaves a
sender that exits 1 saying the receiver went away, and nothing under the output's directory;
the sender prints one line per finished round, in order, with its pages and expected
downtime, and none with --quiet or --json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from conftest import (Lines, files_in, run_sender, start_receiver, start_sender,
                      unnamed_files_in, wait_until)
from multifd.faults import CRASH_EXIT

MiB = 1 << 20
# 200 MB/s of writes into 16 MiB against a 32 MB/s link: every round leaves about the whole
# image dirty, so no round fits 10 ms and --max-rounds 3 makes round 2 the stop-and-copy.
NEVER_CONVERGES = ("--live", "--dirty-rate", "200MB/s", "--max-bandwidth", "32MB/s",
                   "--downtime-limit", "10ms", "--packet-pages", "64")
LAST_ROUND = 2
RECV_ARGS = ("--idle-timeout", "3")  # a bound, should a death ever go unnoticed
BOUND = 10  # seconds past the sender's end for the receiver to be done
ROUND_LINE = re.compile(
    r"round (\d+): (\d+) pages \((\d+) zero\), \d+\.\d MB on the wire in \d+ ms, "
    r"\d+\.\d\d GB/s; dirtied meanwhile (\d+) pages \(\d+ MB/s\), expected downtime "
    r"(\d+) ms(, throttle \d+%)?")
# What a side says when its peer's process is gone: on a data or the control channel, the
# connection closed, lost, or (TLS) closed without a TLS close.
GONE = (r"(control channel|data channel \d+), (data|sync|finish): (connection closed by the "
        r"peer while waiting for (a packet header|a control message)|connection lost "
        r"\((Connection reset by peer|Broken pipe)\)|the {peer} closed the connection without "
        r"a TLS close \(the stream may be truncated\))")
RECEIVER_SAYS = re.compile(r"multifd-recv: receiver: " + GONE.format(peer="sender"))
SENDER_SAYS = re.compile(r"multifd-send: sender: " + GONE.format(peer="receiver"))


def send_loud(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The sender without --quiet: its round lines show."""
    return run_sender(*args, timeout=timeout, quiet=False)


def start_loud_sender(*args: str):
    """A sender without --quiet in the background, and its stderr lines as they come; ended
    after the test by conftest's fixture whatever happens."""
    proc = start_sender(*args, quiet=False)
    return proc, Lines(proc.stderr)


def round_lines(stderr: str) -> list[re.Match]:
    return [m for line in stderr.splitlines() if (m := ROUND_LINE.fullmatch(line))]


def reason(stderr: str, prog: str) -> str:
    """The one line the process said besides its round lines and the receiver's listening
    line: its reason (no traceback, nothing else)."""
    lines = [line for line in stderr.splitlines()
             if not ROUND_LINE.fullmatch(line) and "listening on" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0] == stderr.strip().splitlines()[-1], stderr  # the last line
    assert lines[0].startswith(f"{prog}: "), stderr
    return lines[0]


def tls_args(pki, tls: bool) -> tuple[str, ...]:
    return ("--tls", pki.both) if tls else ()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("round, tls", [
    pytest.param(1, True, id="middle-round-tls"),
    pytest.param(LAST_ROUND, False, id="stop-and-copy-plain"),
    pytest.param(LAST_ROUND, True, id="stop-and-copy-tls"),
])
def test_a_sender_crash_in_a_later_round_leaves_a_clean_receiver(make_image, tmp_path, pki,
                                                                   round, tls):
    image = make_image(16 * MiB, "mixed")
    outdir = tmp_path / "out"
    outdir.mkdir()
    recv = start_receiver(str(outdir / "guest.img"), *RECV_ARGS, *tls_args(pki, tls))
    sent = send_loud(recv.address, image, *NEVER_CONVERGES, "--max-rounds", "3",
                     *tls_args(pki, tls), "--fault", f"crash:round={round}")
    code, _, stderr = recv.finish(timeout=BOUND)
    assert sent.returncode == CRASH_EXIT, sent.stderr
    # It died as round R began: every round before it finished (and was said), none after.
    assert [int(m[1]) for m in round_lines(sent.stderr)] == list(range(round)), sent.stderr
    assert code == 1, stderr
    line = reason(stderr, "multifd-recv")
    assert RECEIVER_SAYS.fullmatch(line), line
    assert files_in(outdir) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("round, tls", [
    pytest.param(1, False, id="middle-round-plain"),
    pytest.param(LAST_ROUND, False, id="stop-and-copy-plain"),
    pytest.param(LAST_ROUND, True, id="stop-and-copy-tls"),
])
def test_a_receiver_crash_in_a_later_round_fails_the_sender(make_image, tmp_path, pki,
                                                            round, tls):
    image = make_image(16 * MiB, "mixed")
    outdir = tmp_path / "out"
    outdir.mkdir()
    recv = start_receiver(str(outdir / "guest.img"), *RECV_ARGS, *tls_args(pki, tls),
                          "--fault", f"crash:round={round}")
    sent = send_loud(recv.address, image, *NEVER_CONVERGES, "--max-rounds", "3",
                     *tls_args(pki, tls))
    code, _, stderr = recv.finish(timeout=BOUND)
    assert code == CRASH_EXIT, stderr
    assert sent.returncode == 1, sent.stderr
    line = reason(sent.stderr, "multifd-send")
    assert SENDER_SAYS.fullmatch(line), line
    # The receiver died as its round R began: the sender cannot have finished round R.
    said = [int(m[1]) for m in round_lines(sent.stderr)]
    assert said == list(range(len(said))) and len(said) <= round, sent.stderr
    left = files_in(outdir)
    if unnamed_files_in(outdir):
        assert left == [], left
    else:  # a crashed receiver cannot remove its hidden temporary file
        assert all(n.startswith(".guest.img.") and n.endswith(".part") for n in left), left


def _children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found += map(int, f.read().split())
    return found


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting for its new parent to reap
    it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.timeout(30)
def test_a_sender_killed_in_a_later_round_leaves_a_clean_receiver(make_image, tmp_path):
    image = make_image(16 * MiB, "mixed")
    outdir = tmp_path / "out"
    outdir.mkdir()
    recv = start_receiver(str(outdir / "guest.img"), *RECV_ARGS)
    sender, err = start_loud_sender(recv.address, image, *NEVER_CONVERGES, "--max-rounds",
                                    "6")
    assert err.wait(lambda lines: any(line.startswith("round 1: ") for line in lines), 20), \
        err.text()
    workload = _children(sender.pid)  # the guest: it must not outlive its sender
    assert workload and all(map(_running, workload))
    assert sender.poll() is None and recv.proc.poll() is None  # round 2 of 0..5 under way
    sender.kill()
    assert sender.wait(timeout=5) == -9
    code, _, stderr = recv.finish(timeout=BOUND)
    assert code == 1, stderr
    line = reason(stderr, "multifd-recv")
    assert RECEIVER_SAYS.fullmatch(line), line
    assert files_in(outdir) == []
    wait_until(lambda: not any(map(_running, workload)), 10, "the workload gone")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["", "--quiet", "--json"])
def test_the_sender_says_each_round_unless_quiet_or_json(make_image, tmp_path, mode):
    image = make_image(16 * MiB, "mixed")
    out = tmp_path / "out.img"
    recv = start_receiver(str(out), "--json")
    sent = send_loud(recv.address, image, *NEVER_CONVERGES, "--max-rounds", "3",
                     *([mode] if mode else []))
    code, stdout, stderr = recv.finish(timeout=BOUND)
    assert sent.returncode == 0 and code == 0, (sent.stderr, stderr)
    received = json.loads(stdout)
    assert received["live"]["rounds"] == 3
    if mode:
        assert sent.stderr == ""  # not a round line, nor anything else
        if mode == "--json":
            assert len(json.loads(sent.stdout)["live"]["rounds"]) == 3
        return
    lines = sent.stderr.splitlines()
    rounds = [ROUND_LINE.fullmatch(line) for line in lines]
    assert all(rounds) and len(rounds) == 3, sent.stderr  # nothing but a line a round
    assert [int(m[1]) for m in rounds] == [0, 1, 2]
    pages = [int(m[2]) for m in rounds]
    dirtied = [int(m[4]) for m in rounds]
    downtime = [int(m[5]) for m in rounds]
    assert pages[0] == 16 * MiB // 4096  # round 0: every page
    assert sum(pages) == received["pages"]
    assert sum(int(m[3]) for m in rounds) == received["zero_pages"]
    # A round sends what the one before it left dirty; the last also what the guest wrote
    # until it paused.
    assert pages[1] == dirtied[0] and pages[2] >= dirtied[1], sent.stderr
    assert dirtied[0] > 0 and downtime[0] > 10  # no convergence: far over 10 ms
    assert dirtied[2] == 0 and downtime[2] == 0  # the guest is paused after the last round
