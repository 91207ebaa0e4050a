"""Fault injection: break any channel at any stage, on purpose, to watch it fail cleanly.

A fault plan is data: a list of Fault(action, where, params) parsed from `--fault SPEC`
flags. The transport consults the plan only at a few explicit seams (connecting, the TLS
handshake, the hello, each packet, the socket under an established channel, the output file's
writes, and the named phases); with no --fault the plan is empty and every seam is a no-op.

    SPEC  := ACTION [ "@" WHERE ] [ ":" KEY "=" VALUE { "," KEY "=" VALUE } ]
    WHERE := N (data channel N) | "control" | "all"          (default: all)

Actions, the side that takes them, and their parameters:

    refuse            both  the channel's connection is refused (receiver: closed at its hello)
    delay             both  the channel's connection waits seconds=S (default 5) first
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
    crash             both  the process ends at once (os._exit(99)) at phase=setup|sync|completion
                            or at round=R (its first packet); with @N, on that channel's sync/round
    full-disk         recv  writes to the output fail with ENOSPC after after=SIZE bytes

SIZE takes the suffixes K, M, G (powers of 1000) and KiB, MiB, GiB. A malformed SPEC is a usage
error naming what is wrong.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
from dataclasses import dataclass, field

from . import errors as E
from . import wire

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
    "crash": ("both", ("phase", "round")),
    "full-disk": ("recv", ("after",)),
}
PHASES = ("setup", "sync", "completion")
HELLO_FAULTS = ("bad-magic", "bad-version", "bad-session", "bad-channel", "dup-channel")
_SIZE = re.compile(r"^(\d+)\s*([kmg]?)(i?)(b?)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 64MiB, 1G)")
    power = " KMG".index(m.group(2).upper()) if m.group(2) else 0
    return int(m.group(1)) * (1024 if m.group(3) else 1000) ** power


@dataclass(frozen=True)
class Fault:
    action: str
    where: str  # "all", "control" or a data channel number as text
    params: dict = field(default_factory=dict)

    def hits(self, label: str) -> bool:
        """Whether this fault applies to the channel called `label` (Hello.label())."""
        if self.where == "all":
            return True
        if self.where == "control":
            return label == "control channel"
        return label == f"data channel {self.where}"

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.action}@{self.where}" + (f":{params}" if params else "")


def parse(spec: str, side: str) -> Fault:
    """One --fault SPEC for `side` ("send" or "recv"); raises UsageError naming the problem."""
    def bad(why: str) -> E.UsageError:
        return E.UsageError(f"--fault {spec!r}: {why}")

    head, _, tail = spec.partition(":")
    action, _, where = head.partition("@")
    action, where = action.strip(), (where.strip() or "all")
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
    if action == "crash" and len(params) != 1:
        raise bad("crash needs phase=setup|sync|completion or round=R")
    if action in HELLO_FAULTS + ("corrupt-header", "corrupt-payload") and where == "all":
        raise bad(f"{action} needs a channel (@N or @control)")
    if side == "recv" and action.startswith("tls-") and where != "all":
        raise bad("the receiver cannot tell channels apart before their TLS handshake: "
                  "its TLS faults hit every connection (leave out @)")
    return Fault(action, where, params)


def _value(key: str, value: str):
    if key == "after":
        return parse_size(value)
    if key in ("packet", "round"):
        if not value.isdigit():
            raise ValueError(f"{key}={value!r} is not a number")
        return int(value)
    if key == "seconds":
        seconds = float(value)
        if not 0 <= seconds <= 3600:
            raise ValueError(f"seconds={value!r} is not in 0..3600")
        return seconds
    if key == "phase":
        if value not in PHASES:
            raise ValueError(f"phase={value!r} is not one of {', '.join(PHASES)}")
        return value
    raise ValueError(f"unknown parameter {key!r}")


class Plan:
    """The faults of one process, queried at the seams. An empty plan changes nothing."""

    def __init__(self, faults=()) -> None:
        self.faults = list(faults)

    def find(self, action: str, label: str | None = None) -> Fault | None:
        for fault in self.faults:
            if fault.action == action and (label is None or fault.hits(label)):
                return fault
        return None

    # --- seams

    def crash(self, phase: str, label: str | None = None, round: int | None = None) -> None:
        """End the process here if a crash fault names this phase (or this round)."""
        for fault in self.faults:
            if fault.action != "crash":
                continue
            if label is not None and fault.where != "all" and not fault.hits(label):
                continue
            if label is None and fault.where != "all" and phase != "setup":
                continue
            if fault.params.get("phase") == phase or (
                    round is not None and fault.params.get("round") == round):
                os._exit(CRASH_EXIT)

    def hello_bytes(self, label: str, data: bytes) -> bytes:
        """The hello as this plan has it sent: corrupted field by field."""
        fault = next((f for f in self.faults if f.action in HELLO_FAULTS and f.hits(label)),
                     None)
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

    def packet(self, label: str, seq: int, parts: list) -> list:
        """The parts of packet `seq` as this plan has them sent."""
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

    def wrap_socket(self, label: str, sock):
        """The socket under an established channel, with its reset or stall, if any."""
        for action in ("reset", "stall"):
            fault = self.find(action, label)
            if fault is not None:
                return TrippedSocket(sock, action, fault.params.get("after", 0))
        return sock

    def wrap_pwrite(self, pwrite):
        fault = self.find("full-disk")
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


class InjectedFault(ConnectionResetError):
    """A failure this side caused on purpose: its own error, not the peer's."""


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
            fault = InjectedFault(errno.ECONNRESET, "connection reset by an injected fault")
            fault.multifd_seq = E.next_seq()  # before the peer can react to the reset
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
