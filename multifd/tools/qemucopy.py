"""The least code that captures a paused QEMU's multifd pages: the baseline `multifd-bench
--qemu` compares `multifd-recv --qemu` with, in the same run.

    python -m multifd.tools.qemucopy --listen 127.0.0.1:0 DIR

One thread per connection, blocking sockets, one reused buffer each. The main channel is read
to its end and thrown away. A multifd channel's 64-byte init is skipped, then each packet's
1344-byte header gives the block, the page offsets and the payload size (normal_pages x 4096,
no compression), and the payload is read straight into the buffer and written with one
pwrite per run of contiguous pages into DIR/<block>, created on first use. No checks, no sync rule (a paused
guest sends each page once), no digest, no device state: what is left is the work every
capture must do. It exits once the main channel and every multifd channel have ended.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

HEADER = 64 + 256 + 8 * 128
PAGE = 4096


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False at the end of the stream before its first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if n == 0:
            if got:
                raise EOFError("stream cut inside a packet")
            return False
        got += n
    return True


class Capture:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.files: dict[bytes, int] = {}
        self.lock = threading.Lock()

    def fd(self, block: bytes) -> int:
        with self.lock:
            if block not in self.files:
                name = block.decode().replace("/", "%2F")
                self.files[block] = os.open(os.path.join(self.directory, name),
                                            os.O_RDWR | os.O_CREAT, 0o644)
            return self.files[block]

    def channel(self, sock: socket.socket, main_ended: threading.Event) -> None:
        buf = bytearray(128 * PAGE)
        head = bytearray(HEADER)
        first = sock.recv(4, socket.MSG_WAITALL)
        if first != b"QEVM":
            _recv_exactly(sock, memoryview(bytearray(60)))  # the rest of the init
            while _recv_exactly(sock, memoryview(head)):
                normal = struct.unpack_from(">I", head, 16)[0]
                if not normal:
                    continue
                block = bytes(head[64:320]).split(b"\0", 1)[0]
                offsets = struct.unpack_from(f">{normal}Q", head, 320)
                view = memoryview(buf)[:normal * PAGE]
                _recv_exactly(sock, view)
                fd, start = self.fd(block), 0
                for i in range(1, normal + 1):  # one write per run of contiguous pages
                    if i == normal or offsets[i] != offsets[i - 1] + PAGE:
                        os.pwrite(fd, view[start * PAGE:i * PAGE], offsets[start])
                        start = i
        else:
            while sock.recv_into(buf):
                pass
            main_ended.set()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    host, _, port = args[args.index("--listen") + 1].rpartition(":")
    directory = args[-1]
    os.makedirs(directory, exist_ok=True)
    server = socket.create_server((host, int(port)))
    print(f"listening on {host}:{server.getsockname()[1]}", file=sys.stderr, flush=True)
    capture, threads, main_ended = Capture(directory), [], threading.Event()
    server.settimeout(0.05)
    while not main_ended.is_set():
        try:
            sock, _ = server.accept()
        except TimeoutError:
            continue
        sock.settimeout(None)
        thread = threading.Thread(target=capture.channel, args=(sock, main_ended))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
