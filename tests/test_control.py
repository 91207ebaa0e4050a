"""multifd/control.py over a real socketpair: a sender's and a receiver's control channel.

Covers send()/receive() of every message type and their refusals (an unexpected message, a
WORKING anywhere but before DONE, a peer's ERROR with its control characters defused),
heeding() the channel while a body runs, and the error path: conclude_failure() and
concluding() exchanging reasons within EXPLAIN_GRACE and TELL_GRACE.

Real time throughout (worker threads do the I/O), each test bounded by trio.fail_after.
"""

from __future__ import annotations

import socket
import time

import pytest
import trio

from conftest import trio_wait_until
from multifd import control
from multifd import errors as E
from multifd import wire
from multifd.conn import Conn
from multifd.errors import Stage
from multifd.settings import Timeouts
from multifd.side import Side

FAST = Timeouts(connect=1, handshake=1, idle=2)
DIGEST = bytes(range(16))
SESSION = wire.Session(image_size=12345, page_size=4096, block_pages=16)


@pytest.fixture
def channel():
    """(sender's control channel, receiver's control channel), connected to each other."""
    a, b = socket.socketpair()
    sender = Conn(a, "control channel", side=Side("sender", FAST), timeout=5)
    receiver = Conn(b, "control channel", side=Side("receiver", FAST), timeout=5)
    yield sender, receiver
    a.close()
    b.close()


def raw_send(conn: Conn, *msgs) -> None:
    """Put encoded messages on the wire from the test's own thread (they fit the buffer)."""
    conn.sock.sendall(b"".join(wire.encode_control(m) for m in msgs))


async def read_error(conn: Conn) -> wire.ErrorMessage:
    msg = await conn.run(Stage.EXPLAIN, control._recv_message, conn)
    assert isinstance(msg, wire.ErrorMessage), msg
    return msg


# --- send and receive


@pytest.mark.parametrize("msg", [
    SESSION,
    wire.Ready(),
    wire.Complete(rounds=1, packets=7, pages=100, zero_pages=42, digest=DIGEST),
    wire.Done(bytes=12345, digest=DIGEST),
    wire.Working(),
], ids=lambda m: type(m).__name__)
async def test_each_message_goes_through(channel, msg):
    sender, receiver = channel
    with trio.fail_after(5):
        await control.send(sender, Stage.SETUP, msg)
        assert await control.receive(receiver, Stage.SETUP, type(msg)) == msg
        # and the other way round
        await control.send(receiver, Stage.SETUP, msg)
        assert await control.receive(sender, Stage.SETUP, type(msg)) == msg


async def test_a_receive_reads_one_message_and_no_more(channel):
    sender, receiver = channel
    raw_send(sender, SESSION, wire.Complete(1, 2, 3, 4, DIGEST))
    with trio.fail_after(5):
        assert await control.receive(receiver, Stage.SETUP, wire.Session) == SESSION
        assert await control.receive(receiver, Stage.FINISH, wire.Complete) == \
            wire.Complete(1, 2, 3, 4, DIGEST)


async def test_an_unexpected_message_is_a_protocol_error(channel):
    sender, receiver = channel
    raw_send(sender, wire.Ready(), wire.Done(1, DIGEST))
    with trio.fail_after(5):
        with pytest.raises(E.RemoteProtocolError) as caught:
            await control.receive(receiver, Stage.SETUP, wire.Session)
        assert str(caught.value) == "control channel, setup: got Ready (expected Session)"
        assert caught.value.side == "receiver"
        with pytest.raises(E.RemoteProtocolError,
                           match=r"^control channel, data: got Done \(expected nothing yet\)$"):
            await control.receive(receiver, Stage.DATA, None)


@pytest.mark.parametrize("expected", [wire.Session, wire.Done, None])
async def test_an_error_message_is_the_peers_reason(channel, expected):
    sender, receiver = channel
    raw_send(sender, wire.ErrorMessage(wire.ErrorCode.IMAGE,
                                       "disk \x1b[31mfull\x07 on naïve\nhost\t!"))
    with trio.fail_after(5):
        with pytest.raises(E.PeerError) as caught:
            await control.receive(receiver, Stage.SETUP, expected)
    err = caught.value
    assert err.message == "sender failed: disk ?[31mfull? on naïve?host?!"
    assert (err.side, err.stage) == ("receiver", Stage.SETUP)


