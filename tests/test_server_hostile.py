"""The server against hostile and careless clients, on 127.0.0.1 (helpers and the tiny-bundle rig of
tests/test_server.py): an offer that never connects holds a session slot only for the pending time;
inputs that used to give HTTP 500 or drop a WebSocket with a handler exception are each a clear 4xx
(or an error message on a WebSocket that stays open) while a session beside them streams on; uploads
are allowed by format, from their magic bytes, and sized from their header before decoding.
Every loop is bounded in count and time."""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import zlib

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCSessionDescription

from server.app import STATE
from server.images import ImageFormatError, probe_image
from server.session import SessionConfig
from tests import aio
from tests.test_server import HTTP_TIMEOUT, Peer, _signal, rig, serving  # noqa: F401  (rig: the module's fixture)

# An offer as a browser would send it, written by hand: no peer connection behind it, so it never
# connects. ICE credentials and a DTLS fingerprint are all aiortc needs to answer it.
SQUAT_SDP = "\r\n".join([
    "v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0", "a=msid-semantic: WMS",
    "m=video 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:sqat", "a=ice-pwd:squatsquatsquatsquatsquat", "a=ice-options:trickle",
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=setup:actpass", "a=mid:0", "a=recvonly", "a=rtcp-mux",
    "a=rtpmap:96 VP8/90000", "",
])


def _png(width: int, height: int, *, pixels: bool = True) -> bytes:
    """A PNG whose header says width x height (an IDAT of real pixels only when ``pixels``)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + b"\x80" * (3 * width) for _ in range(height)) if pixels else b"\0"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _server_errors(caplog) -> list[str]:
    """Handler exceptions (aiohttp logs each 500 and each WebSocket dropped by one) and the server's errors."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(("aiohttp", "avatar"))]


# -- the image header, without a server ---------------------------------------------------------

def test_probe_reads_the_size_of_every_allowed_format_as_opencv_decodes_it():
    rng = np.random.default_rng(0)
    for w, h in ((1, 1), (17, 5), (333, 101)):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for ext, params, fmt in ((".png", [], "PNG"), (".jpg", [], "JPEG"), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "JPEG"),
                                 (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], "WebP"), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], "WebP"),
                                 (".bmp", [], "BMP")):
            ok, buf = cv2.imencode(ext, img, params)
            assert ok
            info = probe_image(buf.tobytes())
            decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            assert (info.format, info.width_px, info.height_px) == (fmt, decoded.shape[1], decoded.shape[0]) == (fmt, w, h)


def test_probe_refuses_other_formats_and_broken_headers():
    ok, hdr = cv2.imencode(".hdr", np.ones((8, 8, 3), np.float32))
    assert ok and cv2.imdecode(hdr, cv2.IMREAD_COLOR) is not None  # OpenCV would decode it
    ok, tiff = cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))
    ok2, ppm = cv2.imencode(".ppm", np.zeros((8, 8, 3), np.uint8))
    assert ok and ok2
    for data, name in ((hdr.tobytes(), "Radiance HDR"), (tiff.tobytes(), "TIFF"), (ppm.tobytes(), "PNM"), (b"GIF89a" + b"\0" * 20, "GIF")):
        with pytest.raises(ImageFormatError, match="not accepted") as e:
            probe_image(data)
        assert e.value.known == name
    for junk in (b"", b"text", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\0\x10JFIF", b"RIFF\0\0\0\0WEBPVP8 ", b"BM" + b"\0" * 40):
        with pytest.raises(ImageFormatError, match="not a readable image") as e:
            probe_image(junk)
        assert e.value.known is None


# -- capacity that cannot be squatted ----------------------------------------------------------

def test_a_squatting_offer_holds_the_only_slot_for_the_pending_time_only(rig):
    """With one slot, an offer that never connects (plain HTTP, no peer behind it) blocks a real
    client for at most the default pending time (5 s), and the refusals say when to come back."""
    pending_s = SessionConfig().connect_timeout_s
    assert pending_s <= 5.0

    async def run():
        async with serving(rig, max_sessions=1) as (base, app), aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            st = app[STATE]
            t_squat = time.monotonic()
            r = await http.post(f"{base}/offer", json={"sdp": SQUAT_SDP, "type": "offer"})
            assert r.status == 200, await r.text()
            squatter = st.sessions[(await r.json())["session_id"]]
            assert squatter.state == "connecting"

            peer = Peer()
            await peer.pc.setLocalDescription(await peer.pc.createOffer())
            refusals, retry_after = 0, []
            while time.monotonic() - t_squat < pending_s + 5.0:  # bounded: a slot never freed fails below
                r = await http.post(f"{base}/offer", json={"sdp": peer.pc.localDescription.sdp, "type": "offer"})
                if r.status != 503:
                    break
                refusals += 1
                retry_after.append(int(r.headers["Retry-After"]))
                await asyncio.sleep(0.2)
            waited_s = time.monotonic() - t_squat
            assert r.status == 200, await r.text()
            assert refusals > 0 and max(retry_after) <= pending_s  # it was blocked, and told when to retry
            assert waited_s <= pending_s + 1.5, waited_s
            assert squatter.state == "closed" and squatter.close_reason == f"no media connection within {pending_s:g} s"
            # the real client connects and streams
            ans = await r.json()
            peer.session_id = ans["session_id"]
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=ans["sdp"], type=ans["type"]))
            peer._tasks = [asyncio.create_task(peer._take(k, t)) for k, t in peer._tracks.items()]
            await peer.wait_video(5, 20.0)
            assert len(peer.video) >= 5
            # the real session outlives the pending time: only sessions that never connect are closed
            await asyncio.sleep(pending_s + 0.5)
            assert st.sessions[peer.session_id].state == "streaming"
            await peer.close()

    aio.run(run(), 90)


