"""multifd/registry.py: sorting connections into one migration's channels.

First the Registry as plain state (claim, claiming, fill, missing), table-driven; then the
front door over real loopback sockets: strangers dropped and logged while a real migration's
channels register, a data channel that comes before its control channel, and
wait_for_channels() naming the channels that never came.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest
import trio

from conftest import trio_wait_until
from multifd import errors as E
from multifd import wire
from multifd.registry import Registry, open_registry, wait_for_channels
from multifd.settings import Timeouts
from multifd.side import Side

S = wire.HelloStatus
SID, OTHER = uuid.uuid4().bytes, uuid.uuid4().bytes
TIMEOUTS = Timeouts(connect=1, handshake=1, idle=2)


def control_hello(channels: int = 3, session: bytes = SID) -> wire.Hello:
    return wire.Hello(wire.Role.CONTROL, session, 0, channels)


def data_hello(channel: int, channels: int = 3, session: bytes = SID) -> wire.Hello:
    return wire.Hello(wire.Role.DATA, session, channel, channels)


class FakeConn:
    closed = False

    def close(self) -> None:
        self.closed = True


def registered(channels: int = 3) -> Registry:
    """A registry whose control channel (of `channels` data channels) is established."""
    registry = Registry()
    assert registry.claim(control_hello(channels)) is S.OK
    registry.fill(control_hello(channels), FakeConn())
    return registry


# --- plain state


def test_a_data_channel_before_any_session_is_unknown():
    registry = Registry()
    assert registry.claim(data_hello(0)) is S.UNKNOWN_SESSION
    # a control hello claimed but not yet established names no session either
    assert registry.claim(control_hello()) is S.OK
    assert registry.claim(data_hello(0)) is S.UNKNOWN_SESSION
    assert not registry.session_known.is_set()


@pytest.mark.parametrize("hello, status", [
    (control_hello(), S.BUSY),
    (control_hello(session=OTHER), S.BUSY),
    (data_hello(1, session=OTHER), S.UNKNOWN_SESSION),
    (data_hello(1, channels=4, session=OTHER), S.UNKNOWN_SESSION),  # session checked first
    (data_hello(1, channels=4), S.BAD_CHANNEL),
    (data_hello(0, channels=2), S.BAD_CHANNEL),
    (data_hello(0), S.DUPLICATE_CHANNEL),
    (data_hello(1), S.OK),
    (data_hello(2), S.OK),
])
def test_claim_once_the_session_is_known(hello, status):
    registry = registered(3)
    assert registry.claim(data_hello(0)) is S.OK
    assert registry.claim(hello) is status


def test_fill_names_the_session_and_completes_with_the_last_channel():
    registry = Registry()
    control = FakeConn()
    registry.claim(control_hello(3))
    registry.fill(control_hello(3), control)
    assert (registry.session_id, registry.channels) == (SID, 3)
    assert registry.session_known.is_set()
    assert registry.missing() == [0, 1, 2]
    for channel in (2, 0):
        assert registry.claim(data_hello(channel)) is S.OK
        registry.fill(data_hello(channel), FakeConn())
    assert registry.missing() == [1]
    assert not registry.complete.is_set()
    registry.claim(data_hello(1))
    registry.fill(data_hello(1), FakeConn())
    assert registry.missing() == []
    assert registry.complete.is_set()
    assert registry.control is control
    conns = [registry.control, *registry.data.values()]
    registry.close_all()
    assert all(c.closed for c in conns)


def test_a_failed_claiming_block_gives_the_slot_back():
    registry = registered(3)
    with pytest.raises(E.PeerTimeout):
        with registry.claiming(data_hello(1)) as status:
            assert status is S.OK
            raise E.PeerTimeout("the reply could not be sent")
    with registry.claiming(data_hello(1)) as status:  # the retry gets the slot
        assert status is S.OK
    assert registry.claim(data_hello(1)) is S.DUPLICATE_CHANNEL  # and keeps it


def test_a_failed_control_claiming_gives_the_control_slot_back():
    registry = Registry()
    with pytest.raises(E.PeerClosed):
        with registry.claiming(control_hello()):
            raise E.PeerClosed("gone before its reply")
    assert registry.claim(control_hello(session=OTHER)) is S.OK


@pytest.mark.parametrize("holder, refused, status", [
    (control_hello(), control_hello(session=OTHER), S.BUSY),
    (data_hello(2), data_hello(2), S.DUPLICATE_CHANNEL),
])
def test_a_refused_claim_that_fails_leaves_the_holders_slot_alone(holder, refused, status):
    registry = registered(3) if holder.role is wire.Role.DATA else Registry()
    assert registry.claim(holder) is S.OK
    with pytest.raises(E.RemoteProtocolError):
        with registry.claiming(refused) as got:
            assert got is status
            raise E.RemoteProtocolError("refused")  # what the reply of a refusal does
    assert registry.claim(refused) is status


# --- the front door, over loopback


@pytest.fixture
async def front_door():
    """(registry, port, side, logs): open_registry() serving a fresh loopback port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    logs: list[str] = []
    side = Side("receiver", TIMEOUTS, log=logs.append)
    try:
        async with open_registry(listeners, side) as registry:
            yield registry, listeners[0].socket.getsockname()[1], side, logs
    finally:
        for listener in listeners:
            await listener.aclose()


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def _say_hello(port: int, hello: wire.Hello) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(wire.encode_hello(hello))
    return stream


