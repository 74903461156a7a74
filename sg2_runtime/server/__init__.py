"""The engine's network API: an OpenAI-Realtime-compatible WebSocket server (``sg2 serve``).

- ``config``: settings (pydantic) from ``configs/*.yaml`` plus command-line overrides;
- ``app``: the aiohttp app factory ``create_app(engine, settings, extensions=...)`` — ``/v1/realtime``,
  ``/healthz``, ``/metrics`` — and the app keys extensions use;
- ``realtime``: one WebSocket call = one engine session (reader, engine-event pump, sender);
- ``protocol``: the wire format (event builders, session mapping, audio conversion);
- ``auth``: API keys (Bearer header or the browser subprotocol);
- ``metrics``: the server's Prometheus metrics;
- ``loading``, ``runner``, ``cli``: models and engine from the settings, serving, ``sg2 serve``.
"""
