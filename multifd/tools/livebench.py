"""multifd-bench --live-rates 0,50MB/s,...: live precopy at each dirty rate, side by side.

Each rate runs a real `multifd-recv --discard` and `multifd-send --live` over 127.0.0.1 on
one random image, with the bench's channels, and reports what the sender's --json says:
rounds, whether precopy converged, the total time (sender start to exit), and the downtime
(workload paused to the receiver's DONE; and as the receiver measured it, from the start of
its last round to its verified commit). Rate 0 is a still guest, as a baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .. import units
from .benchproc import LISTENING
from .mkimage import write_image



def parse_rates(text: str) -> list[float]:
    """`0,50MB/s,100MB/s`: rates in bytes/s (0 allowed: a still guest)."""
    rates = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        rates.append(0.0 if item == "0" else units.parse_rate(item))
    if not rates:
        raise ValueError("no rate given")
    return rates


def _one(image: str, rate: float, channels: int, pattern: str, timeout: float) -> dict:
    recv = subprocess.Popen([sys.executable, "-m", "multifd.recv_cli", "--listen",
                             "127.0.0.1:0", "--discard", "--quiet"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listening = LISTENING.search(recv.stderr.readline())
        if listening is None:
            return {"error": f"multifd-recv did not start: {recv.stderr.read()[-300:]}"}
        port = listening.group(2)
        args = [sys.executable, "-m", "multifd.send_cli", f"127.0.0.1:{port}", image,
                "--channels", str(channels), "--json", "--quiet"]
        if rate:
            args += ["--live", "--dirty-rate", f"{rate:.0f}", "--dirty-pattern", pattern]
        sent = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        recv.wait(timeout=timeout)
        if sent.returncode:
            lines = sent.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else f"multifd-send exited {sent.returncode}"}
        report = json.loads(sent.stdout)
        live = report.get("live") or {"rounds": [{}], "converged": True, "downtime": None,
                                      "receiver_downtime": None}
        return {"rounds": len(live["rounds"]), "converged": live["converged"],
                "seconds": round(report["seconds"], 3), "downtime": live["downtime"],
                "receiver_downtime": live["receiver_downtime"]}
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        recv.stderr.close()


def run(size: int, channels: int, rates: list[float], pattern: str, directory: str,
        timeout: float, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="multifd-livebench-", dir=directory) as work:
        image = os.path.join(work, "image")
        write_image(image, size, "random", 1)
        results = []
        for rate in rates:
            result = {"dirty_rate": rate, **_one(image, rate, channels, pattern, timeout)}
            log(f"live {rate / 1e6:.0f} MB/s: {result}")
            results.append(result)
    return {"size": size, "channels": channels, "pattern": pattern, "live": results}


def table(result: dict) -> str:
    lines = [f"live precopy, {result['size'] >> 20} MiB image, {result['channels']} channels, "
             f"{result['pattern']} writes",
             "| dirty rate | rounds | converged | total time | downtime | receiver's downtime |",
             "|---|---|---|---|---|---|"]
    for r in result["live"]:
        if "error" in r:
            lines.append(f"| {r['dirty_rate'] / 1e6:.0f} MB/s | FAILED: {r['error']} | | | | |")
            continue
        downtime, theirs = ("–" if t is None else f"{t * 1e3:.0f} ms"
                            for t in (r["downtime"], r["receiver_downtime"]))
        lines.append(f"| {r['dirty_rate'] / 1e6:.0f} MB/s | {r['rounds']} | "
                     f"{'yes' if r['converged'] else 'no'} | {r['seconds']:.2f} s | {downtime} "
                     f"| {theirs} |")
    return "\n".join(lines)