async def test_the_receivers_error_is_named_as_the_receivers(channel):
    sender, receiver = channel
    raw_send(receiver, wire.ErrorMessage(wire.ErrorCode.VERIFY, "image digest differs"))
    with trio.fail_after(5):
        with pytest.raises(E.PeerError, match="receiver failed: image digest differs$"):
            await control.receive(sender, Stage.FINISH, wire.Done)


async def test_working_is_accepted_while_waiting_for_done(channel):
    sender, receiver = channel
    raw_send(receiver, wire.Working(), wire.Working(), wire.Working(), wire.Done(9, DIGEST))
    with trio.fail_after(5):
        assert await control.receive(sender, Stage.FINISH, wire.Done) == wire.Done(9, DIGEST)


@pytest.mark.parametrize("expected", [wire.Complete, wire.Ready, wire.Session, None])
async def test_working_is_refused_anywhere_else(channel, expected):
    sender, receiver = channel
    raw_send(sender, wire.Working(), wire.Complete(1, 2, 3, 4, DIGEST))
    with trio.fail_after(5):
        with pytest.raises(E.RemoteProtocolError, match=r"got Working \(expected "):
            await control.receive(receiver, Stage.FINISH, expected)


# --- heeding


async def test_heeding_a_peers_error_cancels_the_body(channel):
    sender, receiver = channel
    body = {}
    with trio.fail_after(5):
        with pytest.raises(E.PeerError, match="sender failed: out of memory$"):
            async with control.heeding(receiver, Stage.DATA, wire.Complete):
                try:
                    await control.send(sender, Stage.DATA,
                                       wire.ErrorMessage(wire.ErrorCode.FAILED, "out of memory"))
                    await trio.sleep_forever()
                except trio.Cancelled:
                    body["cancelled"] = True
                    raise
    assert body == {"cancelled": True}


async def test_heeding_a_wrong_message_is_a_protocol_error(channel):
    sender, receiver = channel
    with trio.fail_after(5):
        with pytest.raises(E.RemoteProtocolError, match=r"got Ready \(expected Complete\)"):
            async with control.heeding(receiver, Stage.DATA, wire.Complete):
                raw_send(sender, wire.Ready())
                await trio.sleep_forever()


async def test_heeding_keeps_an_expected_message_that_came_early(channel):
    sender, receiver = channel
    complete = wire.Complete(1, 10, 20, 5, DIGEST)
    with trio.fail_after(5):
        async with control.heeding(receiver, Stage.DATA, wire.Complete) as heard:
            assert heard.message is None
            raw_send(sender, complete)
            # read in a worker thread: no event to wait on, so the condition is polled
            await trio_wait_until(lambda: heard.message is not None, 5)
    assert heard.message == complete
    # Nothing more was read: the channel is usable for what comes next.
    raw_send(sender, wire.Ready())
    with trio.fail_after(5):
        assert await control.receive(receiver, Stage.FINISH, wire.Ready) == wire.Ready()


async def test_heeding_a_quiet_channel_changes_nothing(channel):
    sender, receiver = channel
    with trio.fail_after(5):
        async with control.heeding(receiver, Stage.DATA, wire.Complete) as heard:
            await trio.sleep(0)
        assert heard.message is None
        # the wait was cancelled, not the connection: it still works
        raw_send(sender, wire.Ready())
        assert await control.receive(receiver, Stage.FINISH, wire.Ready) == wire.Ready()


async def test_heeding_passes_the_bodys_own_error_through_ungrouped(channel):
    _sender, receiver = channel
    with trio.fail_after(5):
        with pytest.raises(E.ChecksumMismatch, match="packet 3"):
            async with control.heeding(receiver, Stage.DATA, wire.Complete):
                raise E.ChecksumMismatch("packet 3: checksum 0 (expected 1)")


