"""multifd-send --live: a workload keeps writing into the sender's copy of the image while
rounds send what it dirtied; the receiver's output must equal the state at the pause
(--save-final), whether precopy converged or was cut at --max-rounds."""

from __future__ import annotations

import json

import pytest

from conftest import run_sender, start_receiver

MiB = 1 << 20


def live_migration(image, tmp_path, *send_args):
    out, final = tmp_path / "out.img", tmp_path / "final.img"
    recv = start_receiver(str(out), "--json")
    sent = run_sender(recv.address, image, "--json", "--live", "--save-final", str(final),
                      "--packet-pages", "64", *send_args)
    code, stdout, stderr = recv.finish()
    assert sent.returncode == 0, sent.stderr
    assert code == 0, stderr
    return json.loads(sent.stdout), json.loads(stdout), out.read_bytes(), final.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pattern", ["uniform", "hot:10%", "sweep"])
def test_the_output_is_the_state_at_the_pause(make_image, tmp_path, pattern):
    image = make_image(16 * MiB, "mixed")
    with open(image, "rb") as f:
        original = f.read()
    report, received, out, final = live_migration(
        image, tmp_path, "--dirty-rate", "20MB/s", "--dirty-pattern", pattern,
        "--max-bandwidth", "64MB/s", "--channels", "2")
    assert out == final
    assert final != original  # the guest did write, into its own copy
    with open(image, "rb") as f:
        assert f.read() == original  # IMAGE itself is never written
    live = report["live"]
    assert len(live["rounds"]) >= 2 and live["rounds"][0]["blocks"] == 64
    assert live["rounds"][0]["pages"] == 16 * MiB // 4096
    for name in ("pages", "zero_pages"):
        assert sum(r[name] for r in live["rounds"]) == report[name] == received[name]
    assert live["downtime"] > 0 and live["receiver_downtime"] > 0
    assert received["live"]["rounds"] == len(live["rounds"])
    assert received["live"]["downtime"] == live["receiver_downtime"]
    assert report["digest"] == received["digest"]
    assert report["digest_name"] == received["digest_name"] == "xxh3-64-page-sum"
    if pattern != "sweep":  # scattered writes: later rounds carry some pages of each block
        assert any(r["pages"] < 64 * r["blocks"] for r in live["rounds"][1:]), live["rounds"]


@pytest.mark.timeout(60)
def test_no_convergence_is_said_and_still_ends_exact(make_image, tmp_path):
    image = make_image(16 * MiB, "mixed")
    report, _, out, final = live_migration(
        image, tmp_path, "--dirty-rate", "200MB/s", "--max-bandwidth", "32MB/s",
        "--downtime-limit", "10ms", "--max-rounds", "3")
    assert out == final
    live = report["live"]
    assert not live["converged"] and len(live["rounds"]) == 3
    assert "did not converge in 3 rounds" in live["why"]


