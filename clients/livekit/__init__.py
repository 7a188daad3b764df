"""The avatar as a LiveKit avatar worker (optional extra ``[livekit]``).

``AvatarVideoGenerator`` is the avatar-worker side of livekit-agents' avatar protocol
(``livekit.agents.voice.avatar``): ``push_audio(rtc.AudioFrame | AudioSegmentEnd)``,
``clear_buffer()`` and an async iterator of ``rtc.VideoFrame``, ``rtc.AudioFrame`` and
``AudioSegmentEnd``, for livekit-agents' ``AvatarRunner`` (which publishes the frames in sync and
tells the agent when playback finished or was interrupted). ``clients/livekit/worker.py`` is a
worker that joins a room. It is a thin translation onto ``engine.pipeline``; livekit is imported
only in this package.
"""
from clients.livekit.generator import AvatarVideoGenerator

__all__ = ["AvatarVideoGenerator"]
