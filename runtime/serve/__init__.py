"""chatterbox_rt.serve: an OpenAI-compatible speech server over the Engine (FastAPI + uvicorn).

    from chatterbox_rt import TTS
    from chatterbox_rt.serve import create_app, serve

    engine = TTS.from_local("ckpt/").engine(max_batch=16)
    app = create_app(engine, library="voices/")      # embed in your own ASGI stack, or:
    serve(engine, host="127.0.0.1", port=8000)       # run it (``chatterbox-rt serve``)

Needs the ``serve`` extra (``pip install 'chatterbox-rt[serve]'``: fastapi, uvicorn,
prometheus-client, python-multipart; av for AAC).
"""
from __future__ import annotations

__all__ = ["create_app", "serve", "make_server", "APIError"]


def __getattr__(name):
    if name in ("create_app", "APIError"):
        from . import app

        return getattr(app, name)
    if name in ("serve", "make_server"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'chatterbox_rt.serve' has no attribute {name!r}")
