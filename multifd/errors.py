"""Typed errors. Every failure the user sees is one of these, rendered as one line.

`seq` orders errors by the moment they were created: when several tasks fail during one
cancellation, the earliest error is the cause and the others are consequences.
"""

from __future__ import annotations

import itertools

_order = itertools.count()


def next_seq() -> int:
    return next(_order)


class MultifdError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, side: str | None = None, channel: str | None = None,
                 stage: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.side = side
        self.channel = channel
        self.stage = stage
        self.seq = next_seq()

    def where(self) -> str:
        parts = [p for p in (self.channel, self.stage) if p]
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


class UsageError(MultifdError):
    """The user asked for something impossible: bad flag, bad file, bad address."""

    exit_code = 2


class ProtocolError(MultifdError):
    """Bytes on the wire that break the protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to send something invalid: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid."""


class BadMagic(RemoteProtocolError):
    pass


class BadVersion(RemoteProtocolError):
    pass


class UnknownSession(RemoteProtocolError):
    pass


class BadChannelId(RemoteProtocolError):
    pass


class DuplicateChannel(RemoteProtocolError):
    pass


class LimitExceeded(RemoteProtocolError):
    pass


class OutOfRange(RemoteProtocolError):
    pass


class Misaligned(RemoteProtocolError):
    pass


class ChecksumMismatch(RemoteProtocolError):
    pass


class TransportError(MultifdError):
    """A connection failed: refused, reset, closed early, timed out."""

    # True where the peer has probably sent its own reason on the control channel, which
    # then makes the better report.
    peer_may_explain = False


class TlsError(TransportError):
    """A TLS failure: a certificate rejected by either side, a peer that does not speak TLS,
    a stream cut without a TLS close."""

    def __init__(self, message: str, *, peer_may_explain: bool = False, **where) -> None:
        super().__init__(message, **where)
        self.peer_may_explain = peer_may_explain


class PeerClosed(TransportError):
    """The peer went away without an explanation on this channel."""

    peer_may_explain = True


class PeerTimeout(TransportError):
    """The peer stayed silent past a deadline."""


class MissingChannels(PeerTimeout):
    """Some data channels never arrived: the sender may have failed to open them."""

    peer_may_explain = True


class PeerError(MultifdError):
    """The peer reported a failure of its own through the control channel."""


class VerificationError(MultifdError):
    """The received image does not match what the sender announced."""


class ImageError(MultifdError):
    """Reading the source image or writing the output failed."""


class Terminated(MultifdError):
    """SIGTERM: cancel cleanly and exit 143."""

    exit_code = 143


class Interrupted(MultifdError):
    """SIGINT (Ctrl-C): cancel cleanly and exit 130."""

    exit_code = 130
