"""The control channel: one message at a time, half duplex, and the error path.

The control channel is never read and written at the same time: the sender speaks (SESSION,
COMPLETE) and then waits for one answer (READY, DONE). While data flows nobody touches it, so
when something fails either side can still use it to say why, and the other side can read that
explanation once its data channels have broken.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from . import errors as E
from . import wire
from .conn import Conn
from .errors import Stage, first_error

# After the first failure a side waits at most EXPLAIN_GRACE for the peer's reason (only when
# its own error says no more than "the peer went away"), then at most TELL_GRACE to send its
# own: a side whose peer fell silent ends within TELL_GRACE of its timeout.
EXPLAIN_GRACE = 2.0
TELL_GRACE = 0.5

# Why this run is being cancelled, for the peer's benefit (set by whoever cancels it, e.g. the
# SIGTERM watcher): a task that only sees trio.Cancelled cannot know.
cancel_reason = trio.lowlevel.RunVar("cancel_reason", default="cancelled")


def _printable(text: str) -> str:
    """The peer's words go to our terminal: no control characters or escape sequences."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _recv_message(conn: Conn) -> wire.ControlMessage:
    decoder = wire.ControlDecoder()
    while (msg := decoder.next_message()) is None:
        decoder.feed(conn.recv_bytes(decoder.bytes_needed(), "a control message"))
    return msg


async def send(conn: Conn, stage: Stage, msg: wire.ControlMessage) -> None:
    await conn.run(stage, conn.send_all, wire.encode_control(msg))


async def receive(conn: Conn, stage: Stage, expected: type | None):
    """The next message, which must be `expected` (None: no message may come); a peer's ERROR
    becomes PeerError.

    WORKING may come only before DONE: each one restarts the idle timeout there. Anywhere
    else it is a protocol error, so a peer cannot use it to defeat the timeout."""
    peer = conn.side.peer
    while (isinstance(msg := await conn.run(stage, _recv_message, conn), wire.Working)
           and expected is wire.Done):
        pass
    if isinstance(msg, wire.ErrorMessage):
        raise E.PeerError(f"{peer} failed: {_printable(msg.text)}", side=conn.side.name,
                          stage=stage)
    if expected is None or not isinstance(msg, expected):
        raise E.RemoteProtocolError(
            f"got {type(msg).__name__} (expected "
            f"{expected.__name__ if expected else 'nothing yet'})", side=conn.side.name,
            channel=conn.label, stage=stage)
    return msg


class Heard:
    """What heeding() read: the expected message if it came early, else None."""

    message = None


@asynccontextmanager
async def heeding(conn: Conn, stage: Stage, expected: type | None):
    """Heed the control channel while the body runs, when the peer has nothing to say on it
    yet but its reason for giving up (or, a moment early, `expected`).

    Heeding is waiting for the channel to become readable, without reading: trio's own wait,
    which the end of the body cancels harmlessly. Once the peer has begun a message, it is
    read whole (as receive() does: an ERROR raises PeerError, which cancels the body) before
    this exits, but within EXPLAIN_GRACE: a peer that sends part of a message and stops is a
    timeout. A cancellation from outside (a signal, a deadline) ends the read too."""
    heard = Heard()
    failure = None
    try:
        async with trio.open_nursery() as nursery:
            waiting = await nursery.start(_heed, conn, stage, expected, heard)
            try:
                yield heard
            except BaseException as exc:
                # Not the nursery's to cancel: a message begun is read to its end (it may be
                # the peer's reason for what just failed here). A cancellation from outside
                # reaches the reader anyway.
                failure = exc
            waiting.cancel()
    except BaseException as exc:
        raise first_error(BaseExceptionGroup("heeding", [exc] if failure is None
                                             else [failure, exc])) from None
    if failure is not None:
        raise failure


async def _heed(conn: Conn, stage: Stage, expected: type | None, heard: Heard,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as waiting:
        task_status.started(waiting)
        await conn.wait_readable()
    if waiting.cancelled_caught:
        return
    with trio.move_on_after(EXPLAIN_GRACE):
        heard.message = await receive(conn, stage, expected)
        return
    raise E.PeerTimeout(f"{conn.side.peer} began a control message and did not finish it "
                        f"within {EXPLAIN_GRACE:g}s", side=conn.side.name, channel=conn.label,
                        stage=stage)


def error_code(err: BaseException) -> wire.ErrorCode:
    for cls, code in ((E.ProtocolError, wire.ErrorCode.PROTOCOL),
                      (E.VerificationError, wire.ErrorCode.VERIFY),
                      (E.ImageError, wire.ErrorCode.IMAGE),
                      (E.PeerTimeout, wire.ErrorCode.TIMEOUT),
                      (E.Terminated, wire.ErrorCode.CANCELLED),
                      (E.Interrupted, wire.ErrorCode.CANCELLED),
                      (trio.Cancelled, wire.ErrorCode.CANCELLED),
                      (KeyboardInterrupt, wire.ErrorCode.CANCELLED)):
        if isinstance(err, cls):
            return code
    return wire.ErrorCode.FAILED


async def conclude_failure(conn: Conn | None, exc: BaseException) -> BaseException:
    """Exchange reasons with the peer after a failure; return the error to report.

    `exc` is what the migration raised, possibly a group: its first error is the cause.

    If our error only says the peer went away or never came (`peer_may_explain`), the peer's
    own explanation (if it sent one in time) is the better report. Otherwise we send ours, so
    the peer can say why. Runs shielded and bounded: it is cleanup, and cleanup must neither
    hang nor be cut short by the cancellation that brought us here.
    """
    err = first_error(exc)
    if conn is None or isinstance(err, E.PeerError):
        return err
    with trio.CancelScope(shield=True):
        if isinstance(err, E.MultifdError) and err.peer_may_explain:
            # A socket timeout, not a cancel scope, bounds this read: cancelling would shut the
            # socket down, and we may still need it to send our own reason. The scope is only a
            # backstop, for a peer that trickles its message byte by byte.
            conn.set_timeout(EXPLAIN_GRACE)
            with trio.move_on_after(EXPLAIN_GRACE + TELL_GRACE):
                try:
                    msg = await conn.run(Stage.EXPLAIN, _recv_message, conn)
                except (E.MultifdError, OSError):
                    msg = None
                if isinstance(msg, wire.ErrorMessage):
                    explained = E.PeerError(f"{conn.side.peer} failed: {_printable(msg.text)}",
                                            side=conn.side.name)
                    explained.__cause__ = err
                    return explained
        await tell_peer(conn, err)
    return err


@asynccontextmanager
async def concluding(control_channel):
    """Run the body; if it fails, conclude_failure() on the control channel and raise the
    error that makes the report. `control_channel()` gives the channel as it is when the
    failure comes (the receiver's may not exist yet: then there is nobody to tell)."""
    try:
        yield
    except BaseException as exc:
        reported = await conclude_failure(control_channel(), exc)
        if reported is exc:
            raise
        raise reported from None


async def tell_peer(conn: Conn, err: BaseException) -> None:
    """Send our reason on the control channel: best effort, shielded, bounded."""
    text = (str(err) if isinstance(err, E.MultifdError) else
            "interrupted" if isinstance(err, KeyboardInterrupt) else cancel_reason.get())
    with trio.CancelScope(shield=True), trio.move_on_after(TELL_GRACE):
        try:
            await conn.run(Stage.EXPLAIN, conn.send_all,
                           wire.encode_control(wire.ErrorMessage(error_code(err), text)))
        except (E.MultifdError, OSError):
            pass
