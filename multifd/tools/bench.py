"""multifd-bench: multifd against what the machine can do, over a matrix of configurations.

    multifd-bench --size 1GiB --channels 1,2,4,8,16 --tls off,on --image random,mixed,zero \\
        --mode file,discard --repeat 3 --json r.json --plot r.png [--qemu] [--live-rates ...]

Every point of the matrix (channels x TLS x image x mode) runs a real `multifd-recv` and
`multifd-send` on 127.0.0.1 (case `multifd`), and beside it the minimal copier shipped here
(case `copier`: multifd.tools.rawcopy, threads and sockets, the same XXH3 digest work for the
random image (it hashes zero chunks too: for the other images it does more), the same TLS), and for the random image the copier once more after importing trio (case `copier+trio`:
the start-up multifd cannot do without, as the design is trio's structured concurrency); each
channel count also runs `iperf3 -P N -l 512K` (raw TCP, plain). Each run is timed
as the whole sender process from spawn to exit (start-up, handshakes and the final
verification count, as they do for a user), with the CPU seconds (wait4) and the peak
anonymous memory (RssAnon) of each process. Repeats interleave the runs, the order reversed
every other repeat (what ran just before a run changes its timing on a noisy machine), and
every figure is the median of its repeats. GB/s is decimal (1e9 bytes a second) of image
bytes. Into a file, the output is compared with the image byte for byte after each run.

Each figure is also given as a ratio to its baselines from the same run: multifd/copier for
the same point, multifd/iperf3 for the same channel count, and for the mixed and zero images
the rate against the random image at the same point. The goals (GOALS below) are judged on
those ratios, never on figures from another run. Where the same run also shows how far a goal
can go at a point, that is its bound, and a goal whose every miss lies beyond its bound is
"out of reach" on this machine:
  mixed / random      the random run's start-up (whole run less multifd's own clock) plus
                      half its transfer: the mixed image carries half the data
  multifd / copier    the copier after `import trio` over the bare copier
  multifd / QEMU dst  the minimal capture of QEMU's stream (qemucopy) over QEMU's
                      destination; with TLS, the TLS copier of the random image, counted as
                      carrying only the guest's data pages (half of its RAM)

--qemu adds, for every channel count and TLS setting, a real QEMU 7.2 source (a paused guest
of --size RAM with a random image of half its RAM loaded) migrating with multifd into a QEMU
destination (default memory, and -mem-prealloc) and into `multifd-recv --qemu`, timed by
QEMU's own total-time (multifd.tools.qemubench); it is compared with multifd's mixed image
(half zero pages) into a file. --live-rates adds the live precopy sweep
(multifd.tools.livebench) for each channel count; with --qemu also QEMU's own live migration
of a guest writing the same image at each rate (multifd.tools.qemulive).

Images are generated once and cached (--cache, default ~/.cache/multifd-bench; the zero image
is sparse), read once before the first timed run; outputs go to --dir (default /dev/shm).
Temporary files and credentials are removed on every way out (error, ^C, SIGTERM, which first
end the processes under test). On this kind of VM memory freed by the guest goes back to the
host and its first write is several times slower, so a run into a new file is preceded by
writing and deleting a file of the image's size (prime).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass

from .. import args as cliargs
from .. import units, wire
from ..errors import UsageError
from . import certs
from .benchproc import (BenchError, cpu_model, free_port, pair, stderr_port, tcp_listening,
                        tool, unlink)
from .mkimage import KINDS, write_image

PROG = "multifd-bench"
MODES = ("file", "discard")
CASES = ("multifd", "copier")
# The copier again, but paying first for the start-up multifd cannot do without: importing
# trio (structured concurrency is the design). Run for the random image, where the copier
# ratios are judged: the ratio to it shows what is left once that fixed cost is equal.
TRIO_COPIER = "copier+trio"
_TRIO_PRELUDE = ("import trio, sys; from multifd.tools.rawcopy import main; "
                 "sys.exit(main(sys.argv[1:]))")
GIB = 1 << 30
MIB = 1 << 20
# (name, what it judges, least value): the issue's targets, judged per point in one run.
GOALS = (
    ("zero image into a file", "multifd GB/s, zero image, file", 3.0),
    ("mixed / random", "multifd image-bytes rate, mixed over random, same point", 1.8),
    ("multifd / copier, random, discard", "multifd over the copier, same digest work", 0.95),
    ("multifd / copier, random, file", "multifd over the copier writing a new file", 0.85),
    ("multifd / QEMU dst, file", "multifd (mixed, file) over QEMU's default destination", 1.0),
    ("multifd / QEMU dst, TLS", "multifd (mixed, file, TLS) over QEMU's TLS destination", 1.3),
    # QEMU's total-time starts at `migrate` in a running process; multifd's own clock (its
    # --json seconds) starts at its first connection: both without process start-up.
    ("multifd / QEMU dst, file, transfer clock", "the same on multifd's own clock", 1.0),
    ("multifd / QEMU dst, TLS, transfer clock", "the same on multifd's own clock", 1.3),
)
MEMORY_GOAL = 100 * MIB  # peak RssAnon of each multifd process
QEMU_DATA_SHARE = 0.5  # of the --qemu guest's RAM that is data (qemubench loads half)


@dataclass(frozen=True, order=True)
class Point:
    channels: int
    tls: bool
    image: str
    mode: str

    def label(self) -> str:
        return f"{self.image} {self.mode} N={self.channels}{' TLS' if self.tls else ''}"


def _list(kind, choices=None):
    """An argparse type: a comma-separated list of `kind`, each among `choices`."""
    def parse(text: str) -> list:
        try:
            items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list") from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [i for i in items if choices is not None and i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))} not in "
                                             f"{', '.join(map(str, choices))}")
        return list(dict.fromkeys(items))
    return parse


def _onoff(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: on or off")
    return text == "on"


# -- running ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args) -> None:
        self.size, self.timeout, self.dir = args.size, args.timeout, args.dir
        self.cache = args.cache
        self.output = os.path.join(args.dir, f"multifd-bench-{os.getpid()}.out")
        self.iperf3 = shutil.which("iperf3")
        self.send = tool("multifd-send", "multifd.send_cli")
        self.recv = tool("multifd-recv", "multifd.recv_cli")
        self.tls_dir: str | None = None  # the credentials of the TLS runs, while they exist

    # -- TLS credentials and files ------------------------------------------------------

    def make_credentials(self) -> None:
        """A CA, a server certificate for 127.0.0.1 and a client certificate, in a private
        (0700) temporary directory that drop_credentials removes."""
        self.tls_dir = tempfile.mkdtemp(prefix="multifd-bench-tls-")
        certs.generate(self.tls_dir, ["127.0.0.1"])

    def drop_credentials(self) -> None:
        if self.tls_dir is not None:
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            self.tls_dir = None

    def image(self, kind: str) -> str:
        return os.path.join(self.cache, f"{kind}-{self.size}.img")

    def prepare_image(self, kind: str) -> bool:
        """The cached image of `kind`, made if missing, then read once (into the page cache,
        as every run will find it). Returns whether it was already there."""
        path = self.image(kind)
        found = os.path.isfile(path) and os.path.getsize(path) == self.size
        if not found:
            os.makedirs(self.cache, exist_ok=True)
            write_image(path, self.size, kind, seed=0)
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(8 * MIB)
            while f.readinto(buf):
                pass
        return found

    def prime(self) -> None:
        """Write and delete a file of the image's size, so that the output's pages are ones
        the host has backed just now (see the module docstring)."""
        path = self.output + ".prime"
        try:
            block = bytes(8 * MIB)
            with open(path, "wb") as f:
                for offset in range(0, self.size, len(block)):
                    f.write(block[:self.size - offset])
        finally:
            unlink(path)

    def drop_outputs(self) -> None:
        """The output, and any partial file multifd-recv left beside it."""
        unlink(self.output)
        prefix = f".{os.path.basename(self.output)}."
        for name in os.listdir(self.dir):
            if name.startswith(prefix) and name.endswith(".part"):
                unlink(os.path.join(self.dir, name))

    def output_identical(self, kind: str) -> bool:
        if os.path.getsize(self.output) != self.size:
            return False
        with open(self.image(kind), "rb") as a, open(self.output, "rb") as b:
            while True:
                chunk = a.read(4 * MIB)
                if chunk != b.read(4 * MIB):
                    return False
                if not chunk:
                    return True

    # -- one run ------------------------------------------------------------------------

    def run(self, case: str, point: Point) -> dict:
        """One timed run of `case` at `point`: seconds, CPU and peak memory of each side."""
        if case == "iperf3":
            return self.case_iperf3(point.channels)
        file = point.mode == "file"
        if file:
            self.prime()
        self.drop_outputs()
        try:
            result = self.case_multifd(point) if case == "multifd" else \
                self.case_copier(point, trio=case == TRIO_COPIER)
            if file and not self.output_identical(point.image):
                raise BenchError("the output differs from the image")
            return result
        finally:
            self.drop_outputs()

    def _secure(self, point: Point) -> list[str]:
        if not point.tls:
            return []
        if self.tls_dir is None:
            raise BenchError("no TLS credentials (make_credentials was not called)")
        return ["--tls", self.tls_dir]

    def _into(self, point: Point) -> list[str]:
        return [self.output] if point.mode == "file" else ["--discard"]

    def case_multifd(self, point: Point) -> dict:
        secure, n = self._secure(point), str(point.channels)
        server = ("multifd-recv", self.recv + ["--listen", "127.0.0.1:0", "--quiet", "--json",
                                               *secure, *self._into(point)])
        client = ("multifd-send", lambda port: self.send + [
            f"127.0.0.1:{port}", self.image(point.image), "--channels", n, "--quiet",
            "--json", *secure])
        with pair(server, stderr_port, client, self.timeout) as (srv, cln):
            reports = [srv.json(), cln.json()]
            if not all(r.get("ok") and r.get("bytes") == self.size for r in reports) or \
                    reports[0].get("digest") != reports[1].get("digest"):
                raise BenchError(f"multifd reports disagree: {reports}")
            # the sender's own clock: first connection to the receiver's DONE
            return {**_stats(srv, cln), "transfer_seconds": reports[1]["seconds"]}

    def case_copier(self, point: Point, trio: bool = False) -> dict:
        raw = [sys.executable, *(["-c", _TRIO_PRELUDE] if trio else
                                 ["-m", "multifd.tools.rawcopy"])]
        common = ["--channels", str(point.channels), "--digest", *self._secure(point)]
        server = ("copier recv", raw + ["recv", "--listen", "127.0.0.1:0", *common,
                                        *self._into(point)])
        client = ("copier send", lambda port: raw + [
            "send", f"127.0.0.1:{port}", self.image(point.image), *common])
        with pair(server, stderr_port, client, self.timeout) as (srv, cln):
            reports = [srv.json(), cln.json()]
            if any(r.get("bytes") != self.size for r in reports) or \
                    reports[0]["digest"] != reports[1]["digest"]:
                raise BenchError(f"copier reports disagree: {reports}")
            return _stats(srv, cln)

    def case_iperf3(self, channels: int) -> dict:
        if self.iperf3 is None:
            raise BenchError("iperf3 is not installed (make bench installs it)")
        port = free_port()
        server = ("iperf3 -s", [self.iperf3, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)])
        client = ("iperf3 -c", lambda _: [
            self.iperf3, "-c", "127.0.0.1", "-p", str(port), "-P", str(channels),
            "-l", "512K", "-n", str(self.size), "-J"])
        ready = lambda _: port if tcp_listening(port) else None  # noqa: E731
        with pair(server, ready, client, self.timeout) as (srv, cln):
            try:
                sent = cln.json()["end"]["sum_sent"]
            except KeyError:
                raise BenchError("iperf3 JSON has no end.sum_sent") from None
            # The server's count can stop short of the last bytes in flight when the test
            # ends (seen under CPU contention), so the sender's count is the one checked.
            if sent["bytes"] < self.size:
                raise BenchError(f"iperf3 sent {sent['bytes']} bytes, not {self.size}")
            return _stats(srv, cln)


def _stats(server, client) -> dict:
    return {"seconds": client.seconds, "sender_cpu_s": client.cpu, "receiver_cpu_s": server.cpu,
            "sender_rss": client.peak_rss, "receiver_rss": server.peak_rss}


# -- the matrix -------------------------------------------------------------------------


def jobs(args) -> list[tuple[str, Point]]:
    """Every (case, point) to run, in the order of one repeat: each point's cases side by
    side, and each channel count's iperf3 before its points."""
    out = []
    for n in args.channels:
        if not args.skip_iperf:
            out.append(("iperf3", Point(n, False, "-", "-")))
        for tls in args.tls:
            for image in args.image:
                for mode in args.mode:
                    for case in CASES + ((TRIO_COPIER,) if image == "random" else ()):
                        out.append((case, Point(n, tls, image, mode)))
    return out


