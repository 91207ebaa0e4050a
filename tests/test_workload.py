"""multifd/workload.py: the process that plays the guest, writing into its own copy of the
image at a rate and in a pattern, and its dirty log: read and cleared by flipping, it never
loses a write, whatever the sender does meanwhile."""

from __future__ import annotations

import hashlib
import time

import pytest

from multifd import workload as W

PAGE, BLOCK_PAGES = 4096, 16
NPAGES = 1024  # 4 MiB: 64 blocks


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "guest.img"
    path.write_bytes(bytes(range(256)) * (NPAGES * PAGE // 256))
    return str(path)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(w: W.Workload) -> bytes:
    with open(w.path, "rb") as f:
        return f.read()


def changed_pages(before: bytes, after: bytes) -> set[int]:
    return {p for p in range(NPAGES)
            if before[p * PAGE:(p + 1) * PAGE] != after[p * PAGE:(p + 1) * PAGE]}


@pytest.mark.parametrize("text, parsed", [("uniform", ("uniform", 0.0)),
                                           ("sweep", ("sweep", 0.0)),
                                           ("hot:5%", ("hot", 0.05)), ("hot:100%", ("hot", 1.0))])
def test_patterns(text, parsed):
    assert W.parse_pattern(text) == parsed


@pytest.mark.parametrize("text", ["hot", "hot:0%", "hot:150%", "hot:x%", "uniform:1", "zipf"])
def test_bad_patterns_say_what_is_wrong(text):
    with pytest.raises(ValueError, match="uniform, sweep, or hot:P%"):
        W.parse_pattern(text)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pattern", ["uniform", "hot:10%", "sweep"])
def test_the_log_read_while_writing_never_loses_a_write(image, pattern):
    original = digest(image)
    # Back-to-back syncs race a fast writer, as rounds do. (A flip read before its
    # acknowledgement would lose only marks that a later write of the same page repeats,
    # so this cannot catch that mistake: the acknowledgement rests on the module's argument.)
    with W.Workload(image, PAGE, BLOCK_PAGES, rate=400e6, pattern=pattern, seed=3) as w:
        w.pause()
        w.sync()
        before = snapshot(w)
        w.resume()
        marked: set[int] = set()
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            marked |= set(w.sync().pages())
        w.pause()
        marked |= set(w.sync().pages())
        changed = changed_pages(before, snapshot(w))
        assert w.written > 100
    assert changed, "the workload wrote nothing"
    # Every write changes its page, and every changed page was marked: exactly.
    assert changed == marked
    assert digest(image) == original  # IMAGE itself is never written


@pytest.mark.timeout(30)
def test_a_paused_workload_writes_nothing(image):
    with W.Workload(image, PAGE, BLOCK_PAGES, rate=40e6, pattern="uniform") as w:
        time.sleep(0.05)
        w.pause()
        w.sync()
        before, count = snapshot(w), w.written
        time.sleep(0.1)
        assert snapshot(w) == before and w.written == count and not w.sync()


@pytest.mark.timeout(30)
def test_hot_writes_go_mostly_to_the_hot_set(image):
    with W.Workload(image, PAGE, BLOCK_PAGES, rate=40e6, pattern="hot:10%", seed=5) as w:
        w.pause()
        before = snapshot(w)
        w.resume()
        time.sleep(0.3)
        w.pause()
        changed = changed_pages(before, snapshot(w))
    hot = set(range(NPAGES // 10))
    assert len(changed & hot) / len(hot) > 0.9
    assert len(changed - hot) / (NPAGES - len(hot)) < 0.5


@pytest.mark.timeout(30)
def test_sweep_increments_one_byte_page_after_page(image):
    with W.Workload(image, PAGE, BLOCK_PAGES, rate=4e6, pattern="sweep") as w:
        w.pause()
        before = snapshot(w)
        w.resume()
        time.sleep(0.2)
        w.pause()
        after = snapshot(w)
    changed = sorted(changed_pages(before, after))
    assert changed and changed == list(range(len(changed)))  # from page 0 on, no gap
    for p in changed:
        a, b = before[p * PAGE:(p + 1) * PAGE], after[p * PAGE:(p + 1) * PAGE]
        assert b[0] == (a[0] + 1) & 0xFF and a[1:] == b[1:]


@pytest.mark.timeout(30)
def test_the_rate_is_kept(image):
    with W.Workload(image, PAGE, BLOCK_PAGES, rate=8e6, pattern="uniform") as w:
        time.sleep(0.05)
        start, t0 = w.written, time.monotonic()
        time.sleep(0.5)
        pages = w.written - start
        elapsed = time.monotonic() - t0
    expected = 8e6 / PAGE * elapsed
    assert 0.6 * expected < pages < 1.4 * expected, (pages, expected)


@pytest.mark.timeout(30)
def test_the_workload_ends_when_its_owner_is_gone(image, tmp_path):
    # An owner that ends without closing it (a sender's crash fault) leaves no writer behind.
    import subprocess
    import sys
    code = (f"import time; from multifd import workload as W; "
            f"w = W.Workload({image!r}, {PAGE}, {BLOCK_PAGES}, 1e6, 'uniform'); "
            f"print(w.proc.pid, flush=True); time.sleep(0.2); import os; os._exit(0)")
    owner = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=20)
    pid = int(owner.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"workload {pid} still runs after its owner ended")
