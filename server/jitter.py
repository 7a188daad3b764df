"""How many audio packets aiortc's receiver holds before it decodes one.

aiortc's ``RTCRtpReceiver`` releases an audio frame only once 4 later packets have arrived
(``JitterBuffer(capacity=16, prefetch=4)``): 80 ms of added latency for 20 ms Opus packets,
and aiortc has no API to change it. On loopback or a LAN there is next to no jitter, and a
packet that is late stalls the buffer whatever the prefetch (a gap holds frames back until it
is filled or the buffer overflows), so the prefetch only adds delay there. This module sets it
on a receiver; both the server (the peer's microphone) and the Python client (the avatar's
audio) use it. It reaches into aiortc's private state, so it checks what it finds and says so
(returns False, leaves the receiver alone) when an aiortc release changes it;
``tests/test_server.py`` fails in that case.
"""
from __future__ import annotations

import logging

from aiortc.jitterbuffer import JitterBuffer

log = logging.getLogger("avatar.server")

_ATTR = "_RTCRtpReceiver__jitter_buffer"  # aiortc 1.16: RTCRtpReceiver.__jitter_buffer


def set_audio_prefetch(receiver, packets: int) -> bool:
    """Hold ``packets`` later packets (at least 1: a frame ends where the next begins) before an
    audio frame is decoded; False when the receiver is not audio or not as expected."""
    if packets < 1:
        raise ValueError(f"the audio jitter buffer needs at least 1 packet, got {packets}")
    jb = getattr(receiver, _ATTR, None)
    if not isinstance(jb, JitterBuffer) or not hasattr(jb, "_prefetch") or getattr(jb, "_is_video", True):
        log.warning("cannot set the audio jitter buffer of %r (aiortc changed?): left at its default", receiver)
        return False
    jb._prefetch = int(packets)
    return True


def audio_prefetch(receiver) -> int | None:
    """The receiver's audio prefetch in packets (None where it cannot be read)."""
    jb = getattr(receiver, _ATTR, None)
    return getattr(jb, "_prefetch", None) if isinstance(jb, JitterBuffer) else None
