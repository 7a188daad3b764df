"""``avatar bench reliability``: `avatar serve` against hostile, vanishing and greedy clients, on 127.0.0.1.

One real server process (``avatar serve --max-sessions 1``, its log kept) and this process as the
clients; every loop is bounded in count and in time. Phases, each a section of the JSON:

    hostile       >= 40 hostile inputs (HTTP: offers, uploads, multipart forms, pushes, routes, hosts and
                  origins; the WebSocket's control messages; raw sockets: broken request lines and headers,
                  half a request line that stalls, a body that stalls), each with its answer, while a
                  session streams beside them; an HTTP interrupt flood on that session (429s, /healthz time);
                  connections beyond ``--max-connections`` (refused at once, an open connection's /healthz
                  still answers). Counted: 5xx answers, handler exceptions in the server's log (tracebacks,
                  "Error handling request", ERROR lines), the streaming session's longest gap between frames.
    disconnects   ``--disconnects`` abrupt ends in turn: a client process killed (SIGKILL: no DTLS close, no
                  DELETE; benchmarks/reliability_peer.py), a peer closed without DELETE, an offer never
                  connected; the time each slot took to free (the disconnect to /healthz showing no session),
                  and the server's fds, threads, asyncio tasks (/metrics) and RSS before, after the first 10,
                  and after all.
    soak          one session for ``--soak-s`` with speech pushed in ``--piece-ms`` pieces in real time over
                  HTTP (a voice agent's TTS): the session's latency p50 / p95, dropped speech frames (the
                  pipeline's and the pacer's), frames received; the server's resources and /healthz time every
                  ``--sample-s``; ``--capacity-offers`` offers refused (503) while it streams.

Not a speed test: the figures are what this machine gave. The full run is
``avatar bench reliability --out docs/benchmarks/reliability.json`` (defaults: 100 disconnects, a 600 s soak;
about 25 minutes on 2 cores); tests/test_bench_reliability.py runs it small on a tiny bundle.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.server import DEMO_VOICE, REPO, SHARED_SPEECH, read_metrics, start_server, stop_server

PIECE_MS = 100  # pushed speech piece (the size the server itself pushes in)
ERROR_LINE = re.compile(r"Traceback|Error handling request|Task exception was never retrieved|Exception in callback|^ERROR|\bERROR\b")


# -- the server process --------------------------------------------------------------------------

def proc_stats(pid: int) -> dict:
    """Open fds, threads and resident memory of a process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", status, re.M).group(1))  # noqa: E731
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": field("Threads"), "rss_mib": round(field("VmRSS") / 1024, 1)}


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


async def _resources(http, url: str, pid: int) -> dict:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    tasks = _metric(text, "avatar_asyncio_tasks")
    return {**proc_stats(pid), "asyncio_tasks": None if tasks is None else int(tasks)}


def _log_errors(path: Path) -> list[str]:
    """Each error in the server's log with the 12 lines after it (a traceback's frames and its exception)."""
    lines = path.read_text(errors="replace").splitlines()
    out, skip_to = [], 0
    for i, ln in enumerate(lines):
        if i >= skip_to and ERROR_LINE.search(ln):
            out.append("\n".join(lines[i : i + 12]))
            skip_to = i + 12
    return out


async def _sessions(http, url: str) -> int:
    async with http.get(f"{url}/healthz") as r:
        return (await r.json())["sessions"]


async def _until_free(http, url: str, timeout_s: float, t0: float | None = None) -> float | None:
    """Seconds from ``t0`` (default now) until the server holds no session (polled every 50 ms), None past ``timeout_s``."""
    t0 = time.monotonic() if t0 is None else t0
    while time.monotonic() - t0 < timeout_s:
        if await _sessions(http, url) == 0:
            return round(time.monotonic() - t0, 3)
        await asyncio.sleep(0.05)
    return None


# -- an in-process peer --------------------------------------------------------------------------

