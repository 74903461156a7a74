"""Transports that put the engine on calls: direct WebRTC, LiveKit, SIP, and the `sg2` CLI."""
