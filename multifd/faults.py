"""Fault injection: break any channel at any stage, on purpose, to watch it fail cleanly.

Faults are data: Fault(action, where, params) records parsed from `--fault SPEC` flags, held
by one Faults object per side. The transport reaches that object through its side
(`Side.faults`, also `conn.side.faults`) and calls one seam where it does the thing the seam
names: connecting, the TLS handshake, the hello, each packet, the socket under an
established channel, the output file's writes, and the named phases. With no --fault every
seam hands back what it was given.

    SPEC  := ACTION [ "@" WHERE ] [ ":" KEY "=" VALUE { "," KEY "=" VALUE } ]
    WHERE := N (data channel N) | "control" | "all"          (default: all)
             (multifd-recv --qemu: N is QEMU's multifd channel N, "main" = "control")

Actions, the side that takes them, and their parameters:

    refuse            both  the channel's connection is refused (receiver: closed at its hello)
    delay             both  the channel's connection waits seconds=DURATION (default 5) first
    tls-stall         both  the channel never completes its TLS handshake
    tls-abort         both  the channel's connection is closed in the middle of its handshake
    bad-magic, bad-version, bad-session, bad-channel, dup-channel
                      send  the channel's hello is corrupt (dup-channel: it claims the id of
                            the next data channel)
    corrupt-header    send  the channel's packet number packet=N (default 0) gets a bad magic
    corrupt-payload   send  the channel's packet N has one payload byte flipped
    reset             both  the connection is reset (TCP RST) after after=SIZE bytes (default 0)
    stall             both  the channel stops after after=SIZE bytes: the sender stops sending,
                            the receiver stops reading; the connection stays open
    throttle          both  the channel moves rate=RATE at most (default 20MB/s): the sender
                            sends, the receiver reads that slowly (a slow channel: with --live
                            its old copies are applied late, which the round barrier orders)
    crash             both  the process ends at once (os._exit(99)): phase=setup|completion
                            (the whole process, no @), or on a data channel (@N, or the first
                            that gets there) at phase=sync or round=R (before its first packet)
    full-disk         recv  writes to the output fail with ENOSPC after after=SIZE bytes

SIZE and DURATION are written as everywhere in multifd (units.py: 1M = 1MiB = 2**20, 1MB =
10**6; 300ms, 2.5s). A SPEC that is malformed, or that names a fault that could never
strike (a crash in a round this sender never sends, a per-channel crash at a per-process
phase), is a usage error naming what is wrong.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import trio

from . import errors as E
from . import units
from . import wire
from .errors import Stage
from .settings import ROUNDS

CRASH_EXIT = 99
ACTIONS = {
    # action: (sides, allowed parameters)
    "refuse": ("both", ()),
    "delay": ("both", ("seconds",)),
    "tls-stall": ("both", ()),
    "tls-abort": ("both", ()),
    "bad-magic": ("send", ()),
    "bad-version": ("send", ()),
    "bad-session": ("send", ()),
    "bad-channel": ("send", ()),
    "dup-channel": ("send", ()),
    "corrupt-header": ("send", ("packet",)),
    "corrupt-payload": ("send", ("packet",)),
    "reset": ("both", ("after",)),
    "stall": ("both", ("after",)),
    "throttle": ("both", ("rate",)),
    "crash": ("both", ("phase", "round")),
    "full-disk": ("recv", ("after",)),
}
PHASES = ("setup", "sync", "completion")
PROCESS_PHASES = ("setup", "completion")
HELLO_FAULTS = ("bad-magic", "bad-version", "bad-session", "bad-channel", "dup-channel")


@dataclass(frozen=True)
class Fault:
    action: str
    where: str  # "all", "control" or a data channel number as text
    params: dict = field(default_factory=dict)

    def hits(self, label: str) -> bool:
        """Whether this fault applies to the channel called `label` (Hello.label(), or in
        QEMU's stream "main channel" / "multifd channel N")."""
        if self.where == "all":
            return True
        if self.where == "control":
            return label in ("control channel", "main channel")
        return label in (f"data channel {self.where}", f"multifd channel {self.where}")

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.action}@{self.where}" + (f":{params}" if params else "")


