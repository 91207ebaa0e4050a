"""Tunables shared by both sides."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """Every network wait is bounded by one of these (seconds)."""

    connect: float = 10.0  # TCP connect of each channel
    handshake: float = 10.0  # hello exchange, and all channels arriving once one has
    idle: float = 30.0  # any single send or receive once established


DEFAULT_CHANNELS = 4
DEFAULT_PAGE_SIZE = 4096
DEFAULT_BLOCK_PAGES = 512  # 2 MiB packets: 12% faster than 512 KiB, no gain beyond
BATCH_BYTES = 8 << 20  # work handed to a channel's thread per hop
# A still image goes in one round; --live sends more (precopy.py), up to --max-rounds.
ROUNDS = 1
