"""``uio serve``: Unified-IO over HTTP, with a web page and dynamic batching (the ``serve`` extra).

:func:`create_app` builds the ASGI application around a model loader; :func:`serve` runs it with
uvicorn until SIGTERM/SIGINT, finishing the requests in flight first. See ``docs/serve.md``.
"""
from .app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
