"""The front process of a scaled-out server: signalling, auth, the page and /metrics; the sessions
live in hosts (worker processes, server/workers.py, or Ray Serve replicas, server/ray_serve.py).

    client --HTTP (offer, audio push, WebSocket, interrupt, DELETE)--> front --HTTP--> the host holding the session
    client <====================== WebRTC media (UDP) =====================> that host's RTCPeerConnection

Every host runs the one-process server of server/app.py on a private address (127.0.0.1, a random
port, a random internal token): the front adds no second implementation of a route, it places and
forwards. What the front does itself:

- ``POST /offer``: checked as the one-process server checks it (JSON, SDP, avatar, steps), then
  placed by the backend on a host with a free session slot (workers: the least loaded; Ray: the
  replica Ray's router picks among those under their capacity); 503 with Retry-After when none has
  one. The answer comes from the host that created the peer connection, so the media flows between
  the client and that host; the front remembers session id -> host (session affinity).
- every later call of the session (``/sessions/{id}``, its audio push, its audio WebSocket,
  interrupt, end_of_segment, DELETE) is forwarded to that host, the token swapped for the host's own.
- a host that dies ends its sessions: each answers 410 with the cause on its next call
  ("the worker process hosting it died (killed by SIGKILL)"); the backend replaces the host, and
  sessions on other hosts stream on, untouched.
- ``GET /metrics``: the front's own series (sessions, capacity, hosts, restarts), its process
  metrics, and the hosts' pipeline series summed (workers: prometheus_client's multiprocess mode,
  so a dead worker's frames stay counted; Ray: each replica's exposition read and summed).
- ``POST /avatars`` goes to every live host in turn (each prepares the portrait for its own
  sessions); the bytes are kept (up to ``MAX_KEPT_UPLOADS``) and sent again to a replacement host.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import prometheus_client
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.app import (STATE, ServerConfig, _cors, _host_guard, _ice_servers, _index, _json_error, _read_json,
                        _read_upload, _auth, _web_file)
from server.avatars import DEFAULT_ID
from server.limits import LINGER_S, LimitedSite, client_gone_middleware, quiet_bad_requests
from server.session import OfferError, offer_media

log = logging.getLogger("avatar.server")

MAX_KEPT_UPLOADS = 32  # uploaded portraits the front keeps to send to a replacement host (as the avatar store keeps 32)
HOST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)  # one forwarded call at most (an upload prepares ~1 s per host)
PUSH_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)  # a pushed audio body streams for as long as it lasts


@dataclass(eq=False)
class Host:
    """One process that hosts sessions: a worker process or a Ray Serve replica."""

    host_id: str  # "w0", "w1", ... or the replica's id
    url: str  # its private HTTP address (server/app.py's routes)
    token: str  # its internal bearer token
    capacity: int  # sessions it accepts at once
    pid: int | None = None  # its process (workers; Ray: the replica's, where known)
    sessions: set[str] = field(default_factory=set)  # its open sessions
    reserved: int = 0  # offers on their way to it (counted so concurrent offers cannot overshoot)
    alive: bool = True
    death: str | None = None  # why it ended

    @property
    def free(self) -> int:
        return self.capacity - len(self.sessions) - self.reserved

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Backend(Protocol):
    """Where the sessions run. ``start`` returns once the first hosts are ready; ``place`` answers an offer."""

    name: str  # "workers" or "ray"

    async def start(self, front: "FrontState") -> None: ...

    async def stop(self) -> None: ...

    def hosts(self) -> list[Host]: ...  # the live, ready hosts

    async def place(self, front: "FrontState", body: dict) -> tuple[Host | None, int, dict, dict[str, str]]:
        """(the host that answered or None, HTTP status, JSON reply, extra headers) for an offer's body."""
        ...

    def collectors(self) -> list[Any]: ...  # prometheus collectors of the hosts' series for the front's /metrics

    def describe(self) -> dict: ...  # for /healthz