async def test_a_message_begun_and_never_finished_is_a_timeout(channel):
    sender, receiver = channel
    frame = wire.encode_control(wire.Complete(1, 2, 3, 4, DIGEST))
    with trio.fail_after(control.EXPLAIN_GRACE + 5):
        start = time.monotonic()
        with pytest.raises(E.PeerTimeout) as caught:
            async with control.heeding(receiver, Stage.DATA, wire.Complete):
                sender.sock.sendall(frame[:5])  # and never the rest
                await trio.sleep_forever()
        elapsed = time.monotonic() - start
    assert str(caught.value) == ("control channel, data: sender began a control message and "
                                 "did not finish it within 2s")
    assert control.EXPLAIN_GRACE * 0.9 <= elapsed < control.EXPLAIN_GRACE + 1.0


async def test_a_cancellation_from_outside_ends_a_begun_read(channel):
    sender, receiver = channel
    frame = wire.encode_control(wire.Complete(1, 2, 3, 4, DIGEST))
    with trio.fail_after(control.EXPLAIN_GRACE + 5):
        start = time.monotonic()
        with trio.move_on_after(0.5) as scope:
            async with control.heeding(receiver, Stage.DATA, wire.Complete):
                sender.sock.sendall(frame[:5])
                await trio.sleep_forever()
        elapsed = time.monotonic() - start
    assert scope.cancelled_caught
    assert elapsed < control.EXPLAIN_GRACE * 0.75


# --- the error path


def test_error_codes():
    cases = [
        (E.ChecksumMismatch("x"), wire.ErrorCode.PROTOCOL),
        (E.LocalProtocolError("x"), wire.ErrorCode.PROTOCOL),
        (E.VerificationError("x"), wire.ErrorCode.VERIFY),
        (E.ImageError("x"), wire.ErrorCode.IMAGE),
        (E.PeerTimeout("x"), wire.ErrorCode.TIMEOUT),
        (E.MissingChannels("x"), wire.ErrorCode.TIMEOUT),
        (E.Terminated("x"), wire.ErrorCode.CANCELLED),
        (E.Interrupted("x"), wire.ErrorCode.CANCELLED),
        (KeyboardInterrupt(), wire.ErrorCode.CANCELLED),
        (E.PeerClosed("x"), wire.ErrorCode.FAILED),
        (E.InjectedFault("x"), wire.ErrorCode.FAILED),
        (ValueError("x"), wire.ErrorCode.FAILED),
    ]
    for err, code in cases:
        assert control.error_code(err) is code, err


async def test_conclude_prefers_the_peers_reason_to_peer_closed(channel):
    sender, receiver = channel
    raw_send(sender, wire.ErrorMessage(wire.ErrorCode.IMAGE, "cannot read image: EIO"))
    ours = E.PeerClosed("connection lost", channel="data channel 1", stage=Stage.DATA)
    with trio.fail_after(5):
        reported = await control.conclude_failure(
            receiver, ExceptionGroup("migration", [ours]))
    assert isinstance(reported, E.PeerError)
    assert reported.message == "sender failed: cannot read image: EIO"
    assert reported.__cause__ is ours


async def test_conclude_tells_our_own_error_within_tell_grace(channel):
    sender, receiver = channel
    ours = E.ChecksumMismatch("packet 3: checksum 1 (expected 2)", channel="data channel 2",
                              stage=Stage.DATA)
    with trio.fail_after(5):
        start = time.monotonic()
        reported = await control.conclude_failure(receiver, ours)
        elapsed = time.monotonic() - start
        told = await read_error(sender)
    assert reported is ours
    assert elapsed < control.TELL_GRACE
    assert told == wire.ErrorMessage(wire.ErrorCode.PROTOCOL,
                                     "data channel 2, data: packet 3: checksum 1 (expected 2)")


