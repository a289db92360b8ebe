"""The one contract between the engine and its front doors (tinker_jax.client and the REST server).

Front doors call only these methods and read only these types; they never reach into engine internals. Methods
that do work return `concurrent.futures.Future`s of `tinker.types` objects; lookups return small dataclasses.
Errors follow tinker_jax.errors: `UserError` (the caller's mistake, naming the field), `Overloaded` (a bounded
queue is full; retry), anything else is the engine's fault.

`tenant` is who a request counts against for fairness and queue bounds (a REST session id; in process, one
tenant). `owner` is who a run belongs to (the REST server's API-key tag), stored with the run.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import tinker.types as tt

from tinker_jax.training.optim import AdamHP, DimuonHP


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    base_model: str
    lora_rank: int | None  # None: full fine-tuning
    created: float
    last_request: float | None
    owner: str | None
    user_metadata: dict

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None


@dataclass(frozen=True)
class CheckpointInfo:
    path: str  # tinker://run/kind/name
    run_id: str
    kind: str  # "weights" (training checkpoint) | "sampler_weights" | "external_weights" (HF files, download only)
    name: str
    created: float
    size_bytes: int | None
    public: bool
    expires: float | None
    step: int | None
    user_metadata: dict


@runtime_checkable
class EngineAPI(Protocol):
    # --- discovery -----------------------------------------------------------------------------------------------
    def capabilities(self) -> list[str]: ...

    def tokenizer_path(self, base_model: str) -> Path: ...

    # --- training runs ---------------------------------------------------------------------------------------------
    def create_model(self, base_model: str, *, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
                     train_attn: bool = True, train_unembed: bool = True, full_finetune: bool | None = None,
                     model_id: str | None = None, user_metadata: dict | None = None, owner: str | None = None,
                     tenant: str | None = None, optimizer: Any = None
                     ) -> Future: ...  # -> model_id; optimizer: training.optim.optimizer_kind's input

    def create_model_from_state(self, path: str, optimizer: bool, *, model_id: str | None = None,
                                base_model: str | None = None, user_metadata: dict | None = None,
                                owner: str | None = None, tenant: str | None = None, optimizer_config: Any = None
                                ) -> Future: ...  # -> tt.LoadWeightsResponse

    def unload_model(self, model_id: str, *, tenant: str | None = None) -> Future: ...

    def get_info(self, model_id: str) -> tt.GetInfoResponse: ...

    def forward_backward(self, model_id: str, data: Sequence[tt.Datum], loss_fn: str,
                         loss_fn_config: dict | None = None, forward_only: bool = False, *,
                         tenant: str | None = None) -> Future: ...  # -> tt.ForwardBackwardOutput

    def optim_step(self, model_id: str, adam: AdamHP | DimuonHP | Any, *, tenant: str | None = None
                   ) -> Future: ...  # -> tt.OptimStepResponse; AdamParams or DimuonParams, as the run's optimizer

    def save_state(self, model_id: str, name: str, ttl_seconds: int | None = None, user_metadata=None, *,
                   overwrite: bool = True, tenant: str | None = None) -> Future: ...  # -> tt.SaveWeightsResponse

    def load_state(self, model_id: str, path: str, optimizer: bool, *, tenant: str | None = None
                   ) -> Future: ...  # -> tt.LoadWeightsResponse

    def save_weights_for_sampler(self, model_id: str, name: str | None, ttl_seconds: int | None = None,
                                 user_metadata=None, *, tenant: str | None = None, sampler: bool = True
                                 ) -> Future: ...  # -> (tinker path or None, sampler id or None)

    def save_weights_external(self, model_id: str, name: str, ttl_seconds: int | None = None, user_metadata=None,
                              *, tenant: str | None = None) -> Future: ...  # -> (tinker path, size in bytes)

    # --- sampling ------------------------------------------------------------------------------------------------
    def create_sampler(self, model_path: str | None = None, base_model: str | None = None, *,
                       tenant: str | None = None) -> str: ...

    def release_sampler(self, sampler_id: str) -> None: ...

    def sampler_base_model(self, sampler_id: str) -> str: ...

    def sample(self, sampler_id: str, prompt: tt.ModelInput, num_samples: int, sampling_params: tt.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
               tenant: str | None = None, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: tt.TensorData | None = None,
               prompt_alt_tokens_k: int = 0, record_stability_info: bool = False,
               sequence_ids: Sequence[str] | None = None) -> Future: ...  # -> tt.SampleResponse

    # --- runs and checkpoints on record ------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> RunInfo | None: ...

    def list_runs(self) -> list[RunInfo]: ...  # newest first

    def get_checkpoint(self, path: str) -> CheckpointInfo | None: ...

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]: ...  # newest first

    def weights_info(self, path: str) -> dict: ...

    def copy_checkpoint(self, source: str, run_id: str, *, owner: str | None, ttl_seconds: int | None = None
                        ) -> str: ...  # SDK copy_weights: a new run holding the checkpoint (shared files)

    def checkpoint_files(self, path: str) -> dict[str, int]: ...  # relative file name -> bytes; NotFound if none

    def checkpoint_file(self, path: str, name: str) -> Path: ...  # one listed file's location; NotFound otherwise

    def checkpoint_archive(self, path: str) -> Path: ...  # a tar of the checkpoint's files (cached)

    def set_checkpoint_public(self, path: str, public: bool) -> None: ...

    def set_checkpoint_ttl(self, path: str, ttl_seconds: int | None) -> None: ...

    def delete_checkpoint(self, path: str, *, tenant: str | None = None) -> Future: ...  # -> bool (it existed)

    def expire_checkpoints(self) -> list[str]: ...  # deletes submitted (now) for checkpoints past their TTL

    def storage_usage(self, owner: str | None) -> tuple[int, int]: ...  # (checkpoints, bytes) on disk of `owner`

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def health(self) -> dict: ...  # {"ok": bool, "problems": [str]}: the registry answers, no worker is dead

    def stats(self) -> dict: ...

    def shutdown(self) -> None: ...
