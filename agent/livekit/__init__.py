"""livekit transport."""
