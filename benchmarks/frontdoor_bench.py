"""Front-door overhead: one forward_backward round trip through the real tinker SDK and the REST server (uvicorn
on 127.0.0.1, `server.app.build_app(engine, settings)`) against the same call through tinker_jax.ServiceClient
in-process, on the same engine, model shape and data.

The server runs in a thread of this process (so the SDK, the server and the engine share the GIL: a conservative
setting). Remote and in-process calls alternate, so load from other processes hits both alike. Figures are
milliseconds per call; the overhead is the difference of the two medians.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks.data import datums
from benchmarks.timing import Stat

API_KEY = "tml-bench"


def unavailable_reason() -> str | None:
    """Why the REST front door cannot be benchmarked in this environment (None: it can)."""
    try:
        import tinker  # noqa: F401
        import uvicorn  # noqa: F401

        from server.app import build_app  # noqa: F401
        from server.settings import ServerSettings  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"unavailable: cannot import the REST server or SDK ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def serve(engine, data_dir: Path) -> Iterator[str]:
    """uvicorn with build_app(engine, settings) on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    from server.app import build_app
    from server.settings import ServerSettings

    settings = ServerSettings(data_dir=data_dir)
    app = build_app(engine, settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def measure_frontdoor(sc, base_model: str, tokens: np.ndarray, data_dir: Path, *, lora_rank: int, warmup: int,
                      repeats: int) -> dict[str, Stat]:
    """-> {"rest": ms per call via SDK + REST, "in_process": ms per call via tinker_jax.ServiceClient}."""
    import tinker

    data = datums(tokens)
    local = sc.create_lora_training_client(base_model, rank=lora_rank, seed=0, train_unembed=False)
    out: dict[str, list[float]] = {"rest": [], "in_process": []}
    with serve(sc.engine, data_dir) as url:
        client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        remote = client.create_lora_training_client(base_model=base_model, rank=lora_rank, seed=0,
                                                    train_unembed=False)
        remote = remote.result() if hasattr(remote, "result") else remote  # SDK >= 0.3x returns a future
        try:
            for i in range(warmup + repeats):
                for key, tc in (("rest", remote), ("in_process", local)):
                    t0 = time.perf_counter()
                    tc.forward_backward(data, "cross_entropy").result()
                    ms = (time.perf_counter() - t0) * 1e3
                    if i >= warmup:
                        out[key].append(ms)
        finally:
            with contextlib.suppress(Exception):
                client.close("success").result(timeout=10)
            sc.engine.unload_model(local.model_id)
    return {k: Stat(v) for k, v in out.items()}
