"""cli.run: one line and an exit code for every outcome, decided once."""

from __future__ import annotations

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
