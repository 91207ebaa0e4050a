"""multifd-bench [--size 1G] [--channels 4] [--dir /dev/shm] [--repeat 1] [--cases LIST]
[--json] ...

How fast is multifd compared with what the machine can do? Each case moves one random image
over loopback TCP and is timed as the whole sender process, from spawn to exit, so startup,
handshake and the final verification count, as they do for a user:

  raw-newfile          multifd.tools.rawcopy (the least code that does the job) into a new file
  multifd-newfile      multifd-send -> multifd-recv OUTPUT, output compared byte for byte
  multifd-tls-newfile  the same with --tls on both sides: mutual TLS 1.3 on every channel
  raw-tls-newfile      multifd.tools.rawcopy --tls (stdlib ssl, mutual TLS 1.3) into a new file
  iperf3               iperf3 -P N -n SIZE: what loopback TCP itself gives, no file at all
  multifd-discard      multifd-send -> multifd-recv --discard
  multifd-tls-discard  the same with --tls on both sides
  raw-tls-discard      multifd.tools.rawcopy --tls (stdlib ssl, mutual TLS 1.3), no output file
  raw-discard          multifd.tools.rawcopy with no output file

and reported with the CPU seconds per GiB of each process (from wait4). The goals:
multifd-newfile reaches 0.80 of raw-newfile, multifd-discard 0.50 of iperf3, and with TLS
multifd-tls-discard moves at least 1.0 GB/s and multifd-tls-newfile 0.7 GB/s (GB = 1e9
bytes, over the whole sender run like every figure here). What TLS costs is shown as the
ratios tls/plain for discard and new file, and multifd's TLS against the least Python code
that does TLS as the ratios multifd-tls-newfile/raw-tls-newfile and
multifd-tls-discard/raw-tls-discard, all with no goal. The TLS cases (multifd's and
rawcopy's) use a CA, server (127.0.0.1) and client certificate made once per bench run in a
private temporary directory (certs.generate), which is removed at the end, also when the
bench fails, is interrupted or gets SIGTERM (which, like ^C, first kills the processes under
test).

--cases runs only the listed cases (comma-separated, in the order above); a ratio or goal
whose cases did not run shows as n/a, and a case not selected counts as skipped, not failed.

On this kind of VM memory freed by the guest goes back to the host, and the first write into
such memory is several times slower; a run into a new file would then measure what ran before
it (raw-newfile, 1 GiB: 2.4 s unprimed, 1.2 s primed). Before each new-file run we therefore
write and delete a file of the image's size (prime).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from .. import args as cliargs
from .. import units, wire
from ..errors import UsageError
from . import certs
from .mkimage import write_image

PROG = "multifd-bench"
# Each TLS case sits beside its plain one or the TLS case it is compared with: the order
# alternates between repeats, and a case's timing depends on what ran just before it.
CASES = ("raw-newfile", "multifd-newfile", "multifd-tls-newfile", "raw-tls-newfile", "iperf3",
         "multifd-discard", "multifd-tls-discard", "raw-tls-discard", "raw-discard")
TLS_CASES = ("multifd-tls-newfile", "raw-tls-newfile", "multifd-tls-discard", "raw-tls-discard")
# (case, reference case, least ratio of their GB/s)
GOALS = (("multifd-newfile", "raw-newfile", 0.80), ("multifd-discard", "iperf3", 0.50))
# (case, least GB/s)
RATE_GOALS = (("multifd-tls-newfile", 0.7), ("multifd-tls-discard", 1.0))
# (label, case, reference case): informational ratios, no goal
TLS_RATIOS = (("tls/plain newfile", "multifd-tls-newfile", "multifd-newfile"),
              ("tls/plain discard", "multifd-tls-discard", "multifd-discard"),
              ("multifd-tls-newfile/raw-tls-newfile", "multifd-tls-newfile", "raw-tls-newfile"),
              ("multifd-tls-discard/raw-tls-discard", "multifd-tls-discard", "raw-tls-discard"))
GIB = 1 << 30
NAME_WIDTH = 35  # of the ratio and goal names in the table: the longest one fits
LISTENING = re.compile(r"listening on (\S+):(\d+)")


class BenchError(Exception):
    pass


class Child:
    """A process whose output goes to unlinked temp files, so no pipe can fill up and stall
    it, and which we reap ourselves with wait4 to get its own rusage."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=self.err)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.seconds = self.cpu = None

    def exited(self, timeout: float) -> bool:
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.seconds = time.perf_counter() - self.start
        self.cpu = usage.ru_utime + usage.ru_stime
        self.proc.returncode = os.waitstatus_to_exitcode(status)

    def wait(self, timeout: float) -> None:
        """Reap within `timeout` and require exit 0."""
        if self.proc.returncode is None:
            if not self.exited(timeout):
                self.kill()
                raise BenchError(f"{self.label} did not finish within {timeout:g} s")
            self._reap()
        if self.proc.returncode != 0:
            raise BenchError(f"{self.label} exited {self.proc.returncode}: {self.tail()}")

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self._reap()

    def text(self, stream) -> str:
        # pread: the child shares the file offset, so seeking here would move its writes.
        return os.pread(stream.fileno(), os.fstat(stream.fileno()).st_size, 0).decode(
            errors="replace")

    def stdout(self) -> str:
        return self.text(self.out)

    def tail(self) -> str:
        lines = self.text(self.err).strip().splitlines()
        return lines[-1] if lines else "(no message)"

    def json(self) -> dict:
        try:
            return json.loads(self.stdout())
        except ValueError:
            raise BenchError(f"{self.label} printed no JSON: {self.stdout()[:200]!r}") from None

    def close(self) -> None:
        self.kill()
        os.close(self.pidfd)
        self.out.close()
        self.err.close()


