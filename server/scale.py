"""``avatar serve --workers N`` / ``--ray auto|ADDRESS``: the front (server/front.py) with its backend.

``config.max_sessions`` is per session host here (a worker process or a Ray Serve replica); the front
accepts at most hosts x that (with Ray autoscaling: the largest replica count x that).
"""
from __future__ import annotations

import asyncio
import dataclasses

from server.app import ServerConfig
from server.front import serve_front
from server.workers import RuntimeSpec, WorkerPool


async def serve_scaled(config: ServerConfig, *, workers: int, ray: str | None = None, bundle: str | None = None,
                       backend: str = "auto", threads: int | None = None, max_replicas: int | None = None,
                       ready: asyncio.Event | None = None) -> None:
    per_host = config.max_sessions
    runtime = RuntimeSpec(bundle=bundle, backend=backend, threads=threads)
    if ray is not None:
        from server.ray_serve import RayBackend  # needs ray[serve]: pip install '.[cluster]'

        replicas = max(workers, max_replicas or workers)
        front_config = dataclasses.replace(config, max_sessions=replicas * per_host)
        pool = RayBackend(ray, runtime, dataclasses.replace(config, max_sessions=per_host), min_replicas=workers,
                          max_replicas=max_replicas or workers)
    else:
        front_config = dataclasses.replace(config, max_sessions=workers * per_host)
        pool = WorkerPool(workers, runtime, config, sessions_per_worker=per_host)
    await serve_front(front_config, pool, ready=ready)
