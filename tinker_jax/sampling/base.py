"""What the JAX and vLLM samplers share: the background-thread lifecycle (start once, no restart after stop,
context manager) and the synchronous conveniences built on `submit`. Subclasses provide `submit`, `_run`
(the loop), `stop`, and the `_cv` / `_stopping` / `_thread` state."""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any, Sequence

from tinker import types

from tinker_jax.errors import UserError
from tinker_jax.sampling.params import RequestSpec, validate_request


_STARTED: "weakref.WeakSet[SamplerBase]" = weakref.WeakSet()  # samplers whose own thread runs
_AT_EXIT = threading.Lock()
_registered = False


def _track(sampler: "SamplerBase") -> None:
    global _registered
    with _AT_EXIT:
        if not _registered:  # on the first start, not at import
            atexit.register(_stop_started_samplers)
            _registered = True
        _STARTED.add(sampler)


def _stop_started_samplers() -> None:
    """At interpreter exit: stop every sampler thread still running. A daemon thread left inside an XLA call while
    the interpreter and the runtime tear down aborted the process (SIGABRT, "terminate called ...") when a script
    ended with samples in flight; stopped here, in-flight requests fail with "sampler: stopped" instead."""
    for sampler in list(_STARTED):
        try:
            sampler.stop(timeout=30)
        except Exception:  # noqa: BLE001 - exiting: one sampler's failure must not keep the others running
            pass


class SamplerBase:
    _thread_name = "tinker-jax-sampler"

    def start(self):
        with self._cv:
            if self._stopping:
                raise RuntimeError("sampler: stopped; build a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
                _track(self)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _request(self, uid: int, prompt_tokens: Sequence[int], params: types.SamplingParams, num_samples: int,
                 include_prompt_logprobs: bool, topk_prompt_logprobs: int,
                 sequence_ids: Sequence[str] | None, topk_sample_logprobs: int = 0,
                 target_prompt_logprobs: Any = None, prompt_alt_tokens_k: int = 0) -> tuple[RequestSpec, list[str]]:
        """A request's validated spec and its sequence ids (default "<uid>:<i>"); ValueError naming the field.
        Subclasses provide `limits` and `eos_token_ids`."""
        spec = validate_request(prompt_tokens, params, num_samples, include_prompt_logprobs, topk_prompt_logprobs,
                                limits=self.limits, eos_token_ids=self.eos_token_ids,
                                topk_sample_logprobs=topk_sample_logprobs,
                                target_prompt_logprobs=target_prompt_logprobs,
                                prompt_alt_tokens_k=prompt_alt_tokens_k)
        ids = [f"{uid}:{i}" for i in range(spec.num_samples)] if sequence_ids is None else list(sequence_ids)
        if len(ids) != spec.num_samples:
            raise UserError(f"sequence_ids: {len(ids)} ids for num_samples={spec.num_samples}")
        return spec, ids

    def sample(self, snapshot: Any, prompt_tokens: Sequence[int], params: types.SamplingParams,
               num_samples: int = 1, include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               timeout: float | None = None) -> types.SampleResponse:
        """Synchronous `submit(...).result()`; raises the request's ValueError directly."""
        return self.submit(snapshot, prompt_tokens, params, num_samples, include_prompt_logprobs,
                           topk_prompt_logprobs).result(timeout)

    def compute_logprobs(self, snapshot: Any, prompt_tokens: Sequence[int],
                         timeout: float | None = None) -> list[float | None]:
        """Tinker's compute_logprobs: prompt logprobs of a max_tokens=1 request (§4.10); None first."""
        resp = self.sample(snapshot, prompt_tokens, types.SamplingParams(max_tokens=1, temperature=1.0), 1, True,
                           0, timeout)
        return resp.prompt_logprobs
