"""multifd-bench: the matrix it runs, the medians, ratios and goals it reports, its table, JSON
and plot, the cached images, and nothing left behind on any way out (failure, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from multifd.tools import bench
from multifd.tools.bench import Point

BENCH = [sys.executable, "-m", "multifd.tools.bench"]
MIB = 1 << 20


def run_bench(tmp_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The bench as a process: temporary files under tmp_path/tmp, outputs in tmp_path/data,
    images cached in tmp_path/cache."""
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout,
                          env=bench_env(tmp_path))


def bench_env(tmp_path) -> dict:
    for name in ("tmp", "data", "cache"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def dirs(tmp_path) -> list[str]:
    return ["--dir", str(tmp_path / "data"), "--cache", str(tmp_path / "cache")]


def parse(*argv: str):
    return bench.build_parser().parse_args(list(argv))


# -- the command line and the matrix ----------------------------------------------------


def test_lists_parse_in_order_without_repeats():
    args = parse("--channels", "8,1,8,4", "--tls", "on,off", "--image", "zero,random",
                 "--mode", "discard")
    assert args.channels == [8, 1, 4] and args.tls == [True, False]
    assert args.image == ["zero", "random"] and args.mode == ["discard"]
    defaults = parse()
    assert (defaults.channels, defaults.tls, defaults.image, defaults.mode) == (
        [4], [False], ["random"], ["file", "discard"])


@pytest.mark.parametrize("argv, said", [
    (["--tls", "yes"], "'yes': on or off"),
    (["--image", "random,holes"], "holes not in random, zero, mixed"),
    (["--mode", "file,tape"], "tape not in file, discard"),
    (["--channels", "0"], "--channels must be in 1..64"),
    (["--channels", ","], "empty list"),
    (["--channels", "1,abc"], "'1,abc': a comma-separated list"),
])
def test_bad_lists_are_one_line_errors(tmp_path, argv, said):
    done = run_bench(tmp_path, *argv, *dirs(tmp_path), timeout=30)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    bench_env(tmp_path)
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit) as exit:
        bench.main(["--plot", str(tmp_path / "p.png"), *dirs(tmp_path)])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("multifd-bench: error: --plot needs matplotlib (pip install multifd[plot]) "
                   "(see --help)"), err
    assert not (tmp_path / "p.png").exists()


def test_each_point_runs_multifd_beside_its_copier_and_iperf3_once_per_channel_count():
    args = parse("--channels", "1,4", "--tls", "off,on", "--image", "random,zero")
    todo = bench.jobs(args)
    assert [j for j in todo if j[0] == "iperf3"] == [("iperf3", Point(1, False, "-", "-")),
                                                     ("iperf3", Point(4, False, "-", "-"))]
    points = [p for case, p in todo if case == "multifd"]
    assert len(points) == len(set(points)) == 2 * 2 * 2 * 2
    for i, (case, point) in enumerate(todo):
        if case == "multifd":
            assert todo[i + 1] == ("copier", point)
            # The copier that imports trio first, for the random image only.
            assert (todo[i + 2:i + 3] == [("copier+trio", point)]) is (point.image == "random")
    assert bench.jobs(parse("--skip-iperf"))[0][0] == "multifd"


# -- medians, ratios and goals ----------------------------------------------------------


def run(seconds: float, rss: int = 20 * MIB) -> dict:
    return {"seconds": seconds, "sender_cpu_s": 0.5, "receiver_cpu_s": 0.4,
            "sender_rss": rss, "receiver_rss": rss + MIB}


SIZE = 1 << 30


def summary(overrides: dict | None = None):
    """1 GiB at N=4: random at 2 GB/s file and discard, its copier 2.1 and 2.2, iperf3 4;
    mixed at 3.8; zero at 4.3 (medians of three runs each)."""
    rates = {("multifd", "random", "file"): 2.0, ("copier", "random", "file"): 2.1,
             ("multifd", "random", "discard"): 2.0, ("copier", "random", "discard"): 2.2,
             ("multifd", "mixed", "file"): 3.8, ("copier", "mixed", "file"): 2.0,
             ("multifd", "zero", "file"): 4.3, ("copier", "zero", "file"): 2.0}
    rates.update(overrides or {})
    runs = {("iperf3", Point(4, False, "-", "-")): [run(SIZE / 4e9)] * 3}
    for (case, image, mode), gbps in rates.items():
        s = SIZE / (gbps * 1e9)
        # Three runs whose median is s: the slow outlier must not count.
        runs[(case, Point(4, False, image, mode))] = [run(s * 3), run(s), run(s * 0.9)]
    return bench.summarize(SIZE, runs, {})


