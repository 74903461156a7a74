"""Small aiortc adjustments shared by the server and the Python client."""

from __future__ import annotations

import logging
from typing import Any

from aiortc.jitterbuffer import JitterBuffer

log = logging.getLogger("sg2.direct.rtc")

AUDIO_JITTER_CAPACITY = 16  # aiortc's own value for audio


def tune_audio_jitter_buffer(receiver: Any, packets: int) -> bool:
    """Set how many 20 ms packets an aiortc audio receiver holds back before decoding.

    aiortc hard-codes 4 (80 ms) for audio. A frame is released once ``max(packets, 1)`` later
    packets have arrived, so 1 means 20 ms; packets arriving later than that are dropped. The
    server's input only feeds the VAD and the codec, where a rare lost packet does no harm, so it
    does not need a deep buffer. Returns False (and leaves the default) on an aiortc whose receiver
    is laid out differently.
    """
    attr = "_RTCRtpReceiver__jitter_buffer"
    current = getattr(receiver, attr, None)
    if not isinstance(current, JitterBuffer):
        log.warning("cannot tune the audio jitter buffer of this aiortc version; keeping its default")
        return False
    setattr(receiver, attr, JitterBuffer(capacity=AUDIO_JITTER_CAPACITY, prefetch=packets))
    return True
