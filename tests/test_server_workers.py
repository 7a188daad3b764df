"""``avatar serve --workers 2`` on 127.0.0.1 (server/front.py + server/workers.py, a tiny random-weight
bundle on PyTorch): two clients land on different worker processes and both receive frames, a third
is refused with 503; killing one worker ends only its session (410 with the cause), the other keeps
streaming, a replacement starts and takes the next session; pushed audio, the audio WebSocket and
DELETE go through the front to the session's worker; /metrics sums the workers' pipelines. Bounded."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from engine.audio import decode_audio
from engine.cli import DEMO
from server.app import ServerConfig
from server.front import FRONT, create_front_app
from server.ice import pin_host_addresses
from server.workers import RuntimeSpec, WorkerPool, default_workers
from tests import aio
from tests.test_server import HTTP_TIMEOUT, Peer, _scrape, _signal, _until
from tests.tiny import tiny_bundle


def test_default_workers_is_one_per_1_2_cores_at_least_one():
    assert [default_workers(c) for c in (1, 2, 3, 16, 64)] == [1, 1, 2, 13, 53]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pin_host_addresses(["127.0.0.1"])
    return tiny_bundle(tmp_path_factory.mktemp("workers") / "b")


async def _frames_grow(peer: Peer, seconds: float) -> int:
    n0 = len(peer.video)
    await asyncio.sleep(seconds)
    return len(peer.video) - n0


def test_two_workers_a_killed_worker_ends_only_its_session_and_is_replaced(bundle):
    voice = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=48000)

    async def run():
        pool = WorkerPool(2, RuntimeSpec(str(bundle), "torch", threads=1), ServerConfig(host="127.0.0.1", max_sessions=1),
                          sessions_per_worker=1)
        app = create_front_app(ServerConfig(host="127.0.0.1", port=0, max_sessions=2, retry_after_s=3), pool)
        runner = web.AppRunner(app)
        t0 = time.monotonic()
        await runner.setup()  # both workers listening, the default avatar prepared in each
        print(f"2 workers ready in {time.monotonic() - t0:.1f} s")
        st = app[FRONT]
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        peers: list[Peer] = []
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
                h = await (await http.get(f"{base}/healthz")).json()
                assert h["backend"] == "workers" and h["capacity"] == 2 and len(h["workers"]) == 2, h
                pids = {w["id"]: w["pid"] for w in h["workers"]}
                assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()

                a, b, c = Peer(_signal(voice, 0.5, 30.0)), Peer(_signal(voice, 0.5, 30.0)), Peer()
                peers += [a, b, c]
                ra, rb = await a.offer(http, base), await b.offer(http, base)
                assert ra.status == 200 and rb.status == 200, (await ra.text(), await rb.text())
                host_a, host_b = (await ra.json())["host"], (await rb.json())["host"]
                assert {host_a, host_b} == {"w0", "w1"}  # one session per worker
                rc = await c.offer(http, base)
                assert rc.status == 503 and int(rc.headers["Retry-After"]) >= 1, await rc.text()
                await a.wait_video(10, 40.0)
                await b.wait_video(10, 40.0)
                assert len(a.video) >= 10 and len(b.video) >= 10, (len(a.video), len(b.video))
                lst = (await (await http.get(f"{base}/sessions")).json())["sessions"]
                assert {s["host"] for s in lst} == {"w0", "w1"} and {s["state"] for s in lst} == {"streaming"}, lst

                # the workers' pipelines in the front's /metrics (prometheus_client multiprocess mode)
                m = await _scrape(http, base)
                assert m[("avatar_hosts", ())] == 2 and m[("avatar_sessions", ())] == 2
                assert m[("avatar_frames_out_total", ())] > 0 and m[("avatar_stage_seconds_count", (("stage", "denoise"),))] > 0

                # kill a's worker: a's session ends with the cause, b streams on
                os.kill(pids[host_a], signal.SIGKILL)
                t_kill = time.monotonic()
                assert await _until(lambda: a.session_id in st.closed, 10.0), "the front did not see the worker die"
                r = await http.get(f"{base}/sessions/{a.session_id}")
                body = await r.json()
                assert r.status == 410 and "worker process" in body["error"] and "SIGKILL" in body["error"], body
                assert (await http.post(f"{base}/sessions/{a.session_id}/interrupt")).status == 410
                assert await _frames_grow(b, 2.0) >= 25, "the other worker's session stopped streaming"
                assert (await http.get(f"{base}/sessions/{b.session_id}")).status == 200

                # a replacement starts in a's slot; the next session lands on it (b's worker is full)
                async def replaced() -> bool:
                    hz = await (await http.get(f"{base}/healthz")).json()
                    return len(hz["workers"]) == 2 and pids[host_a] not in {w["pid"] for w in hz["workers"]}

                t_end = time.monotonic() + 120.0
                while not await replaced():
                    assert time.monotonic() < t_end, "no replacement worker within 120 s"
                    await asyncio.sleep(0.5)
                print(f"replacement ready {time.monotonic() - t_kill:.1f} s after the kill")
                d = Peer()  # audio pushed over HTTP and the WebSocket, through the front
                peers.append(d)
                rd = await d.offer(http, base)
                assert rd.status == 200, await rd.text()
                assert (await rd.json())["host"] not in (host_a, host_b)
                pcm = np.round(voice[int(0.2 * 48000) : int(2.2 * 48000)] * 32767).astype("<i2").tobytes()
                r = await http.post(f"{base}/sessions/{d.session_id}/audio?rate=48000&channels=1", data=pcm)
                assert r.status == 200 and abs((await r.json())["pushed_s"] - 2.0) < 0.01
                await d.wait_video(10, 40.0)
                assert len(d.video) >= 10
                async with http.ws_connect(f"{base}/sessions/{d.session_id}/audio/ws?rate=48000&channels=1") as ws:
                    await ws.send_bytes(pcm[: 48000 * 2])
                    await ws.send_json({"type": "interrupt"})
                    reply = await ws.receive_json(timeout=10.0)
                    assert reply["type"] == "interrupted" and reply["dropped_s"] >= 0
                    await ws.send_json({"type": "nonsense"})
                    assert "unknown message type" in (await ws.receive_json(timeout=10.0))["error"]
                r = await http.delete(f"{base}/sessions/{d.session_id}")
                assert r.status == 200 and (await r.json())["closed"]
                assert (await http.get(f"{base}/sessions/{d.session_id}")).status == 410
                assert (await http.get(f"{base}/sessions/nope")).status == 404
                assert await _until(lambda: len(st.sessions) == 1, 10.0)  # only b's is left
                m = await _scrape(http, base)
                assert m[("avatar_host_deaths_total", ())] == 1 and m[("avatar_sessions_started_total", ())] == 3
        finally:
            for p in peers:
                await p.close()
            procs = list(pool.procs.values())
            await runner.cleanup()
        assert all(not p.is_alive() for p in procs), "a worker outlived the front"

    aio.run(run(), timeout_s=300.0)
