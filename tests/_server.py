"""A speech server on 127.0.0.1 for tests: ``make_server`` on a free port, run on a thread until
``/ready`` answers 200 (shared by the server tests and the bundle's streaming test)."""
import socket
import threading
import time

import httpx

from chatterbox_rt.serve import make_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, engine, **kw):
        self.port = _free_port()
        self.server = make_server(engine, host="127.0.0.1", port=self.port, log_level="warning",
                                  close_engine=False, **kw)
        self.state = self.server.config.app.state.chatterbox
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise TimeoutError("server not ready")
            time.sleep(0.1)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