async def _reply(stream: trio.SocketStream) -> wire.HelloStatus:
    return wire.decode_hello_reply(await _receive_exactly(stream, wire.HELLO_REPLY.size))


async def test_a_stranger_is_dropped_while_the_migration_registers(front_door):
    registry, port, _side, logs = front_door
    streams = []
    with trio.fail_after(5):
        stranger = await trio.open_tcp_stream("127.0.0.1", port)
        streams.append(stranger)
        where = "127.0.0.1:%d" % stranger.socket.getsockname()[1]
        await stranger.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(wire.HELLO.size))
        for hello in (control_hello(2), data_hello(0, 2), data_hello(1, 2)):
            streams.append(stream := await _say_hello(port, hello))
            assert await _reply(stream) is S.OK
        await registry.complete.wait()
        # The stranger got no reply (it does not speak our protocol): only the end.
        assert await stranger.receive_some(100) == b""
        await trio_wait_until(lambda: logs, 5)
    assert registry.control is not None and sorted(registry.data) == [0, 1]
    assert (registry.session_id, registry.channels) == (SID, 2)
    assert logs == [f"dropped connection from {where}: hello: bad magic 0x47455420 "
                    f"(expected 0x{wire.MAGIC:08x})"]
    for stream in streams:
        await stream.aclose()


async def test_refused_hellos_get_a_reply_and_are_logged(front_door):
    registry, port, _side, logs = front_door
    streams = []
    with trio.fail_after(5):
        for hello in (control_hello(2), data_hello(0, 2)):
            streams.append(stream := await _say_hello(port, hello))
            assert await _reply(stream) is S.OK
        for hello, status in ((data_hello(0, 2), S.DUPLICATE_CHANNEL),
                              (control_hello(2, session=OTHER), S.BUSY),
                              (data_hello(1, 2, session=OTHER), S.UNKNOWN_SESSION)):
            streams.append(stream := await _say_hello(port, hello))
            assert await _reply(stream) is status
            assert await stream.receive_some(100) == b""  # and closed
        await trio_wait_until(lambda: len(logs) == 3, 5)
    assert [re.sub(r"from \S+:", "from X:", m) for m in logs] == [
        "dropped data channel 0 from X: hello: duplicate channel id",
        "dropped control channel from X: hello: receiver is busy with another migration",
        "dropped data channel 1 from X: hello: unknown session",
    ]
    # The refusals took nothing: the one data channel missing can still come.
    assert registry.missing() == [1]
    streams.append(stream := await _say_hello(port, data_hello(1, 2)))
    with trio.fail_after(5):
        assert await _reply(stream) is S.OK
        await registry.complete.wait()
    for stream in streams:
        await stream.aclose()


async def test_a_stranger_that_never_finishes_its_hello_is_dropped_after_the_timeout(
        front_door):
    _registry, port, side, logs = front_door
    with trio.fail_after(side.timeouts.handshake + 5):
        stranger = await trio.open_tcp_stream("127.0.0.1", port)
        start = time.monotonic()
        await stranger.send_all(wire.MAGIC_BYTES)  # and no more
        assert await stranger.receive_some(100) == b""
        elapsed = time.monotonic() - start
        await trio_wait_until(lambda: logs, 5)
    assert side.timeouts.handshake * 0.9 <= elapsed < side.timeouts.handshake + 1.0
    assert re.fullmatch(r"dropped connection from 127\.0\.0\.1:\d+: hello: no complete hello "
                        r"within 1s", logs[0]), logs
    await stranger.aclose()


