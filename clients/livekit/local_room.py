"""A stand-in for a connected ``rtc.Room`` that publishes nowhere: livekit-agents' ``AvatarRunner``
runs against it without a LiveKit server (the adapter's tests and ``avatar bench agent``)."""
from __future__ import annotations

from livekit import rtc


class _Publication:
    async def wait_for_subscription(self) -> None:
        return None


class _Participant:
    def __init__(self) -> None:
        self.published: list[object] = []  # the tracks the runner published

    async def publish_track(self, track, options) -> _Publication:
        self.published.append(track)
        return _Publication()


class LocalRoom(rtc.EventEmitter):
    """``local_participant.published`` lists what the runner published; ``isconnected()`` is always true."""

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = _Participant()

    def isconnected(self) -> bool:
        return True
