"""The background-thread lifecycle shared by the samplers: start once, refuse to restart after stop, and use as
a context manager. Subclasses provide `_run` (the loop), `stop`, and the `_cv` / `_stopping` / `_thread` state."""

from __future__ import annotations

import threading


class BackgroundLoop:
    _thread_name = "tinker-jax-sampler"

    def start(self):
        with self._cv:
            if self._stopping:
                raise RuntimeError("sampler: stopped; build a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
