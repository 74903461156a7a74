"""LiveKit transport: SpeechGPT 2.0 in LiveKit rooms.

- :class:`RealtimeModel` (``model``): a livekit-agents 1.8 ``RealtimeModel`` served by ``sg2 serve``
  engine servers (least-loaded choice, failures end the call, truthful capabilities);
- :class:`EnginePool`, :class:`EngineServer` (``servers``): the engine servers, their health and load;
- ``worker``: the ``sg2 agent`` worker (``AgentServer``, per-room calls, load reporting, drain);
- ``floor``: whom the agent listens to in a room with several people, and the fast stop on barge-in;
- ``token_service``: ``POST /v1/livekit/token`` on ``sg2 serve`` (extension ``agent.livekit.token_service:install``);
- ``settings``: the ``livekit:`` and ``agent:`` configuration sections; ``cli``: ``sg2 agent``.

Imports are lazy: ``sg2 --help`` does not load livekit.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SG2_CAPABILITIES",
    "EngineCallError",
    "EnginePool",
    "EngineServer",
    "RealtimeModel",
    "RealtimeSession",
]


def __getattr__(name: str) -> Any:
    if name in ("RealtimeModel", "RealtimeSession", "EngineCallError", "SG2_CAPABILITIES"):
        from . import model

        return getattr(model, name)
    if name in ("EnginePool", "EngineServer"):
        from . import servers

        return getattr(servers, name)
    raise AttributeError(name)
