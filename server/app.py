"""The HTTP side of the server (aiohttp): signalling, pushed audio, avatars, health and metrics.

Routes (JSON unless said; errors are ``{"error": "..."}`` with the status below):

    POST   /offer                        {sdp, type: "offer", avatar?: id, steps?: int} -> {sdp, type, session_id}
                                         400 malformed SDP / no video m-line / bad field, 404 unknown avatar,
                                         503 (Retry-After) at capacity; a session whose peer does not connect
                                         within the pending time (SessionConfig.connect_timeout_s, 5 s) is closed
    POST   /sessions/{id}/audio          raw PCM s16le body (chunked is fine), ?rate=&channels=[&end=1]
    GET    /sessions/{id}/audio/ws       WebSocket: binary PCM s16le; text JSON {"rate", "channels"} first
                                         (or ?rate=&channels=), {"type": "end_of_segment"}, {"type": "interrupt"}
    POST   /sessions/{id}/interrupt      barge-in: drop queued audio and frames -> {dropped_s}
    POST   /sessions/{id}/end_of_segment the pushed turn is over (these two: 20 a second per session, bursts of 50; 429 beyond)
    GET    /sessions, /sessions/{id}     state and pipeline metrics
    DELETE /sessions/{id}                close it
    GET    /avatars                      {avatars: [{id, source, width, height, notes}]}
    POST   /avatars                      an image (multipart field or raw body) -> {id, ...}; 201 new, 200 known
                                         (kept in avatars_dir, when set, and prepared again at the next start);
                                         PNG, JPEG, WebP or BMP only, told by their magic bytes, size read from the
                                         header before decoding (server/images.py): 400 not an image or a broken form,
                                         413 too large, 415 another image format, 422 no face / several faces / too small
    GET    /healthz                      {ok, sessions, capacity} (never needs the token, nor does the page)
    GET    /metrics                      Prometheus text (prometheus_client): server gauges and counters, the pipelines'
                                         histograms (seconds) and counters summed over every session, closed ones
                                         included (no per-session series), process metrics (engine/pipeline/metrics.py)
    GET    /                             the web client (clients/web/index.html) or a short text page

A session's audio comes from the peer's audio track when its offer's audio m-line sends
(sendrecv / sendonly); otherwise it is pushed over HTTP or the WebSocket.

Security: listens on 127.0.0.1 unless told otherwise; with a token, every route but /healthz and
the web page's static files needs ``Authorization: Bearer <token>`` (or ``?token=`` for browsers' WebSockets and links);
cross-origin requests are refused (403) unless their origin is in ``cors_origins``; bodies are
size-limited (413); a server on loopback refuses requests whose Host is not a loopback name (403:
DNS rebinding). A closed session's routes answer 410 Gone with the reason it closed. Connections
(server/limits.py): closed without a whole request's headers ``idle_timeout_s`` after opening or the
last answer, 408 for a body that stalls ``body_timeout_s``, at most ``max_connections`` (503 at once beyond).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
import hmac
import json
import logging
import math
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.errors import AvatarInputError, ImageTooLargeError, UnreadableMediaError
from engine.pipeline.metrics import PrometheusExport
from engine.pipeline.sources import PushSource
from engine.runtime.batching import auto_batch_sessions, batch_runtime, batching_stats
from server.avatars import DEFAULT_ID, AvatarStore, UnsupportedImageError
from server.ice import is_loopback_host, pin_host_addresses, set_consent_timeout
from server.limits import (LINGER_S, LimitedSite, TokenBucket, body_chunks, client_gone_middleware, quiet_bad_requests,
                           read_within)
from server.session import OfferError, Session, SessionConfig, offer_media

log = logging.getLogger("avatar.server")

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = REPO_ROOT / "clients" / "web"  # the web client (static files, no build step), served at /
DEMO_PORTRAIT = REPO_ROOT / "engine" / "assets" / "demo" / "astronaut.jpg"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.(html|js|mjs|css|png|jpg|svg|ico|json|map|wasm)$")
_CONTENT_TYPES = {"html": "text/html", "js": "text/javascript", "mjs": "text/javascript", "css": "text/css", "png": "image/png",
                  "jpg": "image/jpeg", "svg": "image/svg+xml", "ico": "image/x-icon", "json": "application/json",
                  "map": "application/json", "wasm": "application/wasm"}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # where to listen (loopback: nothing outside this machine connects, ICE stays on loopback too)
    port: int = 8080  # 0: any free port (tests)
    max_sessions: int = 1  # concurrent sessions (one pipeline keeps two CPU cores busy)
    token: str | None = None  # bearer token that every route but /healthz and the page's static files requires (None: none)
    cors_origins: tuple[str, ...] = ()  # cross-origin callers allowed ("*": any); empty: same origin only
    max_upload_bytes: int = 10 * 2**20  # a portrait upload at most (413 beyond)
    max_json_bytes: int = 256 * 2**10  # an offer or other JSON body at most (an SDP is a few kB)
    max_ws_message_bytes: int = 2**20  # one WebSocket message at most
    max_ws_per_session: int = 2  # WebSockets pushing into one session at once (429 beyond)
    ws_control_rate_per_s: float = 20.0  # JSON control messages per second on one WebSocket, sustained
    ws_control_burst: int = 50  # ... and in a burst; beyond, the socket is closed (1008) and the session keeps streaming
    # (the same rate and burst limit POST /sessions/{id}/interrupt and /end_of_segment per session: 429 beyond)
    idle_timeout_s: float = 15.0  # a connection without a whole request's headers this long after it opened or was answered is closed
    body_timeout_s: float = 30.0  # a request body that sends no bytes this long is answered 408 (server/limits.py)
    max_connections: int = 256  # HTTP connections open at once; one more is answered 503 and closed (the open ones go on)
    max_steps: int = 16  # an offer's "steps" at most
    retry_after_s: int = 10  # the Retry-After of a 503 at capacity
    push_wait_s: float = 30.0  # a push waits this long at most for room in the session's buffer (503 beyond)
    peer_timeout_s: float = 5.0  # a peer that answers no ICE consent check this long is gone: its session closes (server/ice.py)
    session: SessionConfig = field(default_factory=SessionConfig)
    web_dir: Path = WEB_DIR
    default_portrait: Path = DEMO_PORTRAIT  # the avatar "default"
    avatars_dir: Path | None = None  # keep uploads here and prepare them again at startup (None: memory only)
    batch_sessions: int | None = None  # batch this many sessions' denoiser (GPU: and decoder) calls; None: auto (GPU: max_sessions, CPU: off)
    batch_wait_ms: float = 3.0  # a batch waits this long at most for the other sessions' calls (engine/runtime/batching.py)


class ServerState:
    """What the handlers share: the runtime (one per server), the avatars, the sessions."""

    def __init__(self, runtime: Any, config: ServerConfig, avatars: AvatarStore):
        self.runtime, self.config, self.avatars = runtime, config, avatars
        self.sessions: dict[str, Session] = {}
        self.closed: OrderedDict[str, str] = OrderedDict()  # recently closed session id -> why (410 Gone, not 404)
        self.sessions_started = 0
        self.sessions_rejected = 0
        self.restoring: asyncio.Task | None = None  # kept uploads being prepared again at startup
        self.control_buckets: dict[str, TokenBucket] = {}  # session id -> its HTTP interrupt / end_of_segment rate limit
        self.connections: LimitedSite | None = None  # the listening site, whose gate counts the open connections (serve())
        self.metrics = PrometheusExport()  # GET /metrics: every session's pipeline reports into it, and the server's own
        self.metrics.registry.register(_ServerCollector(self))

    def session_closed(self, s: Session) -> None:
        if self.sessions.get(s.id) is s:
            del self.sessions[s.id]
        self.control_buckets.pop(s.id, None)
        self.closed[s.id] = s.error or s.close_reason or "closed"
        while len(self.closed) > 256:
            self.closed.popitem(last=False)


class _ServerCollector:
    """The server's own series, read from its state at each scrape."""

    def __init__(self, st: ServerState):
        self.st = st

    def collect(self):
        st = self.st
        for name, help_, value in (("avatar_sessions", "Sessions open now.", len(st.sessions)),
                                   ("avatar_sessions_capacity", "Sessions this server accepts at once.", st.config.max_sessions),
                                   ("avatar_avatars", "Avatars prepared and kept.", len(st.avatars))):
            yield GaugeMetricFamily(name, help_, value=value)
        yield CounterMetricFamily("avatar_sessions_started", "Sessions answered since the server started.", value=st.sessions_started)
        yield CounterMetricFamily("avatar_sessions_rejected", "Offers refused at capacity.", value=st.sessions_rejected)
        yield GaugeMetricFamily("avatar_asyncio_tasks", "Tasks of the server's event loop.", value=len(asyncio.all_tasks()))
        if st.connections is not None:
            yield GaugeMetricFamily("avatar_http_connections", "HTTP connections open now.", value=st.connections.gate.open)
            yield CounterMetricFamily("avatar_http_connections_refused", "Connections refused beyond max_connections.",
                                      value=st.connections.gate.refused)


