"""uvicorn serving an app on a loopback port, in a thread of the test process (the real HTTP stack)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn


@contextlib.contextmanager
def uvicorn_thread(app: Any, port: int = 0, start_timeout_s: float = 20.0) -> Iterator[int]:
    """Serve `app` (lifespan on) on 127.0.0.1:`port` (0: a free one) until the block ends; yields the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
