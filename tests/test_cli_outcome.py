"""cli.run: one line and an exit code for every outcome, decided once."""

from __future__ import annotations

import gc
import json

import trio

from multifd import cli, errors
from multifd.report import Report


def _run(main, completed=None):
    return cli.run("multifd-test", "receiver", main, True, completed)


def test_a_signal_after_the_outcome_was_decided_does_not_undo_it(capsys):
    completed: list = []

    async def main():
        completed.append(Report("receiver", ok=True, bytes=10, digest="ab"))
        await trio.sleep(0)
        raise errors.Terminated("terminated by SIGTERM")  # arrives during cleanup

    assert _run(main, completed) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["digest"] == "ab"


def test_a_failure_is_one_line_and_its_exit_code(capsys):
    async def main():
        raise errors.PeerTimeout("peer silent for 1s", channel="data channel 2", stage="data")

    assert _run(main) == 1
    captured = capsys.readouterr()
    assert captured.err == "multifd-test: receiver: data channel 2, data: peer silent for 1s\n"
    assert json.loads(captured.out)["ok"] is False


def test_a_signal_before_the_outcome_is_reported_as_such(capsys):
    async def main():
        raise errors.Interrupted("interrupted")

    assert _run(main, []) == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_internal_error_after_the_outcome_is_said_and_keeps_its_exit_code(capsys):
    completed: list = []

    async def main():
        completed.append(Report("receiver", ok=True, bytes=10, digest="ab"))
        raise RuntimeError("a bug in the cleanup")

    assert _run(main, completed) == 0
    captured = capsys.readouterr()
    assert captured.err == ("multifd-test: receiver: after the outcome was decided: internal "
                            "error: RuntimeError('a bug in the cleanup') (MULTIFD_DEBUG=1 shows "
                            "a traceback)\n")
    assert json.loads(captured.out)["ok"] is True


def test_an_internal_error_before_the_outcome_fails_with_one_line(capsys):
    async def main():
        raise RuntimeError("a bug")

    assert _run(main) == 1
    assert capsys.readouterr().err.startswith("multifd-test: receiver: internal error: ")


def test_running_a_migration_leaves_the_collector_as_it_was():
    """Process-wide start-up settings (gc.disable, gc.freeze) belong to launch.py, which only
    a CLI process runs: whoever imports and runs the library keeps its own."""
    frozen, enabled = gc.get_freeze_count(), gc.isenabled()

    async def main():
        return Report("receiver", ok=True)

    assert _run(main) == 0
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_the_progress_bar_stays_full_when_a_live_migration_sends_more_than_the_image(
        monkeypatch):
    import trio
    import trio.testing

    from multifd import cli
    terminal = _Terminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)
    progress = cli.progress_printer("sending", True)

    async def main() -> None:
        with trio.move_on_after(0.3):  # a round 0 of 1 MiB, then another half of it
            await progress(lambda: 3 << 19, 1 << 20)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    line = terminal.text.split("\r")[-2]
    assert line.startswith("sending [" + "#" * 30 + "] 100.0% 1.50 MiB "), line
    assert cli.round_printer(False) is None  # --quiet or --json: no round lines either
