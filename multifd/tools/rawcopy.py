"""The baseline multifd-bench compares the product to: the least code that copies a file over
N parallel TCP connections, with none of multifd's framing, digests or checks.

    python -m multifd.tools.rawcopy recv --listen 127.0.0.1:0 --channels N (OUT | --discard)
    python -m multifd.tools.rawcopy send HOST:PORT IMAGE --channels N

(both also take --tls DIR and --digest, below).

Chunk i of 512 KiB goes on connection i % N, preceded by a 12-byte header (offset u64,
length u32). Each side has one thread per connection with blocking sockets and one reused
buffer; the receiver pwrite()s each chunk at its offset. Both print one JSON line
{"bytes": ..., "seconds": ...} on stdout; counting bytes is the only check.

--digest gives both sides the digest work multifd does on a still image: each chunk hashed with
XXH3-128 (seeded with its index) and the terms summed, printed as "digest" (hex).

The sender exits only after every connection was closed by the receiver, which it does once
its last write returned: like multifd-send, the sender's exit means the data has landed.

--tls DIR (the baseline of multifd's TLS cases) wraps every connection in stdlib ssl, TLS 1.3
only, with mutual authentication from a directory laid out like multifd-certs makes it: the
receiver presents server-cert.pem/server-key.pem and requires a client certificate signed by
ca-cert.pem; the sender checks the receiver's certificate against ca-cert.pem and the host it
connects to, and presents client-cert.pem/client-key.pem. Each connection does its handshake
in its own thread, the receiver's started as soon as the connection is accepted. A stream ends
with TLS closes both ways: the sender unwrap()s after its last chunk, the receiver answers
once it has read to the end, after its last write; a stream cut without a close is an error.
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded only where TLS is used (below)
    import ssl

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


def _tls_context(directory: str, server_side: bool) -> ssl.SSLContext:
    """TLS 1.3 only, each side proving itself with a certificate signed by ca-cert.pem; the
    client context also checks the name it connects to (PROTOCOL_TLS_CLIENT's default)."""
    import ssl  # here: the plain copy, timed from its start, does not pay for loading it

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(os.path.join(directory, "ca-cert.pem"))
    role = "server" if server_side else "client"
    ctx.load_cert_chain(os.path.join(directory, f"{role}-cert.pem"),
                        os.path.join(directory, f"{role}-key.pem"))
    return ctx


class _Threads:
    """One thread per connection, each started when its connection exists; join() waits for
    all and re-raises the first error. Daemons: if accepting fails, the process can still
    exit while served connections wait for their peer."""

    def __init__(self, target) -> None:
        self.target = target
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, *args) -> None:
        thread = threading.Thread(target=self._guarded, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _guarded(self, *args) -> None:
        try:
            self.target(*args)
        except BaseException as exc:  # reported by the main thread
            self.errors.append(exc)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


def _hasher(digest: bool):
    """term(view, offset) of a chunk, or None without --digest (xxhash loaded only then)."""
    if not digest:
        return None
    import xxhash
    h = xxhash.xxh3_128_intdigest
    return lambda view, offset: h(view, seed=offset // CHUNK)


def _digest(terms: list[int]) -> str:
    return f"{sum(terms) % (1 << 128):032x}"


def recv(listen: str, channels: int, out: str | None, tls: str | None = None,
         digest: bool = False) -> int:
    host, port = _split(listen)
    ctx = None if tls is None else _tls_context(tls, server_side=True)
    fd = None if out is None else os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = [0] * channels
    terms = [0] * channels
    term = _hasher(digest)

    def serve(index: int, sock: socket.socket) -> None:
        if ctx is not None:
            # Handshake here, in this connection's thread: the main thread goes on accepting.
            sock = ctx.wrap_socket(sock, server_side=True, suppress_ragged_eofs=False)
        with sock:
            buf = memoryview(bytearray(CHUNK))
            head = memoryview(bytearray(HEADER.size))
            while True:
                got = _recv_exact(sock, head)
                if got == 0:
                    break
                if got < HEADER.size:
                    raise EOFError("stream ended inside a header")
                offset, length = HEADER.unpack(head)
                if length > CHUNK or _recv_exact(sock, buf[:length]) != length:
                    raise EOFError(f"bad or truncated chunk at offset {offset}")
                view = buf[:length]
                if term is not None:
                    terms[index] += term(view, offset)
                while fd is not None and view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
                total[index] += length
            if ctx is not None:
                sock.unwrap()  # the sender's close came: answer it, after our last write

    threads = _Threads(serve)
    try:
        with socket.create_server((host, port), backlog=channels) as server:
            bound = server.getsockname()
            print(f"listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
            for index in range(channels):
                threads.start(index, server.accept()[0])
        start = time.perf_counter()
        threads.join()
    finally:
        if fd is not None:
            os.close(fd)
    print(json.dumps({"bytes": sum(total), "seconds": time.perf_counter() - start,
                      "digest": _digest(terms) if digest else None}), flush=True)
    return 0


def send(address: str, image: str, channels: int, tls: str | None = None,
         digest: bool = False) -> int:
    host, port = _split(address)
    ctx = None if tls is None else _tls_context(tls, server_side=False)
    fd = os.open(image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    total = [0] * channels
    terms = [0] * channels
    term = _hasher(digest)
    start = time.perf_counter()
    # Connect all first, then each thread does its own TLS handshake, if any.
    socks = [socket.create_connection((host, port)) for _ in range(channels)]

    def pump(index: int) -> None:
        sock = socks[index]
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=host, suppress_ragged_eofs=False)
        with sock:
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
                if term is not None:
                    terms[index] += term(buf[HEADER.size:HEADER.size + length], offset)
                HEADER.pack_into(buf, 0, offset, length)
                sock.sendall(buf[:HEADER.size + length])
                total[index] += length
            if ctx is not None:
                sock.unwrap()  # our TLS close, then the receiver's, sent after its last write
                return
            sock.shutdown(socket.SHUT_WR)
            if sock.recv(1):
                raise ConnectionError("receiver sent data")

    threads = _Threads(pump)
    try:
        for index in range(channels):
            threads.start(index)
        threads.join()
    finally:
        os.close(fd)
    print(json.dumps({"bytes": sum(total), "seconds": time.perf_counter() - start,
                      "digest": _digest(terms) if digest else None}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multifd.tools.rawcopy",
                                description="Minimal parallel TCP file copy (benchmark baseline).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="accept N connections and write what arrives")
    r.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0 picks one")
    r.add_argument("--channels", type=int, default=4, metavar="N", help="connections (default 4)")
    r.add_argument("out", metavar="OUT", nargs="?", help="file to create or overwrite")
    r.add_argument("--discard", action="store_true", help="receive, write nothing")
    r.add_argument("--tls", metavar="DIR", help="mutual TLS 1.3 with DIR's server-cert.pem, "
                   "server-key.pem and ca-cert.pem")
    r.add_argument("--digest", action="store_true", help="hash every chunk (XXH3-128)")
    s = sub.add_parser("send", help="send IMAGE over N connections")
    s.add_argument("address", metavar="HOST:PORT")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--channels", type=int, default=4, metavar="N", help="connections (default 4)")
    s.add_argument("--tls", metavar="DIR", help="mutual TLS 1.3 with DIR's client-cert.pem, "
                   "client-key.pem and ca-cert.pem")
    s.add_argument("--digest", action="store_true", help="hash every chunk (XXH3-128)")
    args = p.parse_args(argv)
    if args.channels < 1:
        p.error("--channels must be at least 1")
    try:
        if args.cmd == "send":
            return send(args.address, args.image, args.channels, args.tls, args.digest)
        if args.discard == (args.out is not None):
            p.error("give either OUT or --discard")
        return recv(args.listen, args.channels, args.out, args.tls, args.digest)
    except (OSError, EOFError, ValueError) as exc:
        print(f"rawcopy {args.cmd}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
