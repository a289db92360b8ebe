"""Shared helpers for model tests: tiny HF-format checkpoints and jitted forward / cross-entropy gradient.

Test modules import this directly (`import models_util`; pytest puts tests/ on sys.path). Everything is
cached per process (`functools.lru_cache`), so every test file asking for a preset shares one directory,
one loaded Decoder and one transformers reference model.

Checkpoints come from `tinker_jax.hf.init_model.init_model(out_dir, preset, seed=0)`; each preset exercises
one family's differences: tiny-qwen3 = q/k norm + tied embeddings, tiny-llama3 = untied lm_head + llama3
RoPE scaling, tiny-qwen2 = q/k/v biases (untied), tiny-qwen3-moe = Qwen3-MoE experts and router (untied).

Test-only compile speed: the jitted helpers here compile with XLA's backend optimisation level 0 and the
fusion emitters off (`FAST_XLA`). On CPU this cuts the compile of a tiny model's gradient from ~6 s to
~0.5 s; the program is the same and fp32 results agree with default compilation to ~1e-6 relative.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PRESETS = ("tiny-qwen3", "tiny-llama3", "tiny-qwen2", "tiny-qwen3-moe", "tiny-qwen3-moe-mixed")

# ---------------------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tinker_jax_tiny_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=None)
def tiny_model_dir(preset: str) -> Path:
    """A local HF directory (config.json + model.safetensors + tokenizer) for `preset`, built once."""
    from tinker_jax.hf.init_model import init_model

    return Path(init_model(_root() / preset, preset, seed=0))


@functools.lru_cache(maxsize=None)
def hf_model(preset: str):
    """The transformers reference for `preset`: PyTorch CPU, fp32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(preset), dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


@functools.lru_cache(maxsize=None)
def jax_model(preset: str):
    """tinker_jax's fp32 Decoder for `preset` on the default device. Shared: callers must not mutate it."""
    from tinker_jax.hf.weights import load_decoder

    return load_decoder(tiny_model_dir(preset))


def vocab_size(preset: str) -> int:
    return jax_model(preset).cfg.vocab_size


# ------------------------------------------------------------------------------------------------ data


def random_tokens(seed: int, shape, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def arange_positions(rows: int, length: int) -> np.ndarray:
    return np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()


def rel_err(a, b) -> float:
    """max|a - b| / max|b| (b the reference); the plain max-abs error when b is all zeros."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num, den = np.abs(a - b).max(), np.abs(b).max()
    return float(num / den) if den > 0 else float(num)


# --------------------------------------------------------------------------------------- jitted compute

FAST_XLA = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=None)
def _compiler_options() -> dict:
    """FAST_XLA if this XLA knows those options (they are debug options and may be renamed), else {}."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=FAST_XLA).lower(1.0).compile()
        return dict(FAST_XLA)
    except Exception:  # noqa: BLE001 - unknown option: default compilation, only slower
        return {}


def fast_jit(fn, **kw):
    return jax.jit(fn, compiler_options=_compiler_options(), **kw)


def token_nll(logits, targets):
    """[B,T,V] logits, [B,T] int targets -> [B,T] -log softmax(logits)[target], fp32."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def _forward(graphdef, state, tokens, positions, segment_ids, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m(tokens, positions, segment_ids, cache)
    return m.logits(h), cache


def _ce_loss(graphdef, wrt, rest, tokens, positions, targets, weights, segment_ids):
    """sum over positions of weights * -log softmax(logits)[target]; `wrt` is the differentiated state."""
    m = nnx.merge(graphdef, wrt, rest)
    h, _ = m(tokens, positions, segment_ids)
    return jnp.sum(token_nll(m.logits(h), targets) * weights)


@functools.lru_cache(maxsize=None)
def _jitted():
    return (fast_jit(_forward, static_argnums=0),
            fast_jit(jax.value_and_grad(_ce_loss, argnums=1), static_argnums=0))


def forward(model, tokens, positions, segment_ids=None, cache=None):
    """jitted model(tokens, positions, segment_ids, cache) -> (logits fp32 [B,T,V], cache).

    numpy inputs are passed as they are (placed on the default device); pass jax arrays to control placement.
    """
    graphdef, state = nnx.split(model)
    return _jitted()[0](graphdef, state, tokens, positions, segment_ids, cache)


def ce_grads(model, tokens, positions, targets, weights, segment_ids=None, wrt=nnx.Param):
    """(loss, grads): grads of the summed weighted token NLL w.r.t. the `wrt` state of `model`.

    grads is an nnx.State with the structure of `nnx.state(model, wrt)`; `graphdef_rest(model, wrt)` gives
    what is needed to merge it back into a model-shaped object (e.g. for `iter_hf_tensors`).
    """
    graphdef, state, rest = nnx.split(model, wrt, ...)
    return _jitted()[1](graphdef, state, rest, tokens, positions, targets, weights, segment_ids)


def hf_checkpoint_layout(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5 keeps a MoE layer's experts fused (`experts.gate_up_proj` [E,2I,D], gate rows first;
    `experts.down_proj` [E,D,I]); checkpoints, and so tinker_jax's names, have one tensor per expert and projection.
    Splits the fused ones, written here from transformers' layout, independently of tinker_jax's table."""
    out = {}
    for name, x in named.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base, width = name[: -len("gate_up_proj")], x.shape[1] // 2
            for e in range(x.shape[0]):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = x[e, :width], x[e, width:]
        elif name.endswith(".mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            out.update((f"{base}{e}.down_proj.weight", x[e]) for e in range(x.shape[0]))
        else:
            out[name] = x
    return out


def graphdef_rest(model, wrt=nnx.Param):
    graphdef, _, rest = nnx.split(model, wrt, ...)
    return graphdef, rest


# ---------------------------------------------------------------------------------------------- comparisons


def flat(tree) -> dict[str, np.ndarray]:
    """Private numpy copies of a pytree's leaves, keyed by path."""
    return {jax.tree_util.keystr(p): np.array(x, copy=True) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def rel(a: dict, b: dict) -> float:
    """Global relative difference ||a - b|| / ||b|| over all leaves of two `flat` dicts."""
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return (num / den) ** 0.5