class Bench:
    def __init__(self, args) -> None:
        self.size, self.channels, self.timeout = args.size, args.channels, args.timeout
        self.dir = args.dir
        self.image = os.path.join(args.dir, f"multifd-bench-{args.size}.img")
        self.output = os.path.join(args.dir, f"multifd-bench-{os.getpid()}.out")
        self.iperf3 = None if args.skip_iperf else shutil.which("iperf3")
        self.multifd = {"multifd-send": _tool("multifd-send", "multifd.send_cli"),
                        "multifd-recv": _tool("multifd-recv", "multifd.recv_cli")}
        self.tls_dir: str | None = None  # the credentials of the TLS cases, while they exist

    # -- TLS credentials ----------------------------------------------------------------

    def make_credentials(self) -> None:
        """A CA, a server certificate for 127.0.0.1 and a client certificate, in a private
        (0700) temporary directory that drop_credentials removes."""
        self.tls_dir = tempfile.mkdtemp(prefix="multifd-bench-tls-")
        certs.generate(self.tls_dir, ["127.0.0.1"])  # a failed write is a UsageError

    def drop_credentials(self) -> None:
        if self.tls_dir is not None:
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            self.tls_dir = None

    # -- files --------------------------------------------------------------------------

    def prepare_image(self) -> bool:
        """Returns True when a kept image of the right size is reused."""
        if os.path.isfile(self.image) and os.path.getsize(self.image) == self.size:
            return True
        write_image(self.image, self.size, "random", seed=0)
        return False

    def prime(self) -> None:
        """Write and delete a file of the image's size, so that the output's pages are
        ones the host has backed just now (see the module docstring)."""
        path = self.output + ".prime"
        try:
            block = bytes(8 << 20)
            with open(path, "wb") as f:
                for offset in range(0, self.size, len(block)):
                    f.write(block[:self.size - offset])
        finally:
            _unlink(path)

    def drop_outputs(self) -> None:
        """The output, and any partial file multifd-recv left beside it."""
        _unlink(self.output)
        prefix = f".{os.path.basename(self.output)}."
        for name in os.listdir(self.dir):
            if name.startswith(prefix) and name.endswith(".part"):
                _unlink(os.path.join(self.dir, name))

    def output_identical(self) -> bool:
        if os.path.getsize(self.output) != self.size:
            return False
        with open(self.image, "rb") as a, open(self.output, "rb") as b:
            while True:
                chunk = a.read(4 << 20)
                if chunk != b.read(4 << 20):
                    return False
                if not chunk:
                    return True

    # -- cases --------------------------------------------------------------------------

    def run(self, case: str) -> dict:
        newfile = case.endswith("-newfile")
        if newfile:
            self.prime()
            self.drop_outputs()
        try:
            if case == "iperf3":
                return self.case_iperf3()
            if case.startswith("raw-"):
                result = self.case_raw(discard=not newfile, tls=case in TLS_CASES)
            else:
                result = self.case_multifd(discard=not newfile, tls=case in TLS_CASES)
            if newfile:
                if not self.output_identical():
                    raise BenchError("output differs from the image")
                result["check"] += ", output identical"
            return result
        finally:
            self.drop_outputs()

    @contextlib.contextmanager
    def pair(self, server: tuple, ready, client: tuple):
        """Start the server (label, argv); once ready(server) gives its port, time the client
        (label, argv_for(port)). Both are reaped before the body runs; any failure kills both."""
        children = []
        try:
            children.append(srv := Child(*server))
            deadline = time.monotonic() + self.timeout
            while (port := ready(srv)) is None:
                if srv.exited(0.005):
                    srv.wait(0)
                    raise BenchError(f"{srv.label} exited before listening")
                if time.monotonic() > deadline:
                    raise BenchError(f"{srv.label} not listening after {self.timeout:g} s")
            children.append(cln := Child(client[0], client[1](port)))
            # A failed client leaves the server waiting for it: the raise kills it now.
            cln.wait(self.timeout)
            srv.wait(self.timeout)
            yield srv, cln
        finally:
            for child in children:
                child.close()

    def case_raw(self, discard: bool, tls: bool = False) -> dict:
        if tls and self.tls_dir is None:
            raise BenchError("no TLS credentials (make_credentials was not called)")
        raw = [sys.executable, "-m", "multifd.tools.rawcopy"]
        n = str(self.channels)
        secure = ["--tls", self.tls_dir] if tls else []
        server = ("rawcopy recv", raw + ["recv", "--listen", "127.0.0.1:0", "--channels", n,
                                         *secure] + (["--discard"] if discard else [self.output]))
        client = ("rawcopy send", lambda port: raw + [
            "send", f"127.0.0.1:{port}", self.image, "--channels", n, *secure])
        with self.pair(server, _stderr_port, client) as (srv, cln):
            for side in (srv, cln):
                if (got := side.json().get("bytes")) != self.size:
                    raise BenchError(f"{side.label} moved {got} bytes, not {self.size}")
            return _stats(srv, cln, check="byte counts")

    def case_multifd(self, discard: bool, tls: bool = False) -> dict:
        if tls and self.tls_dir is None:
            raise BenchError("no TLS credentials (make_credentials was not called)")
        secure = ["--tls", self.tls_dir] if tls else []
        server = ("multifd-recv", self.multifd["multifd-recv"] + [
            "--listen", "127.0.0.1:0", "--quiet", "--json", *secure]
            + (["--discard"] if discard else [self.output]))
        client = ("multifd-send", lambda port: self.multifd["multifd-send"] + [
            f"127.0.0.1:{port}", self.image, "--channels", str(self.channels), "--quiet",
            "--json", *secure])
        with self.pair(server, _stderr_port, client) as (srv, cln):
            reports = [srv.json(), cln.json()]
            if not all(r.get("ok") and r.get("bytes") == self.size for r in reports) or \
                    reports[0].get("digest") != reports[1].get("digest"):
                raise BenchError(f"multifd reports disagree: {reports}")
            return _stats(srv, cln, check="digests agree")

    def case_iperf3(self) -> dict:
        with socket.socket() as s:  # a free port: iperf3 cannot pick one and tell us
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ("iperf3 -s", [self.iperf3, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)])
        client = ("iperf3 -c", lambda _: [
            self.iperf3, "-c", "127.0.0.1", "-p", str(port), "-P", str(self.channels),
            "-l", "512K", "-n", str(self.size), "-J"])
        ready = lambda _: port if _tcp_listening(port) else None  # noqa: E731
        with self.pair(server, ready, client) as (srv, cln):
            try:
                sent, received = (cln.json()["end"][k] for k in ("sum_sent", "sum_received"))
            except KeyError:
                raise BenchError("iperf3 JSON has no end.sum_sent/sum_received") from None
            # The server's count can stop short of the last bytes in flight when the test
            # ends (seen under CPU contention), so the sender's count is the one checked.
            if sent["bytes"] < self.size:
                raise BenchError(f"iperf3 sent {sent['bytes']} bytes, not {self.size}")
            return _stats(srv, cln, check="iperf3 byte count",
                          reported_gbps=received["bits_per_second"] / 8e9)


