"""``avatar serve --ray``: the front (server/front.py) with its sessions on Ray Serve replicas
(server/ray_serve.py), a local Ray on 127.0.0.1, 2 replicas of capacity 1, a tiny random-weight bundle:
two clients land on different replicas and both receive frames, a third gets 503 with Retry-After;
killing one replica's process ends only its session (410 with the cause), the other streams on,
and a new session lands on the survivor once it has room. Skipped where ray[serve] is not installed
(``pip install '.[cluster]'``). Bounded in time."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from aiohttp import web

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install '.[cluster]' (or scripts/install.sh --dev --cluster)")

from engine.audio import decode_audio  # noqa: E402
from engine.cli import DEMO  # noqa: E402
from server.app import ServerConfig  # noqa: E402
from server.front import FRONT, create_front_app  # noqa: E402
from server.ice import pin_host_addresses  # noqa: E402
from server.ray_serve import RayBackend  # noqa: E402
from server.workers import RuntimeSpec  # noqa: E402
from tests import aio  # noqa: E402
from tests.test_server import HTTP_TIMEOUT, Peer, _scrape, _signal, _until  # noqa: E402
from tests.tiny import tiny_bundle  # noqa: E402


def test_ray_replicas_place_sessions_refuse_at_capacity_and_survive_a_killed_replica(tmp_path):
    pin_host_addresses(["127.0.0.1"])
    bundle = tiny_bundle(tmp_path / "b")
    voice = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=48000)

    async def run():
        backend = RayBackend("local", RuntimeSpec(str(bundle), "torch", threads=1), ServerConfig(host="127.0.0.1", max_sessions=1),
                             min_replicas=2, replica_cpus=1.0, ray_init={"num_cpus": 4})
        app = create_front_app(ServerConfig(host="127.0.0.1", port=0, max_sessions=2, retry_after_s=3), backend)
        runner = web.AppRunner(app)
        t0 = time.monotonic()
        await runner.setup()  # a local Ray, Serve, 2 replicas up
        print(f"Ray and 2 replicas ready in {time.monotonic() - t0:.1f} s")
        st = app[FRONT]
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        peers: list[Peer] = []
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
                assert await _until(lambda: len(backend.hosts()) == 2, 20.0), "the replicas did not register"
                h = await (await http.get(f"{base}/healthz")).json()
                assert h["backend"] == "ray" and h["capacity"] == 2 and len(h["replicas"]) == 2, h

                a, b, c = Peer(_signal(voice, 0.5, 30.0)), Peer(_signal(voice, 0.5, 30.0)), Peer()
                peers += [a, b, c]
                ra = await a.offer(http, base)
                rb = await b.offer(http, base)
                assert ra.status == 200 and rb.status == 200, (await ra.text(), await rb.text())
                host_a, host_b = (await ra.json())["host"], (await rb.json())["host"]
                assert host_a != host_b, "both sessions on one replica"
                rc = await c.offer(http, base)
                assert rc.status == 503 and int(rc.headers["Retry-After"]) >= 1, await rc.text()
                await a.wait_video(10, 60.0)
                await b.wait_video(10, 60.0)
                assert len(a.video) >= 10 and len(b.video) >= 10, (len(a.video), len(b.video))
                m = await _scrape(http, base)  # the replicas' series, summed
                assert m[("avatar_frames_out_total", ())] > 0 and m[("avatar_sessions", ())] == 2

                pid_a = st.sessions[a.session_id].pid
                os.kill(pid_a, signal.SIGKILL)
                assert await _until(lambda: a.session_id in st.closed, 30.0), "the front did not see the replica die"
                r = await http.get(f"{base}/sessions/{a.session_id}")
                body = await r.json()
                assert r.status == 410 and "Ray Serve replica" in body["error"], body
                n0 = len(b.video)
                await asyncio.sleep(2.0)
                assert len(b.video) - n0 >= 25, "the other replica's session stopped streaming"
                assert (await http.get(f"{base}/sessions/{b.session_id}")).status == 200

                # b leaves; a new session lands on the survivor (Ray restarts the killed replica meanwhile)
                assert (await http.delete(f"{base}/sessions/{b.session_id}")).status == 200
                assert await _until(lambda: b.session_id in st.closed, 10.0)
                d = Peer(_signal(voice, 0.5, 30.0))
                peers.append(d)
                t_end = time.monotonic() + 60.0
                while (rd := await d.offer(http, base)).status == 503 and time.monotonic() < t_end:
                    d = Peer(_signal(voice, 0.5, 30.0))
                    peers.append(d)
                    await asyncio.sleep(1.0)
                assert rd.status == 200, await rd.text()
                host_d = (await rd.json())["host"]
                assert host_d != host_a
                print(f"the new session landed on {'the survivor' if host_d == host_b else 'the replacement'}")
                await d.wait_video(10, 60.0)
                assert len(d.video) >= 10
        finally:
            for p in peers:
                await p.close()
            await runner.cleanup()  # Serve and the local Ray shut down

    aio.run(run(), timeout_s=420.0)
