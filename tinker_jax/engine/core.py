"""The engine: one core behind both front doors (tinker_jax.ServiceClient and the REST server).

It owns base models, training models (TrainStates), sampler snapshots and the run/checkpoint registry.
Training requests run on one worker thread in submission order, so a script may submit forward_backward
and optim_step back to back; sampling runs on the sampler's own thread. Every method takes and returns
`tinker.types` objects (or futures of them); arrays stay inside.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tinker.types as tt
from flax import nnx

from tinker_jax.engine import checkpoints as checkpoint
from tinker_jax.training import step as train
from tinker_jax.training.batching import build_batches, datum_tokens
from tinker_jax.config import EngineConfig
from tinker_jax.models.lora import LoraSpec
from tinker_jax.training.losses import resolve_config
from tinker_jax.models.decoder import Decoder, probe_attention
from tinker_jax.hf.weights import init_lora_state, load_decoder
from tinker_jax.engine.registry import Registry, TinkerPath, check_name
from tinker_jax.models.sharding import batch_sharding, make_mesh, state_shardings

log = logging.getLogger("tinker_jax.engine")


class NotFound(ValueError):
    """An unknown model, sampler, checkpoint or base model (a user error)."""


@dataclass
class BaseModel:
    name: str
    path: Path
    cfg: Any
    decoder: Decoder  # base weights (no LoRA); LoRA runs share its arrays
    attention: str = "einsum"  # the training attention kernel for this model (EngineConfig.attention, probed)


@dataclass
class Snapshot:
    """Immutable weights for sampling: the graph, the base weights and a private copy of the trained ones."""

    base: BaseModel
    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State
    path: str | None = None

    def model(self) -> Decoder:
        return train.merge_model(self.graphdef, self.trainable, self.frozen)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(self.data_dir / "engine.db", self.data_dir)
        if config.sampler.backend == "vllm":  # fail at start, not on the first sample request
            from tinker_jax.sampling.vllm_backend import require_vllm

            require_vllm()
        if config.compile_cache:
            enable_compile_cache(self.data_dir / "jax_cache")
        self.mesh = make_mesh(config.mesh) if config.mesh.size > 1 else None
        self.attention = config.training_attention(jax.default_backend())
        if self.attention == "cudnn" and (jax.default_backend() != "gpu" or config.dtype != "bfloat16"):
            raise ValueError(f"config.attention: cudnn needs a GPU and dtype bfloat16 (backend "
                             f"{jax.default_backend()!r}, dtype {config.dtype!r}); use auto or einsum")
        self._bases: dict[str, BaseModel] = {}
        self._models: dict[str, train.TrainState] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._samplers: dict[str, Any] = {}  # base model name -> Sampler
        self._lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._run, name="tinker-jax-train", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ plumbing
    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - delivered to the caller through the future
                if not isinstance(e, ValueError):
                    log.exception("engine request failed")
                fut.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the training worker after everything submitted before it."""
        fut: Future = Future()
        self._queue.put((fut, fn))
        return fut

    def shutdown(self):
        self._queue.put(None)
        self._worker.join(timeout=30)
        for s in self._samplers.values():
            s.stop()

    # ------------------------------------------------------------------------------------------ models
    def capabilities(self) -> list[str]:
        return list(self.config.models)

    def base(self, name: str) -> BaseModel:
        with self._lock:
            if name in self._bases:
                return self._bases[name]
            path = self.config.models.get(name)
            if path is None and (Path(name) / "config.json").is_file():
                path = name  # a local HF directory named by its path
            if path is None:
                raise NotFound(f"base_model: unknown model {name!r}; served: {', '.join(self.config.models)}")
            dtype = jnp.bfloat16 if self.config.dtype == "bfloat16" else jnp.float32
            shard = (lambda st: state_shardings(st, self.mesh)) if self.mesh is not None else None
            dec = load_decoder(path, dtype=dtype, shardings_fn=shard)
            self._bases[name] = BaseModel(name, Path(path), dec.cfg, dec, self._attention_for(dec.cfg))
            return self._bases[name]

    def _attention_for(self, cfg) -> str:
        """The configured kernel; under `auto`, cuDNN only after a small probe with this model's head layout
        compiles and runs, so a GPU whose cuDNN lacks the kernel trains with einsum instead of failing."""
        if self.attention != "cudnn" or self.config.attention == "cudnn":
            return self.attention
        why = probe_attention("cudnn", cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        if why:
            log.warning("attention: cuDNN flash attention unavailable (%s); training uses einsum attention", why)
            return "einsum"
        return "cudnn"

    def _new_decoder(self, base: BaseModel, lora: LoraSpec | None) -> Decoder:
        """A decoder over the shared base arrays, with freshly initialised (seeded) adapters."""
        if lora is None:  # full fine-tuning trains its own fp32 copy of every weight
            return nnx.merge(*nnx.split(base.decoder))  # TrainState.create copies the weights to fp32
        param_dtype = jax.tree.leaves(nnx.state(base.decoder))[0].dtype
        make = lambda: Decoder(base.cfg, rngs=nnx.Rngs(0), lora=lora, dtype=base.decoder.dtype,
                               param_dtype=param_dtype)
        graphdef, _, _ = nnx.split(nnx.eval_shape(make), nnx.LoRAParam, ...)
        # One compiled initialiser per adapter shape, shared with load_decoder; the seed enters as a key.
        lora_state = init_lora_state(base.cfg, lora, param_dtype, base.decoder.dtype)
        if self.mesh is not None:
            lora_state = jax.device_put(lora_state, state_shardings(lora_state, self.mesh))
        return nnx.merge(graphdef, lora_state, nnx.state(base.decoder))

    def create_model(self, base_model: str, *, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
                     train_attn: bool = True, train_unembed: bool = True, full_finetune: bool | None = None,
                     model_id: str | None = None, user_metadata: dict | None = None) -> str:
        full = self.config.full_finetune if full_finetune is None else full_finetune
        seed = int(seed) if seed is not None else int(np.random.randint(0, 2**31 - 1))
        lora = None if full else LoraSpec(rank=int(rank), train_attn=train_attn, train_mlp=train_mlp,
                                          train_unembed=train_unembed, seed=seed)
        base = self.base(base_model)
        model_id = check_name(model_id or f"run-{uuid.uuid4().hex[:12]}", "model_id")
        state = train.TrainState.create(self._new_decoder(base, lora), full_finetune=full, meta={
            "base_model": base_model, "lora_rank": None if full else int(rank), "train_attn": train_attn,
            "train_mlp": train_mlp, "train_unembed": train_unembed, "full_finetune": full, "seed": seed})
        with self._lock:
            if model_id in self._models:
                raise ValueError(f"model_id: {model_id!r} already exists")
            self._models[model_id] = state
        self.registry.add_run(model_id, base_model, lora_rank=state.meta["lora_rank"], train_attn=train_attn,
                              train_mlp=train_mlp, train_unembed=train_unembed, full_finetune=full, seed=seed,
                              user_metadata=user_metadata)
        return model_id

    def model(self, model_id: str) -> train.TrainState:
        st = self._models.get(model_id)
        if st is None:
            raise NotFound(f"model_id: unknown model {model_id!r}")
        return st

    def unload_model(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)

    def get_info(self, model_id: str) -> tt.GetInfoResponse:
        st = self.model(model_id)
        m = st.meta
        base = self.base(m["base_model"])
        return tt.GetInfoResponse(
            model_id=model_id, model_name=m["base_model"], is_lora=not m["full_finetune"],
            lora_rank=m["lora_rank"],
            model_data=tt.get_info_response.ModelData(arch=base.cfg.architecture, model_name=m["base_model"],
                                                      tokenizer_id=str(base.path)))

    def tokenizer_path(self, base_model: str) -> Path:
        return self.base(base_model).path

    # ------------------------------------------------------------------------------------------ training
    def _sharding_fn(self):
        if self.mesh is None:
            return None
        sh = batch_sharding(self.mesh, 2)
        return lambda batch: sh

    def forward_backward(self, model_id: str, data: list[tt.Datum], loss_fn: str,
                         loss_fn_config: dict | None = None, forward_only: bool = False) -> Future:
        def op():
            st = self.model(model_id)
            base = self.base(st.meta["base_model"])
            config = resolve_config(loss_fn, loss_fn_config)
            rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"] if self.mesh is not None else 1
            batches = build_batches(data, loss_fn, vocab_size=base.cfg.vocab_size,
                                    max_len=min(base.cfg.max_position_embeddings, self.config.max_seq_len),
                                    max_tokens_per_batch=self.config.max_tokens_per_batch, row_multiple=rows)
            lps, metrics = train.forward_backward(st, batches, loss_fn, config, forward_only=forward_only,
                                                  sharding_fn=self._sharding_fn(), remat=self.config.remat,
                                                  attention=base.attention)
            self.registry.touch_run(model_id)
            return tt.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{"logprobs": tt.TensorData.from_numpy(np.asarray(lp, np.float32))} for lp in lps],
                metrics=metrics)
        return self.submit(op)

    def optim_step(self, model_id: str, adam: tt.AdamParams) -> Future:
        def op():
            metrics = train.optim_step(self.model(model_id), learning_rate=adam.learning_rate, beta1=adam.beta1,
                                       beta2=adam.beta2, eps=adam.eps, weight_decay=adam.weight_decay,
                                       grad_clip_norm=getattr(adam, "grad_clip_norm", 0.0) or 0.0)
            return tt.OptimStepResponse(metrics=metrics)
        return self.submit(op)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save(self, model_id: str, kind: str, name: str, ttl_seconds=None, user_metadata=None) -> TinkerPath:
        st = self.model(model_id)
        p = TinkerPath(model_id, kind, check_name(name, "name"))
        d = checkpoint.save(self.registry.checkpoint_dir(p), st, kind=checkpoint_kind(kind),
                            with_optimizer=kind == "weights", meta=st.meta)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        self.registry.add_checkpoint(p, size_bytes=size, step=st.step, ttl_seconds=ttl_seconds,
                                     user_metadata=user_metadata)
        return p

    def save_state(self, model_id: str, name: str, ttl_seconds=None, user_metadata=None) -> Future:
        return self.submit(lambda: tt.SaveWeightsResponse(
            path=str(self._save(model_id, "weights", name, ttl_seconds, user_metadata))))

    def _meta_of(self, path: str) -> tuple[TinkerPath, dict]:
        p = TinkerPath.parse(path)
        d = checkpoint.recover(self.registry.checkpoint_dir(p))
        if not d.is_dir():
            raise NotFound(f"path: checkpoint {path} not found")
        return p, checkpoint.read_meta(d)

    def load_state(self, model_id: str, path: str, optimizer: bool) -> Future:
        def op():
            p, _ = self._meta_of(path)
            checkpoint.restore_into(self.registry.checkpoint_dir(p), self.model(model_id), with_optimizer=optimizer)
            return tt.LoadWeightsResponse(path=path, model_id=model_id)
        return self.submit(op)

    def create_model_from_state(self, path: str, optimizer: bool, model_id: str | None = None,
                                base_model: str | None = None, user_metadata: dict | None = None) -> Future:
        """New training model configured like the checkpoint's run (with the new run's own `user_metadata`), then
        loaded from it."""
        p, meta = self._meta_of(path)
        def op():
            mid = self.create_model(base_model or meta["base_model"], rank=meta.get("lora_rank") or 32,
                                    seed=meta.get("seed"), train_mlp=meta.get("train_mlp", True),
                                    train_attn=meta.get("train_attn", True),
                                    train_unembed=meta.get("train_unembed", True),
                                    full_finetune=meta.get("full_finetune", False), model_id=model_id,
                                    user_metadata=user_metadata)
            checkpoint.restore_into(self.registry.checkpoint_dir(p), self.model(mid), with_optimizer=optimizer)
            return tt.LoadWeightsResponse(path=path, model_id=mid)
        return self.submit(op)

    def weights_info(self, path: str) -> dict:
        _, meta = self._meta_of(path)
        return {"base_model": meta["base_model"], "is_lora": not meta.get("full_finetune", False),
                "lora_rank": meta.get("lora_rank"), "train_attn": meta.get("train_attn"),
                "train_mlp": meta.get("train_mlp"), "train_unembed": meta.get("train_unembed")}

    # ------------------------------------------------------------------------------------------ sampling
    def _snapshot_of(self, st: train.TrainState, path: str | None) -> Snapshot:
        # A private copy: later optim_steps (which donate their buffers) never touch a snapshot.
        trainable = train.commit(jax.tree.map(jnp.copy, st.trainable), like=st.trainable)
        return Snapshot(self.base(st.meta["base_model"]), st.graphdef, trainable, st.frozen, path)

    def save_weights_for_sampler(self, model_id: str, name: str | None, ttl_seconds=None,
                                 user_metadata=None) -> Future:
        """Snapshot the weights; with a name also write a sampler checkpoint. -> (path or None, sampler id)."""
        def op():
            st = self.model(model_id)
            path = str(self._save(model_id, "sampler_weights", name, ttl_seconds, user_metadata)) if name else None
            return path, self._register_snapshot(self._snapshot_of(st, path))
        return self.submit(op)

    def _register_snapshot(self, snap: Snapshot) -> str:
        sid = f"sampler-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._snapshots[sid] = snap
        return sid

    def create_sampler(self, model_path: str | None = None, base_model: str | None = None) -> str:
        if model_path:
            p, meta = self._meta_of(model_path)
            base = self.base(meta["base_model"])
            full = meta.get("full_finetune", False)
            lora = None if full else LoraSpec(rank=meta["lora_rank"], train_attn=meta["train_attn"],
                                              train_mlp=meta["train_mlp"], train_unembed=meta["train_unembed"])
            graphdef, trainable, frozen = train.split_model(self._new_decoder(base, lora), full)
            trainable = checkpoint.load_trainable(self.registry.checkpoint_dir(p), trainable)
            return self._register_snapshot(Snapshot(base, graphdef, trainable, frozen, model_path))
        if not base_model:
            raise ValueError("create_sampling_session: give model_path or base_model")
        base = self.base(base_model)
        graphdef, trainable = nnx.split(base.decoder, nnx.Param)
        return self._register_snapshot(Snapshot(base, graphdef, trainable, nnx.State({}), None))

    def release_sampler(self, sampler_id: str) -> None:
        """Forget a sampler snapshot (its session ended, or the server evicted it); samples already submitted
        keep their reference and finish."""
        with self._lock:
            self._snapshots.pop(sampler_id, None)

    def snapshot(self, sampler_id: str) -> Snapshot:
        snap = self._snapshots.get(sampler_id)
        if snap is None:
            raise NotFound(f"sampling_session_id: unknown sampler {sampler_id!r}")
        return snap

    def sampler_base_model(self, sampler_id: str) -> str:
        return self.snapshot(sampler_id).base.name

    def _sampler_for(self, base: BaseModel):
        from tinker_jax.sampling import make_sampler  # lazy: training-only users never build a sampler

        with self._lock:
            if base.name not in self._samplers:
                self._samplers[base.name] = make_sampler(base, self.config.sampler)
            return self._samplers[base.name]

    def sample(self, sampler_id: str, prompt: tt.ModelInput, num_samples: int, sampling_params: tt.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0) -> Future:
        try:
            snap = self.snapshot(sampler_id)
            tokens = datum_tokens(tt.Datum(model_input=prompt, loss_fn_inputs={}), 0)
            return self._sampler_for(snap.base).submit(snap, tokens, sampling_params, num_samples,
                                                       include_prompt_logprobs, topk_prompt_logprobs)
        except ValueError as e:
            fut: Future = Future()
            fut.set_exception(e)
            return fut


def enable_compile_cache(path: Path) -> None:
    """Persist compiled XLA programs so a restarted process skips recompiling the same step shapes."""
    if jax.config.jax_compilation_cache_dir:  # the process (or the user) already chose one
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def checkpoint_kind(kind: str) -> str:
    return "training" if kind == "weights" else "sampler"
