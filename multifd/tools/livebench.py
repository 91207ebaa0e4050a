"""multifd-bench --live-rates 0,50MB/s,...: live precopy at each dirty rate, side by side.

Each rate runs a real `multifd-recv --discard` and `multifd-send --live` over 127.0.0.1 on
one random image, with the bench's channels, and reports what the sender's --json says:
rounds, whether precopy converged, the total time (from its first connection to the
receiver's DONE, as QEMU's total-time runs from `migrate` to completed), and the downtime
(workload paused to the receiver's DONE; and as the receiver measured it, from the start of
its last round to its verified commit). Rate 0 is a still guest, as a baseline.

With `repeat`, each rate runs that many times and the run with the median downtime is
reported (all its figures from that one run). With `qemu`, each rate also runs QEMU's own
live migration of a guest that writes the same image at that rate (multifd.tools.qemulive),
reported by QEMU's own clock beside it. QEMU's guest writes uniformly only; with another
pattern its column says so.
"""

from __future__ import annotations

import json
import math
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


def _qemu(image: str, rate: float, channels: int, pattern: str, timeout: float) -> dict:
    from . import qemulive
    from .qemu import QemuError
    if pattern != "uniform":
        return {"skipped": f"QEMU's guest writes uniformly, not {pattern}"}
    try:
        return qemulive.run(image, channels, rate, timeout)
    except ValueError as exc:  # a size or rate the guest cannot do: the rest of the bench can
        return {"skipped": f"QEMU's guest: {exc}"}
    except (QemuError, OSError) as exc:
        return {"error": str(exc).splitlines()[0]}


def median_run(runs: list[dict]) -> dict:
    """The run with the median downtime (the median total time where none has a downtime),
    all its figures from that one run. A run that did not converge ranks as the longest
    downtime; failed runs are counted, and chosen only if nothing else ran. `all` keeps
    every run."""
    done = [r for r in runs if "error" not in r and "skipped" not in r]
    counts = {"runs": len(runs), "converged_runs": sum(r.get("converged") is True for r in runs),
              "failed_runs": sum("error" in r for r in runs)}
    if not done:
        return {**runs[0], **counts, "all": runs}

    def rank(r: dict) -> float:
        if not r["converged"]:
            return math.inf
        return r["downtime"] if r.get("downtime") is not None else r["seconds"]
    chosen = sorted(done, key=rank)[(len(done) - 1) // 2]
    return {**chosen, **counts, "all": runs}


def run(size: int, channels: int, rates: list[float], pattern: str, directory: str,
        timeout: float, log, qemu: bool = False, repeat: int = 1) -> dict:
    """Each rate `repeat` times, multifd's run and QEMU's alternating which goes first."""
    with tempfile.TemporaryDirectory(prefix="multifd-livebench-", dir=directory) as work:
        image = os.path.join(work, "image")
        write_image(image, size, "random", 1)
        results = []
        for rate in rates:
            ours: list[dict] = []
            theirs: list[dict] = []
            for k in range(repeat):
                cases = [("", ours, lambda: _one(image, rate, channels, pattern, timeout))]
                if qemu:
                    cases.append((", QEMU", theirs,
                                  lambda: _qemu(image, rate, channels, pattern, timeout)))
                for label, runs, case in (cases if k % 2 == 0 else cases[::-1]):
                    runs.append(case())
                    log(f"live N={channels} {rate / 1e6:.0f} MB/s{label} [{k + 1}/{repeat}]: "
                        f"{runs[-1]}")
            result = {"dirty_rate": rate, **median_run(ours)}
            if qemu:
                result["qemu"] = median_run(theirs)
            results.append(result)
    return {"size": size, "channels": channels, "pattern": pattern, "repeat": repeat,
            "live": results}


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _converged(r: dict) -> str:
    failed = f", {r['failed_runs']} failed" if r.get("failed_runs") else ""
    if r.get("runs", 1) > 1:
        return f"{r['converged_runs']}/{r['runs']}{failed}"
    return "yes" if r["converged"] else "no"


def _qemu_cells(q: dict) -> str:
    if "error" in q or "skipped" in q:
        return f"{'FAILED: ' + q['error'] if 'error' in q else q['skipped']} | | | |"
    runs = ""
    if q.get("converged_runs", 1) < q.get("runs", 1):
        failed = f", {q['failed_runs']} failed" if q.get("failed_runs") else ""
        runs = f" ({q['converged_runs']}/{q['runs']} converged{failed})"
    if not q["converged"]:
        return f"{q['why']}{runs} | | | {q['guest_rate'] / 1e6:.0f} MB/s |"
    return (f"{q['seconds']:.2f} s{runs} | {_ms(q['downtime'])} | {q['syncs']} | "
            f"{q['guest_rate'] / 1e6:.0f} MB/s |")


def table(result: dict) -> str:
    qemu = any("qemu" in r for r in result["live"])
    head = ("| dirty rate | rounds | converged | total time | downtime | receiver's downtime |"
            + (" QEMU total time | QEMU downtime | QEMU syncs | QEMU guest's rate |"
               if qemu else ""))
    lines = [f"live precopy, {result['size'] >> 20} MiB image, {result['channels']} channels, "
             f"{result['pattern']} writes; of {result.get('repeat', 1)} run(s) each, the one "
             f"with the median downtime", head, "|---" * head.count(" | ") + "|---|"]
    for r in result["live"]:
        if "error" in r:
            row = f"| {r['dirty_rate'] / 1e6:.0f} MB/s | FAILED: {r['error']} | | | | |"
        else:
            row = (f"| {r['dirty_rate'] / 1e6:.0f} MB/s | {r['rounds']} | "
                   f"{_converged(r)} | {r['seconds']:.2f} s | "
                   f"{_ms(r['downtime'])} | {_ms(r['receiver_downtime'])} |")
        if qemu:
            row += " " + _qemu_cells(r.get("qemu", {"skipped": "not run"}))
        lines.append(row)
    if qemu:
        lines.append("QEMU: a QEMU source and destination, QEMU's own total-time and "
                     "downtime (the source's stop to the migration's end); syncs: dirty-"
                     "bitmap syncs (setup, each iteration, the stop); the guest's rate: what "
                     "it wrote while it ran during the migration")
    return "\n".join(lines)
