"""multifd/conn.py's Conn over real connected sockets (socketpair, and TCP loopback where TCP's
own behaviour matters): the blocking primitives, the translation of failures into our errors
naming channel and stage, the one-deadline send, cancellation of a call blocked in its worker
thread, and the detector of two operations at once on one connection.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

import pytest
import trio
import trio.testing

from multifd import conn as conn_module
from multifd import errors as E
from multifd.conn import IOV_BATCH, Conn
from multifd.errors import Stage
from multifd.settings import Timeouts
from multifd.side import Side

SENDER = Side("sender", Timeouts(connect=1, handshake=1, idle=0.3))
RECEIVER = Side("receiver", Timeouts(connect=1, handshake=1, idle=0.3))
LABEL = "data channel 3"
PKG = os.path.dirname(E.__file__)


def threads_in_our_code() -> dict[int, str]:
    """The threads other than this one running code of the package: ident -> where."""
    found = {}
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        f = frame
        while f is not None:
            if f.f_code.co_filename.startswith(PKG):
                found[ident] = f"{f.f_code.co_filename}:{f.f_lineno}"
                break
            f = f.f_back
    return found


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


@pytest.fixture
def pair():
    """make(timeout, kind="unix"|"tcp", small_buffers=False) -> (ours, peer): two Conns on
    the two ends of one connection; ours is the sender's "data channel 3"."""
    socks: list[socket.socket] = []

    def make(timeout: float = 2.0, kind: str = "unix", small_buffers: bool = False):
        a, b = socket.socketpair() if kind == "unix" else _tcp_pair()
        socks.extend((a, b))
        if small_buffers:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        return (Conn(a, LABEL, side=SENDER, timeout=timeout),
                Conn(b, "peer", side=RECEIVER, timeout=timeout))

    yield make
    for s in socks:
        s.close()


# --- the blocking primitives


async def test_send_all_and_recv_exactly_round_trip(pair):
    ours, peer = pair()
    data = os.urandom(3 << 20)  # far more than a socket buffer: many partial sends and receives
    got = {}

    async def receive():
        got["data"] = await peer.run(Stage.DATA, peer.recv_bytes, len(data), "the data")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            assert await ours.run(Stage.DATA, ours.send_all, data) is None
    assert got["data"] == data


async def test_send_all_takes_any_buffer(pair):
    ours, peer = pair()
    words = memoryview(bytearray(range(256)) * 16).cast("I")  # not a byte view
    with trio.fail_after(5):
        await ours.run(Stage.DATA, ours.send_all, words)
        assert await peer.run(Stage.DATA, peer.recv_bytes, 4096, "x") == \
            bytes(range(256)) * 16


async def test_send_parts_many_mixed_parts_arrive_intact(pair):
    ours, peer = pair()
    backing = bytearray(os.urandom(1 << 20))
    parts: list = []
    expected = bytearray()
    for i in range(3 * conn_module.IOV_BATCH + 7):
        size = (i * 7919) % 9000  # 0 .. 9 KB, some parts empty
        if i % 3 == 0:
            part = os.urandom(size)  # bytes
        elif i % 3 == 1:
            at = (i * 104729) % (len(backing) - size)
            part = memoryview(backing)[at:at + size]  # a view of a larger buffer
        else:
            part = bytes(size)  # zero padding, as a partial last page travels
        parts.append(part)
        expected += part
    assert len(parts) > conn_module.IOV_BATCH
    got = {}

    async def receive():
        got["data"] = await peer.run(Stage.DATA, peer.recv_bytes, len(expected), "payload")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await ours.run(Stage.DATA, ours.send_parts, parts)
    assert got["data"] == bytes(expected)


async def test_send_parts_with_a_slow_reader_arrives_intact(pair):
    """Small buffers: sendmsg comes back short in the middle of a part, again and again."""
    ours, peer = pair(timeout=5, kind="tcp", small_buffers=True)
    parts = [os.urandom(5000) if i % 2 else memoryview(os.urandom(70000))[3:]
             for i in range(2 * conn_module.IOV_BATCH + 1)]
    expected = b"".join(bytes(p) for p in parts)
    received = bytearray()

    def read_slowly():
        while len(received) < len(expected):
            chunk = peer.sock.recv(4096)
            if not chunk:
                break
            received.extend(chunk)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, read_slowly)
            await ours.run(Stage.DATA, ours.send_parts, parts)
    assert bytes(received) == expected


