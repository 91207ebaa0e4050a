"""multifd: a live-migration transport for RAM images over N parallel TCP channels.

The public API is importable from here; names are loaded on first use, so that the command
line tools start without importing what they do not need.
"""

from __future__ import annotations

import importlib

__all__ = [
    "MultifdError", "UsageError", "ProtocolError", "TransportError", "PeerError",
    "VerificationError", "Timeouts", "Report", "send_image", "receive_image",
    "open_listeners", "Faults",
]

_WHERE = {
    "MultifdError": "errors", "UsageError": "errors", "ProtocolError": "errors",
    "TransportError": "errors", "PeerError": "errors", "VerificationError": "errors",
    "Timeouts": "settings", "Report": "report", "send_image": "send",
    "receive_image": "recv", "open_listeners": "recv", "Faults": "faults",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'multifd' has no attribute {name!r}")
