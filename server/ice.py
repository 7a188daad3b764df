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
capacity; the server's ``--peer-timeout`` (5 s) checks every 1.25 s and gives up after 3. Nothing
faster is offered by the sockets: aioice's UDP sockets are unconnected, so the ICMP "port
unreachable" of a killed peer's host is never reported to them. Also process-wide (aioice's module
constants, read at each check).

``IceServer`` is one STUN or TURN server for a deployment behind a NAT, on a cloud VM or in a
container (``--ice-server URL``, repeatable; ``--ice-username`` / ``--ice-credential`` for TURN;
or ``$AVATAR_ICE_SERVERS``): ``rtc_configuration`` makes aiortc's ``RTCConfiguration`` of them,
``IceServer.to_json`` the browser's ``RTCIceServer`` dictionary. aiortc uses the first STUN and
the first TURN server it is given (``turn:`` over udp or tcp, ``turns:`` over tcp); a browser
uses them all. With none, only host candidates are gathered (no server is contacted).
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.rtcicetransport import parse_stun_turn_uri

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


def set_consent_timeout(timeout_s: float, interval_s: float | None = None) -> None:
    """Close a connection whose peer answers no consent check for about ``timeout_s`` (checks every
    ``interval_s`` +-20 %, by default a quarter of ``timeout_s`` and at most 2 s, each failing after
    0.5 s; at least 3 failures in a row, so that one lost packet never ends a healthy session; aioice's
    default is 6 x 5 s). A peer killed at a random moment is found gone after about
    U(0, 1.2) x interval + 3 x 0.5 s + 2 x interval: 3.5-5.1 s at timeout 5 s (interval 1.25 s),
    7.5-10.4 s at 10 s (interval 2 s, 4 failures), as measured in docs/benchmarks/reliability.json."""
    if interval_s is None:
        interval_s = min(2.0, timeout_s / 4)
    if not timeout_s >= interval_s > 0:
        raise ValueError(f"need timeout_s >= interval_s > 0, got {timeout_s} and {interval_s}")
    aioice.ice.CONSENT_INTERVAL = interval_s
    aioice.ice.CONSENT_FAILURES = max(3, round(timeout_s / (interval_s + CONSENT_CHECK_TIMEOUT_S)))


ICE_SERVERS_ENV = "AVATAR_ICE_SERVERS"  # a JSON list of the browser's RTCIceServer dicts, or a file holding one


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server, as an ``RTCPeerConnection`` takes it (browser or aiortc)."""

    urls: tuple[str, ...]  # "stun:host[:port]", "turn:host[:port][?transport=udp|tcp]", "turns:host[:port]"
    username: str | None = None  # TURN: the long-term credential's user name
    credential: str | None = None  # TURN: its password

    def __post_init__(self) -> None:
        if isinstance(self.urls, str) or not self.urls:
            raise ValueError(f"IceServer.urls must be a non-empty tuple of URLs, got {self.urls!r}")
        for url in self.urls:
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError as e:
                raise ValueError(f"bad ICE server URL {url!r} ({e}): use stun:HOST[:PORT], "
                                 "turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]") from None
            if parsed["scheme"] in ("turn", "turns") and not (self.username and self.credential):
                raise ValueError(f"the TURN server {url!r} needs a username and a credential "
                                 "(--ice-username and --ice-credential)")

    def to_json(self) -> dict[str, Any]:
        """The browser's ``RTCIceServer`` dictionary (what the page gives ``new RTCPeerConnection``)."""
        d: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            d["username"] = self.username
        if self.credential is not None:
            d["credential"] = self.credential
        return d

    def to_rtc(self) -> RTCIceServer:
        """aiortc's ``RTCIceServer``."""
        return RTCIceServer(urls=list(self.urls), username=self.username, credential=self.credential)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "IceServer":
        """From the browser's dictionary: ``{"urls": str | [str], "username"?, "credential"?}``."""
        if not isinstance(d, Mapping) or "urls" not in d:
            raise ValueError(f"an ICE server is a JSON object with \"urls\", got {d!r}")
        urls = d["urls"]
        urls = (urls,) if isinstance(urls, str) else tuple(str(u) for u in urls)
        return cls(urls, d.get("username"), d.get("credential"))


def parse_ice_servers(urls: Sequence[str], *, username: str | None = None, credential: str | None = None) -> list[IceServer]:
    """``--ice-server URL`` given one or more times: one server per URL; ``username`` and
    ``credential`` go with the TURN URLs (STUN takes none)."""
    out = []
    for url in urls:
        turn = url.startswith("turn")
        out.append(IceServer((url,), username if turn else None, credential if turn else None))
    return out


def ice_servers_from_json(text: str) -> list[IceServer]:
    """A JSON list of the browser's ``RTCIceServer`` dictionaries (also ``{"iceServers": [...]}``)."""
    data = json.loads(text)
    if isinstance(data, Mapping):
        data = data.get("iceServers", [])
    if not isinstance(data, list):
        raise ValueError("ICE servers JSON must be a list of {\"urls\", \"username\", \"credential\"} objects")
    return [IceServer.from_json(d) for d in data]


def ice_servers_from_env(environ: Mapping[str, str] = os.environ) -> list[IceServer]:
    """``$AVATAR_ICE_SERVERS``: the JSON list itself, or the path of a file holding it; unset or empty: none."""
    value = environ.get(ICE_SERVERS_ENV, "").strip()
    if not value:
        return []
    text = value if value.startswith(("[", "{")) else Path(value).read_text()
    try:
        return ice_servers_from_json(text)
    except ValueError as e:
        raise ValueError(f"${ICE_SERVERS_ENV}: {e}") from None


def rtc_configuration(servers: Sequence[IceServer] = (), *, relay_only: bool = False) -> RTCConfiguration:
    """aiortc's configuration with these servers (none: host candidates only, nothing contacted);
    ``relay_only``: only TURN relay candidates (a peer that must not reveal its addresses, or a test
    of the relay path)."""
    if relay_only and not any(u.startswith("turn") for s in servers for u in s.urls):
        raise ValueError("relay-only ICE needs a TURN server (--ice-server turn:...)")
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=[s.to_rtc() for s in servers], iceTransportPolicy=policy)