def row(result: dict, image: str, mode: str) -> dict:
    return next(p for p in result["points"] if p["image"] == image and p["mode"] == mode)


def test_medians_and_ratios_to_the_baselines_of_the_same_run():
    r = summary()
    random = row(r, "random", "file")
    assert random["multifd_gbps"] == pytest.approx(2.0)
    assert random["vs_copier"] == pytest.approx(2.0 / 2.1)
    assert random["vs_iperf3"] == pytest.approx(0.5)
    assert random["vs_random"] is None
    assert row(r, "mixed", "file")["vs_random"] == pytest.approx(1.9)
    assert random["sender_rss_mib"] == 20 and random["receiver_rss_mib"] == 21
    assert r["results"]["multifd random file N=4"]["runs"] == 3


def test_goals_pass_miss_or_did_not_run():
    goals = {g["goal"]: g for g in summary()["goals"]}
    assert goals["zero image into a file"]["pass"] is True
    assert goals["mixed / random"]["pass"] is True  # 1.9 >= 1.8
    assert goals["multifd / copier, random, discard"]["pass"] is False  # 0.91 < 0.95
    assert goals["multifd / copier, random, file"]["pass"] is True  # 0.95 >= 0.85
    assert goals["peak RssAnon of each multifd process (MiB)"]["pass"] is True
    assert "multifd / QEMU dst, file" not in goals  # only with --qemu
    slow = {g["goal"]: g for g in summary({("multifd", "zero", "file"): 2.5})["goals"]}
    assert slow["zero image into a file"]["pass"] is False
    assert slow["zero image into a file"]["values"] == [
        {"where": "zero file N=4", "value": 2.5, "pass": False}]


def test_against_qemu_on_both_clocks():
    # mixed into a file at N=4: 3.8 GB/s over the whole sender run, its own clock 0.2 s
    # (5.37 GB/s); QEMU's destination 4.0 GB/s by its total-time
    r = summary()
    runs = {("multifd", Point(4, False, "mixed", "file")):
            [{**run(SIZE / 3.8e9), "transfer_seconds": 0.2}] * 3}
    mixed = bench.summarize(SIZE, runs, {})["points"][0]
    assert mixed["transfer_gbps"] == pytest.approx(SIZE / 0.2e9)
    qemu = [{"channels": 4, "tls": False, "cases": {"qemu-dst": {"gb_per_s": 4.0}}},
            {"channels": 4, "tls": True, "cases": {"qemu-dst": {"gb_per_s": 1.0}}}]
    goals = {g["goal"]: g for g in bench._goals([mixed], qemu)}
    assert goals["multifd / QEMU dst, file"]["values"] == [
        {"where": "N=4", "value": 0.95, "pass": False}]
    assert goals["multifd / QEMU dst, file, transfer clock"]["values"] == [
        {"where": "N=4", "value": round(SIZE / 0.2e9 / 4.0, 3), "pass": True}]
    # no TLS point ran: n/a on both clocks, not a miss
    assert goals["multifd / QEMU dst, TLS"]["pass"] is None
    assert goals["multifd / QEMU dst, TLS, transfer clock"]["pass"] is None
    assert r["points"][0]["transfer_gbps"] is None  # runs without the sender's report


def _row(image, mode, tls=False, **figures):
    return {"channels": 4, "tls": tls, "image": image, "mode": mode, "multifd_gbps": None,
            "transfer_gbps": None, "copier_gbps": None, "copier_trio_gbps": None,
            "vs_copier": None, "vs_random": None, "sender_rss_mib": None, **figures}