async def test_a_data_channel_before_its_control_channel_waits_and_registers(front_door):
    registry, port, _side, logs = front_door
    with trio.fail_after(5):
        early = await _say_hello(port, data_hello(1, 2))
        # No reply while the session is unknown (checked over a short window).
        with trio.move_on_after(0.3):
            await early.receive_some(1)
            raise AssertionError("a data channel was answered before its session was known")
        assert not registry.data
        control = await _say_hello(port, control_hello(2))
        assert await _reply(control) is S.OK
        assert await _reply(early) is S.OK
        await trio_wait_until(lambda: 1 in registry.data, 5)
        late = await _say_hello(port, data_hello(0, 2))
        assert await _reply(late) is S.OK
        await registry.complete.wait()
    assert logs == []
    for stream in (early, control, late):
        await stream.aclose()


async def test_a_data_channel_whose_control_never_comes_is_dropped(front_door):
    registry, port, side, logs = front_door
    with trio.fail_after(side.timeouts.handshake + 5):
        early = await _say_hello(port, data_hello(0, 2))
        assert await early.receive_some(100) == b""
        await trio_wait_until(lambda: logs, 5)
    assert re.fullmatch(r"dropped data channel 0 from 127\.0\.0\.1:\d+: hello: no control "
                        r"channel arrived within 1s", logs[0]), logs
    assert not registry.data
    await early.aclose()


@pytest.mark.parametrize("arrive, missing", [((0, 2), "channels 1, 3"), ((0, 1, 3), "channel 2")])
async def test_wait_for_channels_names_the_missing_channels(front_door, arrive, missing):
    registry, port, side, _logs = front_door
    streams = []
    with trio.fail_after(side.timeouts.handshake + 5):
        for hello in (control_hello(4), *(data_hello(i, 4) for i in arrive)):
            streams.append(stream := await _say_hello(port, hello))
            assert await _reply(stream) is S.OK
        await trio_wait_until(lambda: len(registry.data) == len(arrive), 5)
        start = time.monotonic()
        with pytest.raises(E.MissingChannels) as caught:
            await wait_for_channels(registry, side)
        elapsed = time.monotonic() - start
    err = caught.value
    assert err.message == (f"data {missing} did not arrive within 1s ({len(arrive)} of 4 data "
                           f"channels connected)")
    assert (err.side, err.stage) == ("receiver", "setup")
    assert side.timeouts.handshake * 0.9 <= elapsed < side.timeouts.handshake + 1.0
    for stream in streams:
        await stream.aclose()


async def test_wait_for_channels_ends_at_once_when_the_sender_gives_up(front_door):
    registry, port, side, _logs = front_door
    with trio.fail_after(5):
        control = await _say_hello(port, control_hello(2))
        assert await _reply(control) is S.OK
        data = await _say_hello(port, data_hello(0, 2))
        assert await _reply(data) is S.OK
        await trio_wait_until(lambda: registry.data, 5)
        await control.send_all(wire.encode_control(wire.ErrorMessage(
            wire.ErrorCode.FAILED, "data channel 1: connect: connection refused")))
        start = time.monotonic()
        with pytest.raises(E.PeerError,
                           match="sender failed: data channel 1: connect: connection refused$"):
            await wait_for_channels(registry, side)
    assert time.monotonic() - start < side.timeouts.handshake * 0.5
    for stream in (control, data):
        await stream.aclose()


async def test_wait_for_channels_returns_once_all_have_come(front_door):
    registry, port, side, _logs = front_door
    streams = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            result = {}

            async def wait():
                result["session"] = await wait_for_channels(registry, side)
            nursery.start_soon(wait)
            for hello in (data_hello(2), control_hello(), data_hello(0), data_hello(1)):
                streams.append(stream := await _say_hello(port, hello))
            for stream in streams:
                assert await _reply(stream) is S.OK
    assert result["session"] is None  # the sender said nothing yet
    assert sorted(registry.data) == [0, 1, 2]
    for stream in streams:
        await stream.aclose()
