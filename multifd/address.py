"""HOST:PORT parsing (pure)."""

from __future__ import annotations

import ipaddress

from .errors import UsageError


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:4444', '[::1]:4444' or 'localhost:4444' -> (host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"address {text!r} does not parse (expected [IPv6]:PORT)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"address {text!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise UsageError(f"address {text!r} does not parse (expected HOST:PORT)")
        if ":" in host:
            raise UsageError(f"address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"address {text!r}: port {port_text!r} is not a number in 0..65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
