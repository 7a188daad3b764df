"""``avatar client``: a WebRTC peer (aiortc) that speaks an audio file to the server as live
audio, receives the avatar's video and re-emitted audio, optionally records them, and measures.

The peer offers a recvonly video transceiver and a sendrecv audio transceiver: the file goes out
on the audio track, paced in real time as a microphone would send it (after ``lead_in_s`` of
silence, followed by silence until the end), and the server's answer carries the avatar's video
and the input audio re-emitted in sync with it.

What it measures (all on this process's monotonic clock; printed with the numbers):

- ``connect.first_frame_ms``: from just before the offer is POSTed to the first decoded video
  frame handed out by aiortc's receiver (``answer_ms`` and ``connected_ms`` on the way).
- ``video.fps_received``: decoded video frames per second of wall time, first to last frame;
  ``fps_by_pts``: frames per second of media time (their RTP timestamps); ``pts_gaps``: slots the
  timestamps skip (frames the server skipped, or lost on the way).
- ``latency.audio_roundtrip_ms``: the delay that best aligns the audio received back with the
  audio sent (cross-correlation of the two waveforms at 16 kHz, each placed on this clock: the
  sent samples when the sending track handed them to the encoder, the received samples at their
  RTP timestamp plus the median (release time - timestamp) of the received audio frames). The
  server re-emits the input audio on the same media clock as the frames, so this is the
  audio-in to frame-out delay of the whole path as this client sees it: encode, network, the
  server's jitter buffer, the pipeline (lookahead, generation, queues), its pacing, and this
  receiver's jitter buffer (aiortc's audio jitter buffer holds 4 packets, 80 ms, by default; the
  server and this client set it to 1 packet, ``server/jitter.py``). ``correlation`` is the normalised peak (near 1: a clean match).
- ``av.release_skew_ms``: median (release - timestamp) of the video frames minus that of the audio
  frames: how much later this receiver hands out a video frame than the audio of the same media
  time. The server stamps both streams from one clock starting at the same instant, so this is the
  receiver's own A/V skew (aiortc holds each video frame until the next one arrives, ~1 frame,
  and audio for 4 packets); a player that follows the timestamps has none of it.
"""
from __future__ import annotations

import asyncio
import fractions
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from clients.python.record import Mp4Recorder
from engine.aio import wait_event
from engine.audio.decode import decode_audio
from server.ice import IceServer, is_loopback_host, pin_host_addresses, rtc_configuration
from server.jitter import audio_prefetch, set_audio_prefetch

RATE_HZ = 48000  # what the client sends and receives
PACKET = 960  # 20 ms


class ClientError(RuntimeError):
    """The server refused, or the connection did not come up."""


class PacedAudioTrack(MediaStreamTrack):
    """A signal sent as live audio: 20 ms mono s16 frames at 48 kHz, each when it falls due on the loop's clock.

    Sample ``i`` of :attr:`signal` is handed to the encoder at ``t0 + i / 48000`` (``t0``: the first
    ``recv``); past the end of the signal it sends silence until stopped.
    """

    kind = "audio"

    def __init__(self, signal: np.ndarray):
        super().__init__()
        self.signal = np.asarray(signal, np.float32)  # (n,) in [-1, 1] at 48 kHz
        self.t0: float | None = None  # loop time of sample 0
        self._k = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self.t0 is None:
            self.t0 = loop.time()
        wait = self.t0 + self._k * PACKET / RATE_HZ - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        x = self.signal[self._k * PACKET : (self._k + 1) * PACKET]
        x = np.pad(x, (0, PACKET - x.size))
        pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE_HZ
        frame.pts = self._k * PACKET
        frame.time_base = fractions.Fraction(1, RATE_HZ)
        self._k += 1
        return frame


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """A received s16 frame (packed, any channel count) as (n,) float32 mono."""
    x = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float32) / 32768.0  # (n, C)
    return x.mean(axis=1)


def _to_16k(x: np.ndarray) -> np.ndarray:
    """48 kHz -> 16 kHz by averaging triples (a crude low-pass; enough to align speech)."""
    n = x.size // 3
    return x[: 3 * n].reshape(n, 3).mean(axis=1)


