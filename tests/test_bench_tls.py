"""multifd-bench with its TLS cases: --cases, the goals and ratios when only some cases ran, a
whole bench run on a small image, and the temporary credentials removed on every way out; and
the TLS baseline, multifd.tools.rawcopy --tls, on its own."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from conftest import wait_until
from multifd.tools import bench, rawcopy

BENCH = [sys.executable, "-m", "multifd.tools.bench"]
MIB = 1 << 20
TLS_AND_PLAIN = ("multifd-tls-newfile,multifd-tls-discard,multifd-newfile,multifd-discard,"
                 "raw-tls-discard,raw-tls-newfile")


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
    assert r["tls_ratios"]["multifd-tls-discard/raw-tls-discard"] == {
        "value": None, "ratio": "multifd-tls-discard/raw-tls-discard"}
    assert r["tls_ratios"]["multifd-tls-newfile/raw-tls-newfile"] == {
        "value": None, "ratio": "multifd-tls-newfile/raw-tls-newfile"}
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
    ratio = [line for line in text.splitlines()
             if line.startswith("multifd-tls-discard/raw-tls-discard ")]
    assert len(ratio) == 1 and "n/a" in ratio[0] and "no raw-tls-discard result" in ratio[0]
    ratio = [line for line in text.splitlines()
             if line.startswith("multifd-tls-newfile/raw-tls-newfile ")]
    assert len(ratio) == 1 and "n/a" in ratio[0]
    assert "no multifd-tls-newfile, raw-tls-newfile result" in ratio[0]


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
    assert re.search(r"^tls/plain newfile +0\.50 ", text, re.M)


@pytest.mark.parametrize("kind, ours, raw, value, shown", [
    ("discard", 1.2, 1.5, 0.8, "0.80"), ("newfile", 0.6, 0.8, 0.75, "0.75")])
def test_multifd_tls_against_the_raw_tls_baseline_is_a_ratio_with_no_goal(kind, ours, raw,
                                                                          value, shown):
    gib = (1 << 30) / 1e9
    name = f"multifd-tls-{kind}/raw-tls-{kind}"
    r = summary({f"multifd-tls-{kind}": [gib / ours], f"raw-tls-{kind}": [gib / raw]})
    assert r["tls_ratios"][name] == {"value": pytest.approx(value), "ratio": name}
    assert r["cases"][f"raw-tls-{kind}"]["ok"] is True
    assert r["cases"]["raw-discard"] == {"ok": None, "skipped": "not in --cases"}
    other = "newfile" if kind == "discard" else "discard"
    assert r["tls_ratios"][f"multifd-tls-{other}/raw-tls-{other}"]["value"] is None
    json.dumps(r)
    lines = bench.table(r).splitlines()
    line = [x for x in lines if x.startswith(f"{name} ")]
    assert len(line) == 1 and line[0].split()[1:] == [shown, "(no", "goal)"]
    # Every ratio and goal value starts in one column, whatever the length of its name.
    starts = {x.index(" n/a ") if " n/a " in x else re.search(r" \d+\.\d\d ", x).start()
              for x in lines if "goal" in x}
    assert starts == {bench.NAME_WIDTH}
    # The newfile ratio is listed just before the discard one.
    names = [x.split()[0] for x in lines if "goal" in x]
    i = names.index("multifd-tls-newfile/raw-tls-newfile")
    assert names[i + 1] == "multifd-tls-discard/raw-tls-discard"


@pytest.mark.parametrize("kind", ["discard", "newfile"])
def test_raw_tls_case_sits_beside_its_multifd_case_and_needs_credentials(kind):
    raw, ours = f"raw-tls-{kind}", f"multifd-tls-{kind}"
    i = bench.CASES.index(raw)
    assert ours in bench.CASES[i - 1:i + 2]
    assert raw in bench.TLS_CASES
    plain = f"raw-{kind}"
    # in the bench's order (written out: not computed the way _case_list does it)
    assert bench._case_list(f"{raw},{ours},{plain}") == {
        "newfile": ("raw-newfile", "multifd-tls-newfile", "raw-tls-newfile"),
        "discard": ("multifd-tls-discard", "raw-tls-discard", "raw-discard")}[kind]


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


@pytest.mark.parametrize("case, primed, discard, tls", [
    ("raw-tls-discard", False, True, True), ("raw-discard", False, True, False),
    ("raw-tls-newfile", True, False, True), ("raw-newfile", True, False, False)])
def test_raw_cases_run_rawcopy_with_or_without_tls_new_files_primed(
        tmp_path, monkeypatch, case, primed, discard, tls):
    b = bench.Bench(bench.build_parser().parse_args(["--size", "1M", "--dir", str(tmp_path)]))
    calls = []
    monkeypatch.setattr(b, "prime", lambda: calls.append("prime"))
    monkeypatch.setattr(b, "output_identical", lambda: calls.append("compared") or True)

    def case_raw(discard, tls=False):
        calls.append(("raw", discard, tls))
        return {"check": "byte counts"}
    monkeypatch.setattr(b, "case_raw", case_raw)
    result = b.run(case)
    assert calls == ((["prime"] if primed else []) + [("raw", discard, tls)]
                     + (["compared"] if primed else []))
    assert result["check"] == ("byte counts, output identical" if primed else "byte counts")


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
        check = "byte counts" if case.startswith("raw-") else "digests agree"
        assert c["check"] == check + (", output identical" if case.endswith("-newfile") else "")
    for case in ("raw-newfile", "iperf3", "raw-discard"):
        assert r["cases"][case] == {"ok": None, "skipped": "not in --cases"}
    for q in r["rate_goals"].values():  # a measured rate, judged against its goal
        assert q["gbps"] > 0 and q["pass"] is (q["gbps"] >= q["goal_gbps"]), q
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
        def sender_running() -> list[int]:
            assert proc.poll() is None, proc.communicate()
            return [p for p in _children(proc.pid)
                    if "multifd-send" in _cmdline(p) or "send_cli" in _cmdline(p)]
        wait_until(sender_running, 60, "a sender of the bench running", interval=0.005)
        children = _children(proc.pid)
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


# -- multifd.tools.rawcopy --tls --------------------------------------------------------------

RAWCOPY = [sys.executable, "-m", "multifd.tools.rawcopy"]
RAW_TIMEOUT = 30


def start_rawcopy_recv(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([*RAWCOPY, "recv", "--listen", "127.0.0.1:0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # printed at once, or the process has already exited
    m = re.search(r"listening on \S+:(\d+)", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"rawcopy recv did not start: {line}{proc.communicate()[1]}")
    return proc, int(m.group(1))


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=RAW_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {RAW_TIMEOUT} s: {err}") from None
    return proc.returncode, out, err


def rawcopy_send(port: int, image: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAWCOPY, "send", f"127.0.0.1:{port}", image, *args],
                          capture_output=True, text=True, timeout=RAW_TIMEOUT)


@pytest.fixture(scope="module")
def rawcopy_pki(pki):
    """good: the credentials of both sides; stranger: a client certificate (and key) from
    another CA, with the good CA so that the stranger does trust the receiver."""
    return {"good": pki.both, "stranger": pki.send_other_ca}


# Not a multiple of the 512 KiB chunk, so the last chunk is a short one; 3 channels get
# different numbers of chunks.
RAW_SIZE = 5 * (512 << 10) + 12345


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize("channels", ["1", "3"])
@pytest.mark.parametrize("discard", [False, True], ids=["newfile", "discard"])
def test_rawcopy_copies_a_file(rawcopy_pki, make_image, tmp_path, tls, channels, discard):
    image = make_image(RAW_SIZE)
    out = tmp_path / "out.img"
    secure = ["--tls", rawcopy_pki["good"]] if tls else []
    proc, port = start_rawcopy_recv("--channels", channels, *secure,
                                    *(["--discard"] if discard else [str(out)]))
    try:
        sent = rawcopy_send(port, image, "--channels", channels, *secure)
        code, stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert sent.returncode == 0, sent.stderr
    assert code == 0, stderr
    assert json.loads(sent.stdout)["bytes"] == RAW_SIZE
    assert json.loads(stdout)["bytes"] == RAW_SIZE
    if discard:
        assert not out.exists()
    else:
        with open(image, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read()


def test_a_rawcopy_tls_receiver_rejects_a_client_certificate_from_another_ca(
        rawcopy_pki, make_image, tmp_path):
    pki = rawcopy_pki
    image = make_image(RAW_SIZE)
    proc, port = start_rawcopy_recv("--channels", "2", "--tls", pki["good"], "--discard")
    try:
        rawcopy_send(port, image, "--channels", "2", "--tls", pki["stranger"])
        code, stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code != 0 and stdout == ""
    assert "certificate" in stderr.lower(), stderr
    # Not asserted: the copier's sender exit. In TLS 1.3 a client's handshake is complete
    # before the server has checked the client's certificate, and the minimal copier reads
    # no reply: a small image can leave in full before the rejection comes back.


def test_a_rawcopy_tls_stream_cut_without_a_tls_close_is_an_error(rawcopy_pki):
    """The sender's bytes all arrive, whole chunks, but its TCP stream ends with no TLS close:
    the receiver must not take that for the end of the data."""
    pki = rawcopy_pki
    proc, port = start_rawcopy_recv("--channels", "1", "--tls", pki["good"], "--discard")
    try:
        ctx = ssl.create_default_context(cafile=os.path.join(pki["good"], "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(pki["good"], "client-cert.pem"),
                            os.path.join(pki["good"], "client-key.pem"))
        with socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT) as raw:
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(rawcopy.HEADER.pack(0, 100) + bytes(100))
            raw_fd = tls.detach()  # the TCP connection without its TLS layer: no close_notify
            socket.socket(fileno=raw_fd).close()
        code, stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 1 and stdout == ""
    assert "rawcopy recv:" in stderr and "EOF" in stderr, stderr
