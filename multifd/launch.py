"""The console entry points, and what belongs to a CLI process rather than to an importer.

Start-up settings that are process-wide (the collector off while importing, then frozen) and
the fast exit are made here, for a process that runs one CLI and ends; a program or test that
imports multifd's modules gets none of them.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys


def start(main) -> None:
    """Run a CLI's main() in this process and end it with main()'s exit code."""
    # Everything imported so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise rescan it on the hot path.
    gc.freeze()
    gc.enable()
    exit_now(main())


def _entry(module: str) -> None:
    # Imports build hundreds of thousands of objects that live as long as the process;
    # collecting while importing costs about a tenth of the start-up.
    gc.disable()
    start(importlib.import_module(module).main)


def send() -> None:
    _entry("multifd.send_cli")


def recv() -> None:
    _entry("multifd.recv_cli")


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (about 60 ms of the sender's run).

    Only once main() has returned: by then every file and socket has been closed by the
    scope that opened it, so only the output streams remain to flush.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass
    os._exit(code)
