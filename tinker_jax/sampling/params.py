"""One sampling request, validated: `tinker.types.SamplingParams` + request fields -> `RequestSpec`.

Every rejection is a `ValueError` whose message starts with the offending field's name, so the engine can
report it to the user as is. Semantics and their sources:

- `max_tokens` is required and > 0 (optional in the SDK type, but SkyRL answers 400 without it; protocol
  doc §2.6). `len(prompt) + max_tokens <= max_seq_len`.
- `temperature == 0` is greedy (argmax); negative or non-finite temperatures are rejected.
- `top_k <= 0` means no limit (SDK: "-1 for no limit"); a `top_k` at or above the vocabulary is no limit too.
- `top_p` must lie in (0, 1].
- `seed`: a request with a seed gets the same tokens whatever else is batched with it (each row's key is
  derived from (seed, sample index, step)); without one a fresh 64-bit seed is drawn. The wire type is
  uint64, so seeds are taken modulo 2**64.
- `stop`: the SDK documents "``None`` keeps implicit EOS stopping; ``[]`` disables all stop tokens,
  including EOS, and generation continues until ``max_tokens``" (tinker/types/_pydantic_types/
  sampling_params.py; protocol doc §2.6). A non-empty `stop` *replaces* the EOS ids: the caller's list is
  the whole stop set (tinker-cookbook renderers pass their end-of-turn token explicitly). Strings are
  stop strings, ints are stop token ids; a mix is rejected.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from tinker import types

from tinker_jax.errors import UserError
from tinker_jax.tensors import dense_array

U64 = 1 << 64


@dataclass(frozen=True)
class Limits:
    """What one Sampler can serve; requests outside these fail with a ValueError."""

    vocab_size: int
    max_seq_len: int  # prompt + max_tokens must fit
    max_num_samples: int
    max_topk_prompt_logprobs: int
    max_stop_tokens: int  # stop token ids per request (EOS included), a static kernel width
    has_tokenizer: bool  # stop strings need one


@dataclass(frozen=True)
class RequestSpec:
    prompt: tuple[int, ...]
    num_samples: int
    max_tokens: int
    temperature: float  # 0 = greedy
    top_k: int  # 0 = no limit
    top_p: float  # 1 = no limit
    seed: int  # in [0, 2**64)
    stop_token_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    include_prompt_logprobs: bool
    topk_prompt_logprobs: int
    topk_sample_logprobs: int = 0  # top-k logprobs at each sampled position (SDK 0.30+)
    # target_prompt_logprobs (SDK 0.30+): token ids to score at each prompt position, dense [P-1, K] int32 (-1: none),
    # and the request's CSR layout (crow, col) when it came sparse, so the answer comes back in the same layout.
    target_ids: np.ndarray | None = field(default=None, compare=False)
    target_layout: tuple | None = field(default=None, compare=False)
    prompt_alt_k: int = 0  # prompt_alt_tokens_k (SDK 0.32+): draws per prompt position after the first

    @property
    def wants_prompt_logprobs(self) -> bool:
        # The protocol doc (§2.6) says topk_prompt_logprobs "implies prompt logprobs".
        return self.include_prompt_logprobs or self.topk_prompt_logprobs > 0

    @property
    def scores_prompt(self) -> bool:
        """Whether its prefill computes logits over the prompt (prompt logprobs, their top-k, or target ids)."""
        return self.wants_prompt_logprobs or self.target_ids is not None or self.prompt_alt_k > 0

    @property
    def scores_prompt_logprobs_only(self) -> bool:
        """It scores its prompt for the prompt's logprobs alone (compute_logprobs): those of tokens that cached
        pages hold can come from the prefix cache, which keeps them per page (not top-k, targets or draws)."""
        return (self.include_prompt_logprobs and not self.topk_prompt_logprobs and self.target_ids is None
                and not self.prompt_alt_k)


def _is_int(x: Any) -> bool:
    """Python or numpy integer, not bool."""
    return (isinstance(x, int) and not isinstance(x, bool)) or type(x).__name__.startswith(("int", "uint"))


def parse_stop(stop: Any, eos_token_ids: Sequence[int], vocab_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """SamplingParams.stop -> (stop token ids, stop strings). None keeps EOS; [] stops on nothing."""
    if stop is None:
        return tuple(dict.fromkeys(int(t) for t in eos_token_ids)), ()
    if isinstance(stop, str):
        stop = [stop]
    try:
        items = list(stop)
    except TypeError:
        raise UserError(f"stop: expected a string, a list of strings or a list of token ids, got {stop!r}") from None
    if all(isinstance(s, str) for s in items):
        if any(s == "" for s in items):
            raise UserError("stop: stop strings must be non-empty")
        return (), tuple(dict.fromkeys(items))
    if all(_is_int(s) for s in items):
        ids = tuple(dict.fromkeys(int(s) for s in items))
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"stop: token ids {bad} are outside the vocabulary [0, {vocab_size})")
        return ids, ()
    raise UserError(f"stop: expected a string, a list of strings or a list of token ids (not a mix), got {stop!r}")


def check_num_samples(num_samples: Any, limits: Limits) -> int:
    if not _is_int(num_samples) or not 1 <= num_samples <= limits.max_num_samples:
        raise UserError(f"num_samples: must be an integer in [1, {limits.max_num_samples}], got {num_samples!r}")
    return int(num_samples)


def validate_request(
    prompt_tokens: Sequence[int],
    params: types.SamplingParams,
    num_samples: int,
    include_prompt_logprobs: bool,
    topk_prompt_logprobs: int,
    *,
    limits: Limits,
    eos_token_ids: Sequence[int],
    topk_sample_logprobs: int = 0,
    target_prompt_logprobs: Any = None,
    prompt_alt_tokens_k: int = 0,
) -> RequestSpec:
    """Check one request against the Sampler's limits; return its processed form or raise ValueError."""
    if not isinstance(params, types.SamplingParams):
        raise UserError(f"sampling_params: expected tinker.types.SamplingParams, got {type(params).__name__}")
    try:
        prompt = tuple(int(t) for t in prompt_tokens)
    except (TypeError, ValueError):
        raise UserError("prompt_tokens: expected a list of integer token ids") from None
    if not prompt:
        raise UserError("prompt_tokens: the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
    if bad:
        raise UserError(f"prompt_tokens: token ids {bad[:8]} are outside the vocabulary [0, {limits.vocab_size})")
    if len(prompt) >= limits.max_seq_len:
        raise UserError(f"prompt_tokens: prompt length {len(prompt)} leaves no room to generate within the "
                         f"context of {limits.max_seq_len} tokens")

    max_tokens = params.max_tokens
    if max_tokens is None:
        raise UserError("max_tokens: required (the number of tokens to generate)")
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise UserError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
    if len(prompt) + max_tokens > limits.max_seq_len:
        raise UserError(f"max_tokens: prompt length {len(prompt)} + max_tokens {max_tokens} exceeds the context of "
                         f"{limits.max_seq_len} tokens")

    temperature = float(params.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature: must be a finite number >= 0, got {params.temperature!r}")
    top_p = float(params.top_p)
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise UserError(f"top_p: must lie in (0, 1], got {params.top_p!r}")
    if not _is_int(params.top_k):
        raise UserError(f"top_k: must be an integer, got {params.top_k!r}")
    top_k = int(params.top_k)
    top_k = 0 if top_k <= 0 or top_k >= limits.vocab_size else top_k

    if params.seed is None:
        seed = secrets.randbits(64)
    elif _is_int(params.seed):
        seed = int(params.seed) % U64
    else:
        raise UserError(f"seed: must be an integer, got {params.seed!r}")

    stop_ids, stop_strs = parse_stop(params.stop, eos_token_ids, limits.vocab_size)
    if len(stop_ids) > limits.max_stop_tokens:
        raise UserError(f"stop: {len(stop_ids)} stop token ids exceed this sampler's limit of "
                         f"{limits.max_stop_tokens}")
    if stop_strs and not limits.has_tokenizer:
        raise UserError("stop: stop strings need a tokenizer, and this sampler was built without one")

    check_num_samples(num_samples, limits)
    if not _is_int(topk_prompt_logprobs) or not 0 <= topk_prompt_logprobs <= limits.max_topk_prompt_logprobs:
        raise UserError(f"topk_prompt_logprobs: must be an integer in [0, {limits.max_topk_prompt_logprobs}], "
                         f"got {topk_prompt_logprobs!r}")
    # One cap for both top-k widths (each a static width of a kernel).
    if not _is_int(topk_sample_logprobs) or not 0 <= topk_sample_logprobs <= limits.max_topk_prompt_logprobs:
        raise UserError(f"topk_sample_logprobs: must be an integer in [0, {limits.max_topk_prompt_logprobs}], "
                         f"got {topk_sample_logprobs!r}")

    target_ids, target_layout = parse_target_ids(target_prompt_logprobs, len(prompt), limits)
    if not _is_int(prompt_alt_tokens_k) or not 0 <= prompt_alt_tokens_k <= limits.max_topk_prompt_logprobs:
        raise UserError(f"prompt_alt_tokens_k: must be an integer in [0, {limits.max_topk_prompt_logprobs}], "
                         f"got {prompt_alt_tokens_k!r}")
    return RequestSpec(
        prompt=prompt,
        num_samples=int(num_samples),
        max_tokens=int(max_tokens),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=stop_ids,
        stop_strings=stop_strs,
        include_prompt_logprobs=bool(include_prompt_logprobs),
        topk_prompt_logprobs=int(topk_prompt_logprobs),
        topk_sample_logprobs=int(topk_sample_logprobs),
        target_ids=target_ids,
        target_layout=target_layout,
        prompt_alt_k=int(prompt_alt_tokens_k),
    )


def parse_target_ids(td: Any, prompt_len: int, limits: Limits) -> tuple[np.ndarray | None, tuple | None]:
    """`target_prompt_logprobs` (a tinker TensorData of int64 ids, dense or CSR, or an array) -> (dense [P-1, K]
    int32 ids with -1 where nothing is asked, the CSR layout (crow, col) or None). K is capped like the other top-k
    widths (a static width of the prefill kernel)."""
    if td is None:
        return None, None
    name = "target_prompt_logprobs"
    crow = getattr(td, "sparse_crow_indices", None)
    if hasattr(td, "data") and hasattr(td, "dtype"):  # the SDK's TensorData (either of its two classes)
        if td.dtype != "int64":
            raise UserError(f"{name}: must be an int64 tensor of token ids, got {td.dtype}")
        dense = dense_array(td, pad_value=-1, where=name)
    else:
        try:
            dense = np.asarray(td, np.int64)
        except (ValueError, TypeError) as e:
            raise UserError(f"{name}: not a readable [len(prompt) - 1, K] tensor of token ids ({e})") from None
    layout = None if crow is None else (tuple(int(x) for x in crow), tuple(int(x) for x in td.sparse_col_indices))
    if dense.ndim != 2 or dense.shape[0] != prompt_len - 1:
        raise UserError(f"{name}: must have shape [len(prompt) - 1, K] = [{prompt_len - 1}, K], got "
                        f"{list(dense.shape)}")
    if not 1 <= dense.shape[1] <= limits.max_topk_prompt_logprobs:
        raise UserError(f"{name}: K = {dense.shape[1]} ids per position; this sampler serves 1 to "
                        f"{limits.max_topk_prompt_logprobs}")
    bad = dense[(dense < -1) | (dense >= limits.vocab_size)]
    if bad.size:
        raise UserError(f"{name}: token ids {bad[:8].tolist()} are outside the vocabulary [0, {limits.vocab_size}) "
                        "(-1 asks for nothing)")
    return dense.astype(np.int32), layout