async def test_conclude_tells_ours_once_the_silent_peer_had_its_chance(channel):
    sender, receiver = channel
    ours = E.PeerClosed("connection lost", channel="data channel 0", stage=Stage.DATA)
    with trio.fail_after(control.EXPLAIN_GRACE + 5):
        start = time.monotonic()
        reported = await control.conclude_failure(receiver, ours)
        elapsed = time.monotonic() - start
        told = await read_error(sender)
    assert reported is ours
    assert control.EXPLAIN_GRACE * 0.9 <= elapsed < (control.EXPLAIN_GRACE +
                                                     control.TELL_GRACE + 0.5)
    assert told.text == "data channel 0, data: connection lost"


async def test_conclude_with_a_peer_gone_returns_at_once(channel):
    sender, receiver = channel
    sender.close()
    ours = E.PeerClosed("connection lost")
    with trio.fail_after(5):
        start = time.monotonic()
        assert await control.conclude_failure(receiver, ours) is ours
        assert time.monotonic() - start < control.TELL_GRACE


async def test_conclude_bounds_the_telling_by_tell_grace(channel):
    """A peer that stopped reading cannot hold our report back."""
    sender, receiver = channel
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.sock.setblocking(False)
    try:
        while True:  # fill the connection: the ERROR will find no room
            receiver.sock.send(bytes(4096))
    except BlockingIOError:
        pass
    receiver.set_timeout(30)  # back to blocking, with a bound far beyond the grace
    ours = E.VerificationError("digest differs")
    with trio.fail_after(5):
        start = time.monotonic()
        assert await control.conclude_failure(receiver, ours) is ours
        elapsed = time.monotonic() - start
    assert control.TELL_GRACE * 0.9 <= elapsed < control.TELL_GRACE + 0.5


async def test_conclude_is_not_cut_short_by_the_cancellation_that_brought_it(channel):
    sender, receiver = channel
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            cancelled = None
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled as exc:
                cancelled = exc
                reported = await control.conclude_failure(receiver, exc)
                raise
        assert reported is cancelled
        told = await read_error(sender)
    assert told == wire.ErrorMessage(wire.ErrorCode.CANCELLED, "cancelled")


async def test_conclude_tells_why_the_run_was_cancelled(channel):
    sender, receiver = channel
    control.cancel_reason.set("terminated by signal")
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled as exc:
                await control.conclude_failure(receiver, exc)
                raise
        told = await read_error(sender)
    assert told == wire.ErrorMessage(wire.ErrorCode.CANCELLED, "terminated by signal")


async def test_conclude_passes_a_peer_error_through_without_a_word(channel):
    sender, receiver = channel
    theirs = E.PeerError("sender failed: boom")
    with trio.fail_after(5):
        assert await control.conclude_failure(receiver, theirs) is theirs
        assert await control.conclude_failure(None, ExceptionGroup("g", [theirs])) is theirs
    # nothing was sent
    sender.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sender.sock.recv(1)


async def test_concluding_reraises_our_error_after_telling_it(channel):
    sender, receiver = channel
    ours = E.ImageError("writing out.img: No space left on device")
    with trio.fail_after(5):
        with pytest.raises(E.ImageError) as caught:
            async with control.concluding(lambda: receiver):
                raise ours
        assert caught.value is ours
        told = await read_error(sender)
    assert told == wire.ErrorMessage(wire.ErrorCode.IMAGE,
                                     "writing out.img: No space left on device")


async def test_concluding_raises_the_peers_reason_instead(channel):
    sender, receiver = channel
    with trio.fail_after(5):
        with pytest.raises(E.PeerError, match="sender failed: source image vanished$") as caught:
            async with control.concluding(lambda: receiver):
                raw_send(sender, wire.ErrorMessage(wire.ErrorCode.IMAGE,
                                                   "source image vanished"))
                raise E.PeerClosed("connection lost", channel="data channel 0")
    assert caught.value.__suppress_context__


async def test_concluding_without_a_channel_reports_the_groups_first_error():
    early = E.PeerTimeout("silent")
    late = E.PeerClosed("gone")
    with trio.fail_after(5):
        with pytest.raises(E.PeerTimeout) as caught:
            async with control.concluding(lambda: None):
                raise ExceptionGroup("migration", [late, early])
    assert caught.value is early
