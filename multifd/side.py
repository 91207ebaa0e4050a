"""Side: one process's part in a migration, and what the transport carries through it.

A Side is made once, by send_image() or receive_image(), and reaches every function of the
transport and every Conn: who this side is (its error lines start with its name), whom it
talks to, the bounds on every network wait, its TLS credentials, where it logs, and its fault
seams. It is immutable: nothing learned during the migration is kept here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .faults import NO_FAULTS, Faults
from .settings import Timeouts


@dataclass(frozen=True)
class Side:
    name: str  # "sender" or "receiver"
    timeouts: Timeouts = Timeouts()
    tls: object = None  # tls.ClientTls for the sender, tls.ServerTls for the receiver
    faults: Faults = NO_FAULTS
    log: Callable[[str], None] = print

    @property
    def peer(self) -> str:
        """The other side, as this side's messages name it."""
        return "receiver" if self.name == "sender" else "sender"