def test_recv_exactly_from_a_peer_that_closes_early_names_what_it_waited_for(pair):
    ours, peer = pair()
    peer.sock.sendall(b"abc")
    peer.sock.shutdown(socket.SHUT_WR)
    buf = bytearray(16)
    with pytest.raises(E.PeerClosed) as caught:
        ours.recv_exactly(memoryview(buf), "a packet header")
    assert caught.value.message == \
        "connection closed by the peer while waiting for a packet header"
    assert buf[:3] == b"abc"


async def test_a_peer_that_closes_early_is_named_by_run(pair):
    ours, peer = pair()
    peer.sock.sendall(b"abc")
    peer.close()
    with trio.fail_after(5):
        with pytest.raises(E.PeerClosed) as caught:
            await ours.run(Stage.DATA, ours.recv_bytes, 16, "a packet header")
    err = caught.value
    assert str(err) == ("data channel 3, data: connection closed by the peer while waiting "
                        "for a packet header")
    assert err.side == "sender" and err.peer_may_explain


# --- failures become our errors


async def test_a_silent_peer_is_a_timeout_naming_channel_and_stage(pair):
    ours, _peer = pair(timeout=0.3)
    with trio.fail_after(5):
        start = time.monotonic()
        with pytest.raises(E.PeerTimeout) as caught:
            await ours.run(Stage.SYNC, ours.recv_bytes, 16, "a packet header")
        elapsed = time.monotonic() - start
    err = caught.value
    assert str(err) == "data channel 3, sync: peer silent for 0.3s"
    assert (err.side, err.channel, err.stage) == ("sender", LABEL, Stage.SYNC)
    assert isinstance(err.__cause__, (TimeoutError, BlockingIOError))
    assert 0.25 <= elapsed < 1.5


async def test_establish_bounds_waits_by_the_idle_timeout(pair):
    ours, _peer = pair(timeout=30)
    ours.establish("data channel 7")
    assert ours.label == "data channel 7" and ours.timeout == SENDER.timeouts.idle
    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout, match=r"^data channel 7, data: peer silent for 0.3s$"):
            await ours.run(Stage.DATA, ours.recv_bytes, 1, "a byte")


@pytest.mark.parametrize("kernel_bound", [0.2, 30], ids=["kernel-first", "trio-first"])
async def test_a_greeting_past_its_deadline_is_reported_as_the_handshake_timeout(pair,
                                                                             kernel_bound):
    # Before `establish` the kernel bounds each read by the handshake timeout too; whichever
    # of the two bounds expires first, it is the one deadline, with one message.
    ours, _peer = pair(timeout=kernel_bound)
    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout, match=r"^no hello reply within 1s$"):
            await conn_module.within_handshake(
                SENDER, lambda: ours.run(Stage.HELLO, ours.recv_bytes, 1, "a byte"),
                lambda: E.PeerTimeout("no hello reply within 1s"))


async def test_a_reset_connection_is_peer_closed(pair):
    ours, peer = pair(kind="tcp")
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST instead of FIN
    with trio.fail_after(5):
        with pytest.raises(E.PeerClosed) as caught:
            await ours.run(Stage.DATA, ours.recv_bytes, 16, "a packet header")
    assert str(caught.value).startswith("data channel 3, data: connection lost (")
    assert isinstance(caught.value.__cause__, ConnectionResetError)


async def test_our_own_error_in_the_thread_keeps_its_type_and_gains_its_place(pair):
    ours, _peer = pair()

    def fail():
        raise E.ChecksumMismatch("packet 4: checksum 0 (expected 1)")

    with trio.fail_after(5):
        with pytest.raises(E.ChecksumMismatch) as caught:
            await ours.run(Stage.DATA, fail)
    assert str(caught.value) == "data channel 3, data: packet 4: checksum 0 (expected 1)"
    assert caught.value.__cause__ is None


async def test_a_foreign_error_in_the_thread_is_a_transport_error(pair):
    ours, _peer = pair()

    def fail():
        raise ValueError("not a socket problem")

    with trio.fail_after(5):
        with pytest.raises(E.TransportError) as caught:
            await ours.run(Stage.FINISH, fail)
    assert str(caught.value) == "data channel 3, finish: ValueError('not a socket problem')"
    assert isinstance(caught.value.__cause__, ValueError)


