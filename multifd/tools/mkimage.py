"""multifd-mkimage PATH --size SIZE [--kind random|zero|mixed] [--seed N]

Seeded, reproducible test images. The image is generated in fixed 1 MiB chunks, each from its
own generator seeded by (seed, chunk index), so the bytes do not depend on how it is written.
'mixed' alternates runs of zero pages and random pages (1..64 pages each).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import args as cliargs

CHUNK = 1 << 20
KINDS = ("random", "zero", "mixed")


def chunk_bytes(kind: str, seed: int, index: int, length: int, page_size: int) -> bytes:
    if kind == "zero":
        return bytes(length)
    # AES-256-CTR keystream: seeded, reproducible, and several GB/s (AES-NI).
    key = hashlib.sha256(f"multifd-mkimage:{seed}".encode()).digest()
    nonce = index.to_bytes(16, "big")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    data = bytearray(encryptor.update(bytes(length)))
    if kind == "mixed":
        rng = random.Random(seed * 1_000_003 + index)
        pages = -(-length // page_size)
        page, zero = 0, index % 2 == 0
        while page < pages:
            run = rng.randint(1, 64)
            if zero:
                data[page * page_size:(page + run) * page_size] = bytes(
                    len(data[page * page_size:(page + run) * page_size]))
            page += run
            zero = not zero
    return bytes(data)


def write_image(path: str, size: int, kind: str = "random", seed: int = 0,
                page_size: int = 4096) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for index, offset in enumerate(range(0, size, CHUNK)):
                length = min(CHUNK, size - offset)
                if kind == "zero":
                    f.seek(length, os.SEEK_CUR)
                else:
                    f.write(chunk_bytes(kind, seed, index, length, page_size))
            f.truncate(size)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = cliargs.Parser(prog="multifd-mkimage",
                       description="Write a seeded, reproducible test image.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--size", type=cliargs.size, required=True, help="e.g. 1G, 64MiB, 4096")
    p.add_argument("--kind", choices=KINDS, default="random")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        write_image(args.path, args.size, args.kind, args.seed)
    except OSError as exc:
        print(f"multifd-mkimage: cannot write {args.path}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
