"""Browser calls over WebRTC without an SFU: aiortc transport, WHIP-style signalling, web client.

Entry points: :func:`install` (the ``sg2 serve`` extension ``agent.direct:install``: engine and the
``direct:`` settings section from the app), :func:`setup_direct` (add to any aiohttp app around an
engine) and :func:`direct_extension` (the same as an extension for ``create_app``); settings:
:class:`DirectSettings`.
Modules: ``service`` (routes, call registry), ``call`` (one call), ``outbound`` (the agent's paced
audio track), ``protocol`` (data-channel JSON), ``client`` (a Python caller for tests, benchmarks
and smoke checks).
"""

from .settings import DirectSettings, IceServer

__all__ = [
    "DIRECT_SERVICE",
    "DirectService",
    "DirectSettings",
    "IceServer",
    "direct_extension",
    "install",
    "setup_direct",
]


def __getattr__(name: str):  # aiortc is imported only when the transport is used
    if name in ("install", "setup_direct", "direct_extension", "DirectService", "DIRECT_SERVICE"):
        from . import service

        return getattr(service, name)
    raise AttributeError(name)
