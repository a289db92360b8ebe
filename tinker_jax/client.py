"""The direct, in-process Python API: the official SDK's class and method names over the local engine.

A Tinker script runs here by changing only the line that builds the ServiceClient:
    service_client = tinker_jax.ServiceClient()          # instead of tinker.ServiceClient()
Every call returns a future with `.result()` (and that can be awaited); every `*_async` twin is a
coroutine returning the same future, as in the SDK (SamplingClient's `sample_async` and `compute_logprobs_async`
return the result itself, as there; the `create_*` calls return the client, which is also its own finished future).
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import tinker.types as tt

from tinker_jax.api_future import APIFuture, ClientFuture, done_future, retrying
from tinker_jax.config import EngineConfig
from tinker_jax.engine.api import EngineAPI
from tinker_jax.errors import Stopped, UserError
from tinker_jax.futures import failed, then
from tinker_jax.rest_client import RestClient
from tinker_jax.sampling.response import last_n_mask

log = logging.getLogger(__name__)
EXPIRE_EVERY_S = 60.0  # how often an in-process engine deletes the checkpoints past their TTL (the server's prune)


def _expire_forever(engine_ref, stop: threading.Event) -> None:
    """Submit deletes for the checkpoints past their TTL now, then every EXPIRE_EVERY_S, until `stop` (or the engine
    is gone)."""
    while not stop.is_set():
        engine = engine_ref()
        if engine is None:
            return
        try:
            engine.expire_checkpoints()
        except Stopped:  # shut down by someone else than close()
            return
        except Exception:  # noqa: BLE001 - the next pass tries again
            if not stop.is_set():  # not a pass that close() interrupted
                log.exception("deleting the checkpoints past their TTL failed")
        del engine
        stop.wait(EXPIRE_EVERY_S)


class ServiceClient:
    """In-process counterpart of `tinker.ServiceClient`.

    data_dir: where checkpoints and the run registry live (default: per-user, see config.default_data_dir).
    config: a YAML file from configs/ (models, mesh, dtype, sampler), or an EngineConfig.
    """

    def __init__(self, data_dir: str | Path | None = None, config: str | Path | EngineConfig | None = None,
                 engine: EngineAPI | None = None):
        if engine is None:
            from tinker_jax.engine.core import Engine

            cfg = config if isinstance(config, EngineConfig) else EngineConfig.load(config)
            if data_dir is not None:
                from dataclasses import replace

                cfg = replace(cfg, data_dir=Path(data_dir))
            engine = Engine(cfg)
        self.engine = engine
        # Checkpoints past their TTL: the REST server deletes them on a timer; in process this client does. Not on
        # several processes, where every process must submit the same requests in the same order (a timer would
        # not): there the job's REST server, or a later one-process run, deletes them (listings hide them at once).
        self._stop_expiry = threading.Event()
        if getattr(engine, "procs", None) is None:
            threading.Thread(target=_expire_forever, args=(weakref.ref(engine), self._stop_expiry), daemon=True,
                             name="tinker-jax-ttl").start()

    def get_server_capabilities(self) -> tt.GetServerCapabilitiesResponse:
        return tt.GetServerCapabilitiesResponse(
            supported_models=[{"model_name": m} for m in self.engine.capabilities()])

    async def get_server_capabilities_async(self):
        return self.get_server_capabilities()

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None, optimizer=None) -> "TrainingClient":
        mid = retrying(lambda: self.engine.create_model(
            base_model, rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
            train_unembed=train_unembed, full_finetune=False, user_metadata=user_metadata,
            optimizer=optimizer)).result()
        return TrainingClient(self, mid)

    async def create_lora_training_client_async(self, *args, **kwargs) -> "TrainingClient":
        return self.create_lora_training_client(*args, **kwargs)

    def create_full_training_client(self, base_model: str, seed: int | None = None) -> "TrainingClient":
        """Full-parameter fine-tuning (not in the hosted SDK; also reachable via config `full_finetune: true`)."""
        return TrainingClient(self, retrying(lambda: self.engine.create_model(
            base_model, seed=seed, full_finetune=True)).result())

    # weights_access_token: the SDK's parameter, accepted and unused (local checkpoints). optimizer: the new run's
    # (default: the one its checkpoint records).
    def create_training_client_from_state(self, path: str, base_model: str | None = None, user_metadata=None,
                                          weights_access_token=None, optimizer=None) -> "TrainingClient":
        resp = retrying(lambda: self.engine.create_model_from_state(
            path, False, base_model=base_model, user_metadata=user_metadata, optimizer_config=optimizer)).result()
        return TrainingClient(self, resp.model_id)

    async def create_training_client_from_state_async(self, path: str, base_model: str | None = None,
                                                      user_metadata=None, weights_access_token=None, optimizer=None):
        return self.create_training_client_from_state(path, base_model, user_metadata, weights_access_token,
                                                      optimizer)

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None,
                                                         user_metadata=None, weights_access_token=None
                                                         ) -> "TrainingClient":
        resp = retrying(lambda: self.engine.create_model_from_state(
            path, True, base_model=base_model, user_metadata=user_metadata)).result()
        return TrainingClient(self, resp.model_id)

    async def create_training_client_from_state_with_optimizer_async(self, path: str, base_model: str | None = None,
                                                                     user_metadata=None, weights_access_token=None):
        return self.create_training_client_from_state_with_optimizer(path, base_model, user_metadata,
                                                                     weights_access_token)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config=None, record_stability_info: bool = False) -> "SamplingClient":
        return SamplingClient(self, self.engine.create_sampler(model_path=model_path, base_model=base_model),
                              record_stability_info)

    async def create_sampling_client_async(self, *args, **kwargs) -> "SamplingClient":
        return self.create_sampling_client(*args, **kwargs)

    def create_rest_client(self) -> RestClient:
        """The training runs and checkpoints of this engine, as the SDK's RestClient reads them
        (`tinker_jax.RestClient`)."""
        return RestClient(self)

    def close(self, status: str | None = None, detail: str | None = None) -> APIFuture[None]:
        """End the session: the engine stops (checkpoint writes in flight finish). `status` ("success", "errored",
        "interrupted") and `detail` are the SDK's, accepted for its scripts (nothing records them in process)."""
        self._stop_expiry.set()
        self.engine.shutdown()
        return done_future(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrainingClient(ClientFuture):
    def __init__(self, service: ServiceClient, model_id: str):
        self.service, self.model_id = service, model_id
        self.engine = service.engine

    def forward(self, data: list[tt.Datum], loss_fn: str, loss_fn_config=None) -> APIFuture[tt.ForwardBackwardOutput]:
        return APIFuture(retrying(lambda: self.engine.forward_backward(self.model_id, data, loss_fn,
                                                                         loss_fn_config, True)))

    def forward_backward(self, data: list[tt.Datum], loss_fn: str,
                         loss_fn_config=None) -> APIFuture[tt.ForwardBackwardOutput]:
        return APIFuture(retrying(lambda: self.engine.forward_backward(self.model_id, data, loss_fn,
                                                                         loss_fn_config, False)))

    def forward_backward_custom(self, data: list[tt.Datum], loss_fn, *, loss_type_input=None
                                ) -> APIFuture[tt.ForwardBackwardOutput]:
        """A client-side loss over logprobs, as the SDK does it: a forward pass for logprobs, the user's loss
        in torch, then cross_entropy with weights = -dLoss/dlogprob (float, possibly negative)."""
        try:
            return done_future(self._forward_backward_custom(data, loss_fn))
        except ValueError as e:  # through the future, as the SDK's
            return APIFuture(failed(e))

    def _forward_backward_custom(self, data: list[tt.Datum], loss_fn) -> tt.ForwardBackwardOutput:
        import torch

        for i, d in enumerate(data):
            if "target_tokens" not in d.loss_fn_inputs:
                raise UserError(f"datum[{i}].loss_fn_inputs: missing ['target_tokens'] (forward_backward_custom "
                                "computes the logprobs of the targets)")
        ce_data = [tt.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "weights": d.loss_fn_inputs.get("weights") or tt.TensorData.from_numpy(
                np.zeros(np.asarray(d.loss_fn_inputs["target_tokens"].data).shape, np.float32))}) for d in data]
        fwd = self.forward(ce_data, "cross_entropy").result()
        logprobs = [torch.tensor(np.asarray(o["logprobs"].data, np.float32).reshape(o["logprobs"].shape),
                                 requires_grad=True) for o in fwd.loss_fn_outputs]
        loss, metrics = loss_fn(data, logprobs)
        loss.backward()
        for i, lp in enumerate(logprobs):
            if lp.grad is None:  # the SDK's check: the loss did not use this datum's logprobs
                raise UserError(f"loss_fn: no gradient reached the logprobs of datum[{i}] (the loss must use every "
                                "datum's logprobs; multiply by 0 to leave one out)")
        weighted = [tt.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"],
            "weights": tt.TensorData.from_numpy(-lp.grad.numpy().astype(np.float32))})
            for d, lp in zip(data, logprobs)]
        out = self.forward_backward(weighted, "cross_entropy").result()
        surrogate = out.metrics.pop("loss:sum")
        out.metrics.update({**{k: float(v) for k, v in (metrics or {}).items()}, "loss:sum": float(loss.detach()),
                            "surrogate_loss:sum": surrogate})
        return out

    def optim_step(self, optim_params: tt.AdamParams | tt.DimuonParams | None = None, *,
                   adam_params: tt.AdamParams | None = None) -> APIFuture[tt.OptimStepResponse]:
        params = optim_params or adam_params or tt.AdamParams()
        return APIFuture(retrying(lambda: self.engine.optim_step(self.model_id, params)))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata=None) -> APIFuture[tt.SaveWeightsResponse]:
        return APIFuture(retrying(lambda: self.engine.save_state(self.model_id, name, ttl_seconds, user_metadata,
                                                                  overwrite=overwrite)))

    def load_state(self, path: str, weights_access_token=None) -> APIFuture[tt.LoadWeightsResponse]:
        return APIFuture(retrying(lambda: self.engine.load_state(self.model_id, path, False)))

    def load_state_with_optimizer(self, path: str, weights_access_token=None) -> APIFuture[tt.LoadWeightsResponse]:
        return APIFuture(retrying(lambda: self.engine.load_state(self.model_id, path, True)))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata=None) -> APIFuture[tt.SaveWeightsForSamplerResponse]:
        return APIFuture(retrying(lambda: self.engine.save_weights_for_sampler(self.model_id, name, ttl_seconds,
                                                                                 user_metadata, sampler=False)),
                         lambda r: tt.SaveWeightsForSamplerResponse(path=r[0]))

    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None, *, user_metadata=None
                              ) -> APIFuture[tt.SaveWeightsExternalResponse]:
        """Hugging Face files of the weights (a PEFT adapter for LoRA, a merged model for full fine-tuning) as
        tinker://<run>/external_weights/<name>; `engine.checkpoint_files` / `checkpoint_file` find them on disk.
        Encrypted exports (`age_encryption_recipients`) are refused, never written in the clear."""
        if age_encryption_recipients:
            raise UserError("age_encryption_recipients: encrypted exports are not supported by tinker_jax")
        return APIFuture(retrying(lambda: self.engine.save_weights_external(self.model_id, name, ttl_seconds,
                                                                              user_metadata)),
                         lambda r: tt.SaveWeightsExternalResponse(path=r[0]))

    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config=None,
                                             record_stability_info: bool = False, kind="snapshot") -> "SamplingClient":
        _, sampler_id = retrying(lambda: self.engine.save_weights_for_sampler(self.model_id, None)).result()
        return SamplingClient(self.service, sampler_id, record_stability_info)

    def create_sampling_client(self, model_path: str, retry_config=None,
                               record_stability_info: bool = False) -> "SamplingClient":
        return self.service.create_sampling_client(model_path=model_path, record_stability_info=record_stability_info)

    def get_info(self) -> tt.GetInfoResponse:
        return self.engine.get_info(self.model_id)

    def get_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.engine.tokenizer_path(self.get_info().model_name)))

    # The SDK's async twins: coroutines that return the same future.
    async def forward_async(self, *a, **k): return self.forward(*a, **k)
    async def forward_backward_async(self, *a, **k): return self.forward_backward(*a, **k)
    async def forward_backward_custom_async(self, *a, **k): return self.forward_backward_custom(*a, **k)
    async def optim_step_async(self, *a, **k): return self.optim_step(*a, **k)
    async def save_state_async(self, *a, **k): return self.save_state(*a, **k)
    async def load_state_async(self, *a, **k): return self.load_state(*a, **k)
    async def load_state_with_optimizer_async(self, *a, **k): return self.load_state_with_optimizer(*a, **k)
    async def save_weights_for_sampler_async(self, *a, **k): return self.save_weights_for_sampler(*a, **k)
    async def save_weights_external_async(self, *a, **k): return self.save_weights_external(*a, **k)
    async def save_weights_and_get_sampling_client_async(self, *a, **k):
        return self.save_weights_and_get_sampling_client(*a, **k)
    async def create_sampling_client_async(self, *a, **k): return self.create_sampling_client(*a, **k)
    async def get_info_async(self): return self.get_info()