# --- one deadline for the whole send


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("how", ["send_all", "send_parts"])
async def test_a_send_to_a_peer_that_stopped_reading_fails_within_one_timeout(pair, kind, how):
    """The kernel's send timeout restarts with every retry: a send that moved some bytes before
    it expired came back short and was retried, so the failure took two timeouts or more."""
    timeout = 0.5
    ours, _peer = pair(timeout=timeout, kind=kind, small_buffers=True)
    data = os.urandom(4 << 20)
    call = ((ours.send_all, data) if how == "send_all" else
            (ours.send_parts, [memoryview(data)[i:i + (64 << 10)]
                               for i in range(0, len(data), 64 << 10)]))
    with trio.fail_after(10):
        start = time.monotonic()
        with pytest.raises(E.PeerTimeout) as caught:
            await ours.run(Stage.DATA, *call)
        elapsed = time.monotonic() - start
    assert str(caught.value) == "data channel 3, data: peer silent for 0.5s"
    # One timeout (plus scheduling slack), not two: two would be 1.0 s at the least.
    assert timeout * 0.9 <= elapsed < timeout * 1.8


def _read_at(sock: socket.socket, rate: float, stop: threading.Event) -> None:
    """Read from `sock` at about `rate` bytes per second until stopped or the peer leaves."""
    start, got = time.monotonic(), 0
    while not stop.is_set():
        if got > rate * (time.monotonic() - start):
            stop.wait(0.005)  # pacing of the reader, not synchronization
            continue
        try:
            chunk = sock.recv(4096)
        except OSError:
            return
        if not chunk:
            return
        got += len(chunk)


@pytest.mark.parametrize("how", ["send_all", "send_parts"])
async def test_a_send_to_a_slow_reader_has_one_deadline_for_the_whole_call(pair, how):
    """400 KiB to a reader taking 400 KB/s needs about 1 s: with a 0.5 s timeout the call fails
    at its deadline, whether the bytes come as one buffer or as parts in four IOV_BATCH groups
    (each of which the reader takes in about half a timeout).

    TCP: there the kernel's send timeout bounds a whole send() call, which the slow path
    narrows to the time left. (On a Unix socket it restarts with every buffer the kernel
    allocates, so a single send() to a slow reader is not cut short; channels are TCP.)"""
    timeout = 0.5
    ours, peer = pair(timeout=timeout, kind="tcp", small_buffers=True)
    parts = [os.urandom(200) for _ in range(4 * conn_module.IOV_BATCH)]
    call = ((ours.send_all, b"".join(parts)) if how == "send_all" else
            (ours.send_parts, parts))
    stop = threading.Event()
    outcome = None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _read_at, peer.sock, 400e3, stop)
            start = time.monotonic()
            try:
                await ours.run(Stage.DATA, *call)
            except E.MultifdError as exc:
                outcome = exc
            finally:
                elapsed = time.monotonic() - start
                stop.set()
    assert isinstance(outcome, E.PeerTimeout) and elapsed < timeout * 1.8, \
        f"{how} to a slow reader: {outcome!r} after {elapsed:.2f}s (timeout {timeout}s)"


class ShortFirstSend:
    """A socket whose first send or sendmsg moves 1000 bytes and comes back after `delay`, as
    the kernel's does when its timeout expires mid-send; everything else is the socket's."""

    def __init__(self, sock: socket.socket, delay: float) -> None:
        self._sock = sock
        self._delay = delay
        self._first = True

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def _short(self, data) -> int:
        self._first = False
        sent = self._sock.send(bytes(data)[:1000])
        time.sleep(self._delay)  # the simulated kernel wait, not synchronization
        return sent

    def send(self, data) -> int:
        return self._short(data) if self._first else self._sock.send(data)

    def sendmsg(self, parts) -> int:
        return self._short(b"".join(parts)) if self._first else self._sock.sendmsg(parts)