def _stats(server: Child, client: Child, **extra) -> dict:
    return {"seconds": client.seconds, "sender_cpu_s": client.cpu,
            "receiver_cpu_s": server.cpu, **extra}


def _tool(name: str, module: str) -> list[str]:
    """The installed command beside our interpreter, else the same code via -m."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return [path] if os.access(path, os.X_OK) else [sys.executable, "-m", module]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _stderr_port(server: Child) -> int | None:
    m = LISTENING.search(server.text(server.err))
    return int(m.group(2)) if m else None


def _tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, found without connecting: iperf3 -1
    would take a probe connection for its one client."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return True
    return False


# -- results ----------------------------------------------------------------------------


def summarize(size: int, runs: dict, errors: dict, skipped: dict) -> dict:
    cases = {}
    for case in CASES:
        if case in skipped:
            cases[case] = {"ok": None, "skipped": skipped[case]}
        elif case in errors or not runs[case]:
            cases[case] = {"ok": False, "error": errors.get(case, "not run"), "runs": runs[case]}
        else:
            # Median of each figure on its own: with --repeat 1 it is simply the run.
            med = {key: statistics.median(r[key] for r in runs[case])
                   for key in runs[case][0] if isinstance(runs[case][0][key], float)}
            cases[case] = {"ok": True, "seconds": med["seconds"],
                           "gbps": size / med["seconds"] / 1e9,
                           "sender_cpu_s_per_gib": med["sender_cpu_s"] / (size / GIB),
                           "receiver_cpu_s_per_gib": med["receiver_cpu_s"] / (size / GIB),
                           "check": runs[case][0]["check"], "runs": runs[case]}
            if "reported_gbps" in med:
                cases[case]["reported_gbps"] = med["reported_gbps"]
    ratios = {}
    for num, den, goal in GOALS:
        a, b = cases[num], cases[den]
        value = a["gbps"] / b["gbps"] if a.get("ok") and b.get("ok") else None
        ratios[f"{num}/{den}"] = {"value": value, "goal": goal,
                                  "pass": None if value is None else value >= goal}
        if value is not None and "reported_gbps" in b:
            ratios[f"{num}/{den}"]["value_vs_reported"] = a["gbps"] / b["reported_gbps"]
    rate_goals = {}
    for case, goal in RATE_GOALS:
        value = cases[case]["gbps"] if cases[case].get("ok") else None
        rate_goals[case] = {"gbps": value, "goal_gbps": goal,
                            "pass": None if value is None else value >= goal}
    tls_ratios = {}
    for label, num, den in TLS_RATIOS:
        a, b = cases[num], cases[den]
        tls_ratios[label] = {"value": a["gbps"] / b["gbps"] if a.get("ok") and b.get("ok")
                             else None, "ratio": f"{num}/{den}"}
    return {"cases": cases, "ratios": ratios, "rate_goals": rate_goals, "tls_ratios": tls_ratios}


def table(result: dict) -> str:
    r = result
    lines = [f"{PROG}: {r['size'] / GIB:g} GiB random image in {r['dir']}, "
             f"{r['channels']} channels, median of {r['repeat']} run(s)"
             f"{' (kept image reused)' if r['image_reused'] else ''}", "",
             f"{'case':<20} {'seconds':>8} {'GB/s':>7} {'send CPU':>9} {'recv CPU':>9}  check",
             f"{'':<20} {'':>8} {'':>7} {'s/GiB':>9} {'s/GiB':>9}"]
    for case, c in r["cases"].items():
        if c["ok"]:
            check = c["check"]
            if "reported_gbps" in c:
                check += f"; iperf3 reports {c['reported_gbps']:.2f} GB/s"
            lines.append(f"{case:<20} {c['seconds']:>8.3f} {c['gbps']:>7.2f} "
                         f"{c['sender_cpu_s_per_gib']:>9.3f} {c['receiver_cpu_s_per_gib']:>9.3f}"
                         f"  {check}")
        else:
            why = f"skipped: {c['skipped']}" if c["ok"] is None else f"FAILED: {c['error']}"
            lines.append(f"{case:<20} {'-':>8} {'-':>7} {'-':>9} {'-':>9}  {why}")
    lines.append("")

    def missing(names) -> str:
        return ", ".join(c for c in names if not r["cases"][c]["ok"])

    for name, q in r["ratios"].items():
        if q["value"] is None:
            lines.append(f"{name:<{NAME_WIDTH}} n/a    (goal >= {q['goal']:.2f}; "
                         f"no {missing(name.split('/'))} result)")
            continue
        extra = (f"  ({q['value_vs_reported']:.2f} against iperf3's own rate)"
                 if "value_vs_reported" in q else "")
        lines.append(f"{name:<{NAME_WIDTH}} {q['value']:.2f}   (goal >= {q['goal']:.2f})  "
                     f"{'PASS' if q['pass'] else 'MISS'}{extra}")
    for case, q in r["rate_goals"].items():
        name = f"{case} GB/s"
        if q["gbps"] is None:
            lines.append(f"{name:<{NAME_WIDTH}} n/a    (goal >= {q['goal_gbps']:.2f}; "
                         f"no {case} result)")
            continue
        lines.append(f"{name:<{NAME_WIDTH}} {q['gbps']:.2f}   (goal >= {q['goal_gbps']:.2f})  "
                     f"{'PASS' if q['pass'] else 'MISS'}")
    for name, q in r["tls_ratios"].items():
        if q["value"] is None:
            lines.append(f"{name:<{NAME_WIDTH}} n/a    (no goal; no "
                         f"{missing(q['ratio'].split('/'))} result)")
            continue
        what = "no goal" if name == q["ratio"] else f"{q['ratio']}, no goal"
        lines.append(f"{name:<{NAME_WIDTH}} {q['value']:.2f}   ({what})")
    return "\n".join(lines)


def _case_list(text: str) -> tuple[str, ...]:
    """'multifd-tls-discard,multifd-discard' -> those cases, in CASES order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no case named")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown case {', '.join(map(repr, unknown))} "
                                         f"(cases: {','.join(CASES)})")
    return tuple(case for case in CASES if case in names)