# -- hostile inputs: clear 4xx, the session beside them streams on ------------------------------

def test_hostile_inputs_are_clear_4xx_and_the_session_beside_them_streams(rig, caplog):
    _, _, _, voice = rig
    caplog.set_level(logging.WARNING)

    async def run():
        async with serving(rig, max_sessions=2) as (base, app), aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            st = app[STATE]
            streaming = Peer(_signal(voice, 0.5, 12.0))  # speaks longer than everything below takes
            assert (await streaming.offer(http, base)).status == 200
            await streaming.wait_video(10, 20.0)
            n_before = len(streaming.video)

            async def expect(method: str, path: str, status: int, needle: str, **kw) -> None:
                r = await http.request(method, f"{base}{path}", **kw)
                text = await r.text()
                assert r.status == status, (path, r.status, text[:300])
                assert needle in json.loads(text)["error"], text[:300]

            # /offer
            peer = Peer()
            await peer.pc.setLocalDescription(await peer.pc.createOffer())
            good = peer.pc.localDescription.sdp
            no_direction = "\r\n".join(ln for ln in good.split("\r\n") if ln not in ("a=recvonly", "a=sendrecv", "a=sendonly"))
            await expect("POST", "/offer", 400, "no direction", json={"sdp": no_direction, "type": "offer"})
            await expect("POST", "/offer", 400, "nested too deep", data="[" * 100_000 + "]" * 100_000,
                         headers={"Content-Type": "application/json"})
            await expect("POST", "/offer", 400, "too many digits", data='{"sdp": "v=0", "steps": ' + "9" * 5000 + "}",
                         headers={"Content-Type": "application/json"})
            await expect("POST", "/offer", 400, "steps", data=f'{{"sdp": {json.dumps(good)}, "steps": 1e400}}',
                         headers={"Content-Type": "application/json"})
            assert list(st.sessions) == [streaming.session_id]  # nothing refused was counted or kept

            # /avatars: formats by list, sizes from the header
            ok, hdr = cv2.imencode(".hdr", np.ones((64, 64, 3), np.float32))
            ok2, tiff = cv2.imencode(".tiff", np.full((64, 64, 3), 128, np.uint8))
            assert ok and ok2
            octet = {"Content-Type": "application/octet-stream"}
            await expect("POST", "/avatars", 415, "Radiance HDR images are not accepted", data=hdr.tobytes(), headers=octet)
            await expect("POST", "/avatars", 415, "TIFF", data=tiff.tobytes(), headers=octet)
            await expect("POST", "/avatars", 422, "1x1 pixels: too small", data=_png(1, 1), headers=octet)
            await expect("POST", "/avatars", 422, "too small", data=_png(4000, 8), headers=octet)  # 1280 x 2 once scaled
            await expect("POST", "/avatars", 413, "20000x20000", data=_png(20_000, 20_000, pixels=False), headers=octet)
            await expect("POST", "/avatars", 400, "not a readable image", data=b"\x89PNG\r\n\x1a\n", headers=octet)
            # multipart forms that do not parse
            await expect("POST", "/avatars", 400, "malformed multipart", data=b"garbage",
                         headers={"Content-Type": 'multipart/form-data; boundary="unterminated'})
            await expect("POST", "/avatars", 400, "malformed multipart", data=b"garbage",
                         headers={"Content-Type": "multipart/form-data"})
            await expect("POST", "/avatars", 400, "malformed multipart", data=b"--x\r\nnot a header line\r\n\r\n",
                         headers={"Content-Type": "multipart/form-data; boundary=x"})
            truncated = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + _png(64, 64)[:40]
            r = await http.post(f"{base}/avatars", data=truncated, headers={"Content-Type": "multipart/form-data; boundary=x"})
            assert 400 <= r.status < 500, (r.status, await r.text())

            # the WebSocket of a pushed-audio session: bad control messages are answered, the socket stays open
            assert (await peer.offer(http, base)).status == 200  # its audio m-line receives only: input "push"
            assert st.sessions[peer.session_id].input == "push"
            async with http.ws_connect(f"{base}/sessions/{peer.session_id}/audio/ws") as ws:
                for message, needle in (('{"rate": 1e400}', "integers"), ('{"rate": NaN}', "integers"),
                                        ('{"rate": 16000, "channels": -1e999}', "integers"), ("[" * 100_000 + "]" * 100_000, "nested too deep"),
                                        ('{"rate": ' + "9" * 5000 + "}", "too many digits"), ("not json", "Expecting value")):
                    await ws.send_str(message)
                    reply = await asyncio.wait_for(ws.receive_json(), 10.0)
                    assert needle in reply["error"], (message[:30], reply)
                await ws.send_str(json.dumps({"type": "interrupt"}))  # still open and working
                assert (await asyncio.wait_for(ws.receive_json(), 10.0))["type"] == "interrupted"
            await http.delete(f"{base}/sessions/{peer.session_id}")
            await peer.close()

            health = await http.get(f"{base}/healthz")
            assert health.status == 200 and (await health.json())["ok"]
            # the session beside all of this streamed on (not a speed test: no stall of a second, not far below 25 fps)
            await asyncio.sleep(1.0)
            arrivals = [t for _, t, _ in streaming.video[n_before - 1 :]]
            span = asyncio.get_running_loop().time() - arrivals[0]
            assert (len(arrivals) - 1) / span > 10 and max(np.diff(arrivals)) < 1.0, (len(arrivals), span, max(np.diff(arrivals)))
            assert st.sessions[streaming.session_id].state == "streaming"
            await streaming.close()

    aio.run(run(), 120)
    assert _server_errors(caplog) == []