STATE = web.AppKey("avatar_state", ServerState)


# -- helpers -----------------------------------------------------------------------------------

def _json_error(cls: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": message}), content_type="application/json", headers=headers or None)


def _too_large(message: str, limit: int, size: int) -> web.HTTPException:
    return web.HTTPRequestEntityTooLarge(limit, size, text=json.dumps({"error": message}), content_type="application/json")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) more than ``limit`` bytes, announced or streamed."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(f"body of {request.content_length} bytes is over the limit of {limit}", limit, request.content_length)
    data = bytearray()
    async for chunk in body_chunks(request, 64 * 1024, request.app[STATE].config.body_timeout_s):  # 408 if it stalls
        data += chunk
        if len(data) > limit:
            raise _too_large(f"body over the limit of {limit} bytes", limit, len(data))
    return bytes(data)


def _loads(raw: str | bytes) -> Any:
    """JSON from a client; every way it can be unusable is a ValueError: not JSON, not UTF-8, nested
    too deep for the parser (RecursionError), an integer of more digits than Python converts."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, "Exceeds the limit (4300 digits)..."
        if "integer string conversion" in str(e):
            raise ValueError("an integer of too many digits") from None
        raise ValueError(str(e)) from None


async def _read_json(request: web.Request, limit: int) -> dict:
    raw = await _read_body(request, limit)
    try:
        body = _loads(raw)
    except ValueError as e:
        raise _json_error(web.HTTPBadRequest, f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _json_error(web.HTTPBadRequest, "body must be a JSON object")
    return body


def _retry_after_s(st: ServerState) -> int:
    """When to try again at capacity: when the first pending session's pending time ends (it is then
    streaming or closed), if that is sooner than ``retry_after_s``."""
    pending = [s.pending_until for s in st.sessions.values() if s.pending_until is not None]
    if not pending:
        return st.config.retry_after_s
    wait_s = min(pending) - asyncio.get_running_loop().time()
    return max(1, min(st.config.retry_after_s, math.ceil(wait_s)))


def _session(request: web.Request) -> Session:
    sid = request.match_info["sid"]
    st = request.app[STATE]
    s = st.sessions.get(sid)
    if s is not None and s.closing:
        raise _json_error(web.HTTPGone, f"session {sid} is closing: {s.close_reason}")
    if s is None:
        if sid in st.closed:
            raise _json_error(web.HTTPGone, f"session {sid} closed: {st.closed[sid]}")
        raise _json_error(web.HTTPNotFound, f"no session {sid!r}")
    return s


def _push_source(s: Session) -> PushSource:
    if s.push is None:
        raise _json_error(web.HTTPConflict, f"session {s.id} takes its audio from its WebRTC audio track; push audio only to a "
                                            "session whose offer's audio m-line does not send (recvonly, or no audio m-line)")
    return s.push


def _pcm_format(rate: Any, channels: Any) -> tuple[int, int]:
    try:
        r, c = int(rate), int(1 if channels is None else channels)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), e.g. {"rate": 1e400}
        raise ValueError(f"rate and channels must be integers, got rate={str(rate)[:40]!r} channels={str(channels)[:40]!r}") from None
    if not 8000 <= r <= 192000:
        raise ValueError(f"rate must be in [8000, 192000] Hz, got {r}")
    if not 1 <= c <= 8:
        raise ValueError(f"channels must be in [1, 8], got {c}")
    return r, c


class PcmPusher:
    """s16le bytes, in pieces of any size, into a PushSource: whole samples only, at most 100 ms per
    push, waiting (backpressure) while the source's buffer is full."""

    def __init__(self, source: PushSource, rate: int, channels: int, *, wait_s: float):
        self.source, self.rate, self.channels, self.wait_s = source, rate, channels, wait_s
        self._rest = b""  # bytes of an incomplete sample frame
        self.samples = 0  # sample frames pushed

    @property
    def seconds(self) -> float:
        return self.samples / self.rate

    async def feed(self, data: bytes) -> None:
        data = self._rest + bytes(data)
        frame_bytes = 2 * self.channels
        n = len(data) // frame_bytes
        self._rest = data[n * frame_bytes :]
        pcm = np.frombuffer(data[: n * frame_bytes], dtype="<i2").astype(np.int16)  # (n * channels,) interleaved
        step = max(1, self.rate // 10) * self.channels  # 100 ms
        for i in range(0, pcm.size, step):
            await self._push(pcm[i : i + step])

    async def _push(self, pcm: np.ndarray) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            try:
                self.source.push_audio(pcm, self.rate, self.channels)
                self.samples += pcm.size // self.channels
                return
            except BufferError:
                if loop.time() > deadline:
                    raise _json_error(web.HTTPServiceUnavailable, f"the session's audio buffer stayed full for {self.wait_s:g} s: "
                                                                  "push at most in real time") from None
                await asyncio.sleep(0.02)


# -- middlewares -------------------------------------------------------------------------------

def _same_origin(request: web.Request, origin: str) -> bool:
    return origin == f"{request.scheme}://{request.host}"


@web.middleware
async def _host_guard(request: web.Request, handler):
    """A server on loopback answers only requests addressed to a loopback name: a web page elsewhere
    that rebinds its own domain name to 127.0.0.1 (DNS rebinding) gets 403, not the API."""
    if is_loopback_host(request.app[STATE].config.host) and not is_loopback_host(request.url.host or ""):
        raise _json_error(web.HTTPForbidden, f"Host {request.host!r} refused: this server listens on loopback only; "
                                             "open it as http://127.0.0.1:<port>/")
    return await handler(request)


@web.middleware
async def _cors(request: web.Request, handler):
    """Cross-origin requests only from the configured origins (403 otherwise, before any work)."""
    origin = request.headers.get("Origin")
    if origin is None or _same_origin(request, origin):
        return await handler(request)
    allowed = request.app[STATE].config.cors_origins
    if origin not in allowed and "*" not in allowed:
        raise _json_error(web.HTTPForbidden, f"cross-origin request from {origin} refused (allow it with --cors {origin})")
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers={**headers, "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                                 "Access-Control-Max-Age": "600"})
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        e.headers.update(headers)
        raise
    if not resp.prepared:  # a WebSocket is already under way
        resp.headers.update(headers)
    return resp


def _public(request: web.Request) -> bool:
    """Needs no token: /healthz, and the web page with its static files (no secrets; the page asks for the token)."""
    path = request.path
    return path == "/healthz" or (request.method in ("GET", "HEAD") and (path == "/" or bool(_STATIC_NAME.match(path[1:]))))


@web.middleware
async def _auth(request: web.Request, handler):
    token = request.app[STATE].config.token
    if token is None or _public(request):
        return await handler(request)
    given = request.headers.get("Authorization", "")
    given = given[7:] if given.startswith("Bearer ") else request.query.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise _json_error(web.HTTPUnauthorized, "missing or wrong token: send 'Authorization: Bearer <token>'",
                          **{"WWW-Authenticate": "Bearer"})
    return await handler(request)


# -- handlers ----------------------------------------------------------------------------------

async def _offer(request: web.Request) -> web.Response:
    st = request.app[STATE]
    body = await _read_json(request, st.config.max_json_bytes)
    sdp, typ = body.get("sdp"), body.get("type", "offer")
    if not isinstance(sdp, str) or not sdp.strip():
        raise _json_error(web.HTTPBadRequest, "the offer needs 'sdp': the SDP text of an offer")
    if typ != "offer":
        raise _json_error(web.HTTPBadRequest, f"'type' must be 'offer', got {typ!r}")
    try:
        offer_media(sdp)  # a malformed offer is refused before anything is counted or built
    except OfferError as e:
        raise _json_error(web.HTTPBadRequest, str(e)) from None
    avatar_id = body.get("avatar") or DEFAULT_ID
    if not isinstance(avatar_id, str) or avatar_id not in st.avatars:
        raise _json_error(web.HTTPNotFound, f"no avatar {avatar_id!r} (GET /avatars lists them; POST /avatars adds one)")
    steps = body.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= st.config.max_steps):
        raise _json_error(web.HTTPBadRequest, f"'steps' must be an integer in [1, {st.config.max_steps}], got {steps!r}")
    if len(st.sessions) >= st.config.max_sessions:
        st.sessions_rejected += 1
        raise _json_error(web.HTTPServiceUnavailable, f"at capacity: {len(st.sessions)} of {st.config.max_sessions} sessions "
                          "in use; retry later", **{"Retry-After": str(_retry_after_s(st))})
    sid = secrets.token_hex(8)
    cfg = st.config.session if steps is None else dataclasses.replace(st.config.session, steps=steps)
    s = Session(sid, st.runtime, st.avatars.get(avatar_id), avatar_id, cfg, on_closed=st.session_closed)
    s.pipeline.metrics.export_to(st.metrics)  # its frames and latencies stay counted in /metrics after it closes
    st.sessions[sid] = s  # counted from now: concurrent offers cannot overshoot the capacity
    try:
        answer = await s.answer(sdp)
    except OfferError as e:
        await s.close("bad offer")
        raise _json_error(web.HTTPBadRequest, str(e)) from None
    except BaseException:
        await asyncio.shield(s.close("offer failed"))
        raise
    st.sessions_started += 1
    log.info("session %s: answered (avatar %s, input %s)", sid, avatar_id, s.input)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": sid, "input": s.input})


async def _push_audio(request: web.Request) -> web.Response:
    st = request.app[STATE]
    s = _session(request)
    src = _push_source(s)
    try:
        rate, channels = _pcm_format(request.query.get("rate"), request.query.get("channels"))
    except ValueError as e:
        raise _json_error(web.HTTPBadRequest, f"{e} (POST raw s16le PCM with ?rate=<Hz>&channels=<n>)") from None
    pusher = PcmPusher(src, rate, channels, wait_s=st.config.push_wait_s)
    try:
        async for chunk in body_chunks(request, 2 * channels * max(1, rate // 10), st.config.body_timeout_s):
            await pusher.feed(chunk)
        if request.query.get("end") in ("1", "true", "yes"):
            src.end_of_segment()
    except RuntimeError:  # the source was closed: the session closed under the push
        raise _json_error(web.HTTPGone, f"session {s.id} closed during the push") from None
    except ConnectionResetError:  # the client left mid-push (aiohttp's ClientConnectionResetError too): one line, no traceback
        log.info("session %s: the client left during an audio push (%.2f s of audio received)", s.id, pusher.seconds)
        return web.Response(status=400, text="the client left during the push")
    return web.json_response({"session_id": s.id, "pushed_s": round(pusher.seconds, 4)})


async def _audio_ws(request: web.Request) -> web.WebSocketResponse:
    st = request.app[STATE]
    s = _session(request)
    src = _push_source(s)
    pusher: PcmPusher | None = None
    if "rate" in request.query:
        try:
            pusher = PcmPusher(src, *_pcm_format(request.query["rate"], request.query.get("channels")), wait_s=st.config.push_wait_s)
        except ValueError as e:
            raise _json_error(web.HTTPBadRequest, str(e)) from None
    if s.websocket_count() >= st.config.max_ws_per_session:
        raise _json_error(web.HTTPTooManyRequests, f"this session already has {s.websocket_count()} audio WebSockets "
                                                   f"(at most {st.config.max_ws_per_session}); close one first")
    ws = web.WebSocketResponse(max_msg_size=st.config.max_ws_message_bytes, heartbeat=30.0)
    await ws.prepare(request)
    s.attach_websocket(ws)
    tokens, last = float(st.config.ws_control_burst), time.monotonic()  # a token bucket for control messages
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                now = time.monotonic()
                tokens = min(float(st.config.ws_control_burst), tokens + (now - last) * st.config.ws_control_rate_per_s)
                last = now
                if tokens < 1.0:
                    log.info("session %s: a WebSocket sent more than %.0f control messages a second; closed", s.id,
                             st.config.ws_control_rate_per_s)
                    await ws.close(code=1008, message=b"too many control messages: at most %d a second" % int(st.config.ws_control_rate_per_s))
                    break
                tokens -= 1.0
            if msg.type == WSMsgType.BINARY:
                if pusher is None:
                    await ws.close(code=1008, message=b"send {\"rate\": <Hz>, \"channels\": <n>} (or ?rate=) before PCM")
                    break
                try:
                    await pusher.feed(msg.data)
                except web.HTTPException as e:  # the buffer stayed full
                    await ws.close(code=1013, message=json.loads(e.text)["error"].encode()[:120])
                    break
                except RuntimeError:
                    break  # the session closed
            elif msg.type == WSMsgType.TEXT:
                try:
                    m = _loads(msg.data)
                    if not isinstance(m, dict):
                        raise ValueError("a control message is a JSON object")
                    if "rate" in m:
                        pusher = PcmPusher(src, *_pcm_format(m["rate"], m.get("channels")), wait_s=st.config.push_wait_s)
                    kind = m.get("type")
                    if kind == "end_of_segment":
                        src.end_of_segment()
                    elif kind == "interrupt":
                        await ws.send_json({"type": "interrupted", "dropped_s": round(s.pipeline.clear_buffer(), 4)})
                    elif kind is not None:
                        raise ValueError(f"unknown message type {kind!r} (end_of_segment, interrupt)")
                except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                    await ws.send_json({"error": str(e)})
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        s.detach_websocket(ws)
    return ws


def _control_allowed(request: web.Request, s: Session) -> None:
    """HTTP control requests of one session: ws_control_rate_per_s sustained, ws_control_burst at once (429 beyond)."""
    st = request.app[STATE]
    bucket = st.control_buckets.setdefault(s.id, TokenBucket(st.config.ws_control_rate_per_s, st.config.ws_control_burst))
    if not bucket.take():
        raise _json_error(web.HTTPTooManyRequests, f"session {s.id}: more than {st.config.ws_control_rate_per_s:g} control "
                          "requests a second", **{"Retry-After": str(max(1, math.ceil(bucket.wait_s())))})


async def _interrupt(request: web.Request) -> web.Response:
    s = _session(request)
    _control_allowed(request, s)
    return web.json_response({"session_id": s.id, "dropped_s": round(s.pipeline.clear_buffer(), 4)})


async def _end_of_segment(request: web.Request) -> web.Response:
    s = _session(request)
    _control_allowed(request, s)
    _push_source(s).end_of_segment()
    return web.json_response({"session_id": s.id, "ok": True})


async def _get_session(request: web.Request) -> web.Response:
    return web.json_response(_session(request).describe())


async def _list_sessions(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.json_response({"sessions": [{k: v for k, v in s.describe().items() if k != "metrics"} for s in st.sessions.values()]})


async def _delete_session(request: web.Request) -> web.Response:
    s = _session(request)
    await s.close("deleted by the client")
    return web.json_response({"session_id": s.id, "closed": True})


async def _list_avatars(request: web.Request) -> web.Response:
    return web.json_response({"avatars": request.app[STATE].avatars.describe()})


async def _read_upload(request: web.Request, limit: int) -> bytes:
    """The image of a multipart form (its first file part, or a part named image / file / portrait) or a raw body."""
    if request.content_type != "multipart/form-data":
        return await _read_body(request, limit)
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise _too_large(f"upload of {request.content_length} bytes is over the limit of {limit}", limit, request.content_length)
    timeout_s = request.app[STATE].config.body_timeout_s  # each read: 408 if the client stalls
    try:
        reader = await request.multipart()
        while (part := await read_within(reader.next(), timeout_s)) is not None:
            if not isinstance(part, BodyPartReader):  # a nested multipart: not where an image is
                continue
            if part.filename is None and part.name not in ("image", "file", "portrait"):
                continue
            data = bytearray()
            while chunk := await read_within(part.read_chunk(64 * 1024), timeout_s):
                data += chunk
                if len(data) > limit:
                    raise _too_large(f"image over the limit of {limit} bytes", limit, len(data))
            return bytes(data)
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as e:  # aiohttp's reader: no or a wrong boundary, broken part headers
        raise _json_error(web.HTTPBadRequest, f"malformed multipart form: {str(e)[:200]}") from None
    raise _json_error(web.HTTPBadRequest, "the form has no image: send it as a file part (or a field named 'image')")


async def _upload_avatar(request: web.Request) -> web.Response:
    st = request.app[STATE]
    data = await _read_upload(request, st.config.max_upload_bytes)
    if not data:
        raise _json_error(web.HTTPBadRequest, "empty upload: send an image (PNG, JPEG, ...) as the body or a multipart file")
    try:
        entry, created = await st.avatars.upload(data)
    except ImageTooLargeError as e:
        raise _too_large(str(e), st.config.max_upload_bytes, len(data)) from None
    except UnsupportedImageError as e:  # an image, but not of a format allowed
        raise _json_error(web.HTTPUnsupportedMediaType, str(e)) from None
    except UnreadableMediaError as e:
        raise _json_error(web.HTTPBadRequest, str(e)) from None
    except AvatarInputError as e:  # no face, several faces, a face too small
        raise _json_error(web.HTTPUnprocessableEntity, str(e)) from None
    log.info("avatar %s: %s", entry.avatar_id, "prepared" if created else "already known")
    return web.json_response(entry.describe(), status=201 if created else 200)


async def _ice_servers(request: web.Request) -> web.Response:
    """The STUN / TURN servers the page should use (``avatar serve --ice-server``); behind the token,
    since TURN credentials are in it (prefer short-lived ones)."""
    servers = request.app[STATE].config.session.ice_servers
    return web.json_response({"iceServers": [s.to_json() for s in servers]}, headers={"Cache-Control": "no-store"})


async def _healthz(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.json_response({"ok": True, "sessions": len(st.sessions), "capacity": st.config.max_sessions,
                              "avatars": len(st.avatars), "backend": st.runtime.backend})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"})


_PLACEHOLDER = """avatar server

The web client is not installed (clients/web/index.html). The API:
  POST /offer  {sdp, type: "offer", avatar?, steps?} -> {sdp, type, session_id}
  POST /sessions/{id}/audio?rate=&channels=   raw s16le PCM
  GET  /sessions/{id}/audio/ws                WebSocket, binary s16le PCM
  POST /sessions/{id}/interrupt, /sessions/{id}/end_of_segment; DELETE /sessions/{id}
  GET  /avatars, POST /avatars, GET /healthz, GET /metrics
Python client: avatar client --server <this URL> --audio speech.wav
"""


async def _index(request: web.Request) -> web.StreamResponse:
    page = request.app[STATE].config.web_dir / "index.html"
    if page.is_file():
        return web.FileResponse(page, headers={"Cache-Control": "no-cache"})
    return web.Response(text=_PLACEHOLDER, content_type="text/plain")


async def _web_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = request.app[STATE].config.web_dir / name
    if not _STATIC_NAME.match(name) or not path.is_file():
        raise _json_error(web.HTTPNotFound, f"no such file: /{name}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache", "Content-Type": _CONTENT_TYPES[name.rsplit(".", 1)[1]]})


# -- the application ---------------------------------------------------------------------------

def create_app(runtime: Any, config: ServerConfig = ServerConfig(), *, avatars: AvatarStore | None = None) -> web.Application:
    """The aiohttp application. ``runtime``: one ``engine.runtime.Runtime`` shared by every session.
    ``avatars``: a store to use (its ``default`` is prepared at startup if it has none)."""
    quiet_bad_requests()  # a request that does not parse is answered 400 and logged as one info line, not a traceback
    app = web.Application(middlewares=[client_gone_middleware, _host_guard, _cors, _auth], client_max_size=config.max_upload_bytes + 256 * 1024,
                          handler_args={"keepalive_timeout": config.idle_timeout_s,  # idle and slow-header connections closed
                                        "lingering_time": LINGER_S})
    n_batch = config.batch_sessions if config.batch_sessions is not None else auto_batch_sessions(runtime, config.max_sessions)
    runtime = batch_runtime(runtime, min(n_batch, config.max_sessions), config.batch_wait_ms)  # the same runtime when <= 1
    app[STATE] = ServerState(runtime, config, avatars or AvatarStore(runtime, directory=config.avatars_dir))
    r = app.router
    r.add_post("/offer", _offer)
    r.add_get("/sessions", _list_sessions)
    r.add_get("/sessions/{sid}", _get_session)
    r.add_delete("/sessions/{sid}", _delete_session)
    r.add_post("/sessions/{sid}/audio", _push_audio)
    r.add_get("/sessions/{sid}/audio/ws", _audio_ws)
    r.add_post("/sessions/{sid}/interrupt", _interrupt)
    r.add_post("/sessions/{sid}/end_of_segment", _end_of_segment)
    r.add_get("/avatars", _list_avatars)
    r.add_post("/avatars", _upload_avatar)
    r.add_get("/healthz", _healthz)
    r.add_get("/ice-servers", _ice_servers)
    r.add_get("/metrics", _metrics)
    r.add_get("/", _index)
    r.add_get("/{name}", _web_file)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _on_startup(app: web.Application) -> None:
    st = app[STATE]
    if is_loopback_host(st.config.host):
        pin_host_addresses(["::1" if ":" in st.config.host else "127.0.0.1"])
    set_consent_timeout(st.config.peer_timeout_s)
    if DEFAULT_ID not in st.avatars:
        await st.avatars.load_default(st.config.default_portrait)
    if st.avatars.directory is not None:  # kept uploads come back in the background: the server answers meanwhile
        st.restoring = asyncio.get_running_loop().create_task(_restore(st), name="avatars-restore")


async def _restore(st: ServerState) -> None:
    n = await st.avatars.restore()
    if n:
        log.info("avatars: %d kept upload%s prepared again", n, "s" if n != 1 else "")


async def _on_shutdown(app: web.Application) -> None:
    st = app[STATE]
    if st.restoring is not None:
        st.restoring.cancel()
        await asyncio.gather(st.restoring, return_exceptions=True)
    await asyncio.gather(*(s.close("server shutting down") for s in list(st.sessions.values())), return_exceptions=True)


async def serve(runtime: Any, config: ServerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT / SIGTERM (or cancellation), then close every session."""
    app = create_app(runtime, config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = LimitedSite(runner, config.host, config.port, max_connections=config.max_connections)
    await site.start()
    app[STATE].connections = site
    port = runner.addresses[0][1] if runner.addresses else config.port
    host = f"[{config.host}]" if ":" in config.host else config.host
    st = app[STATE]
    print(f"avatar serve: listening on http://{host}:{port} ({runtime.backend}, {runtime.threads} threads, "
          f"at most {config.max_sessions} session{'s' if config.max_sessions != 1 else ''}"
          f"{', token required' if config.token else ''})", flush=True)
    query = "?token=<token>" if config.token else ""
    if (config.web_dir / "index.html").is_file():
        print(f"  open http://{host}:{port}/{query} in a browser on this machine: pick an avatar, press start, speak", flush=True)
    else:
        print(f"  http://{host}:{port}/ shows the API (the web client, {config.web_dir}/index.html, is missing)", flush=True)
    print("  API: POST /offer, GET /healthz, GET /metrics, GET/POST /avatars; Python client: avatar client --server "
          f"http://{host}:{port} --audio FILE", flush=True)
    print(f"  avatars: {', '.join(e['id'] for e in st.avatars.describe())}; stop with Ctrl-C", flush=True)
    for name, b in batching_stats(st.runtime).items():
        print(f"  {name}: up to {b['max_batch']} sessions' calls batched (waiting {b['max_wait_ms']:g} ms at most)", flush=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not Unix
            pass
    try:
        await stop.wait()
    finally:
        print("avatar serve: stopping", flush=True)
        await runner.cleanup()
