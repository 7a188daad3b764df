"""What one slow, idle or greedy HTTP client can hold (server/limits.py), on 127.0.0.1 with raw sockets:
idle and slowloris connections closed within the idle timeout, stalled bodies answered 408, connections
beyond the cap refused at once while an open one's /healthz still answers, an HTTP interrupt flood
limited (429) without slowing /healthz or stopping the session, clients that leave mid-request on
every route one info line. Every loop is bounded in count and time."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest

from server.app import STATE
from server.limits import LINGER_S, TokenBucket
from tests import aio
from tests.test_server import HTTP_TIMEOUT, Peer, rig, serving  # noqa: F401  (rig: the module's fixture)
from tests.test_server_hostile import _server_errors

HOST = "127.0.0.1"


def _hostport(base: str) -> tuple[str, int]:
    host, port = base[len("http://"):].split(":")
    return host, int(port)


async def _closed_after(reader: asyncio.StreamReader, timeout_s: float) -> tuple[float, bytes]:
    """Read until the server closes the connection: (seconds it took, what it sent); inf if it stayed open."""
    t0, got = time.monotonic(), b""
    while time.monotonic() - t0 < timeout_s:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.05, timeout_s - (time.monotonic() - t0)))
        except asyncio.TimeoutError:
            break
        except ConnectionResetError:
            return time.monotonic() - t0, got
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    return float("inf"), got


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes]:
    """One keep-alive GET on a raw connection: (status, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    status = int(head.split(b" ", 2)[1])
    length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:"))
    return status, await asyncio.wait_for(reader.readexactly(length), 5.0)


def test_token_bucket():
    b = TokenBucket(10.0, 3)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert 0 < b.wait_s() <= 0.1
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_idle_and_slowloris_connections_are_closed_within_the_idle_timeout(rig):
    idle_s = 1.0

    async def run():
        async with serving(rig, idle_timeout_s=idle_s) as (base, app):
            host, port = _hostport(base)
            silent = await asyncio.open_connection(host, port)  # connects, sends nothing
            half = await asyncio.open_connection(host, port)  # half a request line, then stalls
            half[1].write(b"GET /heal")
            dribble = await asyncio.open_connection(host, port)  # a header byte every 0.2 s: never a whole request
            kept = await asyncio.open_connection(host, port)  # one request answered, then idle
            assert (await _get(*kept, "/healthz"))[0] == 200

            async def drip() -> None:
                w = dribble[1]
                w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                for _ in range(int(4 * idle_s / 0.2)):  # bounded: 4 idle timeouts' worth of bytes
                    if w.is_closing():
                        return
                    w.write(b"a")
                    await asyncio.sleep(0.2)

            dripper = asyncio.create_task(drip())
            took = await asyncio.gather(*(_closed_after(r, idle_s + 3.0) for r, _ in (silent, half, dribble, kept)))
            dripper.cancel()
            await asyncio.gather(dripper, return_exceptions=True)
            for name, (t, _) in zip(("silent", "half a request line", "dribbling headers", "idle keep-alive"), took):
                assert t <= idle_s + 1.0, (name, t)
            for _, w in (silent, half, dribble, kept):
                w.close()
            # a client that sends its request in time is answered as always
            assert (await _get(*(await asyncio.open_connection(host, port)), "/healthz"))[0] == 200
            assert app[STATE].connections.gate.open <= 1

    aio.run(run(), 60)


def test_a_stalled_body_is_answered_408_within_the_body_timeout(rig, caplog):
    body_s = 1.0

    async def run():
        async with serving(rig, body_timeout_s=body_s) as (base, app), aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            host, port = _hostport(base)
            peer = Peer()
            assert (await peer.offer(http, base)).status == 200
            stalls = {"/offer": ("application/json", b'{"sdp": "v=0'),
                      "/avatars": ("application/octet-stream", b"\x89PNG\r\n\x1a\n"),
                      "/avatars#multipart": ("multipart/form-data; boundary=x",
                                             b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'),
                      f"/sessions/{peer.session_id}/audio?rate=16000": ("application/octet-stream", b"\0" * 3200)}
            for path, (ctype, start) in stalls.items():
                r, w = await asyncio.open_connection(host, port)
                w.write(f"POST {path.split('#')[0]} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: 100000\r\n\r\n".encode() + start)
                await w.drain()
                t, got = await _closed_after(r, body_s + 5.0)
                assert got.startswith(b"HTTP/1.1 408"), (path, got[:200])
                assert b"stalled" in got and t <= body_s + LINGER_S + 1.0, (path, t)
                w.close()
            await http.delete(f"{base}/sessions/{peer.session_id}")
            await peer.close()

    aio.run(run(), 60)
    assert _server_errors(caplog) == []


def test_connections_beyond_the_cap_are_refused_while_open_ones_go_on(rig):
    cap = 8

    async def run():
        async with serving(rig, max_connections=cap, idle_timeout_s=30.0) as (base, app):
            host, port = _hostport(base)
            gate = app[STATE].connections.gate
            monitor = await asyncio.open_connection(host, port)  # a keep-alive connection, open before the flood
            assert (await _get(*monitor, "/healthz"))[0] == 200
            idle = [await asyncio.open_connection(host, port) for _ in range(cap - 1)]
            await asyncio.sleep(0.2)
            assert gate.open == cap
            refused = []
            for _ in range(20):  # twenty more: each refused at once, none counted
                r, w = await asyncio.open_connection(host, port)
                w.write(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                t, got = await _closed_after(r, 5.0)
                refused.append((t, got))
                w.close()
            assert all(got.startswith(b"HTTP/1.1 503") and b"too many connections" in got and b"Retry-After" in got
                       and t < 1.0 for t, got in refused), refused[:2]
            assert gate.refused == 20 and gate.open == cap
            # the connection opened before the cap was reached still answers, quickly
            t0 = time.monotonic()
            status, body = await _get(*monitor, "/healthz")
            assert status == 200 and json.loads(body)["ok"] and time.monotonic() - t0 < 1.0
            status, body = await _get(*monitor, "/metrics")
            text = body.decode()
            assert status == 200 and f"avatar_http_connections {float(cap)}" in text and "avatar_http_connections_refused_total 20.0" in text
            # room again once some close
            for _, w in idle[:3]:
                w.close()
            t_end = time.monotonic() + 5.0
            while gate.open > cap - 3 and time.monotonic() < t_end:
                await asyncio.sleep(0.05)
            fresh = await asyncio.open_connection(host, port)
            assert (await _get(*fresh, "/healthz"))[0] == 200
            for _, w in [*idle[3:], monitor, fresh]:
                w.close()

    aio.run(run(), 60)


def test_an_http_interrupt_flood_is_rate_limited_and_healthz_stays_fast(rig, caplog):
    async def run():
        async with serving(rig, max_sessions=1) as (base, app), aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            st = app[STATE]
            peer = Peer()
            assert (await peer.offer(http, base)).status == 200
            await peer.wait_video(5, 20.0)
            assert len(peer.video) >= 5
            n_before = len(peer.video)
            url = f"{base}/sessions/{peer.session_id}/interrupt"
            statuses: list[int] = []
            health_s: list[float] = []

            async def flood() -> None:
                for _ in range(100):  # 8 of these at once: 800 interrupts
                    async with http.post(url) as r:
                        statuses.append(r.status)
                        if r.status == 429:
                            assert int(r.headers["Retry-After"]) >= 1

            async def probe() -> None:
                async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as other:
                    for _ in range(10):
                        t0 = time.monotonic()
                        async with other.get(f"{base}/healthz") as r:
                            assert r.status == 200
                        health_s.append(time.monotonic() - t0)
                        await asyncio.sleep(0.1)

            t0 = time.monotonic()
            await asyncio.gather(*(flood() for _ in range(8)), probe())
            elapsed = time.monotonic() - t0
            ok = statuses.count(200)
            assert set(statuses) <= {200, 429} and statuses.count(429) > 0
            assert ok <= st.config.ws_control_burst + st.config.ws_control_rate_per_s * elapsed + 2, (ok, elapsed)
            assert max(health_s) < 0.5, health_s
            # the session streams on (its frames keep coming), and a later interrupt is served again
            await asyncio.sleep(1.0)
            assert len(peer.video) - n_before > 10 and st.sessions[peer.session_id].state == "streaming"
            assert (await http.post(url)).status == 200
            await http.delete(f"{base}/sessions/{peer.session_id}")
            await peer.close()

    aio.run(run(), 90)
    assert _server_errors(caplog) == []


def test_clients_leaving_mid_request_on_every_route_are_one_info_line(rig, caplog):
    """Each route, its client gone in the middle (body cut, or gone before the answer): no error, no
    traceback; those that were reading a body say so in one info line."""
    caplog.set_level(logging.INFO)

    async def run():
        async with serving(rig, max_sessions=1) as (base, app), aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            host, port = _hostport(base)
            peer = Peer()
            assert (await peer.offer(http, base)).status == 200
            sid = peer.session_id
            cut_bodies = {"/offer": ("application/json", b'{"sdp": "v=0'),
                          "/avatars": ("application/octet-stream", b"\x89PNG\r\n\x1a\n"),
                          "/avatars#multipart": ("multipart/form-data; boundary=x",
                                                 b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG')}
            for path, (ctype, start) in cut_bodies.items():
                _, w = await asyncio.open_connection(host, port)
                w.write(f"POST {path.split('#')[0]} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: 100000\r\n\r\n".encode() + start)
                await w.drain()
                await asyncio.sleep(0.3)
                w.transport.abort()
            # gone right after asking (the answer is written to nobody)
            for method, path in (("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/sessions"), ("GET", f"/sessions/{sid}"),
                                 ("GET", "/avatars"), ("GET", "/"), ("GET", "/app.js"), ("GET", "/ice-servers"),
                                 ("POST", f"/sessions/{sid}/interrupt"), ("POST", f"/sessions/{sid}/end_of_segment"),
                                 ("GET", f"/sessions/{sid}/audio/ws")):
                _, w = await asyncio.open_connection(host, port)
                ws_headers = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              "Sec-WebSocket-Version: 13\r\n") if path.endswith("/ws") else ""
                w.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{ws_headers}Content-Length: 0\r\n\r\n".encode())
                await w.drain()
                w.transport.abort()
            await asyncio.sleep(0.5)
            assert app[STATE].sessions[sid].state in ("connecting", "streaming")
            assert (await http.get(f"{base}/healthz")).status == 200
            r = await http.delete(f"{base}/sessions/{sid}")  # and DELETE still works after all of it
            assert r.status == 200
            await peer.close()

    aio.run(run(), 60)
    assert _server_errors(caplog) == []
    assert not [r for r in caplog.records if r.exc_info and r.name.startswith(("aiohttp", "avatar"))]
    left = [r.getMessage() for r in caplog.records if "the client left" in r.getMessage()]
    # the three cut bodies; the WebSocket's handshake written to nobody may be a fourth
    assert sorted(m.split(":")[0] for m in left if "/ws" not in m) == ["POST /avatars", "POST /avatars", "POST /offer"], left
    assert len(left) <= 4 and all(r.levelno == logging.INFO for r in caplog.records if "the client left" in r.getMessage())


def test_malformed_http_is_400_and_one_info_line(rig, caplog):
    """Requests that do not parse (aiohttp answers 400 and logs an ERROR with a traceback for each): 400,
    and the server's log gets one info line each, no traceback."""
    caplog.set_level(logging.INFO)
    broken = (b"HELLO\r\n\r\n", b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
              b"GET /heal\0thz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
              b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

    async def run():
        async with serving(rig) as (base, app):
            host, port = _hostport(base)
            for data in broken:
                r, w = await asyncio.open_connection(host, port)
                w.write(data)
                await w.drain()
                _, got = await _closed_after(r, 5.0)
                assert got.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), (data[:30], got[:100])
                w.close()

    aio.run(run(), 30)
    assert _server_errors(caplog) == []
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if "malformed HTTP request answered 400" in r.getMessage()]) >= 4
