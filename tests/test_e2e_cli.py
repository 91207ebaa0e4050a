"""End to end: the real CLIs in two processes over real TCP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from multifd import wire as W

from conftest import (assert_each_dropped, cli, files_in, run_sender, start_receiver,
                      start_sender, strangers_during_a_migration, unnamed_files_in, wait_until,
                      writing_into, written_into)

MiB = 1 << 20


def migrate(image: str, out: str, *send_args: str) -> tuple[dict, dict]:
    recv = start_receiver(out, "--json")
    sent = run_sender(recv.address, image, "--json", *send_args)
    rc, stdout, stderr = recv.finish()
    assert sent.returncode == 0, sent.stderr
    assert rc == 0, stderr
    return json.loads(sent.stdout), json.loads(stdout)


@pytest.mark.parametrize("kind", ["random", "mixed", "zero"])
@pytest.mark.parametrize("channels", [1, 4, 16])
def test_image_arrives_identical(make_image, tmp_path, kind, channels):
    image = make_image(6 * MiB, kind)
    out = str(tmp_path / "out" / "guest.img")
    os.mkdir(tmp_path / "out")
    sent, received = migrate(image, out, "--channels", str(channels))
    with open(image, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    assert sent["ok"] and received["ok"]
    assert sent["digest"] == received["digest"]
    assert sent["channels"] == received["channels"] == channels
    assert sent["bytes"] == received["bytes"] == 6 * MiB
    if kind == "zero":
        assert sent["zero_pages"] == sent["pages"] and sent["payload_bytes"] == 0
    if kind == "mixed":
        assert 0 < sent["zero_pages"] < sent["pages"]
    assert files_in(tmp_path / "out") == ["guest.img"]


def test_size_not_a_multiple_of_the_page_size(make_image, tmp_path):
    size = 3 * MiB + 4096 * 3 + 123
    image = make_image(size, "mixed", seed=7)
    out = str(tmp_path / "out.img")
    sent, received = migrate(image, out, "--channels", "3")
    assert os.path.getsize(out) == size
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # as a new file, not mkstemp's 0600
    with open(image, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    assert received["pages"] == -(-size // 4096)


def test_one_page_image_and_small_packets(make_image, tmp_path):
    image = make_image(100, "random")
    out = str(tmp_path / "out.img")
    migrate(image, out, "--channels", "8", "--packet-pages", "1")
    with open(image, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_discard_verifies_without_writing(make_image, tmp_path):
    image = make_image(4 * MiB)
    recv = start_receiver("--discard", "--json")
    sent = run_sender(recv.address, image, "--json")
    rc, stdout, stderr = recv.finish()
    assert sent.returncode == 0 and rc == 0, (sent.stderr, stderr)
    assert json.loads(stdout)["digest"] == json.loads(sent.stdout)["digest"]
    assert json.loads(stdout)["output"] is None


def test_human_summary(make_image, tmp_path):
    image = make_image(2 * MiB)
    recv = start_receiver(str(tmp_path / "o.img"))
    sent = run_sender(recv.address, image)
    rc, stdout, _ = recv.finish()
    assert sent.returncode == 0 and rc == 0
    for text in (sent.stdout, stdout):
        assert "ok, 2.00 MiB" in text and "digest xxh3-128-sum:" in text and "GB/s" in text


def test_max_bandwidth_paces_the_transfer(make_image, tmp_path):
    image = make_image(3 * MiB)
    recv = start_receiver("--discard")
    start = time.monotonic()
    sent = run_sender(recv.address, image, "--max-bandwidth", "4MiB/s", "--channels", "4",
                      "--packet-pages", "128")
    elapsed = time.monotonic() - start
    assert recv.finish()[0] == 0 and sent.returncode == 0, sent.stderr
    # 3 MiB in 512 KiB packets at 4 MiB/s: the last of 6 packets cannot start before 0.625 s.
    assert elapsed >= 0.6


def test_ipv6_loopback(make_image, tmp_path):
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.fail("IPv6 loopback ::1 is not available on this machine")
    finally:
        probe.close()
    image = make_image(MiB)
    recv = start_receiver(str(tmp_path / "o.img"), listen="[::1]:0")
    assert recv.host == "::1"
    sent = run_sender(recv.address, image)
    assert recv.finish()[0] == 0 and sent.returncode == 0, sent.stderr


# ------------------------------------------------------------- failures


def _one_clean_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("method", ["zlib", "zstd:3", "zlib:9"])
def test_compressed_packets_arrive_identical(make_image, tmp_path, method):
    # Mixed: zero pages (headers only), and data pages that zstd shrinks (the generator's
    # pages repeat beyond zlib's window) or that go plain.
    image = make_image(6 * MiB, "mixed")
    out = str(tmp_path / "guest.img")
    sent, received = migrate(image, out, "--compress", method)
    with open(image, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    assert sent["digest"] == received["digest"]
    assert sent["compression"] == method if ":" in method else f"{method}:1"
    assert received["compression"] == method.partition(":")[0]
    assert sent["payload_bytes"] == received["payload_bytes"] > 0
    assert sent["wire_payload_bytes"] == received["wire_payload_bytes"] <= sent["payload_bytes"]
    if method.startswith("zstd"):
        assert sent["wire_payload_bytes"] < sent["payload_bytes"]
    assert sent["compression_ratio"] == received["compression_ratio"] == round(
        sent["payload_bytes"] / sent["wire_payload_bytes"], 3)


def test_a_corrupt_compressed_payload_names_channel_and_packet(make_image, tmp_path):
    image = make_image(6 * MiB, "mixed")
    (tmp_path / "out").mkdir()
    recv = start_receiver(str(tmp_path / "out" / "guest.img"))
    sent = run_sender(recv.address, image, "--compress", "zstd", "--channels", "2",
                      "--fault", "corrupt-payload@1:packet=0")
    rc, _, stderr = recv.finish()
    assert sent.returncode == 1 and rc == 1
    last = stderr.strip().splitlines()[-1]
    assert re.search(r"data channel 1, data: packet 0( \(offset \d+\))?: (zstd payload "
                     r"does not decode|checksum)", last), stderr
    assert files_in(tmp_path / "out") == []


def test_sender_usage_errors(make_image, tmp_path):
    image = make_image(MiB)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    cases = [
        (["127.0.0.1:1", str(tmp_path / "missing.img")], "cannot open image"),
        (["127.0.0.1:1", str(empty)], "is empty"),
        (["127.0.0.1:1", str(tmp_path)], "is a directory"),
        (["127.0.0.1", image], "does not parse"),
        (["::1:80", image], "[ADDR]:PORT"),
        (["127.0.0.1:99999", image], "port"),
        (["127.0.0.1:1", image, "--channels", "0"], "channel count"),
        (["127.0.0.1:1", image, "--channels", "65"], "channel count"),
        (["127.0.0.1:1", image, "--max-bandwidth", "fast"], "'fast' is not a rate"),
        (["127.0.0.1:1", image, "--max-bandwidth", "1Gbit/s"], "is in bits: give bytes per "
                                                              "second (125MB/s)"),
        (["127.0.0.1:1", image, "--idle-timeout", "soon"], "'soon' is not a duration"),
        (["127.0.0.1:1", image, "--page-size", "1000"], "page size"),
        (["127.0.0.1:1", image, "--compress", "gzip"], "not one of none, zlib[:LEVEL], "
                                                       "zstd[:LEVEL]"),
        (["127.0.0.1:1", image, "--compress", "zstd:99"], "the zstd level is 1..19"),
    ]
    for args, expected in cases:
        result = run_sender(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in _one_clean_line(result.stderr), (args, result.stderr)


def test_refused_connection_is_a_network_failure(make_image):
    image = make_image(MiB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        result = run_sender(f"127.0.0.1:{port}", image, "--json")
    assert result.returncode == 1
    line = _one_clean_line(result.stderr)
    assert "connect" in line and "refused" in line.lower()
    assert json.loads(result.stdout)["ok"] is False


def test_receiver_usage_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [
            (["--listen", "127.0.0.1:0", str(tmp_path / "nodir" / "out.img")], "does not exist"),
            (["--listen", "127.0.0.1:0", str(tmp_path)], "is a directory"),
            (["--listen", "127.0.0.1:0", str(tmp_path / "afile" / "out.img")], "does not exist"),
            (["--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--discard"], "in use"),
            (["--listen", "nowhere", "--discard"], "does not parse"),
            (["--listen", "127.0.0.1:0"], "give one of OUTPUT, --discard and --qemu DIR"),
            (["--listen", "127.0.0.1:0", "--discard", "--qemu", str(tmp_path / "g")],
             "--discard and --qemu exclude each other"),
            (["--listen", "127.0.0.1:0", "--qemu-uuid", "x", "--discard"], "not a UUID"),
            (["--listen", "127.0.0.1:0", "--discard", "--qemu-uuid",
              "12345678-1234-1234-1234-123456789abc"], "--qemu-uuid needs --qemu"),
        ]
        for args, expected in cases:
            result = subprocess.run([*cli("recv"), *args], capture_output=True, text=True,
                                    timeout=30)
            assert result.returncode == 2, (args, result.stderr)
            assert expected in _one_clean_line(result.stderr), (args, result.stderr)
    finally:
        busy.close()
    assert files_in(tmp_path) == ["afile"]


def assert_temporary_output_unseen(outdir) -> None:
    """Mid-transfer the output directory shows nothing (an unnamed file), or, on a file system
    without unnamed files, only the hidden temporary file."""
    left = files_in(outdir)
    if unnamed_files_in(outdir):
        assert left == [], left
    else:
        assert len(left) == 1 and left[0].startswith(".guest.img.") and \
            left[0].endswith(".part"), left


def slow_migration(make_image, tmp_path):
    """A migration under way into tmp_path/out for about 4 s (16 MiB at 4 MB/s): returned
    once the receiver has written data (mid-transfer), with most of it still to come."""
    image = make_image(16 * MiB)
    outdir = tmp_path / "out"
    outdir.mkdir()
    recv = start_receiver(str(outdir / "guest.img"))
    sender = start_sender(recv.address, image, "--max-bandwidth", "4MB/s")
    wait_until(lambda: written_into(recv.proc, outdir), 20, "data written")
    return recv, sender, outdir


def test_killed_sender_leaves_nothing_and_receiver_exits_1(make_image, tmp_path):
    recv, sender, outdir = slow_migration(make_image, tmp_path)
    assert sender.poll() is None
    assert writing_into(recv.proc, outdir)
    assert_temporary_output_unseen(outdir)
    sender.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc, _, stderr = recv.finish(timeout=15)
    assert time.monotonic() - killed < 5
    sender.communicate()
    assert rc == 1
    line = [x for x in stderr.splitlines() if "listening" not in x]
    assert len(line) == 1 and "Traceback" not in stderr, stderr
    # a data channel or the heeded control channel, whichever saw the sender die first
    assert "receiver" in line[0] and "channel" in line[0], line[0]
    assert files_in(outdir) == []


def test_strangers_are_dropped_and_the_migration_completes(make_image, tmp_path):
    image = make_image(8 * MiB)
    out = str(tmp_path / "guest.img")
    recv = start_receiver(out, "--handshake-timeout", "1")
    sender = start_sender(recv.address, image, "--max-bandwidth", "4MB/s")
    strangers = []

    def connect():
        for payload, says in (
                (b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n", "bad magic"),
                (b"\xde\xad\xbe\xef" * 16, "bad magic"),  # random bytes may start like TLS
                (b"MFD1" + W.VERSION.to_bytes(2, "big") + b"\x02\x00" + os.urandom(16) +
                 bytes(8), "channel count 0 out of range"),
                (b"", "no complete hello within 1s")):  # never speaks
            s = socket.create_connection((recv.host, recv.port), timeout=5)
            strangers.append((s, s.getsockname()[1], says))
            s.sendall(payload)
        return [(port, re.escape(says)) for _, port, says in strangers]

    try:
        met = strangers_during_a_migration(recv, sender, tmp_path, connect)
    finally:
        for s, _, _ in strangers:
            s.close()
    _, err_s = sender.communicate(timeout=60)
    rc, _, stderr = recv.finish()
    assert sender.returncode == 0, err_s
    assert rc == 0, stderr
    assert len(met) == 4
    assert_each_dropped(stderr, met)
    with open(image, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_the_receiver_cancels_cleanly(make_image, tmp_path, sig, code):
    recv, sender, outdir = slow_migration(make_image, tmp_path)
    assert writing_into(recv.proc, outdir)
    assert_temporary_output_unseen(outdir)
    recv.proc.send_signal(sig)
    rc, _, stderr = recv.finish(timeout=15)
    _, send_err = sender.communicate(timeout=15)
    assert rc == code, stderr
    assert "Traceback" not in stderr and "Traceback" not in send_err
    assert sender.returncode == 1
    expected = "terminated by SIGTERM" if sig == signal.SIGTERM else "interrupted"
    assert f"receiver failed: {expected}" in send_err, send_err
    assert files_in(outdir) == []


def test_packets_with_more_runs_than_one_system_call_takes(tmp_path):
    """2048-page packets of alternating zero and data pages: over a thousand payload parts."""
    page = 4096
    data = bytearray(os.urandom(4 * 2048 * page))
    for i in range(0, 4 * 2048, 2):
        data[i * page:(i + 1) * page] = bytes(page)
    image = tmp_path / "striped.img"
    image.write_bytes(bytes(data))
    out = str(tmp_path / "out.img")
    sent, _ = migrate(str(image), out, "--packet-pages", "2048", "--channels", "2")
    assert sent["zero_pages"] == 4 * 1024
    with open(out, "rb") as f:
        assert f.read() == bytes(data)


def test_a_rate_too_low_for_the_idle_timeout_is_refused(make_image):
    image = make_image(1 << 20)
    # 16 channels take turns: each would see a 2 MiB packet every 8 s at 4 MB/s.
    result = run_sender("127.0.0.1:1", image, "--channels", "16", "--max-bandwidth", "4MB/s",
                        "--idle-timeout", "5")
    assert result.returncode == 2 and "too low for 16 channels" in result.stderr


def test_idle_timeout_bounds_the_whole_exit_when_the_receiver_stops_reading(make_image,
                                                                           tmp_path):
    """--idle-timeout S means the sender ends about S after its peer fell silent, not two or
    three times S: a send that moved a few bytes before the kernel's timeout expired must not
    start the wait again (a receiver stopped with SIGSTOP did exactly that)."""
    image = make_image(64 * MiB)
    recv = start_receiver(str(tmp_path / "out.img"), "--fault", "stall:after=1M",
                          "--idle-timeout", "30")
    start = time.monotonic()
    sent = run_sender(recv.address, image, "--idle-timeout", "2", timeout=30)
    elapsed = time.monotonic() - start
    recv.proc.kill()
    recv.finish(timeout=10)
    assert sent.returncode == 1
    assert "peer silent for 2s" in _one_clean_line(sent.stderr), sent.stderr
    # about 2 s of silence, plus start-up and at most control.TELL_GRACE to say why
    assert elapsed < 3.5, f"the sender took {elapsed:.1f}s to give up"
