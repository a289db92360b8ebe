"""The training step: pure jitted functions over (trainable, frozen) NNX states, and the state they update.

forward_backward adds the gradient of the summed loss into an fp32 accumulator; optim_step applies AdamW
(optax, hyperparameters as traced inputs so a learning-rate schedule never recompiles) and zeroes it.
Everything that varies per call (loss config values, Adam hyperparameters, batch contents) is an array
argument; only the loss name and the bucketed shapes are static.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tinker_jax.training.batching import Batch
from tinker_jax.training.losses import get_loss
from tinker_jax.models.decoder import Decoder

# Trainable = adapters (LoRA) or every parameter (full fine-tuning); selected by variable type.
LORA_FILTER = nnx.LoRAParam
FROZEN_FILTER = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def split_model(model: Decoder, full_finetune: bool):
    """-> (graphdef, trainable, frozen)."""
    if full_finetune:
        graphdef, trainable = nnx.split(model, nnx.Param)
        return graphdef, trainable, nnx.State({})
    graphdef, trainable, frozen = nnx.split(model, LORA_FILTER, FROZEN_FILTER)
    return graphdef, trainable, frozen


def merge_model(graphdef, trainable, frozen) -> Decoder:
    return nnx.merge(graphdef, trainable, frozen) if len(frozen) else nnx.merge(graphdef, trainable)


def make_optimizer() -> optax.GradientTransformation:
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0)


def commit(tree, like=None):
    """Pin every array to a fixed placement: its own, or replicated over `like`'s mesh when it is not laid out on
    that mesh (e.g. the optimizer's step count). jit keys its cache on whether arguments are committed, and Orbax
    restores committed arrays (into the live arrays' shardings): a fresh state must be committed the same way,
    or every resume recompiles (or, on a mesh, mixes one-device and mesh arrays)."""
    meshes = [x.sharding.mesh for x in jax.tree.leaves(tree if like is None else like)
              if isinstance(x.sharding, jax.sharding.NamedSharding)]

    def put(x):
        s = x.sharding
        if meshes and s.device_set != set(meshes[0].devices.flat):
            s = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
        return jax.device_put(x, s)

    return jax.tree.map(put, tree)


@dataclass
class TrainState:
    """One Tinker training model: weights, optimizer state and the gradient accumulator (all fp32)."""

    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    grads: nnx.State  # sum of gradients since the last optim_step
    step: int = 0  # optimizer steps taken
    pending: int = 0  # forward_backward calls accumulated into `grads`
    meta: dict = field(default_factory=dict)

    @staticmethod
    def create(model: Decoder, full_finetune: bool, meta: dict | None = None) -> "TrainState":
        graphdef, trainable, frozen = split_model(model, full_finetune)
        # fp32 master weights, always a private copy: optim_step donates them, and for full fine-tuning
        # they would otherwise alias the shared base model's arrays.
        trainable = commit(jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), trainable))
        return TrainState(graphdef, trainable, frozen, commit(make_optimizer().init(trainable), trainable),
                          commit(jax.tree.map(jnp.zeros_like, trainable), trainable), meta=dict(meta or {}))

    def model(self) -> Decoder:
        return merge_model(self.graphdef, self.trainable, self.frozen)


LOGIT_CHUNK = 2048  # tokens unembedded at a time: only [chunk, V] fp32 logits exist at once


def target_logprobs(model: Decoder, batch: dict, remat: bool = False, attention: str = "einsum") -> jax.Array:
    """Log-probabilities of the target tokens: [B,T] (or [B,T,K] for top-K targets), fp32.

    The unembedding runs chunk by chunk under jax.checkpoint, so neither the forward nor the backward pass
    holds the full [B,T,V] logits (10 GB in fp32 for 16k tokens of a 152k vocabulary).
    """
    hidden, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["mask"].astype(jnp.int32),
                      remat=remat, attention=attention)
    tgt = batch["targets"]
    B, T, D = hidden.shape
    n = B * T
    C = LOGIT_CHUNK if n % LOGIT_CHUNK == 0 else n  # bucketed shapes are powers of two

    @jax.checkpoint
    def chunk(args):
        h, t = args  # [C,D], [C] or [C,K]
        logits = model.logits(h[None])[0]  # [C,V] fp32
        logz = jax.nn.logsumexp(logits, axis=-1)
        if t.ndim == 1:
            return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - logz
        return jnp.take_along_axis(logits, t, axis=-1) - logz[:, None]

    lp = jax.lax.map(chunk, (hidden.reshape(n // C, C, D), tgt.reshape(n // C, C, *tgt.shape[2:])))
    return lp.reshape(tgt.shape)


def _loss(trainable, frozen, graphdef, batch, config, loss_fn, remat=False, attention="einsum"):
    lp = target_logprobs(merge_model(graphdef, trainable, frozen), batch, remat, attention)
    loss, metrics = get_loss(loss_fn).fn(lp, batch["inputs"], batch["mask"], config)
    return loss, (lp, metrics)


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "remat", "attention"), donate_argnames=("grads",))
def _forward_backward(trainable, frozen, grads, batch, config, *, graphdef, loss_fn, remat=False,
                      attention="einsum"):
    (loss, (lp, metrics)), g = jax.value_and_grad(_loss, has_aux=True)(
        trainable, frozen, graphdef, batch, config, loss_fn, remat, attention)
    grads = jax.tree.map(jnp.add, grads, g)
    return grads, loss, lp, metrics


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "attention"))
def _forward(trainable, frozen, batch, config, *, graphdef, loss_fn, attention="einsum"):
    loss, (lp, metrics) = _loss(trainable, frozen, graphdef, batch, config, loss_fn, attention=attention)
    return loss, lp, metrics


@partial(jax.jit, donate_argnames=("trainable", "opt_state", "grads"))
def _optim_step(trainable, opt_state, grads, hp):
    """AdamW on the accumulated gradient, after optional global-norm clipping (clip <= 0: off)."""
    gnorm = optax.global_norm(grads)
    clip = hp.pop("grad_clip_norm")
    factor = jnp.where((clip > 0) & (gnorm > clip), clip / jnp.maximum(gnorm, 1e-30), 1.0)
    grads = jax.tree.map(lambda g: g * factor, grads)
    opt_state.hyperparams.update(hp)
    updates, opt_state = make_optimizer().update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    zeros = jax.tree.map(jnp.zeros_like, grads)
    return trainable, opt_state, zeros, gnorm


def device_batch(batch: Batch, sharding=None) -> dict:
    d = {"tokens": batch.tokens, "positions": batch.positions, "mask": batch.mask, "targets": batch.targets,
         "inputs": batch.inputs}
    return jax.device_put(d, sharding) if sharding is not None else jax.tree.map(jnp.asarray, d)


def forward_backward(state: TrainState, batches: list[Batch], loss_fn: str, config: dict,
                     forward_only: bool = False, sharding_fn=None, remat: bool = False, attention: str = "einsum"):
    """Run the loss over every micro-batch; accumulate gradients unless forward_only.

    remat and attention select how the step computes (models.decoder.Decoder.__call__), not what it computes.

    Returns (per-datum logprobs as numpy arrays in request order, metrics dict with "loss:sum").
    """
    cfg = {k: jnp.float32(v) for k, v in config.items()}
    outputs: dict[int, np.ndarray] = {}  # datum index -> logprobs
    metrics: dict[str, float] = {}
    device_results = []
    for b in batches:
        db = device_batch(b, sharding_fn(b) if sharding_fn else None)
        if forward_only:
            loss, lp, m = _forward(state.trainable, state.frozen, db, cfg, graphdef=state.graphdef,
                                   loss_fn=loss_fn, attention=attention)
        else:
            state.grads, loss, lp, m = _forward_backward(
                state.trainable, state.frozen, state.grads, db, cfg, graphdef=state.graphdef, loss_fn=loss_fn,
                remat=remat, attention=attention)
        device_results.append((b, loss, lp, m))
    for b, loss, lp, m in device_results:  # one host sync after all micro-batches are queued
        lp = np.asarray(lp)
        outputs.update((i, lp[r, :n]) for r, (i, n) in enumerate(zip(b.index, b.lengths)))
        metrics["loss:sum"] = metrics.get("loss:sum", 0.0) + float(loss)
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)  # loss metrics are ":sum" reductions
    if not forward_only:
        state.pending += 1
    return [outputs[i] for i in range(len(outputs))], metrics


def optim_step(state: TrainState, *, learning_rate: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, grad_clip_norm: float) -> dict[str, float]:
    for name, v in dict(learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, grad_clip_norm=grad_clip_norm).items():
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"adam_params.{name}: must be a finite non-negative number, got {v!r}")
    if not (beta1 < 1 and beta2 < 1):
        raise ValueError("adam_params.beta1/beta2: must be < 1")
    hp = {"learning_rate": learning_rate, "b1": beta1, "b2": beta2, "eps": eps, "weight_decay": weight_decay,
          "grad_clip_norm": grad_clip_norm}
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    state.trainable, state.opt_state, state.grads, gnorm = _optim_step(
        state.trainable, state.opt_state, state.grads, hp)
    state.step += 1
    state.pending = 0
    return {"grad_norm:mean": float(gnorm), "learning_rate:mean": float(learning_rate)}


def compile_count() -> int:
    """Programs compiled so far by the training step functions (for the recompilation test)."""
    return sum(f._cache_size() for f in (_forward_backward, _forward, _optim_step))
