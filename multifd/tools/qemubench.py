"""multifd-bench --qemu: a real QEMU source migrating into multifd-recv --qemu, beside the same
source migrating into a real QEMU destination, same guest, same channel count, same run.

Each run starts a fresh paused source (`pc`, --size of RAM, KVM where /dev/kvm works) with a
random image of half its RAM loaded into it (all normal pages; the rest is zero pages) and
migrates it with multifd over 127.0.0.1, unthrottled. Every figure is QEMU's own `total-time`
of the source, from `migrate` to `completed`, so both destinations are judged by the same
clock. The cases:

  qemu-dst            a QEMU destination (-incoming defer) with default memory: every page
                      it receives is faulted in as it is written
  qemu-dst-prealloc   the same destination started with -mem-prealloc
  multifd-recv        multifd-recv --qemu DIR (a new directory under --dir). Without the
                      return path QEMU reports completed once its last byte is sent, so the
                      receiver's exit (0, after it checked and put DIR in place) is awaited
                      too, and its time from `migrate` to that exit is shown beside
  qemucopy            multifd.tools.qemucopy: the least Python that captures the pages
                      (threads, recv and pwrite, no checks): what Python itself allows

Repeats alternate the order of the cases, as in multifd-bench, and report medians. GB/s is
guest RAM (decimal GB) over total-time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .benchproc import LISTENING, cpu_model, free_port
from .mkimage import write_image
from .qemu import Guest, QemuError

CASES = ("qemu-dst", "qemu-dst-prealloc", "multifd-recv", "qemucopy")
IMAGE_ADDR = 0x1000000


class QemuBench:
    def __init__(self, size: int, channels: int, directory: str, timeout: float,
                 tls_dir: str | None = None) -> None:
        self.size, self.channels, self.timeout = size, channels, timeout
        self.tls_dir = tls_dir  # both QEMUs' tls-creds-x509 and multifd-recv's --tls
        self.work = tempfile.mkdtemp(prefix="multifd-qemubench-", dir=directory)
        self.image = os.path.join(self.work, "image")
        try:
            write_image(self.image, size // 2, "random", 1)
        except BaseException:  # SIGTERM (an exception in multifd-bench) or a full disk
            self.close()
            raise

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def _source(self) -> Guest:
        return Guest(mem=f"{self.size >> 20}M", image=self.image, image_addr=IMAGE_ADDR,
                     tls_dir=self.tls_dir)

    def _migrate(self, source: Guest, uri: str) -> float:
        source.migrate(uri, channels=self.channels, tls=self.tls_dir is not None)
        return source.wait_completed(timeout=self.timeout)["total-time"] / 1e3

    def run(self, case: str) -> dict:
        tls = self.tls_dir is not None
        if case == "multifd-recv":
            return self._into_receiver(["-m", "multifd.recv_cli", "--listen", "127.0.0.1:0",
                                        "--quiet", *(["--tls", self.tls_dir] if tls else []),
                                        "--qemu"])
        if case == "qemucopy":
            if tls:
                return {"skipped": "qemucopy has no TLS"}
            return self._into_receiver(["-m", "multifd.tools.qemucopy", "--listen",
                                        "127.0.0.1:0"])
        port = free_port()
        with self._source() as source, Guest(mem=f"{self.size >> 20}M", incoming=True,
                                             mem_prealloc=case.endswith("prealloc"),
                                             tls_dir=self.tls_dir) as dst:
            dst.migrate_incoming(f"tcp:127.0.0.1:{port}", channels=self.channels, tls=tls)
            seconds = self._migrate(source, f"tcp:127.0.0.1:{port}")
            dst.wait_status("completed", timeout=self.timeout)
            creds = _tls_creds(source, dst)
        return {"seconds": seconds, "tls_creds": creds}

    def _into_receiver(self, argv: list[str]) -> dict:
        """Into a receiving process `argv` + [DIR] that prints `listening on HOST:PORT`."""
        out = os.path.join(self.work, "capture")
        recv = subprocess.Popen(
            [sys.executable, *argv, out], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            match = LISTENING.search(recv.stderr.readline())
            if match is None:
                raise QemuError(f"{argv[1]} did not start: {recv.stderr.read()[-500:]}")
            with self._source() as source:
                start = time.perf_counter()
                seconds = self._migrate(source, f"tcp:127.0.0.1:{match.group(2)}")
                if recv.wait(timeout=self.timeout) != 0:
                    raise QemuError(f"{argv[1]} exited {recv.returncode}: "
                                    f"{recv.stderr.read()[-500:]}")
                wall = time.perf_counter() - start
                creds = _tls_creds(source)
            return {"seconds": seconds, "receiver_seconds": wall, "tls_creds": creds}
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
            recv.stderr.close()
            shutil.rmtree(out, ignore_errors=True)


def _tls_creds(*guests: Guest) -> list[str]:
    """The tls-creds each QEMU migrated with ("tls0", or "" for plain TCP). QEMU runs TLS on
    a tcp: migration exactly when it is set, and a TLS destination refuses a plain source
    (and the other way round), so a completed migration proves which one both sides used."""
    return [g.cmd("query-migrate-parameters")["tls-creds"] for g in guests]


def summarize(size: int, channels: int, runs: dict, errors: dict,
              tls: bool = False) -> dict:
    cases = {}
    for case, results in runs.items():
        results = [r for r in results if "skipped" not in r]
        if not results:
            continue
        seconds = statistics.median(r["seconds"] for r in results)
        entry = {"runs": len(results), "total_time_s": round(seconds, 4),
                 "gb_per_s": round(size / seconds / 1e9, 3)}
        if "tls_creds" in results[0]:
            entry["tls_creds"] = sorted({c for r in results for c in r["tls_creds"]})
        if "receiver_seconds" in results[0]:
            entry["receiver_exit_s"] = round(
                statistics.median(r["receiver_seconds"] for r in results), 4)
        cases[case] = entry
    ratios = {}
    for case, base in (("multifd-recv", "qemu-dst"), ("multifd-recv", "qemu-dst-prealloc"),
                       ("multifd-recv", "qemucopy"), ("qemucopy", "qemu-dst")):
        if case in cases and base in cases:
            ratios[f"{case}/{base}"] = round(cases[case]["gb_per_s"] / cases[base]["gb_per_s"],
                                             3)
    return {"guest_ram": size, "channels": channels, "tls": tls, "cpu": cpu_model(),
            "cases": cases, "ratios": ratios, "errors": errors}


def table(result: dict) -> str:
    lines = [f"QEMU source -> destination, guest RAM {result['guest_ram'] >> 20} MiB (half "
             f"random), {result['channels']} multifd channels"
             f"{', TLS' if result.get('tls') else ''}, {result['cpu']}",
             "| case | QEMU total-time | GB/s | receiver exit |", "|---|---|---|---|"]
    for case, c in result["cases"].items():
        exit_s = f"{c['receiver_exit_s']:.3f} s" if "receiver_exit_s" in c else "–"
        lines.append(f"| {case} | {c['total_time_s'] * 1e3:.0f} ms | {c['gb_per_s']:.2f} | "
                     f"{exit_s} |")
    lines += [f"{name}: {value:.2f}x" for name, value in result["ratios"].items()]
    lines += [f"{case}: FAILED: {text}" for case, text in result["errors"].items()]
    return "\n".join(lines)


def run(size: int, channels: int, directory: str, repeat: int, timeout: float,
        log, tls_dir: str | None = None) -> dict:
    runs: dict = {case: [] for case in CASES}
    errors: dict = {}
    bench = QemuBench(size, channels, directory, timeout, tls_dir)
    try:
        for k in range(repeat):
            for case in (CASES if k % 2 == 0 else CASES[::-1]):
                if case in errors:
                    continue
                try:
                    r = bench.run(case)
                    runs[case].append(r)
                    note = f"skipped: {r['skipped']}" if "skipped" in r else \
                        f"{r['seconds'] * 1e3:.0f} ms"
                except (QemuError, OSError, subprocess.SubprocessError) as exc:
                    errors[case] = str(exc).splitlines()[0]
                    note = f"FAILED: {errors[case]}"
                log(f"QEMU N={channels}{' TLS' if tls_dir else ''} [{k + 1}/{repeat}] "
                    f"{case}: {note}")
    finally:
        bench.close()
    return summarize(size, channels, runs, errors, tls_dir is not None)