def build_parser() -> cliargs.Parser:
    p = cliargs.Parser(prog=PROG, description="Time multifd against a raw TCP copy and iperf3 "
                   "over loopback; see the module docstring for what each case measures.")
    p.add_argument("--size", type=cliargs.size, default=units.parse_size("1G"),
                   help="image size, e.g. 256M, 1G (default 1G)")
    p.add_argument("--channels", type=int, default=4, metavar="N",
                   help=f"TCP connections for every case, 1..{wire.MAX_CHANNELS} (default 4)")
    p.add_argument("--dir", default="/dev/shm",
                   help="where the image and the output files go (default /dev/shm)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="run the case sequence K times and report medians (default 1)")
    p.add_argument("--timeout", type=cliargs.duration, default=300.0, metavar="S",
                   help="bound on each process run (default 300)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with all results instead of the table")
    p.add_argument("--keep", action="store_true",
                   help="keep the image for the next run (reused when its size matches)")
    p.add_argument("--skip-iperf", action="store_true", help="do not run the iperf3 case")
    p.add_argument("--qemu", action="store_true",
                   help="instead: a real QEMU source (--size of guest RAM) into multifd-recv "
                   "--qemu beside a QEMU destination (multifd.tools.qemubench)")
    p.add_argument("--live-rates", metavar="LIST",
                   help="instead: live precopy at each dirty rate, e.g. 0,50MB/s,100MB/s "
                   "(multifd.tools.livebench), writes in --live-pattern")
    p.add_argument("--live-pattern", default="uniform", metavar="PATTERN",
                   help="the workload's pattern for --live-rates (default uniform)")
    p.add_argument("--cases", type=_case_list, default=CASES, metavar="LIST",
                   help="comma-separated cases to run, always in this order (default all): "
                   + ", ".join(CASES))
    return p


def _qemu_bench(args) -> int:
    from . import qemubench  # only this case needs QEMU's driver

    try:
        result = qemubench.run(args.size, args.channels, args.dir, args.repeat, args.timeout,
                               lambda text: print(f"{PROG}: {text}", file=sys.stderr,
                                                  flush=True))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1) if args.json else qemubench.table(result), flush=True)
    return 1 if result["errors"] else 0


