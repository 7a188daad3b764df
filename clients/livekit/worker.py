"""An avatar worker for a LiveKit room: the agent's TTS audio in (a data stream), the talking
portrait's video and voice out (published tracks), as livekit-agents' avatar protocol expects.

    python -m clients.livekit.worker --url wss://my.livekit.host --token "$AVATAR_TOKEN" \\
        [--portrait face.jpg] [--bundle DIR] [--backend auto]

The token is the worker's own (identity e.g. ``avatar-worker``; ``LIVEKIT_URL`` and
``LIVEKIT_TOKEN`` are read when the flags are not given). On the agent's side, send the agent's
audio to the worker instead of publishing it (livekit-agents 1.x)::

    from livekit import rtc
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    session.output.audio = DataStreamAudioOutput(
        ctx.room, destination_identity="avatar-worker", wait_remote_track=rtc.TrackKind.KIND_VIDEO)

The worker runs livekit-agents' ``AvatarRunner`` with ``AvatarVideoGenerator``: the runner reads
the audio (``DataStreamAudioReceiver``), publishes the avatar's audio and video through its
``AVSynchronizer``, and tells the agent when each reply finished playing or was interrupted.
It stops when the agent leaves or the room disconnects.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from livekit import rtc
from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

from clients.livekit.generator import AvatarVideoGenerator
from engine.pipeline.pipeline import PipelineConfig

log = logging.getLogger("avatar.livekit.worker")
DEMO_PORTRAIT = Path(__file__).resolve().parents[2] / "engine" / "assets" / "demo" / "astronaut.jpg"


async def run_worker(room: rtc.Room, runtime, avatar, *, config: PipelineConfig | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """Serve ``room`` (connected) until ``stop`` is set, the agent leaves or the room disconnects."""
    stop = stop or asyncio.Event()
    gen = AvatarVideoGenerator(runtime, avatar, config=config)
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room), video_gen=gen, options=gen.avatar_options())

    def on_participant_disconnected(p: rtc.RemoteParticipant) -> None:
        if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            log.info("agent %s left: stopping", p.identity)
            stop.set()

    room.on("participant_disconnected", on_participant_disconnected)
    room.on("disconnected", lambda *_: stop.set())
    await runner.start()
    try:
        await stop.wait()
    finally:
        await runner.aclose()
        await gen.aclose()


async def _serve(url: str, token: str, runtime, avatar) -> None:
    room = rtc.Room()
    await room.connect(url, token)
    log.info("connected to room %s", room.name)
    try:
        await run_worker(room, runtime, avatar)
    finally:
        await room.disconnect()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The avatar as a LiveKit avatar worker (livekit-agents' avatar protocol).")
    ap.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server URL (default: $LIVEKIT_URL)")
    ap.add_argument("--token", default=os.environ.get("LIVEKIT_TOKEN"), help="the worker's access token (default: $LIVEKIT_TOKEN)")
    ap.add_argument("--portrait", default=str(DEMO_PORTRAIT))
    ap.add_argument("--bundle", default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    a = ap.parse_args(argv)
    if not a.url or not a.token:
        ap.error("--url and --token (or $LIVEKIT_URL and $LIVEKIT_TOKEN) are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from engine.avatar import load_portrait, prepare_avatar
    from engine.runtime import load_runtime

    rt = load_runtime(a.bundle, a.backend)
    avatar = prepare_avatar(load_portrait(a.portrait), rt, crop_size_px=rt.bundle.crop_size_px)
    asyncio.run(_serve(a.url, a.token, rt, avatar))


if __name__ == "__main__":
    main()
