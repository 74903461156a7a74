"""Small aiortc adjustments shared by the server and the Python client."""

from __future__ import annotations

import logging
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.utils import uint16_add

log = logging.getLogger("sg2.direct.rtc")

AUDIO_JITTER_CAPACITY = 16  # aiortc's own value for audio


class ImmediateAudioBuffer:
    """A "jitter buffer" that releases every audio packet the moment it arrives.

    Each Opus packet is a whole 20 ms frame, so nothing needs reassembling; a packet older than one
    already released (reordered or duplicated) is dropped. Right for a receiver that does not play
    the audio out but feeds it to a model as it comes (the server), or that measures arrival.
    """

    capacity = AUDIO_JITTER_CAPACITY

    def __init__(self) -> None:
        self._last: int | None = None
        self.dropped = 0

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._last is not None:
            ahead = uint16_add(seq, -self._last)
            if ahead == 0 or ahead >= 0x8000:  # duplicate, or behind what was released
                self.dropped += 1
                return False, None
        self._last = seq
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def tune_audio_jitter_buffer(receiver: Any, packets: int) -> bool:
    """Set how many 20 ms packets an aiortc audio receiver holds back before decoding.

    aiortc hard-codes 4 (80 ms) for audio: a frame is released once that many later packets have
    arrived. ``packets=0`` releases each packet on arrival (:class:`ImmediateAudioBuffer`); ``n>0``
    keeps aiortc's buffer with a prefetch of ``n`` (n x 20 ms). Returns False (and leaves the default)
    on an aiortc whose receiver is laid out differently.
    """
    attr = "_RTCRtpReceiver__jitter_buffer"
    current = getattr(receiver, attr, None)
    if not isinstance(current, JitterBuffer | ImmediateAudioBuffer):
        log.warning("cannot tune the audio jitter buffer of this aiortc version; keeping its default")
        return False
    buffer = (
        ImmediateAudioBuffer()
        if packets == 0
        else JitterBuffer(capacity=AUDIO_JITTER_CAPACITY, prefetch=packets)
    )
    setattr(receiver, attr, buffer)
    return True