def test_live_usage_errors(make_image):
    image = make_image(MiB)
    for args, said in ((["--save-final", "x.img"], "--save-final needs --live"),
                       (["--live", "--dirty-pattern", "hot"], "uniform, sweep, or hot:P%"),
                       (["--live", "--max-rounds", "1"], "--max-rounds must be at least 2")):
        result = run_sender("127.0.0.1:1", image, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr, (args, result.stderr)


@pytest.mark.timeout(60)
def test_a_sender_crash_in_a_later_round_leaves_nothing(make_image, tmp_path):
    image = make_image(16 * MiB, "mixed")
    (tmp_path / "out").mkdir()
    recv = start_receiver(str(tmp_path / "out" / "guest.img"), "--idle-timeout", "3")
    sent = run_sender(recv.address, image, "--live", "--dirty-rate", "200MB/s",
                      "--max-bandwidth", "32MB/s", "--downtime-limit", "10ms",
                      "--max-rounds", "4", "--packet-pages", "64", "--fault", "crash:round=1")
    code, _, stderr = recv.finish()
    assert sent.returncode == 99, sent.stderr
    # Whichever of its channels saw the sender's end first says so.
    last = stderr.strip().splitlines()[-1]
    assert code == 1 and ("data channel" in last or "control channel" in last), stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.timeout(90)
def test_a_slow_dirty_rate_converges_and_auto_converge_makes_a_fast_one_converge(make_image,
                                                                                  tmp_path):
    image = make_image(16 * MiB, "mixed")
    (tmp_path / "slow").mkdir()
    report, _, out, final = live_migration(
        image, tmp_path / "slow", "--dirty-rate", "2MB/s", "--dirty-pattern", "hot:5%",
        "--max-bandwidth", "64MB/s")
    assert out == final and report["live"]["converged"]
    # Three times what the link drains: unthrottled, each round leaves more than it sent.
    fast = ("--dirty-rate", "100MB/s", "--max-bandwidth", "32MB/s", "--downtime-limit",
            "100ms", "--max-rounds", "14")
    (tmp_path / "plain").mkdir()
    report, _, out, final = live_migration(image, tmp_path / "plain", *fast)
    assert out == final and not report["live"]["converged"]
    (tmp_path / "auto").mkdir()
    report, _, out, final = live_migration(image, tmp_path / "auto", *fast, "--auto-converge")
    assert out == final and report["live"]["converged"], report["live"]
    assert report["live"]["throttle"] >= 20


def _stale_page_run(image, tmp_path):
    """A live migration whose receiver reads channel 1 slowly: its older copies of hot blocks
    come late, after newer ones on channel 0. Returns (receiver's exit, stderr, out, final)."""
    out, final = tmp_path / "out.img", tmp_path / "final.img"
    recv = start_receiver(str(out), "--fault", "throttle@1:rate=6MB/s")
    # Uniform writes dirty every block in every round, the 1 ms limit forces all 6 rounds,
    # and blocks land on either channel: some block's copy of round r is on the slow channel
    # and its copy of round r+1 on the fast one in practically every run.
    sent = run_sender(recv.address, image, "--live", "--save-final", str(final),
                      "--packet-pages", "16", "--channels", "2", "--dirty-rate", "50MB/s",
                      "--dirty-pattern", "uniform", "--downtime-limit", "1ms",
                      "--max-rounds", "6")
    code, _, stderr = recv.finish()
    return code, stderr, sent, out, final


@pytest.mark.timeout(90)
def test_a_slow_channel_cannot_put_an_old_copy_over_a_new_one(make_image, tmp_path,
                                                              monkeypatch):
    image = make_image(8 * MiB, "mixed")
    (tmp_path / "barrier").mkdir()
    code, stderr, sent, out, final = _stale_page_run(image, tmp_path / "barrier")
    assert sent.returncode == 0 and code == 0, (sent.stderr, stderr)
    assert out.read_bytes() == final.read_bytes()
    # The control: without the round barrier the same run goes wrong, and it is caught:
    # refused as it arrives, or a wrong image.
    monkeypatch.setenv("MULTIFD_TEST_NO_ROUND_BARRIER", "1")
    (tmp_path / "none").mkdir()
    code, stderr, sent, out, final = _stale_page_run(image, tmp_path / "none")
    assert code == 1 or out.read_bytes() != final.read_bytes(), \
        "without the round barrier the run still ended exact: the test cannot fail"
    if code == 1:  # a later copy came first: before the old one, or before round 0's
        assert "after its copy of round" in stderr or "first came in round" in stderr, stderr


@pytest.mark.timeout(90)
def test_the_bench_live_sweep_reports_each_rate(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "multifd.tools.bench", "--size", "8M",
                             "--channels", "2", "--live-rates", "0,5MB/s", "--live-pattern",
                             "hot:5%", "--dir", str(tmp_path), "--no-matrix", "--json"],
                            capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stderr
    [sweep] = json.loads(result.stdout)["live"]
    assert sweep["channels"] == 2 and sweep["pattern"] == "hot:5%"
    rows = sweep["live"]
    assert [r["dirty_rate"] for r in rows] == [0, 5e6]
    assert rows[0]["rounds"] == 1 and rows[0]["downtime"] is None
    assert rows[1]["rounds"] >= 2 and rows[1]["downtime"] > 0
    assert list(tmp_path.iterdir()) == []  # the bench's image is gone