class FrontState:
    """What the front's handlers share. ``config`` is the one-process server's (auth, CORS, limits)."""

    def __init__(self, config: ServerConfig, backend: Backend):
        self.config, self.backend = config, backend
        self.sessions: dict[str, Host] = {}  # open session id -> its host
        self.closed: OrderedDict[str, str] = OrderedDict()  # recently closed session id -> why (410 Gone, not 404)
        self.sessions_started = 0
        self.sessions_rejected = 0
        self.host_deaths = 0
        self.uploads: OrderedDict[str, bytes] = OrderedDict()  # avatar id -> the uploaded bytes (sent to replacement hosts)
        self.http: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        prometheus_client.ProcessCollector(registry=self.registry)  # the front's own process_*
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        self.registry.register(_FrontCollector(self))

    # -- what backends tell the front ------------------------------------------------------------

    def session_closed(self, sid: str, reason: str) -> None:
        host = self.sessions.pop(sid, None)
        if host is not None:
            host.sessions.discard(sid)
        self._remember(sid, reason)

    def host_died(self, host: Host, cause: str) -> None:
        """Every session of ``host`` ends with ``cause``; called once per host."""
        if not host.alive:
            return
        host.alive, host.death = False, cause
        self.host_deaths += 1
        log.error("%s (%s): %s; its %d session(s) end", host.host_id, host.url, cause, len(host.sessions))
        for sid in list(host.sessions):
            self.sessions.pop(sid, None)
            self._remember(sid, cause)
        host.sessions.clear()

    def _remember(self, sid: str, reason: str) -> None:
        self.closed[sid] = reason
        while len(self.closed) > 256:
            self.closed.popitem(last=False)

    def capacity(self) -> int:
        return sum(h.capacity for h in self.backend.hosts())

    async def send_uploads(self, host: Host) -> None:
        """The kept uploads to a new host, before it takes sessions."""
        for avatar_id, data in list(self.uploads.items()):
            try:
                async with self.http.post(f"{host.url}/avatars", data=data, headers=host.headers(), timeout=HOST_TIMEOUT) as r:
                    await r.read()
                    if r.status >= 300:
                        log.warning("%s: the kept upload %s was refused (%d)", host.host_id, avatar_id, r.status)
            except aiohttp.ClientError as e:
                log.warning("%s: could not send the kept upload %s: %s", host.host_id, avatar_id, e)


class _FrontCollector:
    def __init__(self, st: FrontState):
        self.st = st

    def collect(self):
        st = self.st
        hosts = st.backend.hosts()
        for name, help_, value in (("avatar_sessions", "Sessions open now.", len(st.sessions)),
                                   ("avatar_sessions_capacity", "Sessions the live hosts accept at once.", st.capacity()),
                                   ("avatar_hosts", "Session hosts (worker processes or Ray replicas) live now.", len(hosts))):
            yield GaugeMetricFamily(name, help_, value=value)
        yield CounterMetricFamily("avatar_sessions_started", "Sessions answered since the server started.", value=st.sessions_started)
        yield CounterMetricFamily("avatar_sessions_rejected", "Offers refused at capacity.", value=st.sessions_rejected)
        yield CounterMetricFamily("avatar_host_deaths", "Session hosts that died (their sessions ended).", value=st.host_deaths)


FRONT = web.AppKey("avatar_front", FrontState)


# -- forwarding --------------------------------------------------------------------------------

def _host_of(request: web.Request) -> tuple[FrontState, Host, str]:
    st = request.app[FRONT]
    sid = request.match_info["sid"]
    host = st.sessions.get(sid)
    if host is None:
        if sid in st.closed:
            raise _json_error(web.HTTPGone, f"session {sid} closed: {st.closed[sid]}")
        raise _json_error(web.HTTPNotFound, f"no session {sid!r}")
    return st, host, sid


def _query(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.query.items() if k != "token"}  # the client's token is not the host's


async def _relay(st: FrontState, host: Host, r: aiohttp.ClientResponse) -> web.Response:
    headers = {k: r.headers[k] for k in ("Content-Type", "Retry-After") if k in r.headers}
    return web.Response(status=r.status, body=await r.read(), headers=headers)