def estimate_delay(sent: np.ndarray, sent_t0: float, received: list[tuple[int, float, np.ndarray]], *,
                   max_delay_s: float = 5.0) -> dict | None:
    """Delay (s) between audio sent and the same audio received, both placed on one clock.

    ``sent``: (n,) 48 kHz, sample i sent at ``sent_t0 + i / 48000``; ``received``: (pts in samples,
    release time, (m,) samples) per received frame. Returns ``{"delay_s", "correlation", "offset_s"}``
    or None without enough signal.
    """
    if not received or not np.any(sent):
        return None
    end = max(p + x.size for p, _, x in received)
    y48 = np.zeros(end, np.float32)
    for p, _, x in received:
        y48[p : p + x.size] = x
    offset = float(np.median([t - p / RATE_HZ for p, t, _ in received]))  # client time of received sample 0
    x, y = _to_16k(sent), _to_16k(y48)
    if not np.any(y):
        return None
    n = 1 << int(np.ceil(np.log2(x.size + y.size)))
    c = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(x, n)), n)  # c[d] = sum_j y[j] x[j - d] (circular)
    fs = RATE_HZ / 3
    # delay = offset - sent_t0 + d / fs must lie in [0, max_delay_s]
    d_lo = int(np.floor((sent_t0 - offset) * fs))
    d_hi = int(np.ceil((sent_t0 - offset + max_delay_s) * fs))
    ds = np.arange(d_lo, d_hi + 1)
    vals = c[ds % n]
    best = int(ds[int(np.argmax(vals))])
    norm = float(np.sqrt(np.sum(x**2) * np.sum(y**2)))
    return {"delay_s": offset - sent_t0 + best / fs, "correlation": float(vals.max() / norm) if norm else 0.0, "offset_s": offset}