def summarize(size: int, runs: dict, errors: dict) -> dict:
    """Medians per (case, point), the ratios to their baselines, and the goals."""
    def key(case: str, point: Point) -> str:
        return f"{case} {point.label()}" if case != "iperf3" else f"iperf3 N={point.channels}"

    results = {}
    for (case, point), rs in runs.items():
        entry = {"case": case, **asdict(point)}
        if (case, point) in errors:
            entry.update(ok=False, error=errors[(case, point)])
        elif rs:
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            entry.update(ok=True, runs=len(rs), seconds=med["seconds"],
                         gbps=size / med["seconds"] / 1e9,
                         sender_cpu_s=med["sender_cpu_s"], receiver_cpu_s=med["receiver_cpu_s"],
                         sender_rss_mib=max(r["sender_rss"] for r in rs) / MIB,
                         receiver_rss_mib=max(r["receiver_rss"] for r in rs) / MIB)
            if "transfer_seconds" in med:
                entry.update(transfer_seconds=med["transfer_seconds"],
                             transfer_gbps=size / med["transfer_seconds"] / 1e9)
        else:
            continue
        results[key(case, point)] = entry

    def gbps(case: str, point: Point) -> float | None:
        entry = results.get(key(case, point))
        return entry["gbps"] if entry and entry.get("ok") else None

    rows = []
    for (case, point) in runs:
        if case != "multifd":
            continue
        ours, copier = gbps("multifd", point), gbps("copier", point)
        trio_copier = gbps(TRIO_COPIER, point)
        iperf = gbps("iperf3", Point(point.channels, False, "-", "-"))
        random = gbps("multifd", Point(point.channels, point.tls, "random", point.mode))
        entry = results.get(key("multifd", point), {})
        rows.append({**asdict(point), "multifd_gbps": ours,
                     "transfer_gbps": entry.get("transfer_gbps"), "copier_gbps": copier,
                     "iperf3_gbps": iperf,
                     "copier_trio_gbps": trio_copier, "vs_copier": _ratio(ours, copier),
                     "vs_copier_trio": _ratio(ours, trio_copier),
                     "vs_iperf3": _ratio(ours, iperf),
                     "vs_random": None if point.image == "random" else _ratio(ours, random),
                     **{k: entry.get(k) for k in ("sender_cpu_s", "receiver_cpu_s",
                                                  "sender_rss_mib", "receiver_rss_mib")}})
    return {"results": results, "points": rows, "goals": _goals(rows)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mixed_bound(random: dict | None) -> float | None:
    """The most `mixed / random` can be at the random row's point, from that row alone: the
    mixed image carries half the data, so at best it costs the same start-up (whole run less
    transfer clock) and half the transfer."""
    if not random or not random.get("multifd_gbps") or not random.get("transfer_gbps"):
        return None
    whole, transfer = 1 / random["multifd_gbps"], 1 / random["transfer_gbps"]
    return whole / (whole - transfer / 2)


def _goals(rows: list[dict], qemu: list[dict] | None = None) -> list[dict]:
    """Each goal judged at every point it applies to (None: no such point ran). Where the same
    run shows how far the goal can go at a point (a minimal program doing the same work, or
    arithmetic on the run's own figures), that is its `bound`; a goal whose every miss lies
    beyond its bound is out of reach on this machine (`settled`)."""
    def judged(name: str, values: list[tuple]) -> dict:
        least = {g[0]: g[2] for g in GOALS}[name]
        got = [(where, v, *bound) for where, v, *bound in values if v is not None]
        entries = []
        for where, v, *bound in got:
            entry = {"where": where, "value": round(v, 3), "pass": v >= least}
            if bound and bound[0] is not None:
                entry["bound"] = round(bound[0], 3)
            entries.append(entry)
        misses = [e for e in entries if not e["pass"]]
        return {"goal": name, "least": least, "values": entries,
                "pass": all(e["pass"] for e in entries) if entries else None,
                "settled": bool(misses) and all(e.get("bound", least) < least
                                                for e in misses)}

    def label(r: dict) -> str:
        return Point(r["channels"], r["tls"], r["image"], r["mode"]).label()

    def random_at(r: dict) -> dict | None:
        return next((x for x in rows if x["image"] == "random" and x["mode"] == r["mode"]
                     and x["channels"] == r["channels"] and x["tls"] == r["tls"]), None)

    copier_bound = {r["mode"]: [] for r in rows}
    for r in rows:
        if r["image"] == "random":  # the copier after trio's import: what trio alone leaves
            copier_bound[r["mode"]].append(
                (label(r), r["vs_copier"], _ratio(r["copier_trio_gbps"], r["copier_gbps"])))
    out = [judged("zero image into a file", [(label(r), r["multifd_gbps"]) for r in rows
                                             if r["image"] == "zero" and r["mode"] == "file"]),
           judged("mixed / random", [(label(r), r["vs_random"], _mixed_bound(random_at(r)))
                                     for r in rows if r["image"] == "mixed"]),
           judged("multifd / copier, random, discard", copier_bound.get("discard", [])),
           judged("multifd / copier, random, file", copier_bound.get("file", []))]
    # (clock, TLS or not): [(where, ratio, bound)]
    against_qemu: dict[tuple[str, bool], list] = {}
    for q in qemu or ():
        ours = next((r for r in rows if r["image"] == "mixed" and r["mode"] == "file"
                     and r["channels"] == q["channels"] and r["tls"] == q["tls"]), {})
        theirs = q["cases"].get("qemu-dst", {}).get("gb_per_s")
        if q["tls"]:  # the TLS copier, as if it carried only the guest's data pages
            copier = next((r["copier_gbps"] for r in rows if r["image"] == "random"
                           and r["mode"] == "file" and r["channels"] == q["channels"]
                           and r["tls"]), None)
            bound = _ratio(None if copier is None else copier / QEMU_DATA_SHARE, theirs)
        else:  # the least Python that captures QEMU's own stream
            bound = _ratio(q["cases"].get("qemucopy", {}).get("gb_per_s"), theirs)
        for clock in ("multifd_gbps", "transfer_gbps"):
            against_qemu.setdefault((clock, q["tls"]), []).append(
                (f"N={q['channels']}", _ratio(ours.get(clock), theirs), bound))
    if qemu:
        for clock, suffix in (("multifd_gbps", ""), ("transfer_gbps", ", transfer clock")):
            out.append(judged(f"multifd / QEMU dst, file{suffix}",
                              against_qemu.get((clock, False), [])))
            out.append(judged(f"multifd / QEMU dst, TLS{suffix}",
                              against_qemu.get((clock, True), [])))
    memory = [(f"{r['image']} {r['mode']} N={r['channels']}{' TLS' if r['tls'] else ''}",
               max(r["sender_rss_mib"], r["receiver_rss_mib"])) for r in rows
              if r["sender_rss_mib"] is not None]
    out.append({"goal": "peak RssAnon of each multifd process (MiB)",
                "most": MEMORY_GOAL / MIB,
                "values": [{"where": w, "value": round(v, 1), "pass": v <= MEMORY_GOAL / MIB}
                           for w, v in memory],
                "pass": all(v <= MEMORY_GOAL / MIB for _, v in memory) if memory else None})
    return out


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def table(result: dict) -> str:
    r = result
    size = f"{r['size'] / GIB:g} GiB" if r["size"] >= GIB else f"{r['size'] / MIB:g} MiB"
    lines = [f"{PROG}: {size} images, {r['cpu']}, median of {r['repeat']} "
             f"run(s); GB/s = 1e9 image bytes a second over the whole sender run (transfer: "
             f"on multifd's own clock, first connection to DONE, without start-up)", "",
             "| image | mode | N | TLS | multifd GB/s | transfer GB/s | copier GB/s | x copier "
             "| x copier+trio | iperf3 GB/s | x iperf3 | x random | CPU s send/recv "
             "| RssAnon MiB send/recv |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        cpu = (f"{p['sender_cpu_s']:.2f} / {p['receiver_cpu_s']:.2f}"
               if p["sender_cpu_s"] is not None else "–")
        rss = (f"{p['sender_rss_mib']:.0f} / {p['receiver_rss_mib']:.0f}"
               if p["sender_rss_mib"] is not None else "–")
        lines.append(f"| {p['image']} | {p['mode']} | {p['channels']} | "
                     f"{'on' if p['tls'] else 'off'} | {_fmt(p['multifd_gbps'])} | "
                     f"{_fmt(p.get('transfer_gbps'))} | "
                     f"{_fmt(p['copier_gbps'])} | {_fmt(p['vs_copier'])} | "
                     f"{_fmt(p['vs_copier_trio'])} | "
                     f"{_fmt(p['iperf3_gbps'])} | {_fmt(p['vs_iperf3'])} | "
                     f"{_fmt(p['vs_random'])} | {cpu} | {rss} |")
    failed = [(k, e["error"]) for k, e in r["results"].items() if not e.get("ok")]
    lines += [f"FAILED {k}: {why}" for k, why in failed]
    for q in r.get("qemu", []):
        lines += ["", _qemu_table(q)]
    for live in r.get("live", []):
        from . import livebench
        lines += ["", livebench.table(live)]
    lines += ["", "| goal | least | result | worst point |", "|---|---|---|---|"]
    for g in r["goals"]:
        bound = f">= {g['least']:g}" if "least" in g else f"<= {g['most']:g}"
        if g["pass"] is None:
            lines.append(f"| {g['goal']} | {bound} | n/a (no such point ran) | |")
            continue
        worst = (min if "least" in g else max)(g["values"], key=lambda v: v["value"])
        verdict = "PASS" if g["pass"] else "MISS, out of reach" if g.get("settled") else "MISS"
        reach = f" (bound in this run: {worst['bound']:g})" \
            if "bound" in worst and not worst["pass"] else ""
        lines.append(f"| {g['goal']} | {bound} | {verdict} | "
                     f"{worst['value']:g} at {worst['where']}{reach} |")
    return "\n".join(lines)


def _qemu_table(q: dict) -> str:
    from . import qemubench
    return qemubench.table(q)


# -- the command line -------------------------------------------------------------------


def build_parser() -> cliargs.Parser:
    p = cliargs.Parser(prog=PROG, description="Time multifd against a minimal copier, raw TCP "
                       "(iperf3) and, with --qemu, QEMU's own multifd, over a matrix of "
                       "configurations; see the module docstring.")
    p.add_argument("--size", type=cliargs.size, default=units.parse_size("1G"),
                   help="image size, e.g. 256M, 1GiB (default 1G)")
    p.add_argument("--channels", type=_list(int), default=[4], metavar="LIST",
                   help=f"channel counts, e.g. 1,4,8 (1..{wire.MAX_CHANNELS}; default 4)")
    p.add_argument("--tls", type=_list(_onoff), default=[False], metavar="LIST",
                   help="off, on, or off,on (default off)")
    p.add_argument("--image", type=_list(str, KINDS), default=["random"], metavar="LIST",
                   help=f"image kinds: {','.join(KINDS)} (default random)")
    p.add_argument("--mode", type=_list(str, MODES), default=list(MODES), metavar="LIST",
                   help="file (a new output file), discard (verify, write nothing), or both "
                   "(default)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="run the matrix K times, interleaved, and report medians (default 1)")
    p.add_argument("--dir", default="/dev/shm",
                   help="where the output files go (default /dev/shm)")
    p.add_argument("--cache", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multifd-bench"),
        help="where the images are kept between runs (default ~/.cache/multifd-bench)")
    p.add_argument("--timeout", type=cliargs.duration, default=300.0, metavar="S",
                   help="bound on each process run (default 300)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write all results as one JSON object to PATH (- or nothing: stdout, "
                   "instead of the table)")
    p.add_argument("--plot", metavar="PATH",
                   help="draw the results into PATH (PNG; needs matplotlib: pip install "
                   "multifd[plot])")
    p.add_argument("--skip-iperf", action="store_true", help="do not run iperf3")
    p.add_argument("--qemu", action="store_true",
                   help="add a real QEMU source into QEMU destinations and into multifd-recv "
                   "--qemu, per channel count and TLS setting (multifd.tools.qemubench)")
    p.add_argument("--live-rates", metavar="LIST",
                   help="add live precopy at each dirty rate, e.g. 0,100MB/s,400MB/s, per "
                   "channel count (multifd.tools.livebench), writes in --live-pattern")
    p.add_argument("--live-pattern", default="uniform", metavar="PATTERN",
                   help="the workload's pattern for --live-rates (default uniform)")
    p.add_argument("--no-matrix", action="store_true",
                   help="only what --qemu and --live-rates add")
    return p


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that every finally (children, keys) runs."""


def _on_sigterm(signum, frame) -> None:
    # Once: a second SIGTERM must not cut short the cleanup the first one started. main()
    # puts the previous handler back when it is done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated


def _log(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _check(parser, args) -> None:
    if any(not 1 <= n <= wire.MAX_CHANNELS for n in args.channels):
        parser.error(f"--channels must be in 1..{wire.MAX_CHANNELS}")
    if args.repeat < 1 or args.size < 1:
        parser.error("--repeat and --size must be positive")
    if not os.path.isdir(args.dir) or not os.access(args.dir, os.W_OK | os.X_OK):
        parser.error(f"--dir {args.dir} is not a writable directory")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib (pip install multifd[plot])")
    # Checked before the runs: a path that cannot be written must not cost a whole matrix.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and path != "-":
            parent = os.path.dirname(os.path.abspath(path))
            if os.path.isdir(path) or not os.access(parent, os.W_OK | os.X_OK):
                parser.error(f"{option} {path}: not a file that can be written here")
    if args.live_rates:
        from . import livebench
        try:
            args.rates = livebench.parse_rates(args.live_rates)
        except ValueError as exc:
            parser.error(f"--live-rates: {exc}")


def _run_matrix(bench: Bench, args) -> tuple[dict, dict]:
    todo = [] if args.no_matrix else jobs(args)
    runs: dict = {job: [] for job in todo}
    errors: dict = {}
    if any(p.tls for _, p in todo) or (args.qemu and True in args.tls):
        bench.make_credentials()
    for kind in dict.fromkeys(p.image for _, p in todo if p.image != "-"):
        bench.prepare_image(kind)
    total = len(todo) * args.repeat
    done = 0
    for k in range(args.repeat):
        for job in (todo if k % 2 == 0 else todo[::-1]):
            done += 1
            if job in errors:
                continue
            case, point = job
            what = f"iperf3 N={point.channels}" if case == "iperf3" else \
                f"{case} {point.label()}"
            try:
                runs[job].append(bench.run(case, point))
                r = runs[job][-1]
                note = f"{r['seconds']:.3f} s, {args.size / r['seconds'] / 1e9:.2f} GB/s"
            except BenchError as exc:
                errors[job] = str(exc)
                note = f"FAILED: {exc}"
            _log(f"[{done}/{total}] {what}: {note}")
    return runs, errors


def _run_extras(bench: Bench, args, result: dict) -> bool:
    """--qemu and --live-rates; returns whether any of their runs failed."""
    failed = False
    if args.qemu:
        from . import qemubench
        result["qemu"] = []
        for n in args.channels:
            for tls in args.tls:
                q = qemubench.run(args.size, n, args.dir, args.repeat, args.timeout, _log,
                                  tls_dir=bench.tls_dir if tls else None)
                q["tls"] = tls
                result["qemu"].append(q)
                failed |= bool(q["errors"])
        result["goals"] = _goals(result["points"], result["qemu"])
    if args.live_rates:
        from . import livebench
        result["live"] = []
        for n in args.channels:
            live = livebench.run(args.size, n, args.rates, args.live_pattern, args.dir,
                                 args.timeout, _log, qemu=args.qemu, repeat=args.repeat)
            result["live"].append(live)
            failed |= any("error" in r or r.get("failed_runs")
                          or "error" in r.get("qemu", {}) or r.get("qemu", {}).get("failed_runs")
                          for r in live["live"])
    return failed


def _write(args, result: dict) -> bool:
    """The table (or JSON) on stdout first, then the files; returns whether all went out."""
    print(json.dumps(result, indent=1) if args.json == "-" else table(result), flush=True)
    ok = True
    try:
        if args.json and args.json != "-":
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    except OSError as exc:
        _log(f"--json {args.json}: {exc.strerror or exc}")
        ok = False
    if args.plot:
        from .benchplot import plot
        try:
            plot(result, args.plot)
        except OSError as exc:
            _log(f"--plot {args.plot}: {exc.strerror or exc}")
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    bench = Bench(args)
    # Only where signal handlers can be set (main() may be called from a thread).
    sigterm = (signal.signal(signal.SIGTERM, _on_sigterm)
               if threading.current_thread() is threading.main_thread() else None)
    try:
        runs, errors = _run_matrix(bench, args)
        result = {"size": args.size, "repeat": args.repeat, "cpu": cpu_model(),
                  **summarize(args.size, runs, errors)}
        failed = _run_extras(bench, args, result) or bool(errors)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except _Terminated:
        _log("terminated")
        return 143
    except (OSError, UsageError) as exc:
        _log(str(exc))
        return 1
    finally:
        try:
            bench.drop_credentials()
            bench.drop_outputs()
        finally:
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
    written = _write(args, result)
    return 1 if failed or not written else 0


if __name__ == "__main__":
    raise SystemExit(main())