def _unreachable(st: FrontState, host: Host, sid: str | None, e: Exception) -> web.HTTPException:
    """A host that does not answer: its death (410 with the cause) once the backend has seen it, else 502."""
    if not host.alive or (sid is not None and sid in st.closed):
        why = st.closed.get(sid, host.death) if sid else host.death
        return _json_error(web.HTTPGone, f"session {sid} closed: {why}")
    return _json_error(web.HTTPBadGateway, f"the session's host {host.host_id} did not answer: {type(e).__name__}: {e}")


async def _forward(request: web.Request) -> web.StreamResponse:
    """Any call of one session, to its host; the body streamed (a pushed audio body lasts as long as the speech)."""
    st, host, sid = _host_of(request)
    streamed = request.method == "POST" and request.path.endswith("/audio")
    data = request.content.iter_chunked(64 * 1024) if streamed else (await request.read() or None)
    headers = host.headers()
    if "Content-Type" in request.headers:
        headers["Content-Type"] = request.headers["Content-Type"]
    try:
        async with st.http.request(request.method, host.url + request.path, params=_query(request), data=data, headers=headers,
                                   timeout=PUSH_TIMEOUT if streamed else HOST_TIMEOUT) as r:
            resp = await _relay(st, host, r)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        await asyncio.sleep(0.3)  # the backend sees a death within a few hundred ms: answer with its cause if it was one
        raise _unreachable(st, host, sid, e) from None
    if request.method == "DELETE" and resp.status == 200:
        st.session_closed(sid, "deleted by the client")
    return resp


async def _audio_ws(request: web.Request) -> web.StreamResponse:
    """The session's audio WebSocket, relayed message by message to the same route on its host."""
    st, host, sid = _host_of(request)
    url = f"{host.url}/sessions/{sid}/audio/ws"
    try:
        up = await st.http.ws_connect(url, params=_query(request), headers=host.headers(), max_msg_size=st.config.max_ws_message_bytes,
                                      heartbeat=30.0, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0))
    except aiohttp.WSServerHandshakeError:
        # the host refused (409 track input, 429 too many, 410 closed...): the same URL as a plain GET returns its JSON error
        async with st.http.get(url, params=_query(request), headers=host.headers(), timeout=HOST_TIMEOUT) as r:
            return await _relay(st, host, r)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise _unreachable(st, host, sid, e) from None
    ws = web.WebSocketResponse(max_msg_size=st.config.max_ws_message_bytes, heartbeat=30.0)
    await ws.prepare(request)

    closing: dict[str, Any] = {}  # the host's close code and reason

    async def pump(src, dst, side: str) -> None:
        while True:
            msg = await src.receive()
            if msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            else:  # CLOSE (data: code, extra: reason), CLOSING, CLOSED, ERROR
                if side == "host" and msg.type == WSMsgType.CLOSE:
                    closing.update(code=msg.data, reason=msg.extra or "")
                return

    tasks = [asyncio.create_task(pump(ws, up, "client")), asyncio.create_task(pump(up, ws, "host"))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not up.closed:
            await up.close()
        if not ws.closed:  # the host's close code and reason (1008 flood, 1013 buffer full...) reach the client
            await ws.close(code=closing.get("code") or 1000, message=str(closing.get("reason", "")).encode()[:120])
    return ws


# -- the front's own routes --------------------------------------------------------------------

async def _offer(request: web.Request) -> web.Response:
    st = request.app[FRONT]
    body = await _read_json(request, st.config.max_json_bytes)
    sdp, typ = body.get("sdp"), body.get("type", "offer")
    if not isinstance(sdp, str) or not sdp.strip():
        raise _json_error(web.HTTPBadRequest, "the offer needs 'sdp': the SDP text of an offer")
    if typ != "offer":
        raise _json_error(web.HTTPBadRequest, f"'type' must be 'offer', got {typ!r}")
    try:
        offer_media(sdp)  # a malformed offer is refused here, before any host is asked
    except OfferError as e:
        raise _json_error(web.HTTPBadRequest, str(e)) from None
    avatar_id = body.get("avatar") or DEFAULT_ID
    if not isinstance(avatar_id, str):
        raise _json_error(web.HTTPNotFound, f"no avatar {avatar_id!r} (GET /avatars lists them; POST /avatars adds one)")
    steps = body.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= st.config.max_steps):
        raise _json_error(web.HTTPBadRequest, f"'steps' must be an integer in [1, {st.config.max_steps}], got {steps!r}")
    if len(st.sessions) >= st.config.max_sessions:
        st.sessions_rejected += 1
        raise _json_error(web.HTTPServiceUnavailable, f"at capacity: {len(st.sessions)} of {st.config.max_sessions} sessions "
                          "in use; retry later", **{"Retry-After": str(st.config.retry_after_s)})
    host, status, reply, headers = await st.backend.place(st, body)
    if status == 503:
        st.sessions_rejected += 1
        headers.setdefault("Retry-After", str(st.config.retry_after_s))
    if status != 200 or host is None:
        return web.json_response(reply, status=status, headers=headers)
    sid = reply["session_id"]
    st.sessions[sid] = host
    host.sessions.add(sid)
    st.sessions_started += 1
    log.info("session %s: answered by %s", sid, host.host_id)
    return web.json_response({**reply, "host": host.host_id}, headers=headers)