def test_a_miss_beyond_what_the_same_run_allows_is_out_of_reach():
    rows = [
        # random: 0.5 s whole, 0.25 s on its own clock: start-up 0.25 s, so a mixed run
        # (half the data) takes at least 0.25 + 0.125 s: 1.333x at most
        _row("random", "discard", multifd_gbps=2.0, transfer_gbps=4.0, copier_gbps=2.6,
             copier_trio_gbps=2.2, vs_copier=2.0 / 2.6),
        _row("mixed", "discard", multifd_gbps=2.4, vs_random=1.2),
        # into a file the copier after trio's import reaches 0.97 of the bare copier: the
        # goal (0.85) is within reach there, so that miss is a plain miss
        _row("random", "file", multifd_gbps=1.0, transfer_gbps=1.2, copier_gbps=1.25,
             copier_trio_gbps=1.21, vs_copier=0.8),
        _row("random", "file", tls=True, multifd_gbps=0.8, transfer_gbps=0.9,
             copier_gbps=0.86, copier_trio_gbps=0.8, vs_copier=0.8 / 0.86),
        _row("mixed", "file", tls=True, multifd_gbps=1.3, transfer_gbps=1.5),
        _row("mixed", "file", multifd_gbps=1.9, transfer_gbps=2.5)]
    qemu = [{"channels": 4, "tls": False,
             "cases": {"qemu-dst": {"gb_per_s": 4.6}, "qemucopy": {"gb_per_s": 2.9}}},
            {"channels": 4, "tls": True, "cases": {"qemu-dst": {"gb_per_s": 1.56}}}]
    goals = {g["goal"]: g for g in bench._goals(rows, qemu)}
    mixed = goals["mixed / random"]
    assert mixed["values"][0]["bound"] == pytest.approx(0.5 / 0.375, abs=1e-3)
    assert mixed["pass"] is False and mixed["settled"] is True
    discard = goals["multifd / copier, random, discard"]
    assert discard["values"][0]["bound"] == pytest.approx(2.2 / 2.6, abs=1e-3)
    assert discard["settled"] is True
    assert goals["multifd / copier, random, file"]["settled"] is False  # 0.968 >= 0.85
    plain = goals["multifd / QEMU dst, file"]
    assert plain["values"][0]["bound"] == pytest.approx(2.9 / 4.6, abs=1e-3)
    assert plain["settled"] is True
    # the TLS copier carrying only the guest's data (half its RAM): 0.86 * 2 / 1.56
    tls = goals["multifd / QEMU dst, TLS, transfer clock"]
    assert tls["values"][0] == {"where": "N=4", "value": round(1.5 / 1.56, 3),
                                "pass": False, "bound": round(1.72 / 1.56, 3)}
    assert tls["settled"] is True
    text = bench.table({"size": SIZE, "repeat": 1, "cpu": "a CPU", "points": [],
                        "results": {}, "goals": list(goals.values())})
    assert "| mixed / random | >= 1.8 | MISS, out of reach | 1.2 at mixed discard N=4 " \
           "(bound in this run: 1.333) |" in text
    assert "| multifd / copier, random, file | >= 0.85 | MISS | 0.8 at random file N=4 " \
           "(bound in this run: 0.968) |" in text
    assert "| zero image into a file | >= 3 | n/a (no such point ran) | |" in text


def test_a_failed_run_is_reported_and_its_ratios_are_missing():
    runs = {("multifd", Point(2, True, "random", "discard")): [],
            ("copier", Point(2, True, "random", "discard")): [run(1.0)]}
    r = bench.summarize(SIZE, runs, {("multifd", Point(2, True, "random", "discard")):
                                     "multifd-send exited 1: boom"})
    assert r["results"]["multifd random discard N=2 TLS"] == {
        "case": "multifd", "channels": 2, "tls": True, "image": "random", "mode": "discard",
        "ok": False, "error": "multifd-send exited 1: boom"}
    p = r["points"][0]
    assert p["multifd_gbps"] is None and p["vs_copier"] is None and p["copier_gbps"] > 0
    r.update(size=SIZE, repeat=1, cpu="a CPU")
    text = bench.table(r)
    assert "FAILED multifd random discard N=2 TLS: multifd-send exited 1: boom" in text
    assert "| multifd / copier, random, discard | >= 0.95 | n/a (no such point ran) | |" in text


def test_the_table_has_a_row_per_point_and_a_line_per_goal():
    r = summary()
    r.update(size=SIZE, repeat=3, cpu="Some CPU")
    text = bench.table(r)
    assert text.splitlines()[0].startswith("multifd-bench: 1 GiB images, Some CPU, median of 3")
    assert "| random | file | 4 | off | 2.00 | – | 2.10 | 0.95 | – | 4.00 | 0.50 | – |" in text
    assert "| mixed / random | >= 1.8 | PASS | 1.9 at mixed file N=4 |" in text
    assert "| multifd / copier, random, discard | >= 0.95 | MISS | 0.909 at random discard " \
           "N=4 |" in text


