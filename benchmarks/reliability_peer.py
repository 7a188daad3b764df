"""A client to be killed (``benchmarks/reliability.py``): ``python -m benchmarks.reliability_peer URL``
offers (video and audio received, the audio pushed), prints ``streaming <session id>`` once three video
frames have come, then waits (at most ``--wait-s``) for the SIGKILL that leaves its session without a
DTLS close or a DELETE. Exit 1 if it never streams."""
from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from server.ice import pin_host_addresses


async def run(url: str, wait_s: float, connect_s: float) -> int:
    pin_host_addresses(["127.0.0.1"])
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    frames = 0
    got = asyncio.Event()
    tasks: list[asyncio.Task] = []

    async def take(track) -> None:
        nonlocal frames
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                frames += 1
                if frames >= 3:
                    got.set()

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(take(t))))
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        r = await http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
        if r.status != 200:
            print(f"refused {r.status}", flush=True)
            return 1
        ans = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=ans["sdp"], type=ans["type"]))
    try:
        await asyncio.wait_for(got.wait(), connect_s)
    except asyncio.TimeoutError:
        print("no video", flush=True)
        return 1
    print(f"streaming {ans['session_id']}", flush=True)
    await asyncio.sleep(wait_s)  # the parent kills this process meanwhile
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reliability_peer")
    ap.add_argument("url")
    ap.add_argument("--wait-s", type=float, default=120.0)
    ap.add_argument("--connect-s", type=float, default=30.0)
    a = ap.parse_args(argv)
    return asyncio.run(run(a.url.rstrip("/"), a.wait_s, a.connect_s))


if __name__ == "__main__":
    sys.exit(main())
