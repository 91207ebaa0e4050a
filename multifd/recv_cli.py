"""multifd-recv --listen HOST:PORT (OUTPUT | --discard | --qemu DIR) ..."""

from __future__ import annotations

import gc

if __name__ == "__main__":  # python -m: a CLI process (launch.py says why)
    gc.disable()

import argparse  # noqa: E402
import functools
import json
import sys
import uuid

from . import args as A
from . import cli, tls
from .address import format_address, parse_address
from .image import check_output_path
from .recv import open_listeners, receive_image
from .side import Side

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
    p.add_argument("--qemu", metavar="DIR",
                   help="receive a migration from QEMU itself (multifd on, or off): its RAM "
                   "blocks, device state and a manifest go to DIR, a new or empty directory "
                   "(README: QEMU)")
    p.add_argument("--qemu-channels", metavar="N", type=int,
                   help="with --qemu: the source's multifd-channels, to wait for at the first "
                   "sync point (default: those connected by then, which is all of them when "
                   "QEMU connects directly)")
    p.add_argument("--qemu-uuid", metavar="UUID", type=_uuid,
                   help="with --qemu: accept multifd channels of the source started with "
                   "-uuid UUID only (default: whichever the first channel carries)")
    p.add_argument("--tls", metavar="DIR", help="mutual TLS with the credentials in DIR "
                   "(ca-cert.pem, server-cert.pem, server-key.pem: QEMU's names)")
    p.add_argument("--tls-allow-client", action="append", default=[], metavar="CN",
                   help="accept only client certificates with this common name (repeatable; "
                   "default: any the CA signed)")
    cli.add_common(p)
    return p


def _uuid(text: str) -> bytes:
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


class _QemuReport:
    """A finished capture as the CLI prints it: the manifest."""

    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest

    def to_json(self) -> str:
        return json.dumps({"side": "receiver", "ok": True, **self.manifest}, sort_keys=True)

    def human(self) -> str:
        m = self.manifest
        pages = sum(c["pages"] for c in m["multifd"]) + m["main"]["pages"]
        zeros = sum(c["zero_pages"] for c in m["multifd"]) + m["main"]["zero_pages"]
        lines = [f"receiver: ok, QEMU {m['machine']}: {len(m['blocks'])} RAM blocks, "
                 f"{pages} pages and {zeros} zero pages over {m['channels']} multifd "
                 f"channels in {m['iterations']} sections, {m['seconds']:.2f} s"]
        lines += [f"  {b['file']:<40} {b['bytes']:>12}  xxh3-128:{b['xxh3_128']}"
                  for b in m["blocks"]]
        lines.append(f"  output {m['output']} (manifest.json)")
        return "\n".join(lines)


def _check_output_dir(path: str) -> None:
    from .qemu.blocks import check_output_dir
    check_output_dir(path)


def _qemu_failed(error: str) -> str:
    """A failed capture in --json: what failed, without the transport's image fields."""
    return json.dumps({"side": "receiver", "ok": False, "error": error}, sort_keys=True)


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


async def _serve(host: str, port: int, args, credentials, faults, completed: list) -> cli.Report:
    listeners = await open_listeners(host, port)
    try:
        bound = listeners[0].socket.getsockname()
        _log(f"listening on {format_address(bound[0], bound[1])}")
        if args.qemu is not None:
            side = Side("receiver", cli.timeouts_from(args), credentials, faults, _log)
            from .qemu.capture import receive_qemu  # only --qemu pays for loading it

            manifest = await receive_qemu(
                listeners, args.qemu, side=side, uuid=args.qemu_uuid,
                channels=args.qemu_channels,
                on_complete=lambda m: completed.append(_QemuReport(m)))
            return _QemuReport(manifest)
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
    given = [o for o, on in (("OUTPUT", args.output is not None and args.output != ""),
                             ("--discard", args.discard), ("--qemu", args.qemu is not None))
             if on]
    if len(given) != 1:
        parser.error("give one of OUTPUT, --discard and --qemu DIR" if not given else
                     f"{' and '.join(given)} exclude each other")
    for name in ("qemu_uuid", "qemu_channels"):
        if getattr(args, name) is not None and args.qemu is None:
            parser.error(f"--{name.replace('_', '-')} needs --qemu")
    if args.qemu_channels is not None and not 0 <= args.qemu_channels <= 255:
        parser.error("--qemu-channels must be in 0..255")
    host, port = cli.usage_guard(PROG, args.json, "receiver",
                                 functools.partial(parse_address, args.listen))
    if args.output is not None:
        cli.usage_guard(PROG, args.json, "receiver",
                        functools.partial(check_output_path, args.output))
    if args.qemu is not None:
        cli.usage_guard(PROG, args.json, "receiver",
                        functools.partial(_check_output_dir, args.qemu))
    if args.tls_allow_client and args.tls is None:
        parser.error("--tls-allow-client needs --tls")
    credentials = None if args.tls is None else cli.usage_guard(
        PROG, args.json, "receiver",
        functools.partial(tls.server_tls, args.tls, args.tls_allow_client))
    faults = cli.faults_from(PROG, args, "recv")
    completed: list = []
    return cli.run(PROG, "receiver",
                   functools.partial(_serve, host, port, args, credentials, faults, completed),
                   args.json, completed, failed=_qemu_failed if args.qemu else None)


if __name__ == "__main__":
    from .launch import start
    start(main)
