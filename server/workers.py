"""``avatar serve --workers N``: sessions in N worker processes behind one front (server/front.py).

Why: one Python process stalls below ~1.4 cores with 2-3 sessions (the GIL: aiortc's packetising
and the pipeline's glue share one interpreter; docs/benchmarks/server.json), so more cores need
more interpreters. Each worker is a spawned process that loads its own runtime and runs the
one-process server (server/app.py) on 127.0.0.1 at a random port with a random token; the front
forwards to it (server/front.py) and the worker's RTCPeerConnections talk to the clients
directly (host candidates of this machine; with a loopback front, 127.0.0.1 only, as today).

    front                                              worker i (multiprocessing, spawn)
      WorkerPool.start: Process(worker_main) + Pipe  ->  load_runtime, create_app, listen on 127.0.0.1:0
                         <- ("ready", url, pid)            (after the default avatar is prepared)
      placement, forwarding (server/front.py)       ->  the routes of server/app.py
                         <- ("closed", sid, reason)        a session ended (the front frees its slot)
      proc.sentinel readable: the worker died       ->  its sessions: 410 "the worker process hosting it died (...)";
                                                        a replacement starts (backing off if workers die young)
      the front exits: the pipe closes              ->  the worker stops (its sessions close)

Metrics: the workers run prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a
folder the front makes), and the front's /metrics reads it with a ``MultiProcessCollector``:
the pipelines' histograms and counters summed over every worker, dead ones included.

The default worker count is one per ``CORES_PER_WORKER`` cores, at least 1 (this 2-core machine: 1,
and with 1 ``avatar serve`` keeps its one-process path: a front would only add a hop).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from server.app import ServerConfig
from server.front import FrontState, Host, internal_token, place_on_least_loaded

log = logging.getLogger("avatar.server")

CORES_PER_WORKER = 1.2  # the default: one worker per this many cores (a session's pipeline keeps ~1.2 cores busy)
START_TIMEOUT_S = 300.0  # a worker that is not listening by then is killed (torch import + the default avatar: ~5-20 s)
YOUNG_DEATH_S = 30.0  # a worker that dies younger than this delays its replacement (1, 2, 4 ... 30 s): no restart storm


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(cores: int | None = None) -> int:
    """One worker per ``CORES_PER_WORKER`` cores this process may use, at least 1."""
    return max(1, int((cores or _cores()) / CORES_PER_WORKER))


@dataclass(frozen=True)
class RuntimeSpec:
    """How each worker loads its runtime (``load_runtime``'s arguments; precision: $AVATAR_PRECISION, inherited)."""

    bundle: str | None = None  # bundle folder (None: the shipped one)
    backend: str = "auto"
    threads: int | None = None  # inference threads per worker (None: the cores / workers, at least 1)


@dataclass(frozen=True)
class WorkerSpec:
    runtime: RuntimeSpec
    server: ServerConfig  # the worker's server: its host is the front's (ICE follows it), max_sessions its capacity, its own token


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: the one-process server on 127.0.0.1:0, reporting to the front over ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the front decides
    try:
        from engine.runtime import load_runtime

        rt = load_runtime(spec.runtime.bundle, spec.runtime.backend, threads=spec.runtime.threads)
        asyncio.run(_worker_serve(rt, spec, conn))
    except Exception as e:  # at start (a bundle that does not load...): the front reports it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise


async def _worker_serve(rt: Any, spec: WorkerSpec, conn: Connection) -> None:
    from aiohttp import web

    from server.app import STATE, create_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock, contextlib.suppress(OSError):
            conn.send(msg)

    def watch_front() -> None:  # the front's end of the pipe closes when it exits, however it exits
        try:
            while True:
                conn.recv()
        except (EOFError, OSError):
            loop.call_soon_threadsafe(stop.set)

    app = create_app(rt, spec.server)
    st = app[STATE]
    closed = st.session_closed

    def session_closed(s: Any) -> None:  # ServerState.session_closed, and the front told
        closed(s)
        send(("closed", s.id, st.closed.get(s.id, "closed")))

    st.session_closed = session_closed  # type: ignore[method-assign]  # what each Session's on_closed calls
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # the default avatar prepared
    site = web.TCPSite(runner, "127.0.0.1", 0)  # private: only the front calls it
    await site.start()
    threading.Thread(target=watch_front, name="front-watch", daemon=True).start()
    send(("ready", f"http://127.0.0.1:{runner.addresses[0][1]}", os.getpid()))
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # closes every session


class WorkerPool:
    """The ``Backend`` of server/front.py for worker processes: starts ``n`` workers, replaces the dead."""

    name = "workers"

    def __init__(self, n: int, runtime: RuntimeSpec, config: ServerConfig, *, sessions_per_worker: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        if n < 1:
            raise ValueError(f"workers must be at least 1, got {n}")
        self.n = n
        threads = runtime.threads or max(1, round(_cores() / n))  # inference threads per worker: the cores shared out
        self.runtime = dataclasses.replace(runtime, threads=threads)
        self.config = config
        self.per_worker = sessions_per_worker or max(1, math.ceil(config.max_sessions / n))  # each worker's capacity
        self.start_timeout_s = start_timeout_s
        self.slots: list[Host | None] = [None] * n  # slot i: its live worker (None while starting)
        self.procs: dict[Host, multiprocessing.Process] = {}
        self.restarts = 0
        self.front: FrontState | None = None
        self.metrics_dir = tempfile.mkdtemp(prefix="avatar-metrics-")  # prometheus_client's multiprocess files
        self._ctx = multiprocessing.get_context("spawn")
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._generation = 0

    # -- Backend ------------------------------------------------------------------------------

    async def start(self, front: FrontState) -> None:
        self.front = front
        results = await asyncio.gather(*(self._start_worker(i) for i in range(self.n)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise RuntimeError(f"a worker did not start: {errors[0]}")

    async def stop(self) -> None:
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        procs = list(self.procs.items())
        for _, p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker closes its sessions and exits

        def reap() -> None:
            for host, p in procs:
                p.join(20.0)
                if p.is_alive():
                    log.warning("%s (pid %s) did not stop within 20 s: killed", host.host_id, p.pid)
                    p.kill()
                    p.join(5.0)

        await loop.run_in_executor(None, reap)
        for host, p in procs:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(p.sentinel)
            self.procs.pop(host, None)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def hosts(self) -> list[Host]:
        return [h for h in self.slots if h is not None and h.alive]

    async def place(self, front: FrontState, body: dict) -> tuple[Host | None, int, dict, dict[str, str]]:
        return await place_on_least_loaded(front, body)

    def collectors(self) -> list[Any]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        return [registry]

    def describe(self) -> dict:
        return {"workers": [{"id": h.host_id, "pid": h.pid, "sessions": len(h.sessions), "capacity": h.capacity}
                            for h in self.hosts()], "worker_restarts": self.restarts}

    # -- workers ------------------------------------------------------------------------------

    async def _start_worker(self, slot: int) -> Host:
        loop = asyncio.get_running_loop()
        self._generation += 1
        host_id = f"w{slot}" if self._generation <= self.n else f"w{slot}.{self._generation}"
        token = internal_token()
        server = dataclasses.replace(self.config, port=0, token=token, max_sessions=self.per_worker, cors_origins=())
        front_end, worker_end = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(WorkerSpec(self.runtime, server), worker_end),
                                 name=f"avatar-worker-{host_id}", daemon=True)
        before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # read by the child's prometheus_client at import
        try:
            proc.start()
        finally:
            if before is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = before
        worker_end.close()
        started = time.monotonic()
        ready: asyncio.Future = loop.create_future()
        host = Host(host_id, "", token, self.per_worker, pid=proc.pid)

        def on_message() -> None:
            try:
                while front_end.poll():
                    msg = front_end.recv()
                    if msg[0] == "ready" and not ready.done():
                        ready.set_result(msg[1])
                    elif msg[0] == "error" and not ready.done():
                        ready.set_exception(RuntimeError(f"{host_id}: {msg[1]}"))
                    elif msg[0] == "closed" and self.front is not None:
                        self.front.session_closed(msg[1], msg[2])
            except (EOFError, OSError):
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(front_end.fileno())

        def on_exit() -> None:
            loop.remove_reader(proc.sentinel)
            loop.create_task(reap(), name=f"reap-{host_id}")

        async def reap() -> None:
            await loop.run_in_executor(None, proc.join, 5.0)  # the sentinel closes a moment before the exit status is there
            on_message()  # what it said last
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(front_end.fileno())
            front_end.close()
            cause = _exit_cause(proc.exitcode)
            if not ready.done():
                ready.set_exception(RuntimeError(f"{host_id} exited before it listened ({cause})"))
                return
            self.procs.pop(host, None)
            if self._stopping:
                return
            if self.front is not None:
                self.front.host_died(host, f"the worker process hosting it died ({cause})")
            if self.slots[slot] is host:
                self.slots[slot] = None
            if not self._stopping:
                delay_s = 0.0 if time.monotonic() - started > YOUNG_DEATH_S else min(30.0, 2.0 ** min(5, self.restarts))
                self._spawn(self._replace(slot, delay_s), f"replace-{host_id}")

        loop.add_reader(front_end.fileno(), on_message)
        loop.add_reader(proc.sentinel, on_exit)
        self.procs[host] = proc
        try:
            host.url = await asyncio.wait_for(ready, self.start_timeout_s)
        except BaseException:
            if proc.is_alive():
                proc.kill()
            self.procs.pop(host, None)
            raise
        if self.front is not None and self.front.uploads:
            await self.front.send_uploads(host)
        self.slots[slot] = host
        log.info("%s: pid %d listening on %s", host_id, proc.pid, host.url)
        return host

    async def _replace(self, slot: int, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        self.restarts += 1
        try:
            await self._start_worker(slot)
        except Exception as e:
            log.error("replacement of worker slot %d failed: %s; trying again", slot, e)
            self._spawn(self._replace(slot, min(30.0, 2.0 ** min(5, self.restarts))), f"replace-w{slot}")

    def _spawn(self, coro, name: str) -> None:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


def _exit_cause(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
