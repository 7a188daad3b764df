"""The web client (clients/web) end to end in headless Chromium against the real server on 127.0.0.1:
the page lists the avatars, sends its (fake) microphone, fed from a speech file of ../shared/data,
receives the avatar's frames, and the mouth region changes while the speech plays and not while
it is silent; the overlay shows frames/s and latency; leaving the page closes its session on the
server at once.

The fake microphone loops a wav of silence, speech, silence. The server's pacer tap says which
slots were speech; the page's frames are put on those slots by their RTP timestamps (one
constant offset, found by matching pictures)."""
from __future__ import annotations

import asyncio
import base64
import time
import wave

import numpy as np
import pytest

from engine.audio import decode_audio
from server.app import STATE
from tests import aio
from tests.browser import Browser, chromium_path
from tests.test_server import SLOT_90K, _lower_face, _until, rig, serving  # noqa: F401  (rig: the fixture)

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no Chromium on this machine: `scripts/install.sh --dev` "
                                "installs Debian's chromium when run as root (or set AVATAR_CHROMIUM to a Chromium binary)")

SPEECH = "speech/echomimic__assets_test_audios_jane.wav"
LEAD_S, SPEECH_S, TAIL_S = 1.5, 2.5, 1.5  # the fake microphone's loop


def _fake_mic(shared: object, path) -> None:
    voice = decode_audio(shared / SPEECH, sample_rate_hz=48000)
    speech = voice[int(0.3 * 48000) : int((0.3 + SPEECH_S) * 48000)]
    x = np.concatenate([np.zeros(int(LEAD_S * 48000)), speech, np.zeros(int(TAIL_S * 48000))])
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(48000)
        f.writeframes(np.clip(np.round(x * 32767), -32768, 32767).astype("<i2").tobytes())


