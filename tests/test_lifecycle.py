"""In-process lifecycle tests over real loopback TCP: setup, rejection, cancellation, cleanup.

Cleanup is checked, not assumed: after each scenario no thread may still be running code of
this package (trio keeps idle worker threads cached for reuse; those run none of ours), and
the process has no more open file descriptors than before.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from contextlib import asynccontextmanager

import pytest
import trio

from conftest import tcp_sockets_of, trio_wait_until
from multifd import errors as E
from multifd import wire
from multifd.recv import open_listeners, receive_image
from multifd.send import dial, send_image
from multifd.settings import Timeouts
from multifd.side import Side

FAST = Timeouts(connect=2, handshake=1, idle=3)
SENDER = Side("sender", FAST)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def _listen():
    listeners = await open_listeners("127.0.0.1", 0)
    return listeners, listeners[0].socket.getsockname()[1]


async def test_migration_in_process_and_cleanup(clean, image, tmp_path):
    listeners, port = await _listen()
    out = str(tmp_path / "out")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result = {}

            async def recv():
                result["recv"] = await receive_image(listeners, out, timeouts=FAST,
                                                     log=lambda m: None)
            nursery.start_soon(recv)
            report = await send_image("127.0.0.1", port, image, channels=5, timeouts=FAST)
    for listener in listeners:
        await listener.aclose()
    assert report.ok and result["recv"].digest == report.digest
    assert _read(out) == _read(image)


async def test_data_channels_before_control(clean, image, tmp_path):
    """Channels are told apart by their hello, not arrival order (QEMU's mistake): data
    channels whose hellos the receiver has read before any control channel exists wait,
    unanswered, and are taken once their control channel comes."""
    listeners, port = await _listen()
    out = str(tmp_path / "out")
    sid = uuid.uuid4().bytes
    n = 3
    data = []
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: receive_image(listeners, out, timeouts=FAST,
                                                         log=lambda line: None))
                for i in range(n):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    data.append(sock)
                    sock.sendall(wire.encode_hello(wire.Hello(wire.Role.DATA, sid, i, n)))
                    sock.setblocking(False)
                ours = {sock.getsockname()[1] for sock in data}

                def hellos_read() -> bool:
                    """Every data hello delivered (nothing unacknowledged on our ends) and
                    read (nothing unread on the receiver's)."""
                    mine = [t for t in tcp_sockets_of(port, "client") if t.local_port in ours]
                    theirs = [t for t in tcp_sockets_of(port) if t.remote_port in ours]
                    return len(mine) == len(theirs) == n and not any(
                        t.tx_queue for t in mine) and not any(t.rx_queue for t in theirs)
                await trio_wait_until(hellos_read, 10, "the receiver read the data hellos")
                for sock in data:  # and answered none: no session is known yet
                    with pytest.raises(BlockingIOError):
                        sock.recv(wire.HELLO_REPLY.size)
                control = await dial("127.0.0.1", port,
                                     wire.Hello(wire.Role.CONTROL, sid, 0, n), SENDER)
                for sock in data:
                    reply = b""
                    stream = trio.socket.from_stdlib_socket(sock)
                    while len(reply) < wire.HELLO_REPLY.size:
                        chunk = await stream.recv(wire.HELLO_REPLY.size - len(reply))
                        assert chunk, "the receiver closed a data channel"
                        reply += chunk
                    assert wire.decode_hello_reply(reply) is wire.HelloStatus.OK
                control.close()
                nursery.cancel_scope.cancel()
    finally:
        for sock in data:
            sock.close()
    for listener in listeners:
        await listener.aclose()
    assert not os.path.exists(out)


async def test_rejected_hellos_name_the_reason(clean, tmp_path):
    listeners, port = await _listen()
    sid, other = uuid.uuid4().bytes, uuid.uuid4().bytes
    logs = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: receive_image(listeners, None, timeouts=Timeouts(
                connect=2, handshake=5, idle=3), log=logs.append))
            control = await dial("127.0.0.1", port, wire.Hello(wire.Role.CONTROL, sid, 0, 2),
                                 SENDER)
            good = await dial("127.0.0.1", port, wire.Hello(wire.Role.DATA, sid, 0, 2), SENDER)
            cases = [
                (wire.Hello(wire.Role.DATA, other, 1, 2), "unknown session"),
                (wire.Hello(wire.Role.DATA, sid, 0, 2), "duplicate channel id"),
                (wire.Hello(wire.Role.DATA, sid, 1, 3), "out of range"),
                (wire.Hello(wire.Role.CONTROL, other, 0, 2), "busy"),
            ]
            for hello, reason in cases:
                with pytest.raises(E.RemoteProtocolError, match=reason):
                    await dial("127.0.0.1", port, hello, SENDER)
            # The id equal to the count is refused by the receiver's decoder (>=, not >).
            raw = wire.encode_hello(wire.Hello(wire.Role.DATA, sid, 0, 2))
            bad = raw[:24] + (2).to_bytes(2, "big") + raw[26:]
            s = trio.socket.socket()
            await s.connect(("127.0.0.1", port))
            await s.send(bad)
            reply = await s.recv(8)
            assert wire.decode_hello_reply(reply) is wire.HelloStatus.BAD_CHANNEL
            s.close()
            await trio_wait_until(lambda: len([m for m in logs if "dropped" in m]) >= 5, 10,
                                  "5 dropped connections logged")
            control.close()
            good.close()
            nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    # One drop line per rejected hello, each naming the channel it claimed and the reason.
    dropped = [m for m in logs if "dropped" in m]
    expected = [("data channel 1", "unknown session"), ("data channel 0", "duplicate channel id"),
                ("data channel 1", "out of range"), ("control channel", "busy"),
                ("connection", "channel id 2 out of range")]
    assert len(dropped) == len(expected), logs
    for label, reason in expected:
        assert [m for m in dropped if m.startswith(f"dropped {label} from 127.0.0.1:")
                and reason in m.split(": hello: ", 1)[1]], (label, reason, logs)


async def _fake_receiver(listener, *, reject_channel=None):
    """Speaks just enough protocol: hellos (optionally rejecting one, once every other data
    channel was accepted), READY, then silence."""
    answered = []  # the data channels accepted
    others_answered = trio.Event()
    async with trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()

            async def serve(stream=stream):
                async with stream:
                    await speak(stream)

            async def speak(stream):
                hello = wire.decode_hello(await _recv_exactly(stream, wire.HELLO.size))
                if hello.role is wire.Role.DATA and hello.channel == reject_channel:
                    await others_answered.wait()  # the others are established: they get going
                    await stream.send_all(wire.encode_hello_reply(wire.HelloStatus.BAD_CHANNEL))
                    return
                await stream.send_all(wire.encode_hello_reply(wire.HelloStatus.OK))
                if hello.role is wire.Role.DATA:
                    answered.append(hello.channel)
                    if len(answered) == hello.channels - 1:
                        others_answered.set()
                if hello.role is wire.Role.CONTROL:
                    await _recv_exactly(stream, wire.FRAME.size + wire.SESSION.size)
                    await stream.send_all(wire.encode_control(wire.Ready()))
                await trio.sleep_forever()  # never reads data: the sender's sends block
            nursery.start_soon(serve)


async def _recv_exactly(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


@asynccontextmanager
async def fake_receiver(**behaviour):
    """A port served by _fake_receiver for the body's duration, bounded by 10 s."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(_fake_receiver, listener, **behaviour))
            yield listener.socket.getsockname()[1]
            nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_one_rejected_channel_fails_setup_and_closes_the_rest(clean, image):
    async with fake_receiver(reject_channel=5) as port:
        with pytest.raises(E.RemoteProtocolError) as info:
            await send_image("127.0.0.1", port, image, channels=8, timeouts=FAST)
    assert info.value.channel == "data channel 5" and info.value.stage == "hello"


async def test_cancel_while_the_receiver_stopped_reading(clean, big_image):
    """QEMU's cancel hang: every sender blocked in send; cancellation must unblock them all."""
    async with fake_receiver() as port:
        with trio.move_on_after(1.0) as scope:
            await send_image("127.0.0.1", port, big_image, channels=4,
                             timeouts=Timeouts(connect=2, handshake=2, idle=60))
        assert scope.cancelled_caught


async def test_silent_receiver_times_out_naming_channel_and_stage(clean, big_image):
    async with fake_receiver() as port:
        with pytest.raises(E.PeerTimeout) as info:
            await send_image("127.0.0.1", port, big_image, channels=2,
                             timeouts=Timeouts(connect=2, handshake=2, idle=1))
    assert info.value.stage == "data" and info.value.channel.startswith("data channel")


async def test_missing_data_channel_times_out_and_tells_the_sender(clean, tmp_path):
    listeners, port = await _listen()
    sid = uuid.uuid4().bytes
    outdir = tmp_path / "out"
    outdir.mkdir()
    failures = []

    async def recv():
        try:
            await receive_image(listeners, str(outdir / "o"), timeouts=FAST, log=lambda m: None)
        except E.PeerTimeout as exc:
            failures.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recv)
            control = await dial("127.0.0.1", port, wire.Hello(wire.Role.CONTROL, sid, 0, 2),
                                 SENDER)
            data0 = await dial("127.0.0.1", port, wire.Hello(wire.Role.DATA, sid, 0, 2), SENDER)
            control.set_timeout(8)  # the receiver first waits for our reason, then says its own
            head = await control.run("test", control.recv_bytes, wire.FRAME.size, "frame")
            kind, _, _, length = wire.FRAME.unpack(head)
            body = await control.run("test", control.recv_bytes, length, "body")
            control.close()
            data0.close()
    for listener in listeners:
        await listener.aclose()
    assert kind == wire.ControlType.ERROR and b"data channel 1 did not arrive" in body
    assert "data channel 1 did not arrive" in str(failures[0])
    assert os.listdir(outdir) == []
