"""Typed errors, and the one policy that decides which error is reported when several happen.

Every failure the user sees is a MultifdError rendered as one line: "data channel 3, hello:
bad magic ...". The policy:

- Every error carries an ordering stamp taken when it happened (`stamp`): a MultifdError
  when it is created, a foreign exception raised in a worker thread when it leaves the call
  (`stamped_call`). When a failure cancels the others, trio may hand the errors over in any
  order; the stamps say which came first.
- `first_error` picks the report from a (possibly nested) group: the earliest of our own
  errors, except that a peer's explained failure (PeerError) beats errors that only say the
  peer went away (`peer_may_explain`), even earlier ones; else the first foreign error that
  is not a cancellation; else a cancellation.
- `caused_by_shutdown` decides whether a call that failed after we shut its socket down
  (cancellation) failed because of that: then it is reported as the cancellation, never as
  an error of its own, unless it is our own failure stamped before the shutdown.
"""

from __future__ import annotations

import enum
import itertools
import sys

_clock = itertools.count()
_STAMP = "multifd_when"


def stamp(exc: BaseException) -> int:
    """The moment `exc` happened: stamped now unless it already was."""
    when = getattr(exc, _STAMP, None)
    if when is None:
        when = next(_clock)
        setattr(exc, _STAMP, when)
    return when


def now() -> int:
    """A stamp for an event that is not an error (e.g. a shutdown), on the same clock."""
    return next(_clock)


def stamped_call(fn, *args):
    """fn(*args), with any exception stamped the moment it leaves the call (run it in the
    thread that does the work, so the stamp is not the time trio got round to it)."""
    try:
        return fn(*args)
    except BaseException as exc:
        stamp(exc)
        raise


def inherit_stamp(err: BaseException, cause: BaseException) -> None:
    """`err` translates `cause`: it happened when `cause` did."""
    setattr(err, _STAMP, min(stamp(err), stamp(cause)))


class Stage(enum.StrEnum):
    """Where in a channel's life an error happened; the second part of every error line."""

    CONNECT = "connect"
    TLS = "tls"
    HELLO = "hello"
    SETUP = "setup"
    DATA = "data"
    SYNC = "sync"
    FINISH = "finish"
    VERIFY = "verify"
    EXPLAIN = "explain"


class MultifdError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1
    # True where the peer has probably sent its own reason on the control channel, which
    # then makes the better report.
    peer_may_explain = False

    def __init__(self, message: str, *, side: str | None = None, channel: str | None = None,
                 stage: Stage | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.side = side
        self.channel = channel
        self.stage = stage
        stamp(self)

    def where(self) -> str:
        return ", ".join(str(p) for p in (self.channel, self.stage) if p)

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


class BadChannelId(RemoteProtocolError):
    pass


class LimitExceeded(RemoteProtocolError):
    pass


class OutOfRange(RemoteProtocolError):
    pass


class Misaligned(RemoteProtocolError):
    pass


class ChecksumMismatch(RemoteProtocolError):
    pass


class Unsupported(RemoteProtocolError):
    """The peer uses a feature this side cannot honour (a QEMU capability, say): named, so
    that the user knows what to turn off."""


class TransportError(MultifdError):
    """A connection failed: refused, reset, closed early, timed out."""


class InjectedFault(TransportError):
    """A failure this side caused on purpose (--fault): its own error, not the peer's."""


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


# --- the policy


def _foreign(module: str, name: str) -> tuple:
    """The exception class module.name as an isinstance() argument, if that module is loaded
    (an exception of it can exist only then). This module imports no networking: the pure
    wire format depends on it."""
    loaded = sys.modules.get(module)
    return (getattr(loaded, name),) if loaded is not None else ()


def leaves(exc: BaseException):
    """The errors of a (possibly nested) group, depth first; `exc` itself if not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from leaves(sub)
    else:
        yield exc


def first_error(exc: BaseException) -> BaseException:
    """The one error to report for `exc`, a single error or a (nested) group."""
    cancelled = _foreign("trio", "Cancelled")
    found = list(leaves(exc))
    ours = [e for e in found if isinstance(e, MultifdError)]
    if any(isinstance(e, PeerError) for e in ours):
        # Once read, the peer's reason is the better report, even against earlier errors
        # that only say the peer went away (nobody can read that reason again later).
        ours = [e for e in ours if not e.peer_may_explain]
    if ours:
        return min(ours, key=stamp)
    others = [e for e in found if not isinstance(e, cancelled)]
    return others[0] if others else found[0]


def caused_by_shutdown(exc: BaseException, shutdown_at: int) -> bool:
    """Whether `exc`, raised by a call whose socket we shut down at `shutdown_at` (a stamp),
    is that shutdown's doing. It is, unless it is a failure of our own that happened first
    (it may be the first error of all, though trio saw another channel's first): a connection
    that merely ended is always taken for the shutdown's doing."""
    if stamp(exc) > shutdown_at:
        return True
    return isinstance(exc, (ConnectionError, _foreign("ssl", "SSLEOFError"))) or (
        isinstance(exc, MultifdError) and exc.peer_may_explain)


class collapse_group:
    """Re-raise a nursery's exception group as its one reportable error.

    Used where a nursery is an implementation detail (a guard task beside a thread): callers
    see the error, not a group of one.
    """

    def __enter__(self):
        return self

    def __exit__(self, etype, exc, tb):
        if isinstance(exc, BaseExceptionGroup):
            raise first_error(exc)
        return False