def test_websockets_per_session_are_capped_and_a_control_flood_is_cut_off(rig, caplog):
    """Two audio WebSockets per session at most (429 beyond); a flood of control messages (the issue's
    170k interrupts in 5 s) closes that socket with 1008 within its burst, and the server stays
    healthy: /healthz answers quickly and the session goes on streaming."""
    async def run():
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, serving(rig, max_sessions=1) as (base, app):
            st = app[STATE]
            peer = Peer()
            assert (await peer.offer(http, base)).status == 200
            url = f"{base}/sessions/{peer.session_id}/audio/ws"
            async with http.ws_connect(url) as ws1, http.ws_connect(url) as ws2:
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await http.ws_connect(url)
                assert e.value.status == 429
                await ws2.send_str(json.dumps({"type": "interrupt"}))
                assert (await asyncio.wait_for(ws2.receive_json(), 10.0))["type"] == "interrupted"
                for _ in range(400):  # a flood: far beyond the burst of 50
                    await ws1.send_str(json.dumps({"type": "interrupt"}))
                closed_by = None
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline:
                    m = await asyncio.wait_for(ws1.receive(), 10.0)
                    if m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                        closed_by = (m.data, m.extra)
                        break
                assert closed_by is not None and closed_by[0] == 1008 and "too many control messages" in (closed_by[1] or "")
                t0 = time.monotonic()
                health = await http.get(f"{base}/healthz")
                assert health.status == 200 and time.monotonic() - t0 < 2.0
                await ws2.send_str(json.dumps({"type": "interrupt"}))  # the other socket still works
                assert (await asyncio.wait_for(ws2.receive_json(), 10.0))["type"] == "interrupted"
            assert st.sessions[peer.session_id].state in ("connecting", "streaming")
            await http.delete(f"{base}/sessions/{peer.session_id}")
            await peer.close()

    aio.run(run(), 90)
    assert _server_errors(caplog) == []


def test_a_client_that_leaves_mid_push_is_one_info_line(rig, caplog):
    """A pusher whose connection drops in the middle of a POST of audio: one info line from the server,
    no traceback, and the session goes on."""
    caplog.set_level(logging.INFO)

    async def run():
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http, serving(rig, max_sessions=1) as (base, app):
            peer = Peer()
            assert (await peer.offer(http, base)).status == 200
            host, port = base[len("http://"):].split(":")
            for _ in range(3):
                _, w = await asyncio.open_connection(host, int(port))
                w.write(f"POST /sessions/{peer.session_id}/audio?rate=16000 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        f"Content-Length: 1000000\r\n\r\n".encode() + b"\0" * 3200)
                await w.drain()
                await asyncio.sleep(0.2)
                w.transport.abort()  # gone mid-body
            await asyncio.sleep(0.5)
            assert app[STATE].sessions[peer.session_id].state in ("connecting", "streaming")
            await http.delete(f"{base}/sessions/{peer.session_id}")
            await peer.close()

    aio.run(run(), 60)
    assert _server_errors(caplog) == []
    left = [r for r in caplog.records if "left during an audio push" in r.getMessage()]
    assert len(left) == 3 and all(r.levelno == logging.INFO and not r.exc_info for r in left)