async def place_on_least_loaded(st: FrontState, body: dict) -> tuple[Host | None, int, dict, dict[str, str]]:
    """The offer to the live host with the most free slots (ties: the first); another if that one refuses at capacity."""
    tried: set[Host] = set()
    while True:
        free = [h for h in st.backend.hosts() if h.free > 0 and h not in tried]
        if not free:
            total = st.capacity()
            return None, 503, {"error": f"at capacity: {len(st.sessions)} of {total} sessions in use on "
                                        f"{len(st.backend.hosts())} host(s); retry later"}, {"Retry-After": str(st.config.retry_after_s)}
        host = max(free, key=lambda h: h.free)
        tried.add(host)
        host.reserved += 1
        try:
            async with st.http.post(f"{host.url}/offer", json=body, headers=host.headers(), timeout=HOST_TIMEOUT) as r:
                reply = await r.json(content_type=None)
                headers = {"Retry-After": r.headers["Retry-After"]} if "Retry-After" in r.headers else {}
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            log.warning("%s did not answer an offer: %s", host.host_id, e)
            continue
        finally:
            host.reserved -= 1
        if status == 503:
            continue
        return host, status, reply, headers


async def _list_sessions(request: web.Request) -> web.Response:
    st = request.app[FRONT]
    out: list[dict] = []
    for host in st.backend.hosts():
        try:
            async with st.http.get(f"{host.url}/sessions", headers=host.headers(), timeout=HOST_TIMEOUT) as r:
                out += [{**s, "host": host.host_id} for s in (await r.json()).get("sessions", [])]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            continue
    return web.json_response({"sessions": out})


async def _list_avatars(request: web.Request) -> web.Response:
    st = request.app[FRONT]
    for host in st.backend.hosts():
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with st.http.get(f"{host.url}/avatars", headers=host.headers(), timeout=HOST_TIMEOUT) as r:
                return await _relay(st, host, r)
    raise _json_error(web.HTTPServiceUnavailable, "no session host is up", **{"Retry-After": str(st.config.retry_after_s)})


async def _upload_avatar(request: web.Request) -> web.Response:
    """To every live host in turn (the first one's answer is the client's: a refused image is refused by all)."""
    st = request.app[FRONT]
    data = await _read_upload(request, st.config.max_upload_bytes)
    if not data:
        raise _json_error(web.HTTPBadRequest, "empty upload: send an image (PNG, JPEG, ...) as the body or a multipart file")
    answer: web.Response | None = None
    for host in st.backend.hosts():
        try:
            async with st.http.post(f"{host.url}/avatars", data=data, headers=host.headers(), timeout=HOST_TIMEOUT) as r:
                resp = await _relay(st, host, r)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("%s: upload not delivered: %s", host.host_id, e)
            continue
        if answer is None:
            answer = resp
            if resp.status >= 300:
                return resp
            st.uploads[json.loads(resp.body)["id"]] = data
            while len(st.uploads) > MAX_KEPT_UPLOADS:
                st.uploads.popitem(last=False)
    if answer is None:
        raise _json_error(web.HTTPServiceUnavailable, "no session host is up", **{"Retry-After": str(st.config.retry_after_s)})
    return answer


