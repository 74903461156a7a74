"""The engine's network API (OpenAI-Realtime-compatible WebSocket server)."""
