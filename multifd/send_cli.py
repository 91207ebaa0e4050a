"""multifd-send ADDRESS IMAGE [--channels N] [--max-bandwidth RATE] ..."""

from __future__ import annotations

import gc

if __name__ == "__main__":  # python -m: a CLI process (launch.py says why)
    gc.disable()

import argparse  # noqa: E402
import functools

from . import args as A
from . import cli, codec, precopy, tls, units, wire
from .address import parse_address
from .errors import UsageError
from .workload import parse_pattern
from .send import send_image
from .settings import DEFAULT_BLOCK_PAGES, DEFAULT_CHANNELS, DEFAULT_PAGE_SIZE

PROG = "multifd-send"


def _channels(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= wire.MAX_CHANNELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a channel count in 1..{wire.MAX_CHANNELS}")
    return int(text)


def _method(text: str) -> codec.Method:
    try:
        return codec.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message.partition(": ")[2] or exc.message) \
            from None


def _pattern(text: str) -> str:
    try:
        parse_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> A.Parser:
    p = A.Parser(prog=PROG, description="Stream a RAM image to multifd-recv over N parallel "
                   "TCP channels; exit 0 only once the receiver verified it.")
    p.add_argument("address", metavar="ADDRESS", help="receiver, HOST:PORT or [IPv6]:PORT")
    p.add_argument("image", metavar="IMAGE", help="the image file to send")
    p.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                   help=f"data channels, 1..{wire.MAX_CHANNELS} (default {DEFAULT_CHANNELS})")
    p.add_argument("--max-bandwidth", type=A.rate, default=None, metavar="RATE",
                   help="cap on the total rate of all channels, e.g. 500MB/s (10**6) or "
                   "1GiB/s and 1G/s (2**30); README: Sizes and rates")
    p.add_argument("--page-size", type=A.size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                   help=f"page size, a power of two, e.g. 4096 or 4K (default "
                   f"{DEFAULT_PAGE_SIZE})")
    p.add_argument("--packet-pages", type=int, default=DEFAULT_BLOCK_PAGES, metavar="N",
                   help=f"pages per packet (default {DEFAULT_BLOCK_PAGES})")
    p.add_argument("--compress", type=_method, default=codec.Method(), metavar="METHOD",
                   help="compress each packet's data pages: none (default), zlib[:1..9] "
                   "(default level 1), zstd[:1..19] (default 3); a packet that does not "
                   "shrink goes plain")
    live = p.add_argument_group("live precopy (the image keeps changing while it is sent)")
    live.add_argument("--live", action="store_true",
                      help="start a workload that plays the guest: it writes into the "
                      "sender's own copy of IMAGE (never IMAGE itself) while rounds send what "
                      "it dirtied, until the rest fits --downtime-limit; then it is paused "
                      "and the last round sent (stop-and-copy)")
    live.add_argument("--dirty-rate", type=A.rate, default=units.parse_rate("100MB/s"),
                      metavar="RATE", help="how fast the workload dirties pages (default "
                      "100MB/s)")
    live.add_argument("--dirty-pattern", type=_pattern, default="uniform", metavar="PATTERN",
                      help="uniform (default), hot:P%% (90%% of the writes to the first P%% "
                      "of the pages) or sweep (one byte in every page, page after page)")
    live.add_argument("--seed", type=int, default=1, help="the workload's seed (default 1)")
    live.add_argument("--downtime-limit", type=A.duration, default=precopy.DEFAULT_DOWNTIME,
                      metavar="S", help=f"the downtime the last round may take (default "
                      f"{precopy.DEFAULT_DOWNTIME * 1e3:.0f}ms)")
    live.add_argument("--max-rounds", type=int, default=precopy.DEFAULT_MAX_ROUNDS,
                      metavar="N", help=f"rounds at most, the last included (default "
                      f"{precopy.DEFAULT_MAX_ROUNDS})")
    live.add_argument("--auto-converge", action="store_true",
                      help="throttle the workload when precopy does not converge: 20%% of its "
                      "rate taken away, 10%% more each round that still does not, up to 99%% "
                      "(QEMU's cpu-throttle)")
    live.add_argument("--save-final", metavar="PATH", help="write the guest's state at the "
                      "pause to PATH (what the receiver's output must equal)")
    p.add_argument("--tls", metavar="DIR", help="mutual TLS with the credentials in DIR "
                   "(ca-cert.pem, client-cert.pem, client-key.pem: QEMU's names)")
    p.add_argument("--tls-hostname", metavar="NAME", help="check the receiver's certificate "
                   "against NAME instead of the host in ADDRESS")
    cli.add_common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    host, port = cli.usage_guard(PROG, args.json, "sender",
                                 functools.partial(parse_address, args.address))
    if port == 0:
        parser.error(f"address {args.address!r}: port 0 is only for listening")
    if args.tls_hostname is not None and args.tls is None:
        parser.error("--tls-hostname needs --tls")
    credentials = None if args.tls is None else cli.usage_guard(
        PROG, args.json, "sender", functools.partial(tls.client_tls, args.tls,
                                                     args.tls_hostname))
    live = None
    if args.live:
        if args.max_rounds < 2:
            parser.error("--max-rounds must be at least 2 (round 0, and the last)")
        live = precopy.Live(args.dirty_rate, args.dirty_pattern, args.seed,
                            args.downtime_limit, args.max_rounds, args.save_final,
                            args.auto_converge)
    elif args.save_final or args.auto_converge:
        parser.error(f"{'--save-final' if args.save_final else '--auto-converge'} needs --live")
    completed: list = []
    main_fn = functools.partial(
        send_image, host, port, args.image, channels=args.channels, page_size=args.page_size,
        block_pages=args.packet_pages, max_bandwidth=args.max_bandwidth, method=args.compress,
        live=live,
        timeouts=cli.timeouts_from(args), tls=credentials,
        faults=cli.faults_from(PROG, args, "send"),
        on_progress=cli.progress_printer("sending", not args.quiet and not args.json),
        on_round=cli.round_printer(not args.quiet and not args.json),
        on_complete=completed.append)
    return cli.run(PROG, "sender", main_fn, args.json, completed)


if __name__ == "__main__":
    from .launch import start
    start(main)
