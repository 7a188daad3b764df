"""One session: one RTCPeerConnection, one Pipeline, its source and its two tracks.

    offer SDP --answer()--> answer SDP
    the peer's audio track (an offer whose audio m-line sends)  --TrackSource--\\
    or pushed PCM (HTTP, WebSocket)                 --PushSource--------------> Pipeline
        -> FramePacer -> AvatarVideoTrack + AvatarAudioTrack -> the peer

The pipeline starts when the peer's connection asks for media (a track's first ``recv``), not at
the offer, so no frames pile up while ICE and DTLS connect. The session closes itself when the
connection fails or closes, when the input ends, when the pipeline fails, or when no media
connection comes within ``connect_timeout_s`` (the pending time: an offer that never connects holds
its session slot this long at most, 5 s by default); ``close()`` is idempotent and leaves no task behind.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiortc import RTCPeerConnection, RTCSessionDescription, sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamTrack

from engine.aio import cancel_and_wait, wait_bounded, wait_event
from engine.avatar import Avatar
from engine.errors import AvatarInputError
from engine.pipeline.pipeline import Pipeline, PipelineConfig, PipelineError
from engine.pipeline.sources import AudioSource, PushSource, TrackSource
from server.ice import rtc_configuration
from server.jitter import set_audio_prefetch
from server.tracks import AvatarAudioTrack, AvatarVideoTrack, FramePacer

log = logging.getLogger("avatar.server")


class OfferError(ValueError):
    """The offer cannot be answered (malformed SDP, no video m-line, ...): the client's error."""


@dataclass(frozen=True)
class SessionConfig:
    steps: int | None = None  # denoising steps (None: the bundle's)
    # the pending time: close the session if no media connection (ICE + DTLS, then the first media
    # request) comes within this after the answer; an offer that never connects holds a slot this long
    connect_timeout_s: float = 5.0
    push_buffer_s: float = 10.0  # pushed audio queued ahead of the pipeline at most (pushes wait beyond)
    audio_jitter_packets: int = 1  # packets of the peer's audio held before decoding (aiortc's default 4 = 80 ms; server/jitter.py)
    ice_servers: tuple = ()  # STUN / TURN servers (server/ice.py IceServer) for the server's peer and the page; none: host candidates only


def offer_media(sdp_text: str) -> dict[str, str]:
    """``{kind: direction}`` of the offer's first audio and video m-lines; raises OfferError."""
    if not sdp_text.lstrip().startswith("v=0"):
        raise OfferError("malformed SDP: a session description starts with 'v=0'")
    try:
        desc = aiortc_sdp.SessionDescription.parse(sdp_text)
    except Exception as e:  # aiortc's parser raises ValueError, KeyError, IndexError... on bad lines
        raise OfferError(f"malformed SDP: {type(e).__name__}: {e}") from e
    if not desc.media:
        raise OfferError("malformed SDP: no media sections ('m=' lines)")
    media: dict[str, str] = {}
    for m in desc.media:
        if m.kind in ("audio", "video") and not m.direction:
            raise OfferError(f"the offer's {m.kind} m-line has no direction attribute: add a=recvonly (or a=sendrecv, "
                             "a=sendonly, a=inactive), as browsers and aiortc write it")
        if m.kind in ("audio", "video") and m.kind not in media:
            media[m.kind] = m.direction
    if media.get("video") not in ("recvonly", "sendrecv"):
        raise OfferError("the offer has no video m-line that receives: add a video transceiver with direction "
                         "'recvonly' (the avatar's video is sent to you)")
    return media


