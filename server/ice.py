"""Which local addresses aioice offers as ICE host candidates.

aioice gathers a host candidate on every interface address except 127.0.0.1 (RFC 8445 forbids
loopback candidates), and aiortc has no API to choose. A server that listens on 127.0.0.1 should
not open media sockets on the machine's other interfaces, and a loopback-only test needs the
loopback address itself (``../shared/FACTS.md``, "WebRTC on loopback"). So this module wraps
``aioice.ice.get_host_addresses`` once and lets the process pin the list.

The setting is process-wide (aioice reads the function per gathering): the server sets it when
it binds a loopback address, the Python client when it talks to a loopback server.
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Sequence

import aioice.ice

_original: Callable[..., list[str]] | None = None  # aioice's own function, once wrapped
_pinned: list[str] | None = None  # None: aioice's default gathering


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    assert _original is not None
    if _pinned is None:
        return _original(use_ipv4, use_ipv6)
    return [a for a in _pinned if (use_ipv4 and ":" not in a) or (use_ipv6 and ":" in a)]


def pin_host_addresses(addresses: Sequence[str] | None) -> None:
    """Offer exactly these local addresses as host candidates (None: aioice's default, every interface)."""
    global _original, _pinned
    if _original is None:
        _original = aioice.ice.get_host_addresses
        aioice.ice.get_host_addresses = _host_addresses
    _pinned = None if addresses is None else [str(ipaddress.ip_address(a)) for a in addresses]


def is_loopback_host(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost`` and the like."""
    if host.strip("[]").lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
