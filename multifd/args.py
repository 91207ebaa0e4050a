"""Command-line parsing shared by every multifd program: one-line errors and the units grammar.

Light on purpose (argparse and units only): the tools import it without loading trio.
"""

from __future__ import annotations

import argparse

from . import units


class Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line, not the whole usage block."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _typed(parse, check=None):
    """An argparse type from a units parser (ValueError -> the one-line usage error)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if check is not None:
            check(text, value)
        return value

    return convert


def _positive(text: str, value: float) -> None:
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero")


def _seconds_in(low: float, high: float):
    def check(text: str, value: float) -> None:
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration in {low:g}s..{high:g}s")
    return check


size = _typed(units.parse_size, _positive)
rate = _typed(units.parse_rate, _positive)
duration = _typed(units.parse_duration, _seconds_in(0.001, 86400))