class Session:
    """``s = Session(...); answer = await s.answer(offer_sdp); ...; await s.close("why")``"""

    def __init__(self, session_id: str, runtime: Any, avatar: Avatar, avatar_id: str, config: SessionConfig = SessionConfig(),
                 *, on_closed: Callable[["Session"], None] | None = None):
        self.id = session_id
        self.avatar_id = avatar_id
        self.config = config
        self.created_s = time.time()
        self.on_closed = on_closed
        # no ICE servers: host candidates only, nothing contacted; with --ice-server: STUN / TURN as configured
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers))
        self.pipeline = Pipeline(runtime, avatar, PipelineConfig(realtime=True, steps=config.steps))
        self.pacer = FramePacer(runtime.bundle.fps, metrics=self.pipeline.metrics)
        self.video = AvatarVideoTrack(self.pacer)
        self.audio = AvatarAudioTrack(self.pacer)
        self.source: AudioSource | None = None
        self.push: PushSource | None = None  # set when the input is pushed PCM
        self.input = "none"  # "track": the peer's audio track; "push": HTTP / WebSocket PCM
        self.state = "new"  # new -> connecting -> streaming -> closed
        self.pending_until: float | None = None  # while connecting: the loop time at which the pending time ends
        self.close_reason: str | None = None
        self.error: str | None = None  # the pipeline's error, if it failed
        self.closed = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._closer: asyncio.Task | None = None
        self._websockets: set[Any] = set()  # aiohttp WebSocketResponses pushing into this session
        self._remote_audio: MediaStreamTrack | None = None

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and self._remote_audio is None:
                self._remote_audio = track

        @self.pc.on("connectionstatechange")
        async def _on_state() -> None:
            state = self.pc.connectionState
            log.info("session %s: connection %s", self.id, state)
            if state in ("failed", "closed"):
                self.close_soon(f"connection {state}")

    # -- signalling ----------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> RTCSessionDescription:
        """Answer the offer and start waiting for the media connection; raises OfferError."""
        media = offer_media(offer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as e:  # aiortc: ValueError, OperationError (no common codec), InvalidAccessError...
            raise OfferError(f"cannot use the offer: {type(e).__name__}: {e}") from e
        for t in self.pc.getTransceivers():
            if t.kind == "audio":
                set_audio_prefetch(t.receiver, self.config.audio_jitter_packets)
        self.pc.addTrack(self.video)
        self.pacer.audio = media.get("audio") in ("sendrecv", "recvonly")
        if "audio" in media:
            self.pc.addTrack(self.audio)
        if self._remote_audio is not None:
            self.source, self.input = TrackSource(self._remote_audio), "track"
        else:
            self.push = PushSource(max_buffer_s=self.config.push_buffer_s)
            self.source, self.input = self.push, "push"  # a reply pushed at once is generated ahead; the tracks pace it
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as e:  # an offer aiortc accepted but cannot answer (ValueError, InvalidStateError...)
            raise OfferError(f"cannot answer the offer: {type(e).__name__}: {e}") from e
        self.state = "connecting"
        self.pending_until = asyncio.get_running_loop().time() + self.config.connect_timeout_s
        self._spawn(self._run(), "session-run")
        return self.pc.localDescription

    # -- running -------------------------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:
        t = asyncio.create_task(coro, name=f"{name}-{self.id}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        reason = "the input ended"
        try:
            if not await wait_event(self.pacer.wanted, self.config.connect_timeout_s):
                reason = f"no media connection within {self.config.connect_timeout_s:g} s"
                return
            self.state, self.pending_until = "streaming", None
            self.pipeline.start(self.source)
            await self.pacer.run(self.pipeline.frames())
        except (PipelineError, AvatarInputError) as e:
            self.error = str(e)
            reason = f"the pipeline failed: {e}"
            log.error("session %s: %s", self.id, reason)
        finally:
            self.pacer.end()
            self.close_soon(reason)

    def close_soon(self, reason: str) -> asyncio.Task:
        """Start closing (once: a later reason is ignored); returns the closing task, which the session keeps.
        Usable from callbacks and from inside the session's own tasks."""
        if self._closer is None:
            self._closing = True
            self.close_reason = reason
            self._closer = asyncio.get_running_loop().create_task(self._close(), name=f"session-close-{self.id}")
        return self._closer

    async def close(self, reason: str = "closed") -> None:
        """Stop everything: tasks cancelled and awaited, tracks stopped, pipeline and connection closed.
        The closing runs in its own task: a caller that is cancelled meanwhile (a client gone while its
        DELETE waits) leaves it running to the end, and every caller returns once it has ended."""
        await asyncio.shield(self.close_soon(reason))

    async def _close(self) -> None:
        log.info("session %s: closing (%s)", self.id, self.close_reason)
        await cancel_and_wait(list(self._tasks), log=log, what=f"session {self.id}")
        self.pacer.end()
        self.video.stop()
        self.audio.stop()
        for ws in list(self._websockets):
            await self._bounded(ws.close(message=b"session closed"), "closing a WebSocket")
        await self._bounded(self.pipeline.aclose(), "closing the pipeline", timeout_s=30.0)  # its tasks, worker threads, source
        await self._bounded(self.pc.close(), "closing the peer connection")
        self.state = "closed"
        self.closed.set()
        if self.on_closed is not None:
            self.on_closed(self)

    async def _bounded(self, coro, what: str, timeout_s: float = 10.0) -> None:
        """A step of closing that cannot keep the session (and its capacity) forever."""
        finished, _ = await wait_bounded(coro, timeout_s)
        if not finished:
            log.warning("session %s: %s took over %g s; given up", self.id, what, timeout_s)

    @property
    def closing(self) -> bool:
        return self._closing

    def attach_websocket(self, ws: Any) -> None:
        self._websockets.add(ws)

    def detach_websocket(self, ws: Any) -> None:
        self._websockets.discard(ws)

    def websocket_count(self) -> int:
        return len(self._websockets)

    def describe(self) -> dict:
        p = self.pipeline
        return {"session_id": self.id, "avatar": self.avatar_id, "input": self.input, "state": self.state,
                "connection": self.pc.connectionState, "age_s": round(time.time() - self.created_s, 3),
                "steps": p.steps, "lookahead_ms": round(p.lookahead_ms, 1), "error": self.error,
                "metrics": p.metrics.snapshot()}