class Peer:
    """recvonly video and audio (its input is pushed): video arrival times are kept."""

    def __init__(self):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.arrivals: list[float] = []
        self.session_id: str | None = None
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", lambda t: self._tasks.append(asyncio.ensure_future(self._take(t))))

    async def _take(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.arrivals.append(time.monotonic())

    async def offer_sdp(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, http, url: str, frames: int = 3, timeout_s: float = 30.0) -> None:
        from aiortc import RTCSessionDescription

        async with http.post(f"{url}/offer", json={"sdp": await self.offer_sdp(), "type": "offer"}) as r:
            if r.status != 200:
                raise RuntimeError(f"offer refused: {r.status} {await r.text()}")
            ans = await r.json()
        self.session_id = ans["session_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=ans["sdp"], type=ans["type"]))
        t_end = time.monotonic() + timeout_s
        while len(self.arrivals) < frames and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        if len(self.arrivals) < frames:
            raise RuntimeError(f"no video within {timeout_s:g} s")

    def max_gap_s(self, since: float) -> float | None:
        t = [a for a in self.arrivals if a >= since]
        return round(float(np.max(np.diff(t))), 3) if len(t) > 1 else None

    async def close(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- hostile inputs -------------------------------------------------------------------------------

def _png(width: int, height: int, *, pixels: bool = True, value: int = 128) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes([value]) * (3 * width) for _ in range(height)) if pixels else b"\0"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _http_cases(good_sdp: str, sid: str) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, aiohttp request kwargs): each should be answered 4xx."""
    import cv2

    js = {"Content-Type": "application/json"}
    octet = {"Content-Type": "application/octet-stream"}
    no_direction = "\r\n".join(ln for ln in good_sdp.split("\r\n") if ln not in ("a=recvonly", "a=sendrecv", "a=sendonly"))
    audio_only = good_sdp.split("m=video")[0] if "m=video" in good_sdp else "v=0\r\n"
    hdr = cv2.imencode(".hdr", np.ones((64, 64, 3), np.float32))[1].tobytes()
    tiff = cv2.imencode(".tiff", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
    mp = lambda b: {"Content-Type": f"multipart/form-data; boundary={b}"}  # noqa: E731
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    cases: list[tuple[str, str, str, dict]] = [
        ("offer: not JSON", "POST", "/offer", {"data": "not json", "headers": js}),
        ("offer: a JSON array", "POST", "/offer", {"data": "[]", "headers": js}),
        ("offer: JSON nested 100,000 deep", "POST", "/offer", {"data": "[" * 100_000 + "]" * 100_000, "headers": js}),
        ("offer: a 5000-digit integer", "POST", "/offer", {"data": '{"sdp": "v=0", "steps": ' + "9" * 5000 + "}", "headers": js}),
        ("offer: invalid UTF-8", "POST", "/offer", {"data": b'{"sdp": "\xff\xfe"}', "headers": js}),
        ("offer: no sdp", "POST", "/offer", {"json": {}}),
        ("offer: sdp not a string", "POST", "/offer", {"json": {"sdp": 5}}),
        ("offer: type answer", "POST", "/offer", {"json": {"sdp": good_sdp, "type": "answer"}}),
        ("offer: garbage SDP", "POST", "/offer", {"json": {"sdp": "hello"}}),
        ("offer: SDP without media", "POST", "/offer", {"json": {"sdp": "v=0\r\n"}}),
        ("offer: m-lines without direction", "POST", "/offer", {"json": {"sdp": no_direction}}),
        ("offer: no video m-line", "POST", "/offer", {"json": {"sdp": audio_only}}),
        ("offer: unknown avatar", "POST", "/offer", {"json": {"sdp": good_sdp, "avatar": "nope"}}),
        ("offer: avatar not a string", "POST", "/offer", {"json": {"sdp": good_sdp, "avatar": [1]}}),
        ("offer: steps 0", "POST", "/offer", {"json": {"sdp": good_sdp, "steps": 0}}),
        ("offer: steps true", "POST", "/offer", {"json": {"sdp": good_sdp, "steps": True}}),
        ("offer: steps 1e400", "POST", "/offer", {"data": f'{{"sdp": {json.dumps(good_sdp)}, "steps": 1e400}}', "headers": js}),
        ("offer: steps 10^6", "POST", "/offer", {"json": {"sdp": good_sdp, "steps": 10**6}}),
        ("offer: 300 kB body", "POST", "/offer", {"data": '{"sdp": "' + "a" * 300_000 + '"}', "headers": js}),
        ("upload: empty", "POST", "/avatars", {"data": b"", "headers": octet}),
        ("upload: text", "POST", "/avatars", {"data": b"just text", "headers": octet}),
        ("upload: Radiance HDR", "POST", "/avatars", {"data": hdr, "headers": octet}),
        ("upload: TIFF", "POST", "/avatars", {"data": tiff, "headers": octet}),
        ("upload: GIF", "POST", "/avatars", {"data": b"GIF89a" + b"\0" * 40, "headers": octet}),
        ("upload: PNG 1x1", "POST", "/avatars", {"data": _png(1, 1), "headers": octet}),
        ("upload: PNG 4000x8", "POST", "/avatars", {"data": _png(4000, 8), "headers": octet}),
        ("upload: PNG header 20000x20000", "POST", "/avatars", {"data": _png(20_000, 20_000, pixels=False), "headers": octet}),
        ("upload: PNG signature only", "POST", "/avatars", {"data": b"\x89PNG\r\n\x1a\n", "headers": octet}),
        ("upload: PNG truncated", "POST", "/avatars", {"data": _png(64, 64)[:60], "headers": octet}),
        ("upload: no face (grey 256x256)", "POST", "/avatars", {"data": _png(256, 256), "headers": octet}),
        ("upload: 11 MiB", "POST", "/avatars", {"data": b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 2**20), "headers": octet}),
        ("multipart: unterminated boundary", "POST", "/avatars",
         {"data": b"garbage", "headers": {"Content-Type": 'multipart/form-data; boundary="unterminated'}}),
        ("multipart: no boundary", "POST", "/avatars", {"data": b"garbage", "headers": {"Content-Type": "multipart/form-data"}}),
        ("multipart: broken part header", "POST", "/avatars", {"data": b"--x\r\nnot a header line\r\n\r\n", "headers": mp("x")}),
        ("multipart: no file part", "POST", "/avatars",
         {"data": b'--x\r\nContent-Disposition: form-data; name="other"\r\n\r\nhi\r\n--x--\r\n', "headers": mp("x")}),
        ("multipart: truncated image", "POST", "/avatars", {"data": part + _png(64, 64)[:40], "headers": mp("x")}),
        ("session: unknown", "GET", "/sessions/nope", {}),
        ("session: an id of 5000 characters", "GET", "/sessions/" + "a" * 5000, {}),
        ("session: DELETE unknown", "DELETE", "/sessions/nope", {}),
        ("push: unknown session", "POST", "/sessions/nope/audio?rate=16000", {"data": b"\0\0", "headers": octet}),
        ("push: no rate", "POST", f"/sessions/{sid}/audio", {"data": b"\0\0", "headers": octet}),
        ("push: rate 0", "POST", f"/sessions/{sid}/audio?rate=0", {"data": b"\0\0", "headers": octet}),
        ("push: rate 10^9", "POST", f"/sessions/{sid}/audio?rate=1000000000", {"data": b"\0\0", "headers": octet}),
        ("push: rate NaN", "POST", f"/sessions/{sid}/audio?rate=nan", {"data": b"\0\0", "headers": octet}),
        ("push: 100 channels", "POST", f"/sessions/{sid}/audio?rate=16000&channels=100", {"data": b"\0\0", "headers": octet}),
        ("interrupt: unknown session", "POST", "/sessions/nope/interrupt", {}),
        ("route: path traversal", "GET", "/..%2f..%2fetc%2fpasswd", {}),
        ("route: dot file", "GET", "/.env", {}),
        ("route: PUT /offer", "PUT", "/offer", {"data": b"{}"}),
        ("host: a foreign Host header (DNS rebinding)", "GET", "/sessions", {"headers": {"Host": "evil.example"}}),
        ("origin: a cross-origin offer", "POST", "/offer", {"json": {"sdp": good_sdp}, "headers": {"Origin": "http://evil.example"}}),
        ("websocket: unknown session", "GET", "/sessions/nope/audio/ws", {}),
    ]
    return cases


WS_CASES = [  # (name, message): answered with an error message, the socket open
    ("ws: rate 1e400", '{"rate": 1e400}'), ("ws: rate NaN", '{"rate": NaN}'), ("ws: channels -1e999", '{"rate": 16000, "channels": -1e999}'),
    ("ws: nested 100,000 deep", "[" * 100_000 + "]" * 100_000), ("ws: a 5000-digit rate", '{"rate": ' + "9" * 5000 + "}"),
    ("ws: not JSON", "not json"), ("ws: a JSON array", "[1, 2]"), ("ws: unknown type", '{"type": "reboot"}'),
]

RAW_CASES = [  # (name, bytes sent): a 4xx, or the connection closed
    ("raw: garbage request line", b"HELLO\r\n\r\n"),
    ("raw: header line of 10 kB", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"),
    ("raw: 200 headers", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n"),
    ("raw: Content-Length abc", b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n"),
    ("raw: Content-Length and chunked", b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("raw: chunk size zz", b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"),
    ("raw: NUL in the path", b"GET /heal\0thz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("raw: URL of 20 kB", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
]


async def _raw(host: str, port: int, data: bytes, wait_s: float) -> tuple[str, float]:
    """Send ``data`` on a fresh connection: (the status line, or "closed"/"open"; seconds to the answer)."""
    r, w = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    try:
        w.write(data)
        await w.drain()
        got = b""
        while time.monotonic() - t0 < wait_s:
            try:
                chunk = await asyncio.wait_for(r.read(65536), max(0.05, wait_s - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return (got.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"), time.monotonic() - t0
            got += chunk
            if b"\r\n\r\n" in got:
                return got.split(b"\r\n", 1)[0].decode(errors="replace"), time.monotonic() - t0
        return "open", time.monotonic() - t0
    finally:
        w.close()


def _status_of(line: str) -> int | None:
    m = re.match(r"HTTP/1\.[01] (\d{3})", line)
    return int(m.group(1)) if m else None


async def _hostile(http, url: str, peer: Peer, cfg: dict) -> dict:
    import aiohttp

    host, port = url[len("http://"):].split(":")
    port = int(port)
    sid = peer.session_id
    scratch = Peer()
    good = await scratch.offer_sdp()
    await scratch.close()
    rows: list[dict] = []
    for name, method, path, kw in _http_cases(good, sid):
        t0 = time.monotonic()
        try:
            async with http.request(method, f"{url}{path}", **kw) as r:
                text = await r.text()
                status = r.status
            try:
                answer = json.loads(text).get("error", text)[:160]
            except (ValueError, AttributeError):
                answer = text[:160]
        except aiohttp.ClientError as e:  # the server closed: an answer too (counted apart)
            status, answer = None, f"{type(e).__name__}: {e}"[:160]
        rows.append({"input": name, "status": status, "answer": answer, "ms": round(1000 * (time.monotonic() - t0), 1)})
    async with http.ws_connect(f"{url}/sessions/{sid}/audio/ws") as ws:
        for name, message in WS_CASES:
            t0 = time.monotonic()
            await ws.send_str(message)
            reply = await asyncio.wait_for(ws.receive(), 10.0)
            ok = reply.type == aiohttp.WSMsgType.TEXT
            rows.append({"input": name, "status": "ws error message" if ok else f"ws {reply.type.name}",
                         "answer": (json.loads(reply.data).get("error", "") if ok else str(reply.extra))[:160],
                         "ms": round(1000 * (time.monotonic() - t0), 1)})
    async with http.ws_connect(f"{url}/sessions/{sid}/audio/ws") as ws:  # PCM before its format: closed 1008
        await ws.send_bytes(b"\0" * 640)
        reply = await asyncio.wait_for(ws.receive(), 10.0)
        rows.append({"input": "ws: PCM before the format", "status": f"ws close {ws.close_code}", "answer": str(reply.extra)[:160], "ms": None})
    for name, data in RAW_CASES:
        line, took = await _raw(host, port, data, 5.0)
        rows.append({"input": name, "status": _status_of(line) or line, "answer": line, "ms": round(1000 * took, 1)})
    # half a request line, then nothing: closed by the idle timeout
    line, took = await _raw(host, port, b"GET /heal", cfg["idle_timeout_s"] + 5.0)
    rows.append({"input": "raw: half a request line, then a stall", "status": _status_of(line) or line, "answer": line,
                 "ms": round(1000 * took, 1)})
    line, took = await _raw(host, port, b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 5000\r\n\r\n{\"sdp\"", cfg["body_timeout_s"] + 10.0)
    rows.append({"input": "raw: a body that stalls", "status": _status_of(line) or line, "answer": line, "ms": round(1000 * took, 1)})

    def refused_ok(row: dict) -> bool:
        s = row["status"]
        return (isinstance(s, int) and 400 <= s < 500) or s in ("closed", "ws error message", "ws close 1008")

    return {"inputs": len(rows), "answers_5xx": sum(1 for r in rows if isinstance(r["status"], int) and r["status"] >= 500),
            "not_4xx_or_closed": [r["input"] for r in rows if not refused_ok(r)], "rows": rows}


async def _interrupt_flood(http, url: str, sid: str, requests: int) -> dict:
    import aiohttp

    statuses: list[int] = []
    health_ms: list[float] = []
    done = asyncio.Event()

    async def flood(n: int) -> None:
        for _ in range(n):
            async with http.post(f"{url}/sessions/{sid}/interrupt") as r:
                statuses.append(r.status)

    async def probe() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as other:
            while not done.is_set():
                t0 = time.monotonic()
                async with other.get(f"{url}/healthz") as r:
                    await r.read()
                health_ms.append(1000 * (time.monotonic() - t0))
                await asyncio.sleep(0.1)

    prober = asyncio.create_task(probe())
    t0 = time.monotonic()
    await asyncio.gather(*(flood(requests // 8) for _ in range(8)))
    took = time.monotonic() - t0
    done.set()
    await prober
    return {"requests": len(statuses), "seconds": round(took, 2), "answered_200": statuses.count(200),
            "answered_429": statuses.count(429), "other": sorted(set(statuses) - {200, 429}),
            "healthz_ms_max": round(max(health_ms), 1) if health_ms else None,
            "healthz_ms_p50": round(float(np.median(health_ms)), 1) if health_ms else None}


async def _connection_cap(url: str, cap: int, extra: int) -> dict:
    host, port = url[len("http://"):].split(":")
    port = int(port)
    monitor = await asyncio.open_connection(host, int(port))

    async def healthz_on(conn) -> tuple[int, float]:
        r, w = conn
        t0 = time.monotonic()
        w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10.0)
        n = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
        await asyncio.wait_for(r.readexactly(n), 10.0)
        return int(head.split(b" ")[1]), 1000 * (time.monotonic() - t0)

    await healthz_on(monitor)
    held = []
    try:
        for _ in range(cap - 1):  # the rest of the cap, idle (the idle timeout is far longer than this takes)
            held.append(await asyncio.open_connection(host, port))
        refusals, refused_ms = 0, []
        for _ in range(extra):
            line, took = await _raw(host, port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 5.0)
            if _status_of(line) == 503:
                refusals += 1
                refused_ms.append(1000 * took)
        status, ms = await healthz_on(monitor)
    finally:
        for _, w in [*held, monitor]:
            w.close()
    return {"max_connections": cap, "over_the_cap": extra, "refused_503": refusals,
            "refusal_ms_max": round(max(refused_ms), 1) if refused_ms else None,
            "open_connection_healthz": {"status": status, "ms": round(ms, 1)}}


# -- abrupt disconnects --------------------------------------------------------------------------

async def _killed(http, url: str, free_timeout_s: float) -> dict:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "benchmarks.reliability_peer", url, cwd=REPO,
                                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60.0)).decode().strip()
        if not line.startswith("streaming"):
            return {"kind": "killed", "error": f"the client did not stream: {line!r}"}
        await asyncio.sleep(0.5)
        proc.kill()
        t0 = time.monotonic()
        await proc.wait()
        return {"kind": "killed", "free_s": await _until_free(http, url, free_timeout_s, t0)}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _closed_without_delete(http, url: str, free_timeout_s: float) -> dict:
    peer = Peer()
    try:
        await peer.connect(http, url)
    except RuntimeError as e:
        await peer.close()
        return {"kind": "closed without DELETE", "error": str(e)}
    await peer.close()  # a DTLS close, no DELETE
    return {"kind": "closed without DELETE", "free_s": await _until_free(http, url, free_timeout_s)}


async def _never_connected(http, url: str, free_timeout_s: float) -> dict:
    peer = Peer()
    sdp = await peer.offer_sdp()
    await peer.close()  # nothing behind the offer
    async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}) as r:
        if r.status != 200:
            return {"kind": "never connected", "error": f"offer refused: {r.status}"}
    return {"kind": "never connected", "free_s": await _until_free(http, url, free_timeout_s)}


async def _disconnects(http, url: str, pid: int, n: int, free_timeout_s: float, progress: Callable[[str], None]) -> dict:
    kinds = (_killed, _closed_without_delete, _never_connected)
    await asyncio.sleep(2.0)  # the previous phase's closings settle
    before = await _resources(http, url, pid)
    after_10 = None
    rows = []
    for i in range(n):
        rows.append({"i": i, **await kinds[i % 3](http, url, free_timeout_s)})
        if rows[-1].get("free_s") is None and "error" not in rows[-1]:
            rows[-1]["error"] = f"the slot was not freed within {free_timeout_s:g} s"
        if i == min(n, 10) - 1:
            await asyncio.sleep(1.0)
            after_10 = await _resources(http, url, pid)
        if (i + 1) % 10 == 0:
            progress(f"disconnects: {i + 1}/{n}")
    await asyncio.sleep(3.0)  # closing tasks end, the GC runs
    after = await _resources(http, url, pid)
    by_kind: dict[str, dict] = {}
    for kind in ("killed", "closed without DELETE", "never connected"):
        free = [r["free_s"] for r in rows if r["kind"] == kind and r.get("free_s") is not None]
        by_kind[kind] = {"count": sum(1 for r in rows if r["kind"] == kind), "freed": len(free),
                         "free_s_median": round(float(np.median(free)), 2) if free else None,
                         "free_s_max": round(max(free), 2) if free else None, "free_s_min": round(min(free), 2) if free else None}
    rss_ref = (after_10 or before)["rss_mib"]
    return {"count": n, "errors": [r for r in rows if "error" in r], "by_kind": by_kind,
            "resources": {"before": before, "after_first_10": after_10, "after": after,
                          "rss_vs_after_first_10": round(after["rss_mib"] / rss_ref - 1.0, 3) if rss_ref else None},
            "rows": rows}


# -- the soak: pushed speech in real-time pieces ------------------------------------------------------

def _speech_pcm(audio: Path) -> bytes:
    from engine.audio import decode_audio

    x = decode_audio(audio, sample_rate_hz=16000)
    return np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def _soak(http, url: str, pid: int, audio: Path, soak_s: float, piece_ms: int, sample_s: float, capacity_offers: int,
                progress: Callable[[str], None]) -> dict:
    pcm = _speech_pcm(audio)
    piece = 2 * 16 * piece_ms
    peer = Peer()
    await peer.connect(http, url)
    sid = peer.session_id
    loop = asyncio.get_running_loop()
    samples: list[dict] = []
    refusals: dict[str, Any] = {"offers": 0, "refused_503": 0, "retry_after_s": []}
    push_late_ms: list[float] = []
    push_status: dict[int, int] = {}

    async def push() -> None:
        t0 = loop.time()
        for i in range(int(soak_s * 1000 / piece_ms)):
            delay = t0 + i * piece_ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            push_late_ms.append(max(0.0, -delay) * 1000)
            off = (i * piece) % max(piece, len(pcm) - piece)
            async with http.post(f"{url}/sessions/{sid}/audio?rate=16000", data=pcm[off : off + piece]) as r:
                push_status[r.status] = push_status.get(r.status, 0) + 1
        async with http.post(f"{url}/sessions/{sid}/end_of_segment") as r:
            await r.read()

    async def sample() -> None:
        t0 = time.monotonic()
        while True:
            h0 = time.monotonic()
            await _sessions(http, url)
            samples.append({"t_s": round(time.monotonic() - t0, 1), "healthz_ms": round(1000 * (time.monotonic() - h0), 1),
                            **await _resources(http, url, pid)})
            if len(samples) % 6 == 0:
                progress(f"soak: {samples[-1]['t_s']:.0f}/{soak_s:g} s, rss {samples[-1]['rss_mib']} MiB")
            await asyncio.sleep(sample_s)

    async def capacity() -> None:
        await asyncio.sleep(min(2.0, soak_s / 4))
        for _ in range(capacity_offers):
            other = Peer()
            sdp = await other.offer_sdp()
            await other.close()
            async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}) as r:
                refusals["offers"] += 1
                if r.status == 503:
                    refusals["refused_503"] += 1
                    refusals["retry_after_s"].append(int(r.headers.get("Retry-After", 0)))
            await asyncio.sleep(0.1)

    t_start = time.monotonic()
    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(push(), capacity())
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    await asyncio.sleep(1.5)  # the last pushed frames out
    async with http.get(f"{url}/sessions/{sid}") as r:
        snap = (await r.json())["metrics"]
    wall = time.monotonic() - t_start
    await http.delete(f"{url}/sessions/{sid}")
    frames_rx = len([a for a in peer.arrivals if a >= t_start])
    max_gap = peer.max_gap_s(t_start)
    await peer.close()
    c, lat = snap["counters"], snap["stages"].get("latency", {})
    r = refusals["retry_after_s"]
    return {"seconds": soak_s, "piece_ms": piece_ms, "pushes": push_status, "push_late_ms_max": round(max(push_late_ms, default=0.0), 1),
            "latency_ms": {k: lat.get(k) for k in ("count", "p50_ms", "p95_ms", "p99_ms", "max_ms")},
            "speech_frames_dropped": {"pipeline": c.get("frames_dropped"), "pacer": c.get("stream_speech_dropped")},
            "frames": {"out": c.get("frames_out"), "idle": c.get("idle_frames"), "degraded": c.get("frames_degraded"),
                       "received": frames_rx, "received_fps": round(frames_rx / wall, 2), "max_gap_s": max_gap},
            "capacity": {**{k: v for k, v in refusals.items() if k != "retry_after_s"},
                         "retry_after_s": [min(r), max(r)] if r else None},
            "resources": {"first": samples[0] if samples else None, "last": samples[-1] if samples else None,
                          "healthz_ms_max": max((s["healthz_ms"] for s in samples), default=None),
                          "rss_mib_max": max((s["rss_mib"] for s in samples), default=None)},
            "samples": samples}


# -- the run -------------------------------------------------------------------------------------

def bench_reliability(out: str | Path, *, disconnects: int = 100, soak_s: float = 600.0, piece_ms: int = PIECE_MS,
                      sample_s: float = 10.0, capacity_offers: int = 20, flood_requests: int = 800, connections_over: int = 20,
                      audio: str | Path | None = None, bundle: str | None = None, backend: str = "auto", threads: int | None = None,
                      max_connections: int | None = None, idle_timeout: float | None = None, body_timeout: float | None = None,
                      peer_timeout: float | None = None, pending_timeout: float | None = None, quiet: bool = False) -> dict:
    import aiohttp

    from server.app import ServerConfig
    from server.session import SessionConfig

    progress = (lambda m: None) if quiet else (lambda m: print(f"bench reliability: {m}", flush=True))
    audio = Path(audio) if audio else (SHARED_SPEECH if SHARED_SPEECH.is_file() else DEMO_VOICE)
    d = ServerConfig()
    cfg = {"max_sessions": 1, "max_connections": max_connections or d.max_connections,
           "idle_timeout_s": idle_timeout or d.idle_timeout_s, "body_timeout_s": body_timeout or d.body_timeout_s,
           "peer_timeout_s": peer_timeout or d.peer_timeout_s, "pending_timeout_s": pending_timeout or SessionConfig().connect_timeout_s}
    args = ["--max-sessions", "1", "--backend", backend, "--max-connections", str(cfg["max_connections"]),
            "--idle-timeout", str(cfg["idle_timeout_s"]), "--body-timeout", str(cfg["body_timeout_s"]),
            "--peer-timeout", str(cfg["peer_timeout_s"]), "--pending-timeout", str(cfg["pending_timeout_s"])]
    args += ["--bundle", str(bundle)] if bundle else []
    args += ["--threads", str(threads)] if threads else []
    free_timeout_s = max(cfg["peer_timeout_s"], cfg["pending_timeout_s"]) + 15.0
    log_file = tempfile.NamedTemporaryFile("w+", prefix="avatar-serve-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    proc, url = start_server(*args, stderr=log_file)
    result: dict = {}
    try:
        async def run() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                result["start"] = await _resources(http, url, proc.pid)
                progress("hostile inputs")
                peer = Peer()
                await peer.connect(http, url)
                t0 = time.monotonic()
                hostile = await _hostile(http, url, peer, cfg)
                hostile["interrupt_flood"] = await _interrupt_flood(http, url, peer.session_id, flood_requests)
                hostile["connection_cap"] = await _connection_cap(url, cfg["max_connections"], connections_over)
                await asyncio.sleep(1.0)
                hostile["session_beside"] = {"frames": len([a for a in peer.arrivals if a >= t0]), "max_gap_s": peer.max_gap_s(t0),
                                             "seconds": round(time.monotonic() - t0, 1)}
                async with http.delete(f"{url}/sessions/{peer.session_id}") as r:
                    await r.read()
                await peer.close()
                await _until_free(http, url, 15.0)
                result["hostile"] = hostile
                progress(f"disconnects ({disconnects})")
                result["disconnects"] = await _disconnects(http, url, proc.pid, disconnects, free_timeout_s, progress)
                progress(f"soak ({soak_s:g} s)")
                result["soak"] = await _soak(http, url, proc.pid, audio, soak_s, piece_ms, sample_s, capacity_offers, progress)
                result["end"] = await _resources(http, url, proc.pid)

        asyncio.run(run())
        result["server_metrics"] = read_metrics(url)
    finally:
        stop_server(proc)
        log_file.close()
    errors = _log_errors(log_path)
    log_path.unlink()
    h, dsc, soak = result["hostile"], result["disconnects"], result["soak"]
    res = dsc["resources"]
    report = {
        "what": "avatar serve against hostile, vanishing and greedy clients on 127.0.0.1 (benchmarks/reliability.py)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server": {**cfg, "bundle": bundle or "default", "backend": backend, "threads": threads},
        "audio": str(audio.relative_to(REPO.parent) if audio.is_relative_to(REPO.parent) else audio),
        "summary": {
            "hostile_inputs": h["inputs"], "answers_5xx": h["answers_5xx"], "handler_exceptions": len(errors),
            "not_4xx_or_closed": h["not_4xx_or_closed"],
            "interrupt_flood": {k: h["interrupt_flood"][k] for k in ("requests", "answered_429", "healthz_ms_max")},
            "connections_refused_over_cap": h["connection_cap"]["refused_503"],
            "session_beside_max_gap_s": h["session_beside"]["max_gap_s"],
            "disconnects": dsc["count"], "disconnect_errors": len(dsc["errors"]),
            "slot_free_s": {k: {"median": v["free_s_median"], "max": v["free_s_max"]} for k, v in dsc["by_kind"].items()},
            "fds_threads_tasks_start_before_after": {k: [result["start"][k], res["before"][k], res["after"][k]]
                                                     for k in ("fds", "threads", "asyncio_tasks")},
            "rss_mib": {"before": res["before"]["rss_mib"], "after_first_10": (res["after_first_10"] or {}).get("rss_mib"),
                        "after": res["after"]["rss_mib"], "after_vs_first_10": res["rss_vs_after_first_10"]},
            "soak_s": soak["seconds"], "soak_latency_p95_ms": soak["latency_ms"]["p95_ms"],
            "soak_speech_frames_dropped": soak["speech_frames_dropped"], "soak_received_fps": soak["frames"]["received_fps"],
            "soak_capacity_refused": f"{soak['capacity']['refused_503']}/{soak['capacity']['offers']}",
            "soak_rss_mib": [(soak["resources"]["first"] or {}).get("rss_mib"), (soak["resources"]["last"] or {}).get("rss_mib")],
        },
        "handler_exceptions": errors[:50],
        **result,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--disconnects", type=int, default=100, help="abrupt disconnects, in turn killed / closed without DELETE / never connected (default 100)")
    p.add_argument("--soak-s", type=float, default=600.0, help="seconds of the soak: one session, speech pushed in real time (default 600)")
    p.add_argument("--piece-ms", type=int, default=PIECE_MS, help="pushed speech piece in ms (default 100)")
    p.add_argument("--sample-s", type=float, default=10.0, help="the soak samples the server's resources this often (default 10)")
    p.add_argument("--capacity-offers", type=int, default=20, help="offers sent while the soak's session streams, all to be refused (default 20)")
    p.add_argument("--flood-requests", type=int, default=800, help="HTTP interrupts in the flood (default 800)")
    p.add_argument("--connections-over", type=int, default=20, help="connections opened beyond --max-connections (default 20)")
    p.add_argument("--audio", help="speech pushed in the soak (default: a shared-data speech file, else the demo voice), looped")
    p.add_argument("--bundle", help="model bundle folder (default: the shipped bundle)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "tensorrt"), help="the server's backend")
    p.add_argument("--threads", type=int, help="the server's inference threads")
    p.add_argument("--max-connections", type=int, help="the server's --max-connections (default: its default)")
    p.add_argument("--idle-timeout", type=float, help="the server's --idle-timeout (default: its default)")
    p.add_argument("--body-timeout", type=float, help="the server's --body-timeout (default: its default)")
    p.add_argument("--peer-timeout", type=float, help="the server's --peer-timeout (default: its default)")
    p.add_argument("--pending-timeout", type=float, help="the server's --pending-timeout (default: its default)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def check(a) -> None:
    """The counts and durations, before the server starts (ValueError: one line)."""
    for flag, value, low in (("--disconnects", a.disconnects, 0), ("--capacity-offers", a.capacity_offers, 0),
                             ("--flood-requests", a.flood_requests, 8), ("--connections-over", a.connections_over, 0),
                             ("--piece-ms", a.piece_ms, 10)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--soak-s", a.soak_s), ("--sample-s", a.sample_s)):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value:g}")
    if a.piece_ms > 1000:
        raise ValueError(f"--piece-ms must be <= 1000, got {a.piece_ms}")


def run_args(a) -> int:
    check(a)
    r = bench_reliability(a.out, disconnects=a.disconnects, soak_s=a.soak_s, piece_ms=a.piece_ms, sample_s=a.sample_s,
                          capacity_offers=a.capacity_offers, flood_requests=a.flood_requests, connections_over=a.connections_over,
                          audio=a.audio, bundle=a.bundle, backend=a.backend, threads=a.threads, max_connections=a.max_connections,
                          idle_timeout=a.idle_timeout, body_timeout=a.body_timeout, peer_timeout=a.peer_timeout,
                          pending_timeout=a.pending_timeout, quiet=a.quiet)
    print(json.dumps(r["summary"], indent=1))
    print(f"wrote {a.out}")
    return 0
