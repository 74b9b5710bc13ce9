"""Running the app: uvicorn on 127.0.0.1 by default, with a drain on SIGTERM / SIGINT.

On the first signal the app stops being ready (``/ready`` answers 503, new speech requests get
503), uvicorn stops accepting connections and waits for the requests in flight to finish (at most
``drain_timeout`` seconds, default: as long as they take), then the engine is closed and the
process exits. A second signal exits at once.
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("chatterbox_rt.serve")


def make_server(engine, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: Optional[float] = None,
                log_level: str = "info", **app_kw):
    """A ``uvicorn.Server`` for ``create_app(engine, **app_kw)`` (the engine is closed when it stops)."""
    import uvicorn

    from .app import create_app

    app_kw.setdefault("close_engine", True)
    app = create_app(engine, **app_kw)
    config = uvicorn.Config(app, host=host, port=int(port), log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout, server_header=False)
    return _DrainingServer(config, app.state.chatterbox)


def serve(engine, **kw) -> None:
    """Serve until SIGTERM / SIGINT, then drain (see the module docstring)."""
    make_server(engine, **kw).run()


try:
    import uvicorn as _uvicorn

    _Base = _uvicorn.Server
except ImportError:  # pragma: no cover - serve's dependencies are an extra
    _Base = object


class _DrainingServer(_Base):
    def __init__(self, config, state):
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        if not self._state.draining:
            log.info("signal %s: draining %d request(s) in flight, then exiting", sig, self._state.inflight)
        self._state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn >= 0.29 re-raises a captured signal once it has shut down, so the process would
        # die of it (status -15) after a clean drain; a drained server exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
