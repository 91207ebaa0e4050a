"""multifd-recv --listen HOST:PORT (OUTPUT | --discard) ..."""

from __future__ import annotations

import gc

if __name__ == "__main__":  # python -m: a CLI process (launch.py says why)
    gc.disable()

import functools  # noqa: E402
import sys

from . import args as A
from . import cli, tls
from .address import format_address, parse_address
from .image import check_output_path
from .recv import open_listeners, receive_image

PROG = "multifd-recv"


def build_parser() -> A.Parser:
    p = A.Parser(prog=PROG, description="Accept exactly one migration from multifd-send, "
                   "verify it, and write it to OUTPUT atomically.")
    p.add_argument("output", metavar="OUTPUT", nargs="?",
                   help="where the image goes (written beside it, renamed once verified)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free port and prints it")
    p.add_argument("--discard", action="store_true",
                   help="receive and verify, write nothing (for benchmarks)")
    p.add_argument("--tls", metavar="DIR", help="mutual TLS with the credentials in DIR "
                   "(ca-cert.pem, server-cert.pem, server-key.pem: QEMU's names)")
    p.add_argument("--tls-allow-client", action="append", default=[], metavar="CN",
                   help="accept only client certificates with this common name (repeatable; "
                   "default: any the CA signed)")
    cli.add_common(p)
    return p


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


async def _serve(host: str, port: int, args, credentials, faults, completed: list) -> cli.Report:
    listeners = await open_listeners(host, port)
    try:
        bound = listeners[0].socket.getsockname()
        _log(f"listening on {format_address(bound[0], bound[1])}")
        return await receive_image(
            listeners, None if args.discard else args.output,
            timeouts=cli.timeouts_from(args), tls=credentials,
            faults=faults, log=_log,
            on_progress=cli.progress_printer("receiving", not args.quiet and not args.json),
            on_complete=completed.append)
    finally:
        for listener in listeners:
            await listener.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.discard == (args.output is not None and args.output != ""):
        parser.error("give either OUTPUT or --discard")
    host, port = cli.usage_guard(PROG, args.json, "receiver",
                                 functools.partial(parse_address, args.listen))
    if args.output is not None:
        cli.usage_guard(PROG, args.json, "receiver",
                        functools.partial(check_output_path, args.output))
    if args.tls_allow_client and args.tls is None:
        parser.error("--tls-allow-client needs --tls")
    credentials = None if args.tls is None else cli.usage_guard(
        PROG, args.json, "receiver",
        functools.partial(tls.server_tls, args.tls, args.tls_allow_client))
    faults = cli.faults_from(PROG, args, "recv")
    completed: list = []
    return cli.run(PROG, "receiver",
                   functools.partial(_serve, host, port, args, credentials, faults, completed),
                   args.json, completed)


if __name__ == "__main__":
    from .launch import start
    start(main)
