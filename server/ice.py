"""Which local addresses aioice offers as ICE host candidates.

aioice gathers a host candidate on every interface address except 127.0.0.1 (RFC 8445 forbids
loopback candidates), and aiortc has no API to choose. A server that listens on 127.0.0.1 should
not open media sockets on the machine's other interfaces, and a loopback-only test needs the
loopback address itself (``../shared/FACTS.md``, "WebRTC on loopback"). So this module wraps
``aioice.ice.get_host_addresses`` once and lets the process pin the list.

The setting is process-wide (aioice reads the function per gathering): the server sets it when
it binds a loopback address, the Python client when it talks to a loopback server.

``set_consent_timeout`` shortens how long a vanished peer (a closed laptop lid, a killed tab:
no DTLS close, no DELETE) keeps its session: aioice checks consent (RFC 7675) every 5 s and
gives up after 6 failures, about 30 s during which the session holds a slot of the server's
capacity. Also process-wide (aioice's module constants, read at each check).
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


CONSENT_CHECK_TIMEOUT_S = 0.5  # aioice waits this long for the answer to one check (one STUN try, no retransmission)


def set_consent_timeout(timeout_s: float, interval_s: float = 2.0) -> None:
    """Close a connection whose peer answers no consent check for about ``timeout_s`` (checks every
    ``interval_s`` +-20 %, each failing after 0.5 s; at least 3 failures in a row, so that one lost
    packet never ends a healthy session; aioice's default is 6 x 5 s)."""
    if not timeout_s >= interval_s > 0:
        raise ValueError(f"need timeout_s >= interval_s > 0, got {timeout_s} and {interval_s}")
    aioice.ice.CONSENT_INTERVAL = interval_s
    aioice.ice.CONSENT_FAILURES = max(3, round(timeout_s / (interval_s + CONSENT_CHECK_TIMEOUT_S)))