async def _healthz(request: web.Request) -> web.Response:
    st = request.app[FRONT]
    return web.json_response({"ok": bool(st.backend.hosts()), "sessions": len(st.sessions), "capacity": min(st.capacity(), st.config.max_sessions),
                              "backend": st.backend.name, **st.backend.describe()})


async def _metrics(request: web.Request) -> web.Response:
    st = request.app[FRONT]
    registry = CollectorRegistry()
    registry.register(_Union([st.registry, *st.backend.collectors()]))
    body = await asyncio.get_running_loop().run_in_executor(None, prometheus_client.generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"})


class _Union:
    def __init__(self, collectors: list[Any]):
        self.collectors = collectors

    def collect(self):
        for c in self.collectors:
            yield from c.collect()


# -- the application ---------------------------------------------------------------------------

class _ConfigView:
    """What server/app.py's middlewares and page handlers read (``request.app[STATE].config``)."""

    def __init__(self, config: ServerConfig):
        self.config = config


def create_front_app(config: ServerConfig, backend: Backend) -> web.Application:
    """The front's aiohttp application; ``backend`` hosts the sessions (started with the app)."""
    quiet_bad_requests()  # the front is what the public reaches: the same limits as a single server (server/limits.py)
    app = web.Application(middlewares=[client_gone_middleware, _host_guard, _cors, _auth], client_max_size=config.max_upload_bytes + 256 * 1024,
                          handler_args={"keepalive_timeout": config.idle_timeout_s, "lingering_time": LINGER_S})
    app[STATE] = _ConfigView(config)  # type: ignore[assignment]  # the shared middlewares read only .config
    app[FRONT] = FrontState(config, backend)
    r = app.router
    r.add_post("/offer", _offer)
    r.add_get("/sessions", _list_sessions)
    r.add_get("/sessions/{sid}", _forward)
    r.add_delete("/sessions/{sid}", _forward)
    r.add_post("/sessions/{sid}/audio", _forward)
    r.add_get("/sessions/{sid}/audio/ws", _audio_ws)
    r.add_post("/sessions/{sid}/interrupt", _forward)
    r.add_post("/sessions/{sid}/end_of_segment", _forward)
    r.add_get("/avatars", _list_avatars)
    r.add_post("/avatars", _upload_avatar)
    r.add_get("/healthz", _healthz)
    r.add_get("/ice-servers", _ice_servers)
    r.add_get("/metrics", _metrics)
    r.add_get("/", _index)
    r.add_get("/{name}", _web_file)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _on_startup(app: web.Application) -> None:
    st = app[FRONT]
    st.http = aiohttp.ClientSession()
    await st.backend.start(st)


async def _on_cleanup(app: web.Application) -> None:
    st = app[FRONT]
    try:
        await st.backend.stop()
    finally:
        await st.http.close()


async def serve_front(config: ServerConfig, backend: Backend, *, ready: asyncio.Event | None = None) -> None:
    """Run the front until SIGINT / SIGTERM (or cancellation), then stop the hosts (their sessions close)."""
    app = create_front_app(config, backend)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # starts the hosts: returns once they are ready
    site = LimitedSite(runner, config.host, config.port, max_connections=config.max_connections)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else config.port
    host = f"[{config.host}]" if ":" in config.host else config.host
    st = app[FRONT]
    hosts = backend.hosts()
    print(f"avatar serve: listening on http://{host}:{port} ({backend.name}: {len(hosts)} session host"
          f"{'s' if len(hosts) != 1 else ''}, at most {min(st.capacity(), config.max_sessions)} sessions"
          f"{', token required' if config.token else ''})", flush=True)
    for h in hosts:
        print(f"  {h.host_id}: pid {h.pid}, {h.capacity} session{'s' if h.capacity != 1 else ''}, {h.url}", flush=True)
    query = "?token=<token>" if config.token else ""
    print(f"  open http://{host}:{port}/{query} in a browser; API: POST /offer, GET /healthz, GET /metrics; stop with Ctrl-C", flush=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        print("avatar serve: stopping", flush=True)
        await runner.cleanup()


def internal_token() -> str:
    """A host's own bearer token: only the front knows it."""
    return secrets.token_urlsafe(24)
