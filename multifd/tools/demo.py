"""make demo: a real loopback migration through the two CLIs, then a byte-for-byte check.

    python -m multifd.tools.demo [--tls DIR]     (make demo passes the development certs/)
"""

from __future__ import annotations

import argparse
import filecmp
import re
import subprocess
import sys
import tempfile
import time

from .mkimage import write_image

SIZE = 256 << 20
CHANNELS = 4


def _start_receiver(out: str, tls: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "multifd.recv_cli", "--listen",
                             "127.0.0.1:0", out, "--quiet", *tls],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on (\S+)", line)
        if m:
            return proc, m.group(1)
        if not line:
            break
    proc.kill()
    raise SystemExit(f"demo: the receiver did not start: {proc.communicate()[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multifd.tools.demo",
                                     description="A verified loopback migration.")
    parser.add_argument("--tls", metavar="DIR", help="mutual TLS with the credentials in DIR")
    args = parser.parse_args(argv)
    tls = ["--tls", args.tls] if args.tls else []
    with tempfile.TemporaryDirectory(prefix="multifd-demo-") as tmp:
        image, out = f"{tmp}/guest.img", f"{tmp}/received.img"
        print(f"demo: writing a {SIZE >> 20} MiB test image (runs of zero and random pages)")
        write_image(image, SIZE, "mixed", seed=42)
        receiver, address = _start_receiver(out, tls)
        print(f"demo: multifd-recv listening on {address}; multifd-send over {CHANNELS} "
              f"channels{f', mutual TLS with the credentials in {args.tls}/' if tls else ''}")
        try:
            sender = subprocess.run([sys.executable, "-m", "multifd.send_cli", address, image,
                                     "--channels", str(CHANNELS), "--quiet", *tls],
                                    capture_output=True, text=True, timeout=300)
            recv_out, recv_err = receiver.communicate(timeout=60)
        finally:
            receiver.kill()
        sys.stdout.write(sender.stdout + recv_out)
        sys.stderr.write(sender.stderr + recv_err)
        if sender.returncode or receiver.returncode:
            print(f"demo: FAILED (sender exit {sender.returncode}, "
                  f"receiver exit {receiver.returncode})")
            return 1
        same = filecmp.cmp(image, out, shallow=False)
        print(f"demo: output {'identical to' if same else 'DIFFERS from'} the input "
              f"(byte-for-byte comparison; the demo's files are removed now)")
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
