"""The PyTorch peer: transformers (+ peft for LoRA) on the same HF directory, data and shapes as ours.

Training step = forward, summed next-token cross-entropy over fp32 logits (what ours computes), backward,
AdamW step, zero_grad. LoRA: peft r / alpha / target modules as given (no dropout). Sampling = `generate`,
greedy, exactly `max_new_tokens` per row (EOS suppressed by min_new_tokens).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The "moe" section: tinker_jax's default targets (attention, every expert's gate/up/down, the unembedding). On
# transformers 5 a Qwen3-MoE layer's experts are fused parameters (experts.gate_up_proj [E,2I,D], down_proj
# [E,D,I]), not modules: peft converts the gate/up/down targets onto them (lora.ParamWrapper), see peft_summary.
MOE_LORA_TARGETS = LORA_TARGETS + ["lm_head"]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_model(model_dir: Path, dtype: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # no progress bars / deprecation chatter in the bench log
    transformers.utils.logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_torch_dtype(dtype))
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=_torch_dtype(dtype))
    return model.to(device())


def lora_model(model, rank: int, alpha: float, targets: list[str] | None = None):
    from peft import LoraConfig, get_peft_model

    import warnings

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets or LORA_TARGETS),
                     bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calling a deprecated transformers helper
        # peft 0.21 warns that the rank/alpha patterns its own MoE conversion adds for gate_up_proj "did not match
        # any targeted module", yet applies them (peft_summary reads the ranks and scales back from the model)
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match", category=RuntimeWarning)
        return get_peft_model(model, cfg)


def peft_summary(model) -> dict:
    """What peft actually adapted, read back from the model after get_peft_model (its MoE conversion rewrites the
    config): the resolved target modules / parameters, rank and scale of each kind of adapted layer (first
    occurrence), trainable parameter count, and transformers' experts implementation."""
    cfg = model.peft_config["default"]
    kinds: dict[str, dict] = {}
    for name, mod in model.named_modules():
        r, scaling = getattr(mod, "r", None), getattr(mod, "scaling", None)
        if not isinstance(r, dict) or "default" not in r or not isinstance(scaling, dict):
            continue
        leaf = getattr(mod, "parameter_name", None) or name.rsplit(".", 1)[-1]
        if leaf in kinds:
            continue
        kinds[leaf] = {"wrapper": type(mod).__name__, "rank": int(r["default"]),
                       "scale": float(scaling["default"]), "experts": int(getattr(mod, "num_experts", 1) or 1),
                       "example": name}
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return {"peft_target_modules": sorted(cfg.target_modules or []),
            "peft_target_parameters": sorted(getattr(cfg, "target_parameters", None) or []),
            "rank_pattern": dict(cfg.rank_pattern or {}), "alpha_pattern": dict(cfg.alpha_pattern or {}),
            "adapted": kinds,
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "experts_implementation": getattr(getattr(inner, "config", None), "_experts_implementation", None)}


def _optimizer(params):
    import torch

    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if torch.cuda.is_available() else {}
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, **kw)


# (rows, length, lora) -> how the peer had to split its steps to fit in memory (read by benchmarks.rows)
MICRO_BATCH_NOTES: dict[tuple[int, int, bool], str] = {}
# str(model_dir) -> peft_summary of the last LoRA peer built on it (read by benchmarks.rows for the "moe" rows)
LORA_NOTES: dict[str, dict] = {}


def train_step(model_dir: Path, tokens: np.ndarray, *, lora_rank: int | None, lora_alpha: float, dtype: str,
               targets: list[str] | None = None) -> tuple[Callable[[], None], Callable[[], None]]:
    """-> (one training step: forward, backward, AdamW; release the model). targets: peft target_modules
    (default LORA_TARGETS)."""
    import torch
    import torch.nn.functional as F

    holder = {"model": load_model(model_dir, dtype)}
    if lora_rank:
        holder["model"] = lora_model(holder["model"], lora_rank, lora_alpha, targets)
        LORA_NOTES[str(model_dir)] = peft_summary(holder["model"])
    model = holder["model"]
    dev = device()
    x = torch.as_tensor(tokens[:, :-1], device=dev)
    y = torch.as_tensor(tokens[:, 1:], device=dev)
    opt = _optimizer(model.parameters())
    model.train()
    rows = x.shape[0]
    plan = {"micro": rows}  # rows per forward/backward; halved on CUDA OOM (gradients accumulate: same step)

    def attempt():
        m = plan["micro"]
        for s in range(0, rows, m):
            logits = model(input_ids=x[s:s + m]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[s:s + m].reshape(-1), reduction="sum")
            del logits
            loss.backward()
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    def step():
        while True:
            try:
                return attempt()
            except torch.OutOfMemoryError:
                # e.g. 8x2048 of a 152k vocabulary on an 80 GB card: fp32 logits and their gradient alone are
                # ~20 GB. Retry the same step in micro-batches, as a user would; the row records the split.
                opt.zero_grad(set_to_none=True)
                free_memory()
                if plan["micro"] == 1:
                    raise
                plan["micro"] //= 2
                MICRO_BATCH_NOTES[(rows, x.shape[1], bool(lora_rank))] = (
                    f"the peer ran out of GPU memory at {rows} rows per pass and ran each step as "
                    f"{rows // plan['micro']} micro-batches of {plan['micro']} rows (gradients accumulated)")

    def close():
        holder.clear()
        opt.state.clear()
        free_memory()
    return step, close


def generate_step(model, prompts: np.ndarray, max_new: int) -> Callable[[], int]:
    """-> one `generate` call over the whole batch (each row gets exactly max_new tokens); returns tokens made."""
    import torch

    model.eval()
    ids = torch.as_tensor(prompts, device=device())
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def gen() -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=pad)
        sync()
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])
    return gen


def handoff_step(model_dir: Path, prompt: np.ndarray, *, lora_rank: int, lora_alpha: float, dtype: str
                 ) -> tuple[Callable[[], float], Callable[[], None]]:
    """The disk handoff a torch stack does: save the adapter, load base + adapter from disk in a fresh model,
    generate one token. The step returns its seconds, from the save to the token."""
    import shutil
    import tempfile

    import torch
    from peft import PeftModel

    holder = {"trained": lora_model(load_model(model_dir, dtype), lora_rank, lora_alpha)}
    ids = torch.as_tensor(prompt[None, :], device=device())
    tmp = tempfile.mkdtemp(prefix="bench-handoff-")

    def once() -> float:
        t0 = time.perf_counter()
        holder["trained"].save_pretrained(tmp)
        fresh = PeftModel.from_pretrained(load_model(model_dir, dtype), tmp).eval()
        with torch.inference_mode():
            fresh.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                           do_sample=False, pad_token_id=0)
        sync()
        dt = time.perf_counter() - t0
        del fresh
        return dt

    def close():
        holder.clear()
        shutil.rmtree(tmp, ignore_errors=True)
        free_memory()
    return once, close