async def run_client(server: str, audio: str | Path, *, avatar: str | None = None, record: str | Path | None = None,
                     seconds: float | None = None, token: str | None = None, steps: int | None = None,
                     lead_in_s: float = 1.0, connect_timeout_s: float = 20.0, audio_jitter_packets: int = 1,
                     ice_servers: Sequence[IceServer] = (), relay_only: bool = False,
                     received: list | None = None) -> dict:
    """Stream ``audio`` to the server, receive the avatar, measure; returns the report (see the module doc).
    ``ice_servers``: STUN / TURN servers (none: host candidates only); ``relay_only``: TURN relay candidates only
    (``report["ice"]`` says which candidate types the connection used).
    ``received``: a list that gets every audio frame received, as (pts in 48 kHz samples, release time, (n,) float32 mono).
    ``audio_jitter_packets``: audio packets this receiver holds before decoding (aiortc's default is 4, 80 ms;
    1 is what a browser's adaptive buffer settles to on loopback; ``server/jitter.py``)."""
    loop = asyncio.get_running_loop()
    speech = await loop.run_in_executor(None, lambda: decode_audio(audio, sample_rate_hz=RATE_HZ))
    signal = np.concatenate([np.zeros(int(lead_in_s * RATE_HZ), np.float32), speech.astype(np.float32)])
    if seconds is None:
        seconds = signal.size / RATE_HZ + 2.0
    base = server.rstrip("/")
    if is_loopback_host(urlparse(base).hostname or ""):
        pin_host_addresses(["127.0.0.1"])  # see server/ice.py
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    pc = RTCPeerConnection(rtc_configuration(ice_servers, relay_only=relay_only))
    mic = PacedAudioTrack(signal)
    pc.addTransceiver("video", direction="recvonly")
    audio_tr = pc.addTransceiver(mic, direction="sendrecv")
    set_audio_prefetch(audio_tr.receiver, audio_jitter_packets)
    tracks: dict[str, MediaStreamTrack] = {}
    connected, failed = asyncio.Event(), asyncio.Event()
    pc.on("track", lambda t: tracks.setdefault(t.kind, t))

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState in ("failed", "closed"):
            failed.set()

    rec = Mp4Recorder(record) if record else None
    video: list[tuple[int, float, int, int]] = []  # (pts 1/90000, release time, width, height)
    heard: list[tuple[int, float, np.ndarray]] = []  # (pts 1/48000, release time, mono samples)
    first_frame = asyncio.Event()

    async def take_video(track: MediaStreamTrack) -> None:
        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            video.append((int(f.pts), loop.time(), f.width, f.height))
            first_frame.set()
            if rec:
                rec.video(f)

    async def take_audio(track: MediaStreamTrack) -> None:
        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            heard.append((int(f.pts), loop.time(), _mono(f)))
            if received is not None:
                received.append(heard[-1])
            if rec:
                rec.audio(f)

    report: dict[str, Any] = {"server": base, "audio_file": str(audio), "avatar": avatar or "default"}
    tasks: list[asyncio.Task] = []
    sid = None
    async with aiohttp.ClientSession(headers=headers) as http:
        try:
            await pc.setLocalDescription(await pc.createOffer())
            body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": "offer"}
            if avatar:
                body["avatar"] = avatar
            if steps:
                body["steps"] = steps
            t_post = loop.time()
            async with http.post(f"{base}/offer", json=body) as r:
                reply = await r.json(content_type=None)
                if r.status != 200:
                    raise ClientError(f"POST /offer: {r.status} {reply.get('error', reply)}")
            t_answer = loop.time()
            sid = reply["session_id"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type=reply["type"]))
            tasks = [asyncio.create_task(take_video(tracks["video"]))]
            if "audio" in tracks:
                tasks.append(asyncio.create_task(take_audio(tracks["audio"])))
            waits = [asyncio.create_task(connected.wait()), asyncio.create_task(failed.wait())]
            await asyncio.wait(waits, timeout=connect_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            for t in waits:
                t.cancel()
            if not connected.is_set():
                raise ClientError(f"no WebRTC connection within {connect_timeout_s:g} s (state {pc.connectionState})")
            t_connected = loop.time()
            report["ice"] = _candidate_types(pc)
            if not await wait_event(first_frame, connect_timeout_s):
                raise ClientError(f"connected, but no video frame within {connect_timeout_s:g} s")
            t_stop = t_connected + seconds
            while loop.time() < t_stop and not failed.is_set():
                await asyncio.sleep(min(0.1, max(0.0, t_stop - loop.time())))
            async with http.get(f"{base}/sessions/{sid}") as r:
                if r.status == 200:
                    report["server_session"] = _server_summary(await r.json())
        finally:
            if sid is not None:
                try:
                    async with http.delete(f"{base}/sessions/{sid}") as r:
                        await r.read()
                except aiohttp.ClientError:
                    pass  # the server is gone: nothing to delete
            mic.stop()
            await pc.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if rec:
                await rec.close()

    report["session_id"] = sid
    report["connect"] = {"answer_ms": _ms(t_answer - t_post), "connected_ms": _ms(t_connected - t_post),
                         "first_frame_ms": _ms(video[0][1] - t_post) if video else None}
    report["video"] = _video_summary(video)
    report["audio"] = {"frames": len(heard), "seconds": round(sum(x.size for _, _, x in heard) / RATE_HZ, 3)}
    d = estimate_delay(signal, mic.t0, heard) if mic.t0 is not None else None
    report["latency"] = {"audio_roundtrip_ms": _ms(d["delay_s"]) if d else None,
                         "correlation": round(d["correlation"], 3) if d else None,
                         "client_audio_jitter_packets": audio_prefetch(audio_tr.receiver)}
    if d and video:
        off_v = float(np.median([t - p / 90000 for p, t, _, _ in video]))
        report["av"] = {"release_skew_ms": _ms(off_v - d["offset_s"])}
    else:
        report["av"] = {"release_skew_ms": None}
    if rec:
        report["record"] = {"path": str(rec.path), "video_frames": rec.video_frames, "audio_frames": rec.audio_frames}
    report["measures"] = {
        "connect.first_frame_ms": "offer POST sent -> first decoded video frame out of this client's receiver",
        "video.fps_received": "decoded video frames per second of wall time (first to last frame)",
        "video.fps_by_pts": "video frames per second of media time (RTP timestamps)",
        "latency.audio_roundtrip_ms": "audio sent -> the same audio received back (waveform cross-correlation): the "
                                      "audio-in to frame-out delay as this client sees it, both jitter buffers included "
                                      "(client_audio_jitter_packets: this receiver's, 20 ms each)",
        "av.release_skew_ms": "for equal media timestamps, how much later this receiver hands out video than audio "
                              "(the server sends both on one clock; this is the receiver's own skew)",
    }
    return report


def _candidate_types(pc: RTCPeerConnection) -> dict:
    """The local and remote candidate types ("host", "srflx", "relay") of the pair ICE nominated
    (aioice's private state, read only for the report; None where it is not reachable)."""
    for t in pc.getTransceivers():
        try:
            pair = next(iter(t.receiver.transport.transport._connection._nominated.values()))
        except (AttributeError, StopIteration):
            continue
        return {"local": pair.local_candidate.type, "remote": pair.remote_candidate.type}
    return {"local": None, "remote": None}


def _ms(s: float) -> float:
    return round(1000.0 * s, 1)


def _video_summary(video: list[tuple[int, float, int, int]]) -> dict:
    if not video:
        return {"frames": 0}
    n = len(video)
    wall = video[-1][1] - video[0][1]
    pts = [p for p, _, _, _ in video]
    steps = np.diff(pts) if n > 1 else np.zeros(0)
    step = int(np.median(steps)) if steps.size else 0
    return {"frames": n, "width": video[0][2], "height": video[0][3],
            "fps_received": round((n - 1) / wall, 2) if wall > 0 else None,
            "fps_by_pts": round((n - 1) * 90000 / (pts[-1] - pts[0]), 2) if pts[-1] > pts[0] else None,
            "pts_gaps": int(np.sum(steps // step - 1)) if step > 0 else 0}


def _server_summary(info: dict) -> dict:
    m = info.get("metrics", {})
    st = m.get("stages", {})
    pick = lambda name: {k: st[name][k] for k in ("p50_ms", "p95_ms", "max_ms")} if name in st else None  # noqa: E731
    return {"input": info.get("input"), "steps": info.get("steps"), "lookahead_ms": info.get("lookahead_ms"), "fps": m.get("fps"),
            "counters": m.get("counters"), "pipeline_latency_ms": pick("latency"), "send_latency_ms": pick("send_latency"),
            "denoise_ms": pick("denoise"), "compose_ms": pick("compose")}