class SamplingClient(ClientFuture):
    def __init__(self, service: ServiceClient, sampler_id: str, record_stability_info: bool = False):
        self.service, self.sampler_id = service, sampler_id
        self.engine = service.engine
        self.record_stability_info = bool(record_stability_info)  # every sample recorded for stable_reinforce
        # The engine keeps the sampler's weights (an adapter copy, or a whole model's for full fine-tuning) until
        # released: an RL loop makes a sampler per step and simply drops the old one.
        weakref.finalize(self, service.engine.release_sampler, sampler_id)

    def sample(self, prompt: tt.ModelInput, num_samples: int, sampling_params: tt.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: tt.TensorData | None = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None) -> APIFuture[tt.SampleResponse]:
        # prompt.length only with last_n: on a prompt the engine refuses (an image chunk) it raises the SDK's error
        post = None if prompt_logprobs_last_n is None else last_n_mask(
            prompt_logprobs_last_n, prompt.length, bool(include_prompt_logprobs or topk_prompt_logprobs))
        return APIFuture(retrying(lambda: self.engine.sample(self.sampler_id, prompt, num_samples, sampling_params,
                                                               include_prompt_logprobs, topk_prompt_logprobs,
                                                               topk_sample_logprobs=topk_sample_logprobs,
                                                               target_prompt_logprobs=target_prompt_logprobs,
                                                               prompt_alt_tokens_k=prompt_alt_tokens_k,
                                                               record_stability_info=self.record_stability_info)),
                         post)

    async def sample_async(self, prompt: tt.ModelInput, num_samples: int, sampling_params: tt.SamplingParams,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
                           topk_sample_logprobs: int = 0, target_prompt_logprobs: tt.TensorData | None = None,
                           prompt_alt_tokens_k: int = 0, prompt_logprobs_last_n: int | None = None
                           ) -> tt.SampleResponse:
        """The response itself (the SDK's sample_async awaits for you)."""
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                                 topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k,
                                 prompt_logprobs_last_n)

    def compute_logprobs(self, prompt: tt.ModelInput, prompt_logprobs_last_n: int | None = None
                         ) -> APIFuture[Sequence[float | None]]:
        post = last_n_mask(prompt_logprobs_last_n, prompt.length, True)
        fut = retrying(lambda: self.engine.sample(self.sampler_id, prompt, 1, tt.SamplingParams(max_tokens=1),
                                                   True, 0))
        return APIFuture(fut if post is None else then(fut, post), lambda r: r.prompt_logprobs)

    async def compute_logprobs_async(self, prompt: tt.ModelInput, prompt_logprobs_last_n: int | None = None
                                     ) -> Sequence[float | None]:
        """The logprobs themselves (as the SDK's)."""
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    def get_base_model(self) -> str:
        return self.engine.sampler_base_model(self.sampler_id)

    def get_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.engine.tokenizer_path(self.get_base_model())))