@pytest.mark.parametrize("how", ["send_all", "send_parts"])
async def test_a_short_send_is_retried_with_the_time_left_only(pair, how):
    """The retry gets what is left of the call's timeout (0.2 s of 0.5), and later calls get
    the connection's whole timeout back."""
    timeout = 0.5
    ours, _peer = pair(timeout=timeout, kind="tcp", small_buffers=True)
    ours.sock = ShortFirstSend(ours.sock, delay=0.3)
    data = bytes(4 << 20)
    call = (ours.send_all, data) if how == "send_all" else (ours.send_parts, [data[:10], data])
    with trio.fail_after(10):
        start = time.monotonic()
        with pytest.raises(E.PeerTimeout):
            await ours.run(Stage.DATA, *call)
        elapsed = time.monotonic() - start
    assert timeout * 0.9 <= elapsed < 0.3 + timeout * 0.8  # a fresh timeout would be 0.8 s
    raw = ours.raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.calcsize("ll"))
    sec, usec = struct.unpack("ll", raw)
    assert sec + usec / 1e6 == pytest.approx(timeout, abs=0.01)


# --- cancellation and the conflict detector


@pytest.mark.parametrize("blocked_in", ["recv", "send"])
async def test_cancelling_a_blocked_call_is_prompt_quiet_and_leaves_no_thread(pair, blocked_in):
    ours, peer = pair(timeout=30, small_buffers=True)
    call = ((ours.recv_bytes, 16, "a packet header") if blocked_in == "recv" else
            (ours.send_all, bytes(8 << 20)))
    before = threads_in_our_code()  # another test's leftovers are not this one's doing
    with trio.fail_after(5):
        start = time.monotonic()
        with trio.move_on_after(0.3) as scope:
            await ours.run(Stage.DATA, *call)
        elapsed = time.monotonic() - start
    assert scope.cancelled_caught  # a cancellation, not an error of its own
    assert elapsed < 2.0  # not the 30 s timeout
    # The worker thread left our code with the call, without being waited for.
    assert set(threads_in_our_code()) <= set(before)
    # The guard shut the connection down: the peer sees its end.
    peer.sock.settimeout(5)
    while peer.sock.recv(1 << 20):
        pass
    assert not ours._busy


async def test_a_cancelled_call_does_not_disturb_the_next_conn(pair):
    """Cancelling one connection's call shuts that connection down, and only that one."""
    ours, peer = pair(timeout=30)
    other, other_peer = pair(timeout=5)
    with trio.fail_after(5):
        with trio.move_on_after(0.2):
            await ours.run(Stage.DATA, ours.recv_bytes, 1, "a byte")
        other_peer.sock.sendall(b"still here")
        assert await other.run(Stage.DATA, other.recv_bytes, 10, "x") == b"still here"


async def test_two_operations_at_once_on_one_conn_are_refused(pair):
    ours, peer = pair(timeout=5)
    got = {}

    async def first():
        got["first"] = await ours.run(Stage.DATA, ours.recv_bytes, 5, "the first read")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()  # the first is in its thread
            with pytest.raises(E.LocalProtocolError,
                               match="data channel 3: two operations at once"):
                await ours.run(Stage.DATA, ours.recv_bytes, 5, "a second read")
            # The refused call did not touch the first one: it still gets its bytes.
            peer.sock.sendall(b"hello")
        assert got["first"] == b"hello"
        # Once the first is over, the connection takes the next call.
        peer.sock.sendall(b"again")
        assert await ours.run(Stage.DATA, ours.recv_bytes, 5, "x") == b"again"


async def test_a_failed_call_frees_the_conn(pair):
    ours, peer = pair(timeout=0.2)
    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout):
            await ours.run(Stage.DATA, ours.recv_bytes, 1, "a byte")
        peer.sock.sendall(b"z")
        assert await ours.run(Stage.DATA, ours.recv_bytes, 1, "a byte") == b"z"


@pytest.mark.parametrize("how", ["send_all", "send_parts"])
async def test_an_injected_reset_mid_call_is_the_error_reported(how):
    """A reset closes the socket mid-call: restoring the send timeout on the way out must not
    replace the reset with 'Bad file descriptor'."""
    from multifd.faults import TrippedSocket
    a, b = socket.socketpair()
    conn = Conn(TrippedSocket(a, "reset", 3), "data channel 0", side=Side("sender", Timeouts()),
                timeout=5)
    try:
        with trio.fail_after(5), pytest.raises(E.InjectedFault,
                                               match="reset by an injected fault"):
            if how == "send_all":
                await conn.run(Stage.DATA, conn.send_all, b"12345678")
            else:  # more parts than one sendmsg takes: the multi-batch path
                await conn.run(Stage.DATA, conn.send_parts, [b"x" * 10] * (IOV_BATCH + 88))
    finally:
        b.close()
        a.close()
