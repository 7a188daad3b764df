"""``avatar serve --ray auto|ADDRESS``: the sessions on Ray Serve replicas, behind the front (server/front.py).

Needs the extra ``cluster`` (``pip install '.[cluster]'``: ``ray[serve]``); nothing else imports this module,
so the engine and the one-process server stay importable and testable without Ray.

    front (aiohttp: page, auth, /metrics)                  Ray Serve deployment "SessionHost" (replicas)
      POST /offer -> handle.options(stream=True)              the one-process server (server/app.py) on its own
                      .session.remote(offer)  ------------->  thread and loop, a private port and token
                      Ray's router: a replica with fewer       session(): answers the offer, yields the answer
                      ongoing calls than max_ongoing_requests   (and the replica's URL), then holds the call open
                      (= its session capacity); none free:      until the session ends, then yields why
                      queued -> the front answers 503 + Retry-After after ``placement_timeout_s``
      later calls of the session (audio, WebSocket, interrupt, DELETE) -> that replica's URL (session affinity)
      client <================ WebRTC media (UDP) =================>  that replica's RTCPeerConnection

- Autoscaling on the session count: every open session is one ongoing call of its replica, so Ray
  Serve's autoscaler (``autoscaling_config``, ``target_ongoing_requests`` = ``TARGET_LOAD`` x capacity)
  scales on sessions; ``--workers`` replicas at least, ``--ray-max-replicas`` at most.
- Health: ``check_health`` (every ``HEALTH_PERIOD_S``) fails when the replica's server thread or loop
  is stuck; Ray then replaces the replica. A replica that dies ends its sessions: their held calls
  fail in the front, which answers their next call with 410 and the cause.
- Every replica registers (and heartbeats) its URL in a small named actor, ``SessionRegistry``, so the
  front knows all of them (uploads go to each, /metrics sums their series, /healthz counts them).

Networking across machines: the replicas' HTTP listens on the node's address (protected by a token
only the front knows); their ICE candidates are the node's host addresses, so clients must reach
the nodes' UDP ports directly, or use TURN (``--ice-server turn:...``, which the replicas and the
page both use). A front on 127.0.0.1 keeps everything on loopback (tests).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
import urllib.request
from typing import Any

import ray
from ray import serve

from server.app import ServerConfig
from server.front import FrontState, Host, internal_token
from server.ice import is_loopback_host
from server.workers import RuntimeSpec

log = logging.getLogger("avatar.server")

APP_NAME = "avatar-sessions"
NAMESPACE = "avatar"
REGISTRY_NAME = "avatar-session-registry"
HEALTH_PERIOD_S = 2.0  # Ray Serve calls check_health this often
HEALTH_TIMEOUT_S = 10.0
HEARTBEAT_S = 1.0  # a replica tells the registry it lives this often
STALE_S = 5.0  # a replica silent this long is not offered to anyone
TARGET_LOAD = 0.7  # autoscaling: sessions per replica / capacity Ray Serve aims at (a spare replica before all are full)


@ray.remote(num_cpus=0)
class SessionRegistry:
    """Replica id -> (its URL, token, pid, capacity, last heartbeat)."""

    def __init__(self) -> None:
        self.hosts: dict[str, dict] = {}

    def heartbeat(self, replica_id: str, info: dict) -> None:
        self.hosts[replica_id] = {**info, "seen": time.time()}

    def remove(self, replica_id: str) -> None:
        self.hosts.pop(replica_id, None)

    def list(self) -> dict[str, dict]:
        now = time.time()
        return {k: v for k, v in self.hosts.items() if now - v["seen"] < STALE_S}


class SessionHost:
    """A replica: the one-process server on a thread of its own, its sessions answered through ``session``."""

    def __init__(self, runtime: RuntimeSpec, config: ServerConfig):
        from engine.runtime import load_runtime

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.token = internal_token()
        bind = "127.0.0.1" if is_loopback_host(config.host) else "0.0.0.0"
        self.advertise = "127.0.0.1" if bind == "127.0.0.1" else ray.util.get_node_ip_address()
        self.config = dataclasses.replace(config, port=0, token=self.token, cors_origins=())
        self.registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        rt = load_runtime(runtime.bundle, runtime.backend, threads=runtime.threads)
        self.loop = asyncio.new_event_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._serve, args=(rt, bind, started), name="session-host", daemon=True)
        self.thread.start()
        self.url = started.result(timeout=300)  # the default avatar prepared, listening
        self._beat()

    def _serve(self, rt: Any, bind: str, started: concurrent.futures.Future) -> None:
        from aiohttp import web

        from server.app import STATE, create_app

        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.app = create_app(rt, self.config)
            self.state = self.app[STATE]
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, bind, 0).start()
            started.set_result(f"http://{self.advertise}:{runner.addresses[0][1]}")

        try:
            self.loop.run_until_complete(start())
        except BaseException as e:
            started.set_exception(e)
            return
        self.loop.call_later(HEARTBEAT_S, self._beat_soon)
        self.loop.run_forever()

    def _beat(self) -> None:
        self.registry.heartbeat.remote(self.replica_id, {"url": self.url, "token": self.token, "pid": os.getpid(),
                                                         "capacity": self.config.max_sessions})

    def _beat_soon(self) -> None:
        self._beat()
        self.loop.call_later(HEARTBEAT_S, self._beat_soon)

    async def _on_server(self, coro) -> Any:
        """Run ``coro`` on the server's loop, from Ray's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def session(self, body: dict):
        """Answer the offer; yield ``{status, reply, url, token, replica, pid}``; if it was answered, hold the call
        until the session ends and yield ``{closed: why}`` (so Ray counts the session as an ongoing call)."""
        import aiohttp

        async def offer() -> tuple[int, dict]:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{self.url}/offer", json=body, headers={"Authorization": f"Bearer {self.token}"}) as r:
                    return r.status, await r.json(content_type=None)

        status, reply = await self._on_server(offer())
        yield {"status": status, "reply": reply, "url": self.url, "token": self.token, "replica": self.replica_id,
               "pid": os.getpid(), "capacity": self.config.max_sessions}
        if status != 200:
            return
        sid = reply["session_id"]

        async def closed() -> str:
            s = self.state.sessions.get(sid)
            if s is not None:
                await s.closed.wait()
            return self.state.closed.get(sid, "closed")

        try:
            yield {"closed": await self._on_server(closed())}
        except asyncio.CancelledError:  # the front went away: the session goes too
            s = self.state.sessions.get(sid)
            if s is not None:
                asyncio.run_coroutine_threadsafe(s.close("the front stopped"), self.loop)
            raise

    def info(self) -> dict:
        return {"replica": self.replica_id, "url": self.url, "pid": os.getpid(), "sessions": len(self.state.sessions)}

    async def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the session server's thread ended")
        try:
            await asyncio.wait_for(self._on_server(asyncio.sleep(0)), 5.0)
        except asyncio.TimeoutError:
            raise RuntimeError("the session server's event loop did not answer within 5 s") from None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.registry.remove.remote(self.replica_id)


