"""The baseline multifd-bench compares the product to: the least code that copies a file over
N parallel TCP connections, with none of multifd's framing, digests or checks.

    python -m multifd.rawcopy recv --listen 127.0.0.1:0 --channels N (OUT | --discard)
    python -m multifd.rawcopy send HOST:PORT IMAGE --channels N

Chunk i of 512 KiB goes on connection i % N, preceded by a 12-byte header (offset u64,
length u32). Each side has one thread per connection with blocking sockets and one reused
buffer; the receiver pwrite()s each chunk at its offset. Both print one JSON line
{"bytes": ..., "seconds": ...} on stdout; counting bytes is the only check.

The sender exits only after every connection was closed by the receiver, which it does once
its last write returned: like multifd-send, the sender's exit means the data has landed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time

CHUNK = 512 << 10
HEADER = struct.Struct("<QI")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill `view`; fewer bytes only at end of stream."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


def _run_threads(target, items) -> None:
    errors: list[BaseException] = []

    def guarded(item):
        try:
            target(item)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def recv(listen: str, channels: int, out: str | None) -> int:
    host, port = _split(listen)
    fd = None if out is None else os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = [0] * channels
    with socket.create_server((host, port), backlog=channels) as server:
        bound = server.getsockname()
        print(f"listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        conns = [server.accept()[0] for _ in range(channels)]
    start = time.perf_counter()

    def serve(index: int) -> None:
        with conns[index] as sock:
            buf = memoryview(bytearray(CHUNK))
            head = memoryview(bytearray(HEADER.size))
            while True:
                got = _recv_exact(sock, head)
                if got == 0:
                    return
                if got < HEADER.size:
                    raise EOFError("stream ended inside a header")
                offset, length = HEADER.unpack(head)
                if length > CHUNK or _recv_exact(sock, buf[:length]) != length:
                    raise EOFError(f"bad or truncated chunk at offset {offset}")
                view = buf[:length]
                while fd is not None and view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
                total[index] += length

    try:
        _run_threads(serve, range(channels))
    finally:
        if fd is not None:
            os.close(fd)
    print(json.dumps({"bytes": sum(total), "seconds": time.perf_counter() - start}), flush=True)
    return 0


def send(address: str, image: str, channels: int) -> int:
    host, port = _split(address)
    fd = os.open(image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    total = [0] * channels
    start = time.perf_counter()
    # Connect all first: the receiver accepts exactly N connections before serving any.
    socks = [socket.create_connection((host, port)) for _ in range(channels)]

    def pump(index: int) -> None:
        with socks[index] as sock:
            # Header and chunk share one buffer so each chunk is one sendall().
            buf = memoryview(bytearray(HEADER.size + CHUNK))
            for offset in range(index * CHUNK, size, channels * CHUNK):
                length = min(CHUNK, size - offset)
                got = 0
                while got < length:
                    n = os.preadv(fd, [buf[HEADER.size + got:HEADER.size + length]],
                                  offset + got)
                    if n == 0:
                        raise EOFError(f"{image} shrank while being read")
                    got += n
                HEADER.pack_into(buf, 0, offset, length)
                sock.sendall(buf[:HEADER.size + length])
                total[index] += length
            sock.shutdown(socket.SHUT_WR)
            if sock.recv(1):
                raise ConnectionError("receiver sent data")

    try:
        _run_threads(pump, range(channels))
    finally:
        os.close(fd)
    print(json.dumps({"bytes": sum(total), "seconds": time.perf_counter() - start}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multifd.rawcopy",
                                description="Minimal parallel TCP file copy (benchmark baseline).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="accept N connections and write what arrives")
    r.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0 picks one")
    r.add_argument("--channels", type=int, default=4, metavar="N", help="connections (default 4)")
    r.add_argument("out", metavar="OUT", nargs="?", help="file to create or overwrite")
    r.add_argument("--discard", action="store_true", help="receive, write nothing")
    s = sub.add_parser("send", help="send IMAGE over N connections")
    s.add_argument("address", metavar="HOST:PORT")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--channels", type=int, default=4, metavar="N", help="connections (default 4)")
    args = p.parse_args(argv)
    if args.channels < 1:
        p.error("--channels must be at least 1")
    try:
        if args.cmd == "send":
            return send(args.address, args.image, args.channels)
        if args.discard == (args.out is not None):
            p.error("give either OUT or --discard")
        return recv(args.listen, args.channels, args.out)
    except (OSError, EOFError, ValueError) as exc:
        print(f"rawcopy {args.cmd}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