# -- whole runs -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_small_matrix_end_to_end_with_json_and_plot(tmp_path):
    out = tmp_path / "r.json"
    plot = tmp_path / "r.png"
    done = run_bench(tmp_path, "--size", "4M", "--channels", "1,2", "--tls", "off,on",
                     "--image", "random,zero", "--repeat", "2", "--timeout", "60",
                     "--json", str(out), "--plot", str(plot), *dirs(tmp_path), timeout=230)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert len(r["points"]) == 2 * 2 * 2 * 2
    for key, entry in r["results"].items():
        assert entry["ok"] is True and entry["runs"] == 2, (key, entry)
        assert entry["gbps"] > 0 and entry["sender_cpu_s"] > 0
        if entry["case"] != "iperf3":
            assert 0 < entry["sender_rss_mib"] < 200 and 0 < entry["receiver_rss_mib"] < 200
    assert {p["iperf3_gbps"] is not None for p in r["points"]} == {True}
    # The table went to stdout, one row per point, and the progress to stderr.
    assert done.stdout.count("\n| random |") + done.stdout.count("\n| zero |") == 16
    # Per repeat: iperf3 for each of 2 channel counts, 2 cases for each of 16 points, and
    # the copier+trio for the 8 random ones.
    assert "[1/" in done.stderr and f"[{2 * (2 + 16 * 2 + 8)}/" in done.stderr
    random = [p for p in r["points"] if p["image"] == "random"]
    assert all(p["copier_trio_gbps"] > 0 and p["vs_copier_trio"] > 0 for p in random)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The images stay cached (and are reused: same files), nothing else is left behind.
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert cached == [f"random-{4 * MIB}.img", f"zero-{4 * MIB}.img"]
    stamp = os.stat(tmp_path / "cache" / cached[0]).st_mtime_ns
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "data") == []
    again = run_bench(tmp_path, "--size", "4M", "--mode", "discard", "--skip-iperf",
                      "--json", *dirs(tmp_path))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["points"][0]["multifd_gbps"] > 0
    assert os.stat(tmp_path / "cache" / cached[0]).st_mtime_ns == stamp


def test_failed_runs_exit_1_and_leave_nothing(tmp_path):
    # No receiver listens within a millisecond: every run fails.
    done = run_bench(tmp_path, "--size", "1M", "--tls", "on", "--timeout", "0.001",
                     "--skip-iperf", *dirs(tmp_path))
    assert done.returncode == 1
    assert "FAILED multifd random file N=4 TLS" in done.stdout
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "data") == []


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.timeout(120)
def test_sigterm_mid_run_removes_the_credentials_outputs_and_processes(tmp_path):
    proc = subprocess.Popen(
        [*BENCH, "--size", "64M", "--channels", "2", "--tls", "on", "--mode", "file",
         "--repeat", "20", "--skip-iperf", "--timeout", "30", *dirs(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bench_env(tmp_path))
    try:
        # Signal while a sender runs: the bench is then waiting for it, past any spawn.
        def sender_running() -> list[int]:
            assert proc.poll() is None, proc.communicate()
            return [p for p in _children(proc.pid)
                    if "multifd-send" in _cmdline(p) or "send_cli" in _cmdline(p)]
        wait_until(sender_running, 90, "a sender of the bench running", interval=0.005)
        children = _children(proc.pid)
        assert len(os.listdir(tmp_path / "tmp")) >= 1  # the credentials, while they serve
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "data") == []
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_unwritable_output_paths_are_refused_before_any_run(tmp_path):
    for option, path in (("--json", str(tmp_path)), ("--json", "/nonexistent/r.json"),
                         ("--plot", "/nonexistent/r.png")):
        done = run_bench(tmp_path, option, path, *dirs(tmp_path), timeout=30)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (f"multifd-bench: error: {option} {path}: not a file "
                                       f"that can be written here (see --help)"), done.stderr
        assert os.listdir(tmp_path / "cache") == []  # refused before any image was made


class _Stop(Exception):
    pass


@pytest.mark.parametrize("fails", [False, True], ids=["spawned", "spawn-fails"])
def test_a_signal_while_a_child_starts_acts_once_the_child_is_ended(monkeypatch, fails):
    """SIGTERM landing inside Popen (after the fork) used to lose the child: it ran on,
    unended and unreaped, until the bench's own death killed it."""
    from multifd.tools import benchproc
    real = subprocess.Popen
    started = []

    def popen_hit_by_sigterm(*args, **kwargs):
        proc = None if fails else real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler would raise right here
        for _ in range(100):  # give a raising handler every chance to run inside Popen
            time.sleep(0.001)
        if fails:  # as an exec that failed: no child, and the signal still counts
            raise OSError("no such program")
        started.append(proc.pid)
        return proc

    def on_sigterm(signum, frame):
        raise _Stop
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    monkeypatch.setattr(benchproc.subprocess, "Popen", popen_hit_by_sigterm)
    try:
        with pytest.raises(_Stop):
            benchproc.Child("sleeper", ["sleep", "30"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signal.getsignal(signal.SIGTERM) is previous
    for pid in started:  # ended and reaped by Child, not left to the bench's death
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(started) == (0 if fails else 1)