def session_host_app(runtime: RuntimeSpec, config: ServerConfig, *, min_replicas: int = 1, max_replicas: int | None = None,
                     replica_cpus: float = 1.0):
    """The Ray Serve application: ``SessionHost`` replicas of ``config.max_sessions`` sessions each; a fixed
    ``min_replicas`` count, or autoscaled on the sessions open between ``min_replicas`` and ``max_replicas``."""
    capacity = config.max_sessions
    options: dict[str, Any] = {
        "name": "SessionHost", "max_ongoing_requests": capacity, "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": HEALTH_TIMEOUT_S, "graceful_shutdown_timeout_s": 20.0,
        "ray_actor_options": {"num_cpus": replica_cpus},
    }
    if max_replicas and max_replicas > min_replicas:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "initial_replicas": min_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": max(0.1, TARGET_LOAD * capacity),
                                         "upscale_delay_s": 5.0, "downscale_delay_s": 120.0}
    else:
        options["num_replicas"] = min_replicas
    return serve.deployment(SessionHost).options(**options).bind(runtime, config)


class RayBackend:
    """The ``Backend`` of server/front.py on Ray Serve."""

    name = "ray"

    def __init__(self, address: str, runtime: RuntimeSpec, config: ServerConfig, *, min_replicas: int = 1, max_replicas: int | None = None,
                 replica_cpus: float = 1.0, placement_timeout_s: float = 3.0, ray_init: dict | None = None):
        self.address = address  # "auto": join the cluster on this machine or start one; "local": always start one; else an address
        self.runtime, self.config = runtime, config
        self.min_replicas, self.max_replicas = min_replicas, max(min_replicas, max_replicas or min_replicas)
        self.replica_cpus = replica_cpus
        self.placement_timeout_s = placement_timeout_s  # an offer no replica takes within this: 503 (autoscaling is under way)
        self.ray_init = ray_init or {}
        self.front: FrontState | None = None
        self.handle: Any = None
        self.registry: Any = None
        self.known: dict[str, Host] = {}  # replica id -> its Host (kept while it lives)
        self._listed: dict[str, dict] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started_ray = False

    async def start(self, front: FrontState) -> None:
        self.front = front
        await asyncio.get_running_loop().run_in_executor(None, self._start_sync)
        await self._refresh()
        self._spawn(self._poll(), "ray-registry-poll")

    def _start_sync(self) -> None:
        kwargs = {"namespace": NAMESPACE, "include_dashboard": False, "log_to_driver": False, **self.ray_init}
        if not ray.is_initialized():
            if self.address == "auto":
                try:
                    ray.init(address="auto", **kwargs)
                except ConnectionError:
                    ray.init(num_cpus=max(os.cpu_count() or 1, int(self.max_replicas * self.replica_cpus) + 1), **kwargs)
                    self._started_ray = True
            elif self.address == "local":
                kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, int(self.max_replicas * self.replica_cpus) + 1))
                ray.init(**kwargs)
                self._started_ray = True
            else:
                ray.init(address=self.address, **kwargs)
        self.registry = SessionRegistry.options(name=REGISTRY_NAME, namespace=NAMESPACE, get_if_exists=True).remote()
        serve.start(proxy_location="Disabled")  # no Serve HTTP proxy: the front is the ingress
        app = session_host_app(self.runtime, self.config, min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                               replica_cpus=self.replica_cpus)
        self.handle = serve.run(app, name=APP_NAME, route_prefix=None)  # returns once the replicas are up

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

        def shutdown() -> None:
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            if self._started_ray:
                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()

        await asyncio.get_running_loop().run_in_executor(None, shutdown)

    def hosts(self) -> list[Host]:
        return [h for rid, h in self.known.items() if h.alive and rid in self._listed]

    def collectors(self) -> list[Any]:
        return [_SummedHosts(self)]

    def describe(self) -> dict:
        return {"replicas": [{"id": h.host_id, "pid": h.pid, "sessions": len(h.sessions), "capacity": h.capacity} for h in self.hosts()],
                "max_replicas": self.max_replicas}

    async def place(self, front: FrontState, body: dict) -> tuple[Host | None, int, dict, dict[str, str]]:
        free = sum(h.free for h in self.hosts())
        if free <= 0 and len(self.hosts()) >= self.max_replicas:
            return None, 503, {"error": f"at capacity: every one of the {len(self.hosts())} replicas holds "
                                        f"{self.config.max_sessions} session(s); retry later"}, {}
        gen = self.handle.options(stream=True).session.remote(body)
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.placement_timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()
            return None, 503, {"error": f"no replica took the session within {self.placement_timeout_s:g} s (all full"
                                        f"{'; more are starting' if self.max_replicas > len(self.hosts()) else ''}); retry later"}, {}
        host = self._host(first["replica"], first)
        if first["status"] != 200:
            gen.cancel()
            return host, first["status"], first["reply"], {}
        sid = first["reply"]["session_id"]
        self._spawn(self._hold(host, sid, gen), f"session-hold-{sid}")
        return host, 200, first["reply"], {}

    # -- internals ----------------------------------------------------------------------------

    def _host(self, replica_id: str, info: dict) -> Host:
        host = self.known.get(replica_id)
        if host is None or not host.alive:
            host = self.known[replica_id] = Host(replica_id, info["url"], info["token"], info["capacity"], pid=info.get("pid"))
            self._listed.setdefault(replica_id, info)
        return host

    async def _hold(self, host: Host, sid: str, gen: Any) -> None:
        """The session's held call: its end is the session's end; its failure is the replica's death."""
        try:
            async for msg in gen:
                if "closed" in msg and self.front is not None:
                    self.front.session_closed(sid, msg["closed"])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError / ActorDiedError / ActorUnavailableError...: the replica is gone
            if self.front is not None:
                self.front.host_died(host, f"the Ray Serve replica hosting it died ({type(e).__name__})")
            self.known.pop(host.host_id, None)
            return
        if self.front is not None and sid in self.front.sessions:
            self.front.session_closed(sid, "closed")

    async def _refresh(self) -> None:
        self._listed = await self.registry.list.remote()
        for rid, info in self._listed.items():
            host = self._host(rid, info)
            if self.front is not None and self.front.uploads and not getattr(host, "uploads_sent", False):
                host.uploads_sent = True  # type: ignore[attr-defined]
                await self.front.send_uploads(host)
        for rid, host in list(self.known.items()):  # silent replicas: gone (their held calls report the cause)
            if rid not in self._listed and not host.sessions:
                self.known.pop(rid, None)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._refresh()
            except Exception as e:  # the registry restarting: try again
                log.warning("Ray registry: %s", e)

    def _spawn(self, coro, name: str) -> None:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


class _SummedHosts:
    """Each replica's /metrics, summed sample by sample (the front's own series and process metrics left out)."""

    SKIP = ("process_", "python_", "avatar_sessions", "avatar_avatars")

    def __init__(self, backend: RayBackend):
        self.backend = backend

    def collect(self):
        from prometheus_client.core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Metric] = {}
        values: dict[tuple, float] = {}
        for h in self.backend.hosts():
            req = urllib.request.Request(f"{h.url}/metrics", headers=h.headers())
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for fam in text_string_to_metric_families(text):
                if fam.name.startswith(self.SKIP):
                    continue
                families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for s in fam.samples:
                    key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                    values[key] = values.get(key, 0.0) + s.value
        for (fam_name, name, labels), v in values.items():
            families[fam_name].add_sample(name, dict(labels), v)
        yield from families.values()