def test_page_streams_the_microphone_and_the_mouth_moves(rig, shared_data, tmp_path):
    _, _, avatar, _ = rig
    rows, cols = _lower_face(avatar)
    region = {"x": cols.start, "y": rows.start, "w": cols.stop - cols.start, "h": rows.stop - rows.start}
    mic = tmp_path / "mic.wav"
    _fake_mic(shared_data, mic)

    async def run():
        async with serving(rig) as (base, app):
            st = app[STATE]
            tap: dict[int, tuple[np.ndarray, str]] = {}
            async with Browser.launch(f"{base}/?autostart=1", fake_audio=mic) as b:
                options = await b.wait_for("[...document.querySelectorAll('#avatar option')].map(o => o.value)", 20)
                assert options == ["default"]
                await b.wait_for("window.avatarClient.session && window.avatarClient.session.id", 30)
                sid = await b.evaluate("window.avatarClient.session.id")
                session = st.sessions[sid]
                assert session.input == "track", "the page's microphone is the session's input"
                assert await b.evaluate("document.getElementById('video').muted"), "the page echoes the user's own voice"
                session.pacer.tap = lambda slot, f, pcm: tap.__setitem__(slot, (f.image[rows, cols].astype(np.float32), f.kind))
                await b.wait_for("window.avatarClient.session.state === 'connected'", 30)
                await b.wait_for("(window.avatarClient.session.stats.fps || 0) > 10", 30)
                await b.evaluate(f"window.avatarClient.record({{x: {region['x']}, y: {region['y']}, w: {region['w']}, "
                                 f"h: {region['h']}}}, 400)")
                t_end = time.monotonic() + 2 * (LEAD_S + SPEECH_S + TAIL_S)  # two loops of the fake microphone
                records = []
                while time.monotonic() < t_end:
                    await asyncio.sleep(1.0)
                    records += await b.evaluate("window.avatarClient.takeRecords()")
                stats = await b.evaluate("window.avatarClient.session.stats")
                overlay = await b.evaluate("document.getElementById('overlay').textContent")
                assert not any(c.startswith("exception") for c in b.console), b.console
                await b.navigate("about:blank")  # closing the page: it DELETEs its session on the way out
                t_end = time.monotonic() + 5  # well under the peer timeout (10 s): the DELETE did it
                while st.sessions and time.monotonic() < t_end:
                    await asyncio.sleep(0.1)
                assert not st.sessions, "leaving the page did not close its session on the server"
                # the page's DELETE and its peer connection's close race: either reason is the page leaving
                assert any(w in (session.close_reason or "") for w in ("deleted", "connection closed")), session.close_reason
            return tap, records, stats, overlay

    tap, records, stats, overlay = aio.run(run())

    # the page received frames at about the frame rate and shows its numbers
    assert stats["fps"] > 10, stats  # streaming, not stalled (speed: benchmarks)
    assert stats["firstFrameMs"] is not None and stats["firstFrameMs"] < 10_000, stats
    assert stats["latencyMs"] is not None and 0 < stats["latencyMs"] < 5000, stats
    assert "fps" in overlay and "latency  ≈" in overlay, overlay
    assert len(records) > 100, len(records)

    # put the page's frames on the server's slots: RTP timestamps are slot * 3600 plus one unknown offset
    assert all(r["rtp"] is not None for r in records), "the browser gave no RTP timestamps"
    h, w = rows.stop - rows.start, cols.stop - cols.start
    crops = [np.frombuffer(base64.b64decode(r["rgb"]), np.uint8).reshape(h, w, 3).astype(np.float32) for r in records]
    rel = [((r["rtp"] - records[0]["rtp"]) % 2**32) // SLOT_90K for r in records]
    slots = sorted(tap)

    def mismatch(k: int) -> float:
        d = [np.abs(c - tap[s + k][0]).mean() for c, s in zip(crops, rel) if s + k in tap]
        return float(np.mean(d)) if len(d) > len(crops) // 2 else np.inf

    offsets = range(slots[0] - rel[0], slots[-1] - rel[0] + 1)
    k = min(offsets, key=mismatch)
    typical = float(np.median([m for m in map(mismatch, offsets) if np.isfinite(m)]))
    # the codec's loss varies with its bitrate: the right offset is told by matching far better than the others
    assert mismatch(k) < 0.6 * typical, f"the page's frames match no run of the server's frames ({mismatch(k):.1f} vs {typical:.1f})"

    # the mouth region changes while speech plays (generated frames), not while it is silent
    portrait = avatar.image[rows, cols].astype(np.float32)
    kinds = {"speech": [], "idle": []}
    for c, s in zip(crops, rel):
        kind = tap.get(s + k, (None, None))[1]
        if kind in kinds:
            kinds[kind].append(float(np.abs(c - portrait).mean()))
    assert len(kinds["speech"]) >= 20 and len(kinds["idle"]) >= 20, {n: len(v) for n, v in kinds.items()}
    speech, idle = np.median(kinds["speech"]), np.median(kinds["idle"])
    assert speech > 2 * idle + 2, (speech, idle)


def test_page_errors_are_clear(rig):
    """Without the server's token the page says how to give it; with it, the avatars are listed; an
    offer over capacity is refused with the server's reason and its Retry-After."""

    async def run():
        async with serving(rig, token="s3cret", max_sessions=0) as (base, app):
            async with Browser.launch(f"{base}/") as b:
                status = await b.wait_for("window.avatarClient && window.avatarClient.status().error && window.avatarClient.status().text", 20)
                assert "401" not in status and "token" in status, status
                await b.navigate(f"{base}/?token=s3cret&input=none")
                options = await b.wait_for("window.avatarClient && [...document.querySelectorAll('#avatar option')].map(o => o.value)", 20)
                assert options == ["default"]
                await b.evaluate("window.avatarClient.start()")
                status = await b.wait_for("window.avatarClient.status().error && window.avatarClient.status().text", 20)
                assert "capacity" in status and "retry in" in status, status
                assert await b.evaluate("window.avatarClient.session") is None
                assert not app[STATE].sessions

    aio.run(run())


def test_page_survives_stop_start_and_follows_the_server(rig):
    """Start, stop and start again at once: one session streams and the first leaves nothing behind
    on the server (capacity 1 would refuse the second otherwise). Closed on the server, the session
    ends on the page too, with the server's reason. An input that cannot work is the error shown."""

    async def run():
        async with serving(rig) as (base, app):
            st = app[STATE]
            async with Browser.launch(f"{base}/?input=none") as b:
                await b.wait_for("window.avatarClient && document.querySelectorAll('#avatar option').length", 20)
                await b.evaluate("window.avatarClient.start(); window.avatarClient.stop(); window.avatarClient.start(); 0")
                await b.wait_for("window.avatarClient.session && window.avatarClient.session.state === 'connected'", 30)
                sid = await b.evaluate("window.avatarClient.session.id")
                assert not await b.evaluate("document.getElementById('video').muted")  # no microphone: the avatar is heard
                t_end = time.monotonic() + 5
                while len(st.sessions) != 1 and time.monotonic() < t_end:
                    await asyncio.sleep(0.1)
                assert list(st.sessions) == [sid], (list(st.sessions), sid)
                await st.sessions[sid].close("deleted by an operator")
                status = await b.wait_for("window.avatarClient.session === null && window.avatarClient.status().error && "
                                          "window.avatarClient.status().text", 10)
                assert "deleted by an operator" in status, status
                # an input that cannot work (here: no file chosen) is the error shown, and no session is left behind
                await b.navigate(f"{base}/?input=file&autostart=1")
                status = await b.wait_for("window.avatarClient && window.avatarClient.status().error && "
                                          "window.avatarClient.status().text", 20)
                assert "choose an audio file" in status, status
                assert await _until(lambda: not st.sessions, 5.0), "the failed start left its session on the server"
                assert not any(c.startswith("exception") for c in b.console), b.console

    aio.run(run())


def _has_non_loopback_address() -> bool:
    import ipaddress

    import ifaddr  # aioice's own dependency

    return any(not ipaddress.ip_address(ip.ip if isinstance(ip.ip, str) else ip.ip[0]).is_loopback
               for a in ifaddr.get_adapters() for ip in a.ips)


def test_a_browser_with_default_webrtc_settings_connects(rig):
    """The other tests start Chromium with loopback candidates allowed; a user's browser offers none
    (only its network addresses, or mDNS names for them), while this server offers 127.0.0.1 only.
    Launched without those flags, the page still connects and streams."""
    if not _has_non_loopback_address():
        pytest.skip("this machine has no network interface but loopback: a default browser offers no candidate at all")

    async def run():
        async with serving(rig) as (base, app):
            st = app[STATE]
            async with Browser.launch(f"{base}/?input=none&autostart=1", default_webrtc=True) as b:
                await b.wait_for("window.avatarClient && window.avatarClient.session && "
                                 "window.avatarClient.session.state === 'connected'", 30)
                await b.wait_for("(window.avatarClient.session.stats.fps || 0) > 10", 30)
                (session,) = st.sessions.values()
                ice = session.pc.getTransceivers()[0].receiver.transport.transport
                offered = [c.ip for c in ice.getRemoteCandidates()]
                assert offered and not any(ip in ("127.0.0.1", "::1") for ip in offered), offered
                assert not any(c.startswith("exception") for c in b.console), b.console

    aio.run(run())
