"""What both CLIs share: running a migration under trio and turning its outcome into output
and an exit code. A user mistake or a failed migration is one line on stderr, never a
traceback; exit 0 success, 1 migration failed, 2 usage or input error, 130 interrupted
(SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

import trio

from . import args as A
from . import control
from .errors import Interrupted, MultifdError, Terminated, UsageError, collapse_group, first_error
from .faults import Faults
from .faults import parse as parse_fault
from .report import Report, human_bytes
from .settings import ROUNDS, Timeouts


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of the summary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    d = Timeouts()
    parser.add_argument("--connect-timeout", type=A.duration, default=d.connect,
                        metavar="S", help=f"bound on each TCP connect (default {d.connect:g}s)")
    parser.add_argument("--handshake-timeout", type=A.duration, default=d.handshake,
                        metavar="S", help="bound on each hello, and on all channels arriving "
                        f"(default {d.handshake:g}s)")
    parser.add_argument("--idle-timeout", type=A.duration, default=d.idle, metavar="S",
                        help=f"bound on any single send or receive, e.g. 30, 2.5s, 500ms "
                        f"(default {d.idle:g}s)")
    parser.add_argument("--fault", action="append", default=[], metavar="SPEC",
                        help="break a channel on purpose (repeatable): ACTION[@N|@control|@all]"
                        "[:KEY=VALUE,...], e.g. reset@2:after=64MiB, tls-stall@0, "
                        "corrupt-payload@1:packet=3, crash:phase=sync, stall@control; "
                        "actions: refuse, delay, tls-stall, tls-abort, bad-magic, "
                        "bad-version, bad-session, bad-channel, dup-channel, corrupt-header, "
                        "corrupt-payload, reset, stall, throttle, crash, full-disk (README: "
                        "Faults)")


def faults_from(prog: str, args, side: str) -> Faults:
    """The --fault flags as the side's Faults; a SPEC that is malformed, or that could never
    strike with these options, is the one-line usage error."""
    def build() -> Faults:
        by_arrival = getattr(args, "qemu", None) is not None
        # A receiver cannot know whether its sender is live: any round may come.
        rounds = (args.max_rounds if args.live else ROUNDS) if side == "send" else None
        faults = Faults([parse_fault(spec, side, by_arrival, rounds) for spec in args.fault])
        for fault in faults.faults:
            if args.tls is None and fault.action.startswith("tls-"):
                raise UsageError(f"--fault {fault}: a TLS fault needs --tls")
        if side == "send":
            faults.check_channels(args.channels)
        return faults

    return usage_guard(prog, args.json, "sender" if side == "send" else "receiver", build)


def timeouts_from(args) -> Timeouts:
    return Timeouts(connect=args.connect_timeout, handshake=args.handshake_timeout,
                    idle=args.idle_timeout)


def progress_printer(label: str, enabled: bool):
    """A task that redraws one progress line on stderr, or None when stderr is no TTY."""
    if not enabled or not sys.stderr.isatty():
        return None

    async def progress(done, total: int) -> None:
        start = trio.current_time()
        try:
            while True:
                now, value = trio.current_time(), done()
                rate = value / (now - start) if now > start else 0.0
                width = 30
                # A live migration sends more than the image: the bar stays full after
                # round 0, and the bytes go on counting.
                share = min(1.0, value / total) if total else 1.0
                filled = int(width * share)
                sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] "
                                 f"{100 * share:5.1f}% {human_bytes(value)} "
                                 f"{rate / 1e9:.2f} GB/s ")
                sys.stderr.flush()
                await trio.sleep(0.2)
        finally:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    return progress


def round_printer(enabled: bool):
    """on_round for a live sender: each round's line on stderr as it ends (over the progress
    bar, which redraws below it), or None."""
    if not enabled:
        return None

    def show(round) -> None:
        sys.stderr.write(f"\r\x1b[K{round.line()}\n" if sys.stderr.isatty() else
                         f"{round.line()}\n")
        sys.stderr.flush()

    return show


_SIGNALS = {signal.SIGINT: (Interrupted, "interrupted"),
            signal.SIGTERM: (Terminated, "terminated by SIGTERM")}


async def _with_signals(main):
    """Run main(); SIGINT and SIGTERM become errors that cancel it like any failure.

    trio's own KeyboardInterrupt cannot reach a task that waits for a worker thread; a
    signal receiver's task can always run, and its error cancels every scope, which shuts
    the sockets down and so ends the threads.
    """

    async def watch_signals():
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            async for signum in signals:
                error, text = _SIGNALS[signum]
                control.cancel_reason.set(text)
                raise error(text)

    with collapse_group():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            report = await main()
            nursery.cancel_scope.cancel()
    return report


def run(prog: str, side: str, main, json_mode: bool, completed: list | None = None,
        failed=None) -> int:
    """Run `main` (an async function returning a Report) and report its outcome.

    `failed(text)` gives the JSON object of a failure (default: a Report with ok false).

    `completed` receives the report as soon as the outcome is decided: a signal or error
    that arrives after that, during cleanup, does not turn a finished migration into a
    failed one. An internal error (a bug) after that point is still said, on stderr, while
    the exit code stays the decided outcome's."""
    try:
        report = trio.run(_with_signals, main)
    except BaseException as exc:  # noqa: B036 - everything ends here, as one line
        err = first_error(exc)
        if completed:
            if not isinstance(err, (MultifdError, KeyboardInterrupt, SystemExit,
                                    trio.Cancelled)):
                _say(prog, side, f"after the outcome was decided: {_outcome(err, exc)[1]}")
            return _print_report(completed[0], json_mode)
        if isinstance(err, SystemExit):
            raise
        code, text = _outcome(err, exc)
        _say(prog, side, text)
        if json_mode:
            print(failed(text) if failed else Report(side, ok=False, error=text).to_json(),
                  flush=True)
        return code
    return _print_report(report, json_mode)


def _outcome(err: BaseException, exc: BaseException) -> tuple[int, str]:
    """The exit code and the line for the error `err` (the first of `exc`)."""
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, MultifdError):
        return err.exit_code, str(err)
    if isinstance(err, trio.Cancelled):
        return 1, "cancelled"
    if os.environ.get("MULTIFD_DEBUG"):
        traceback.print_exception(exc)
    return 1, f"internal error: {err!r} (MULTIFD_DEBUG=1 shows a traceback)"


def _say(prog: str, side: str, text: str) -> None:
    print(f"{prog}: {side}: {text}", file=sys.stderr, flush=True)


def _print_report(report: Report, json_mode: bool) -> int:
    try:
        print(report.to_json() if json_mode else report.human(), flush=True)
    except BrokenPipeError:  # a reader that went away (`| head`) is not our failure
        pass
    return 0


def usage_guard(prog: str, json_mode: bool, side: str, fn):
    """Run a synchronous check; a UsageError becomes the one-line exit 2."""
    try:
        return fn()
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        if json_mode:
            print(Report(side, ok=False, error=str(exc)).to_json(), flush=True)
        raise SystemExit(2) from None
