"""A real multifd-recv against senders that break the rules, written with the wire module."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

from conftest import files_in, run_sender, start_receiver, wait_until_idle
from multifd import wire
from multifd.digest import DigestSum, block_term, term_bytes

BLOCK = 512 * 1024


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "receiver closed the connection"
        data += chunk
    return data


def _connect(port: int, hello: wire.Hello) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(wire.encode_hello(hello))
    assert wire.decode_hello_reply(_recv_exactly(sock, wire.HELLO_REPLY.size)) is \
        wire.HelloStatus.OK
    return sock


def _open_migration(port: int, channels: int):
    sid = uuid.uuid4().bytes
    control = _connect(port, wire.Hello(wire.Role.CONTROL, sid, 0, channels))
    data = [_connect(port, wire.Hello(wire.Role.DATA, sid, i, channels))
            for i in range(channels)]
    return control, data


def _packet(session: wire.Session, block: int, content: bytes, seq: int) -> tuple[bytes, int]:
    npages = -(-len(content) // session.page_size)
    term = block_term(content, block)
    head = wire.encode_packet(wire.PacketKind.PAGES, seq=seq, round=0,
                              offset=block * session.block_bytes,
                              runs=((0, npages, wire.RunKind.DATA),),
                              page_size=session.page_size, flags=3, digest=term_bytes(term))
    return head + content, term


def test_a_duplicated_block_cannot_stand_in_for_a_missing_one(tmp_path):
    recv = start_receiver(str(tmp_path / "out.img"), "--idle-timeout", "5")
    control, data = _open_migration(recv.port, 2)
    try:
        session = wire.Session(2 * BLOCK)
        control.sendall(wire.encode_control(session))
        content = os.urandom(BLOCK)
        total = DigestSum()
        for sock in data:  # block 0 on both channels, block 1 never: the counts still add up
            packet, term = _packet(session, 0, content, seq=0)
            total.add(term)
            sock.sendall(packet + wire.encode_packet(wire.PacketKind.SYNC, seq=1, round=0)
                         + wire.encode_packet(wire.PacketKind.END, seq=2, round=1))
        control.sendall(wire.encode_control(wire.Complete(1, 2, 256, 0, total.digest())))
        rc, _, stderr = recv.finish(timeout=20)
    finally:
        for sock in (control, *data):
            sock.close()
    assert rc == 1
    # Refused as it arrives: a block comes at most once a round.
    assert stderr.strip().splitlines()[-1].endswith("block 0 came twice in round 0"), stderr
    assert files_in(tmp_path) == []


def test_ctrl_c_while_waiting_on_the_control_channel(tmp_path):
    """SIGINT must not wait for a blocked worker thread: exit 130 at once, nothing left."""
    recv = start_receiver(str(tmp_path / "out.img"), "--idle-timeout", "30")
    control, data = _open_migration(recv.port, 1)  # ... and never send SESSION
    try:
        wait_until_idle(recv.proc)  # every thread asleep: waiting for SESSION
        recv.proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        rc, _, stderr = recv.finish(timeout=20)
        assert time.monotonic() - start < 5
    finally:
        control.close()
        data[0].close()
    assert rc == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert files_in(tmp_path) == []


def test_sixty_four_channels_at_once(make_image, tmp_path):
    """65 connections arrive together: none may be turned away as a flood."""
    image = make_image(8 << 20, "mixed")
    for attempt in range(3):
        out = str(tmp_path / f"out{attempt}.img")
        recv = start_receiver(out)
        sent = run_sender(recv.address, image, "--channels", "64")
        rc, _, stderr = recv.finish()
        assert sent.returncode == 0 and rc == 0, (sent.stderr, stderr)
        with open(image, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read()


def test_a_trickled_hello_is_dropped_at_the_hello_deadline(make_image, tmp_path):
    """One deadline for the whole hello: a byte now and then does not keep a slot alive."""
    image = make_image(1 << 20)
    recv = start_receiver(str(tmp_path / "out.img"), "--handshake-timeout", "1")
    trickle = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
    try:
        hello = wire.encode_hello(wire.Hello(wire.Role.CONTROL, bytes(16), 0, 1))
        start = time.monotonic()
        closed_after = None
        for byte in hello[:-1]:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - start
                break
            time.sleep(0.3)  # the scenario: a byte now and then
        if closed_after is None:  # all but the last byte went out: the socket must be closed
            assert trickle.recv(1) == b""
            closed_after = time.monotonic() - start
        assert closed_after < 3
        sent = run_sender(recv.address, image)
        rc, _, stderr = recv.finish()
    finally:
        trickle.close()
    assert sent.returncode == 0 and rc == 0, (sent.stderr, stderr)
    assert "no complete hello within 1s" in stderr


def test_working_is_refused_outside_the_wait_for_done(tmp_path):
    """WORKING would otherwise let a peer hold a receiver past its idle timeout for ever."""
    recv = start_receiver(str(tmp_path / "out.img"), "--idle-timeout", "2")
    control, data = _open_migration(recv.port, 1)
    try:
        control.sendall(wire.encode_control(wire.Working()))  # instead of SESSION
        rc, _, stderr = recv.finish(timeout=20)
    finally:
        control.close()
        data[0].close()
    assert rc == 1 and "got Working (expected Session)" in stderr, stderr


def test_data_hellos_without_a_session_hold_their_pending_slot(tmp_path):
    """A flood of complete data hellos for sessions that never come is bounded too."""
    from multifd.registry import MAX_PENDING
    # A handshake timeout far longer than the flood takes to arrive on a busy machine: no
    # slot may free up before the last connections come.
    recv = start_receiver("--discard", "--handshake-timeout", "30")
    flood = []
    try:
        for _ in range(MAX_PENDING + 3):
            sock = socket.create_connection(("127.0.0.1", recv.port), timeout=10)
            sock.sendall(wire.encode_hello(wire.Hello(wire.Role.DATA, os.urandom(16), 0, 1)))
            flood.append(sock)
        deadline = time.monotonic() + 10
        refused = 0
        for sock in flood[MAX_PENDING:]:  # the last ones are closed at once
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                refused += sock.recv(8) == b""
            except ConnectionResetError:  # closed with our hello unread
                refused += 1
        assert refused == 3
    finally:
        for sock in flood:
            sock.close()
        recv.proc.send_signal(signal.SIGTERM)
        rc, _, stderr = recv.finish(timeout=20)
    assert f"{MAX_PENDING} connections already waiting for a hello" in stderr


def test_a_control_message_begun_and_never_finished_is_a_timeout(tmp_path):
    """While the receiver waits for data channels it heeds the control channel: a sender that
    sends part of a message and stops is a timeout after a grace period, not a wait bounded
    only by the idle timeout (the data channel never comes)."""
    recv = start_receiver(str(tmp_path / "out.img"), "--handshake-timeout", "10",
                          "--idle-timeout", "30")
    sid = uuid.uuid4().bytes
    control = _connect(recv.port, wire.Hello(wire.Role.CONTROL, sid, 0, 1))
    try:
        control.sendall(wire.encode_control(wire.Ready())[:3])
        start = time.monotonic()
        rc, _, stderr = recv.finish(timeout=20)
        elapsed = time.monotonic() - start
    finally:
        control.close()
    assert rc == 1 and "sender began a control message and did not finish it within 2s" in \
        stderr, stderr
    assert elapsed < 5, f"{elapsed:.1f}s"


def test_a_signal_ends_a_control_message_trickled_byte_by_byte(tmp_path):
    """A trickle that would keep every socket read alive: SIGTERM still ends it at once."""
    recv = start_receiver(str(tmp_path / "out.img"), "--handshake-timeout", "30",
                          "--idle-timeout", "30")
    sid = uuid.uuid4().bytes
    control = _connect(recv.port, wire.Hello(wire.Role.CONTROL, sid, 0, 1))
    frame = wire.encode_control(wire.ErrorMessage(wire.ErrorCode.FAILED, "x" * 100))
    try:
        for byte in frame[:4]:
            control.sendall(bytes([byte]))
            time.sleep(0.3)  # the scenario: a byte now and then, within the 2 s grace period
        recv.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rc, _, stderr = recv.finish(timeout=20)
        elapsed = time.monotonic() - start
    finally:
        control.close()
    assert rc == 143 and "terminated by SIGTERM" in stderr, stderr
    assert elapsed < 3, f"{elapsed:.1f}s"