def _live_bench(args, parser) -> int:
    from . import livebench

    try:
        rates = livebench.parse_rates(args.live_rates)
    except ValueError as exc:
        parser.error(f"--live-rates: {exc}")
    try:
        result = livebench.run(args.size, args.channels, rates, args.live_pattern, args.dir,
                               args.timeout, lambda text: print(f"{PROG}: {text}",
                                                                file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1) if args.json else livebench.table(result), flush=True)
    return 1 if any("error" in r for r in result["live"]) else 0


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that every finally (children, keys) runs."""


def _on_sigterm(signum, frame) -> None:
    # Once: a second SIGTERM must not cut short the cleanup the first one started. main()
    # puts the previous handler back when it is done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.channels <= wire.MAX_CHANNELS:
        parser.error(f"--channels must be in 1..{wire.MAX_CHANNELS}")
    if args.repeat < 1 or args.size < 1:
        parser.error("--repeat and --size must be positive")
    if not os.path.isdir(args.dir) or not os.access(args.dir, os.W_OK | os.X_OK):
        parser.error(f"--dir {args.dir} is not a writable directory")
    if args.qemu:
        return _qemu_bench(args)
    if args.live_rates:
        return _live_bench(args, parser)
    bench = Bench(args)
    skipped = {case: "not in --cases" for case in CASES if case not in args.cases}
    if "iperf3" not in skipped:
        if args.skip_iperf:
            skipped["iperf3"] = "--skip-iperf"
        elif bench.iperf3 is None:
            skipped["iperf3"] = "iperf3 not installed (apt-get install iperf3)"
    runs: dict = {case: [] for case in CASES}
    errors: dict = {}
    # Only where signal handlers can be set (main() may be called from a thread).
    sigterm = (signal.signal(signal.SIGTERM, _on_sigterm)
               if threading.current_thread() is threading.main_thread() else None)
    try:
        if any(case not in skipped for case in TLS_CASES):
            bench.make_credentials()
        reused = bench.prepare_image()
        for k in range(args.repeat):
            # Alternate the order: what ran just before a case changes its timing on this
            # kind of VM, and the medians should not carry that bias to one side.
            for case in (CASES if k % 2 == 0 else CASES[::-1]):
                if case in skipped or case in errors:
                    continue
                try:
                    runs[case].append(bench.run(case))
                    note = f"{runs[case][-1]['seconds']:.3f} s"
                except BenchError as exc:
                    errors[case] = str(exc)
                    note = f"FAILED: {exc}"
                print(f"{PROG}: [{k + 1}/{args.repeat}] {case}: {note}", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except (OSError, UsageError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            bench.drop_credentials()
            bench.drop_outputs()
            if not args.keep:
                _unlink(bench.image)
        finally:
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
    result = {"size": args.size, "channels": args.channels, "dir": args.dir,
              "repeat": args.repeat, "image_reused": reused,
              **summarize(args.size, runs, errors, skipped)}
    print(json.dumps(result, indent=1) if args.json else table(result), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