def parse(spec: str, side: str, by_arrival: bool = False,
          rounds: int | None = ROUNDS) -> Fault:
    """One --fault SPEC for `side` ("send" or "recv"); raises UsageError naming the problem.
    `by_arrival`: the receiver names a connection by its arrival before its TLS handshake
    (--qemu: QEMU connects its main channel first, then multifd channels 0, 1, ...).
    `rounds`: how many rounds this side may see at most (None: it cannot know)."""
    def bad(why: str) -> E.UsageError:
        return E.UsageError(f"--fault {spec!r}: {why}")

    head, _, tail = spec.partition(":")
    action, _, where = head.partition("@")
    action, where = action.strip(), (where.strip() or "all")
    if where == "main":  # QEMU's name for the control channel
        where = "control"
    if action not in ACTIONS:
        raise bad(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    sides, allowed = ACTIONS[action]
    if sides not in ("both", side):
        raise bad(f"{action} is a fault of multifd-{sides}, not of multifd-{side}")
    if where not in ("all", "control") and not (where.isdigit() and int(where) < 64):
        raise bad(f"channel {where!r} is not a data channel 0..63, 'control' or 'all'")
    params: dict = {}
    for item in filter(None, (p.strip() for p in tail.split(","))) if tail else ():
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise bad(f"{item!r} is not KEY=VALUE")
        if key not in allowed:
            raise bad(f"{action} takes {', '.join(allowed) or 'no parameters'}, not {key!r}")
        if key in params:
            raise bad(f"{key} given twice")
        try:
            params[key] = _value(key, value)
        except ValueError as exc:
            raise bad(str(exc)) from None
    if action == "crash":
        _check_crash(params, where, bad, rounds)
    if action in HELLO_FAULTS + ("corrupt-header", "corrupt-payload") and where == "all":
        raise bad(f"{action} needs a channel (@N or @control)")
    if action in ("corrupt-header", "corrupt-payload") and where == "control":
        raise bad("the control channel carries no packets (name a data channel, @N)")
    if action == "full-disk" and where != "all":
        raise bad("full-disk strikes the output file, not a channel (leave out @)")
    if side == "recv" and action.startswith("tls-") and where != "all" and not by_arrival:
        raise bad("the receiver cannot tell channels apart before their TLS handshake: "
                  "its TLS faults hit every connection (leave out @)")
    return Fault(action, where, params)


def _check_crash(params: dict, where: str, bad, rounds: int | None) -> None:
    """Refuse the crashes that could never strike."""
    if len(params) != 1:
        raise bad("crash needs phase=setup|sync|completion or round=R")
    phase = params.get("phase")
    if phase in PROCESS_PHASES and where != "all":
        raise bad(f"phase={phase} happens once per process, not per channel (leave out @)")
    if phase is None and rounds is not None and params["round"] >= rounds:
        raise bad(f"round={params['round']} never comes: the sender sends "
                  f"{'one round (0)' if rounds == 1 else f'rounds 0..{rounds - 1}'}")
    if phase not in PROCESS_PHASES and where == "control":
        raise bad("the control channel has no rounds or syncs (name a data channel or "
                  "leave out @)")


def _value(key: str, value: str):
    if key == "after":
        return units.parse_size(value)
    if key == "rate":
        rate = units.parse_rate(value)
        if rate < 1e6:  # a pause at most ~2 s per packet: a cancel must not wait for ever
            raise ValueError(f"rate={value!r} is below 1MB/s")
        return rate
    if key in ("packet", "round"):
        if not value.isdigit():
            raise ValueError(f"{key}={value!r} is not a number")
        return int(value)
    if key == "seconds":
        seconds = units.parse_duration(value)
        if not 0 <= seconds <= 3600:
            raise ValueError(f"seconds={value!r} is not in 0..3600")
        return seconds
    if key == "phase":
        if value not in PHASES:
            raise ValueError(f"phase={value!r} is not one of {', '.join(PHASES)}")
        return value
    raise ValueError(f"unknown parameter {key!r}")


class Phase(enum.StrEnum):
    """Named points of a migration where a crash fault can end the process."""

    SETUP = "setup"  # once per process, when its channels are established
    ROUND = "round"  # on a data channel, before the first packet of a round
    SYNC = "sync"  # on a data channel, right after its SYNC went out (sender) or came in
    COMPLETION = "completion"  # once per process, when the data is all there


class Faults:
    """One side's faults and the seams where they strike. An empty set changes nothing.

    The transport calls each seam once, where it does the thing the seam names; with no
    --fault every seam is a no-op that hands back what it was given."""

    def __init__(self, faults=()) -> None:
        self.faults = tuple(faults)

    def check_channels(self, channels: int) -> None:
        """Refuse a fault aimed at a data channel that this migration will not have."""
        for fault in self.faults:
            if fault.where.isdigit() and int(fault.where) >= channels:
                raise E.UsageError(f"--fault {fault}: there is no data channel {fault.where} "
                                   f"(--channels {channels}: 0..{channels - 1})")

    def targets(self, label: str) -> bool:
        """Whether a fault is aimed at this very channel (not at every channel)."""
        return any(f.where != "all" and f.hits(label) for f in self.faults)

    def _find(self, actions, label: str | None = None) -> Fault | None:
        for fault in self.faults:
            if fault.action in actions and (label is None or fault.hits(label)):
                return fault
        return None

    # --- seams, in the order a channel meets them

    async def connect(self, label: str) -> None:
        """Before the channel connects (sender) or is admitted after its hello (receiver)."""
        if self._find(("refuse",), label):
            raise E.InjectedFault("refused (injected fault)")
        if delay := self._find(("delay",), label):
            await trio.sleep(delay.params.get("seconds", 5.0))

    async def handshake(self, conn) -> None:
        """Before the TLS handshake of `conn` (a TlsConn)."""
        if self._find(("tls-stall",), conn.label):
            await trio.sleep_forever()  # until the handshake deadline
        if self._find(("tls-abort",), conn.label):
            await conn.run(Stage.TLS, _abort_handshake, conn.sock)

    def hello_bytes(self, label: str, data: bytes) -> bytes:
        """The hello as it goes out: corrupted field by field."""
        fault = self._find(HELLO_FAULTS, label)
        if fault is None:
            return data
        b = bytearray(data)
        if fault.action == "bad-magic":
            b[0:4] = b"XXXX"
        elif fault.action == "bad-version":
            b[4:6] = (wire.VERSION + 1).to_bytes(2, "big")
        elif fault.action == "bad-session":
            b[8:24] = bytes(16)
        elif fault.action == "bad-channel":
            b[24:26] = (0xFFFE).to_bytes(2, "big")
        else:  # dup-channel: claim the next channel's id, which that channel claims too
            channel, channels = int.from_bytes(b[24:26], "big"), int.from_bytes(b[26:28], "big")
            b[24:26] = ((channel + 1) % max(channels, 1)).to_bytes(2, "big")
        return bytes(b)

    def socket(self, label: str, sock):
        """The socket under an established channel, with its reset or stall, if any."""
        if throttle := self._find(("throttle",), label):
            return ThrottledSocket(sock, throttle.params.get("rate", 20e6))
        fault = self._find(("reset",), label) or self._find(("stall",), label)
        return sock if fault is None else TrippedSocket(sock, fault.action,
                                                        fault.params.get("after", 0))

    def packet(self, label: str, seq: int, parts: list) -> list:
        """The parts of packet `seq` as they go out."""
        for fault in self.faults:
            if fault.action in ("corrupt-header", "corrupt-payload") and fault.hits(label) \
                    and fault.params.get("packet", 0) == seq:
                if fault.action == "corrupt-header":
                    head = bytearray(parts[0])
                    head[0] ^= 0xFF
                    return [bytes(head), *parts[1:]]
                if len(parts) > 1:
                    payload = bytearray(parts[1])
                    payload[len(payload) // 2] ^= 0x01
                    return [parts[0], bytes(payload), *parts[2:]]
        return parts

    def pwrite(self, pwrite):
        """The output file's positioned write, failing with ENOSPC past its budget."""
        fault = self._find(("full-disk",))
        if fault is None:
            return pwrite
        budget = [fault.params.get("after", 0)]

        def full_disk_pwrite(fd, data, offset):
            size = memoryview(data).nbytes
            if budget[0] < size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            budget[0] -= size
            return pwrite(fd, data, offset)
        return full_disk_pwrite

    def phase(self, phase: Phase, label: str | None = None, round: int | None = None) -> None:
        """End the process here if a crash fault names this phase (or round) and channel."""
        for fault in self.faults:
            if fault.action != "crash" or (label is not None and not fault.hits(label)):
                continue
            if fault.params.get("phase") == phase or (
                    phase is Phase.ROUND and fault.params.get("round") == round):
                os._exit(CRASH_EXIT)


NO_FAULTS = Faults()


def _abort_handshake(sock) -> None:
    """Send the first TLS handshake flight, then cut the connection."""
    sock.setblocking(False)
    try:
        sock.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
    sock.close()
    raise E.InjectedFault("TLS handshake aborted by an injected fault")


class ThrottledSocket:
    """A channel's socket that moves `rate` bytes/s at most, sending or reading (the calls
    the bulk path makes; everything else passes through)."""

    def __init__(self, sock, rate: float) -> None:
        self._sock = sock
        self._rate = rate
        self._free_at = time.monotonic()

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def _pace(self, size: int) -> None:
        now = time.monotonic()
        self._free_at = max(self._free_at, now) + size / self._rate
        if self._free_at > now:
            time.sleep(self._free_at - now)

    def send(self, data) -> int:
        sent = self._sock.send(data)
        self._pace(sent)
        return sent

    def sendall(self, data) -> None:
        self._sock.sendall(data)
        self._pace(memoryview(data).nbytes)

    def sendmsg(self, parts) -> int:
        sent = self._sock.sendmsg(parts)
        self._pace(sent)
        return sent

    def recv_into(self, view, nbytes: int = 0, flags: int = 0) -> int:
        # A small read at a time, so that the pace holds inside one MSG_WAITALL call.
        size = min(nbytes or memoryview(view).nbytes, 64 << 10)
        got = self._sock.recv_into(view, size)
        self._pace(got)
        return got


class TrippedSocket:
    """A channel's socket that resets or stalls once `after` bytes went through it.

    Only the calls the bulk path makes are counted; everything else passes through. A stall
    blocks in a read of the real socket, so shutting the socket down (cancellation) or the
    peer leaving ends it like any other blocked call.
    """

    def __init__(self, sock, action: str, after: int) -> None:
        self._sock = sock
        self._action = action
        self._left = after

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def _trip(self, size: int) -> int:
        """How many of `size` bytes may still pass; trips the fault when none may."""
        if self._left >= size:
            self._left -= size
            return size
        allowed, self._left = self._left, 0
        if allowed:
            return allowed
        if self._action == "reset":
            # Created (and so stamped) before the peer can react to the reset.
            fault = E.InjectedFault("connection reset by an injected fault")
            # Linger 0: close() sends a RST instead of a FIN.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._sock.close()
            raise fault
        # Stall: move nothing, read nothing, until the socket is shut down (our cancellation)
        # or the peer hangs up.
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not poller.poll(1000):
            pass
        raise ConnectionResetError(errno.ECONNRESET, "a stalled channel was ended")

    def send(self, data) -> int:
        view = memoryview(data).cast("B")
        n = self._trip(view.nbytes)
        sent = self._sock.send(view[:n])
        self._left += n - sent  # what the kernel did not take still counts as not sent
        return sent

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._trip(view.nbytes)
            self._sock.sendall(view[:n])
            view = view[n:]

    def sendmsg(self, parts) -> int:
        total = sum(memoryview(p).nbytes for p in parts)
        if self._left >= total:
            self._left -= total
            return self._sock.sendmsg(parts)
        joined = b"".join(bytes(p) for p in parts)
        self.sendall(joined)
        return total

    def recv_into(self, view, nbytes: int = 0, flags: int = 0) -> int:
        size = nbytes or memoryview(view).nbytes
        n = self._trip(size)
        return self._sock.recv_into(view, n, flags) if flags else self._sock.recv_into(view, n)
