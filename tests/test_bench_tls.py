"""multifd-bench with its TLS cases: --cases, the goals and ratios when only some cases ran, a
whole bench run on a small image, and the temporary credentials removed on every way out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from multifd import bench

BENCH = [sys.executable, "-m", "multifd.bench"]
MIB = 1 << 20
TLS_AND_PLAIN = "multifd-tls-newfile,multifd-tls-discard,multifd-newfile,multifd-discard"


def run_bench(tmp_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The bench as a process, its temporary files (and credentials) under tmp_path/tmp."""
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout,
                          env=bench_env(tmp_path))


def bench_env(tmp_path) -> dict:
    for name in ("tmp", "data"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def fake_run(seconds: float) -> dict:
    return {"seconds": seconds, "sender_cpu_s": 0.5, "receiver_cpu_s": 0.5,
            "check": "digests agree"}


# -- --cases ----------------------------------------------------------------------------


def test_cases_keep_the_bench_order_whatever_the_order_given():
    assert bench._case_list("multifd-discard, multifd-tls-discard,multifd-discard") == (
        "multifd-discard", "multifd-tls-discard")
    assert bench.build_parser().parse_args([]).cases == bench.CASES


@pytest.mark.parametrize("value", ["multifd-tls-discard,nope", "", ","])
def test_an_unknown_or_empty_case_list_is_a_one_line_usage_error(tmp_path, value):
    done = run_bench(tmp_path, "--cases", value, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "--cases" in done.stderr
    if "nope" in value:
        assert "'nope'" in done.stderr
    assert os.listdir(tmp_path / "tmp") == []


# -- results ----------------------------------------------------------------------------


def summary(runs: dict, errors: dict | None = None) -> dict:
    size = 1 << 30
    skipped = {case: "not in --cases" for case in bench.CASES
               if case not in runs and case not in (errors or {})}
    all_runs = {case: [fake_run(s) for s in runs.get(case, [])] for case in bench.CASES}
    result = {"size": size, "channels": 4, "dir": "/dev/shm", "repeat": 1,
              "image_reused": False, **bench.summarize(size, all_runs, errors or {}, skipped)}
    return result


def test_deselected_cases_are_skipped_and_their_ratios_and_goals_are_na():
    gib = (1 << 30) / 1e9
    r = summary({"multifd-tls-discard": [gib / 1.2], "multifd-discard": [gib / 2.0]})
    assert r["cases"]["raw-newfile"] == {"ok": None, "skipped": "not in --cases"}
    assert not any(c["ok"] is False for c in r["cases"].values())
    assert all(q["value"] is None and q["pass"] is None for q in r["ratios"].values())
    assert r["rate_goals"]["multifd-tls-discard"]["gbps"] == pytest.approx(1.2)
    assert r["rate_goals"]["multifd-tls-discard"]["pass"] is True
    assert r["rate_goals"]["multifd-tls-newfile"] == {"gbps": None, "goal_gbps": 0.7,
                                                      "pass": None}
    assert r["tls_ratios"]["tls/plain discard"]["value"] == pytest.approx(0.6)
    assert r["tls_ratios"]["tls/plain newfile"]["value"] is None
    json.dumps(r)  # --json prints exactly this

    text = bench.table(r)
    assert "FAILED" not in text
    assert "skipped: not in --cases" in text
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert "n/a" in lines["multifd-newfile/raw-newfile"]
    assert "no multifd-newfile, raw-newfile result" in lines["multifd-newfile/raw-newfile"]
    assert "1.20" in lines["multifd-tls-discard GB/s"]
    assert "goal >= 1.00" in lines["multifd-tls-discard GB/s"]
    assert lines["multifd-tls-discard GB/s"].endswith("PASS")
    assert "n/a" in lines["multifd-tls-newfile GB/s"]
    assert "0.60" in lines["tls/plain discard"] and "no goal" in lines["tls/plain discard"]
    assert "no multifd-tls-newfile, multifd-newfile result" in lines["tls/plain newfile"]


def test_rate_goals_miss_below_and_a_failed_case_is_no_result():
    gib = (1 << 30) / 1e9
    r = summary({"multifd-tls-newfile": [gib / 0.5], "multifd-newfile": [gib / 1.0]},
                errors={"multifd-tls-discard": "boom"})
    assert r["rate_goals"]["multifd-tls-newfile"]["pass"] is False
    assert r["rate_goals"]["multifd-tls-discard"]["pass"] is None
    assert r["cases"]["multifd-tls-discard"]["ok"] is False
    text = bench.table(r)
    assert "FAILED: boom" in text
    assert [line for line in text.splitlines()
            if line.startswith("multifd-tls-newfile GB/s")][0].endswith("MISS")
    assert "tls/plain newfile                0.50" in text


@pytest.mark.parametrize("case, primed, discard, tls", [
    ("multifd-tls-newfile", True, False, True), ("multifd-newfile", True, False, False),
    ("multifd-tls-discard", False, True, True), ("multifd-discard", False, True, False)])
def test_new_file_cases_tls_or_not_are_primed_before_they_run(tmp_path, monkeypatch, case,
                                                               primed, discard, tls):
    args = bench.build_parser().parse_args(["--size", "1M", "--dir", str(tmp_path)])
    b = bench.Bench(args)
    calls = []
    monkeypatch.setattr(b, "prime", lambda: calls.append("prime"))
    monkeypatch.setattr(b, "output_identical", lambda: True)

    def case_multifd(discard, tls=False):
        calls.append(("multifd", discard, tls))
        return {"check": "digests agree"}
    monkeypatch.setattr(b, "case_multifd", case_multifd)
    b.run(case)
    assert calls == (["prime"] if primed else []) + [("multifd", discard, tls)]


def test_credentials_are_a_private_directory_for_127_0_0_1(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(bench.tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    b = bench.Bench(bench.build_parser().parse_args(["--dir", str(tmp_path)]))
    b.make_credentials()
    try:
        assert os.path.dirname(b.tls_dir) == str(tmp_path)
        assert os.stat(b.tls_dir).st_mode & 0o777 == 0o700
        assert sorted(os.listdir(b.tls_dir)) == sorted(
            ["ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem",
             "client-cert.pem", "client-key.pem"])
    finally:
        b.drop_credentials()
    assert b.tls_dir is None and os.listdir(tmp_path) == []


# -- whole runs -------------------------------------------------------------------------


def test_tls_and_plain_cases_on_a_small_image(tmp_path):
    done = run_bench(tmp_path, "--size", "4M", "--channels", "2", "--repeat", "2",
                     "--dir", str(tmp_path / "data"), "--timeout", "30", "--cases",
                     TLS_AND_PLAIN, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    for case in TLS_AND_PLAIN.split(","):
        c = r["cases"][case]
        assert c["ok"] is True, c
        assert len(c["runs"]) == 2
        assert c["check"] == ("digests agree, output identical" if case.endswith("-newfile")
                              else "digests agree")
    for case in ("raw-newfile", "iperf3", "raw-discard"):
        assert r["cases"][case] == {"ok": None, "skipped": "not in --cases"}
    assert all(q["gbps"] > 0 and q["pass"] in (True, False) for q in r["rate_goals"].values())
    assert all(q["value"] > 0 for q in r["tls_ratios"].values())
    assert all(q["value"] is None for q in r["ratios"].values())
    # Neither the credentials, nor the image, nor any output is left behind.
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "data") == []


def test_the_table_of_a_tls_only_run(tmp_path):
    done = run_bench(tmp_path, "--size", "2M", "--channels", "1", "--dir",
                     str(tmp_path / "data"), "--timeout", "30", "--cases",
                     "multifd-tls-discard")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("multifd-tls-discard ")][0].endswith(
        "digests agree")
    assert "FAILED" not in done.stdout
    assert any(line.startswith("multifd-tls-discard GB/s") for line in lines)
    assert any(line.startswith("tls/plain discard") and "n/a" in line for line in lines)
    assert os.listdir(tmp_path / "tmp") == []


def test_failed_cases_leave_no_credentials(tmp_path):
    # No receiver listens within a millisecond: every case fails, the bench exits 1.
    done = run_bench(tmp_path, "--size", "1M", "--dir", str(tmp_path / "data"), "--timeout",
                     "0.001", "--cases", "multifd-tls-discard,multifd-tls-newfile")
    assert done.returncode == 1
    assert "FAILED" in done.stdout
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "data") == []


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


def test_sigterm_mid_run_removes_the_credentials_and_its_processes(tmp_path):
    proc = subprocess.Popen(
        [*BENCH, "--size", "64M", "--channels", "2", "--repeat", "20", "--dir",
         str(tmp_path / "data"), "--timeout", "30", "--cases", "multifd-tls-discard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bench_env(tmp_path))
    try:
        # Signal while a sender runs: the bench is then waiting for it, past any spawn.
        deadline = time.monotonic() + 60
        senders: list[int] = []
        while not senders:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            children = _children(proc.pid)
            senders = [p for p in children if "multifd-send" in _cmdline(p)
                       or "send_cli" in _cmdline(p)]
            time.sleep(0.005)
        assert len(os.listdir(tmp_path / "tmp")) == 1  # the credentials, while they serve
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "data") == []
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
