"""The TURN relay path: Debian's coturn on 127.0.0.1 as a relay with a user and password, and the
Python client with relay-only ICE (RTCConfiguration(iceTransportPolicy=RELAY): aioice gathers
only a relay candidate from the TURN server) still gets the avatar's frames and audio back.
The relayed session's round trip is printed beside a direct one. Skips where turnserver is not
installed (apt-get install coturn, or scripts/install.sh --dev as root). Loopback only, bounded."""
from __future__ import annotations

import contextlib
import wave

import numpy as np
import pytest
from aiohttp import web

from clients.python.client import run_client
from engine.audio import decode_audio
from engine.avatar import load_portrait, prepare_avatar
from engine.cli import DEMO
from engine.runtime import load_runtime
from server.app import STATE, ServerConfig, create_app
from server.avatars import AvatarStore
from server.coturn import LocalTurn, TurnUnavailable
from server.ice import pin_host_addresses
from tests import aio
from tests.tiny import tiny_bundle


@pytest.fixture(scope="module")
def turn():
    try:
        with LocalTurn() as t:
            yield t
    except TurnUnavailable as e:
        pytest.skip(f"no local TURN relay: {e}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    d = tmp_path_factory.mktemp("turn")
    rt = load_runtime(tiny_bundle(d / "b"), "torch", threads=1)
    avatar = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), rt, crop_size_px=rt.bundle.crop_size_px)
    x = decode_audio(DEMO / "demo_voice.wav", sample_rate_hz=48000)[: 2 * 48000]
    voice = d / "voice.wav"
    with wave.open(str(voice), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes((np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes())
    pin_host_addresses(["127.0.0.1"])
    return rt, avatar, voice


@contextlib.asynccontextmanager
async def serving(rt, avatar):
    store = AvatarStore(rt)
    store.add("default", avatar, "default: astronaut.jpg")
    app = create_app(rt, ServerConfig(host="127.0.0.1", port=0), avatars=store)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    finally:
        await runner.cleanup()


def test_relay_only_client_gets_frames_through_a_local_coturn(rig, turn):
    rt, avatar, voice = rig

    async def run():
        async with serving(rt, avatar) as (base, app):
            direct = await run_client(base, voice, seconds=3.0, lead_in_s=0.6)
            relayed = await run_client(base, voice, seconds=3.0, lead_in_s=0.6, ice_servers=[turn.ice_server()], relay_only=True)
            assert app[STATE].sessions == {}
            return direct, relayed

    direct, relayed = aio.run(run(), 90)
    assert direct["ice"]["local"] == "host"
    # the nominated pair's local candidate is the relay address coturn allocated: every packet went through it
    assert relayed["ice"]["local"] == "relay", (relayed["ice"], turn.log_text()[-2000:])
    for rep in (direct, relayed):
        assert rep["video"]["frames"] > 30 and rep["video"]["fps_received"] > 10, rep["video"]
        lat = rep["latency"]
        assert lat["correlation"] > 0.2 and 50 < lat["audio_roundtrip_ms"] < 2000, lat
    print(f"\naudio round trip: direct {direct['latency']['audio_roundtrip_ms']} ms, "
          f"relayed through coturn {relayed['latency']['audio_roundtrip_ms']} ms (tiny bundle, loopback)")


def test_relay_only_without_a_turn_server_is_refused():
    from server.ice import IceServer, rtc_configuration

    with pytest.raises(ValueError, match="needs a TURN server"):
        rtc_configuration([IceServer(("stun:127.0.0.1:3478",))], relay_only=True)
