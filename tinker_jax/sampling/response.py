"""Assemble `tinker.types.SampleResponse` from per-sample results and the prompt's logprobs."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from tinker_jax.errors import UserError


def sequence(tokens: Sequence[int], logprobs: Sequence[float], stop_reason: str, sequence_id: str,
             topk: Sequence[tuple] | None = None):
    """topk: per token (ids [k], logprobs [k]) of its sampling distribution (`topk_sample_logprobs`), or None."""
    top = None
    if topk is not None:
        k = len(topk[0][0]) if topk else 0
        top = TopkLogprobs(token_ids=np.asarray([ids for ids, _ in topk], np.int32).reshape(len(topk), k),
                           logprobs=np.asarray([lp for _, lp in topk], np.float32).reshape(len(topk), k))
    return types.SampledSequence(
        stop_reason=stop_reason,
        sequence_id=sequence_id,
        tokens_np=np.asarray(tokens, np.int32),
        logprobs_np=np.asarray(logprobs, np.float32),
        topk_logprobs_np=top,
    )


def prompt_logprobs_array(target_lp: np.ndarray | None, prompt_len: int) -> np.ndarray:
    """[P] float32: NaN at position 0 (no context; the client turns it into None), then log p(prompt[i])."""
    out = np.full((prompt_len,), np.nan, np.float32)
    if prompt_len > 1:
        out[1:] = target_lp[: prompt_len - 1]
    return out


def topk_prompt_logprobs(ids: np.ndarray | None, lps: np.ndarray | None, prompt_len: int, k: int) -> TopkLogprobs:
    """[P,k] matrices; row 0 is the sentinel (token 0, -99999.0), which the client reads as None (§4.9)."""
    tid = np.zeros((prompt_len, k), np.int32)
    tlp = np.full((prompt_len, k), MASK_LOGPROB, np.float32)
    if prompt_len > 1:
        tid[1:] = ids[: prompt_len - 1, :k]
        tlp[1:] = lps[: prompt_len - 1, :k]
    return TopkLogprobs(token_ids=tid, logprobs=tlp)


def sample_response(sequences, prompt_lp: np.ndarray | None, topk: TopkLogprobs | None,
                    target: types.TensorData | None = None, alt=None, cache_hit: int = 0) -> types.SampleResponse:
    return types.SampleResponse(sequences=list(sequences), prompt_logprobs_np=prompt_lp, topk_prompt_logprobs_np=topk,
                                target_prompt_logprobs=target, prompt_alt_tokens=alt,
                                prompt_cache_hit_tokens=int(cache_hit))


def prompt_alt_tokens(tokens: np.ndarray, logprobs: np.ndarray):
    """prompt_alt_tokens_k's draws, tokens and logprobs [P-1, k], as the SDK's PromptAltTokens."""
    from tinker.types.prompt_alt_tokens import PromptAltTokens

    return PromptAltTokens(tokens=types.TensorData.from_numpy(np.asarray(tokens, np.int64)),
                           logprobs=types.TensorData.from_numpy(np.asarray(logprobs, np.float32)))


def target_logprobs(lp: np.ndarray, ids: np.ndarray, layout: tuple | None) -> types.TensorData:
    """The logprobs of `target_prompt_logprobs`' ids, lp [P-1, K] (ids [P-1, K], -1: not asked), as a float32
    TensorData in the request's layout: dense with 0.0 where nothing was asked, or CSR with the request's indices."""
    lp = np.where(ids >= 0, lp, 0.0).astype(np.float32)
    if layout is None:
        return types.TensorData(data=lp.reshape(-1).tolist(), dtype="float32", shape=list(lp.shape))
    crow, col = layout
    rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    return types.TensorData(data=lp[rows, np.asarray(col, np.int64)].tolist(), dtype="float32", shape=list(lp.shape),
                            sparse_crow_indices=list(crow), sparse_col_indices=list(col))


def _unmasked(resp: types.SampleResponse) -> dict:
    """What prompt_logprobs_last_n leaves as it is (SDK: it "does not affect target_prompt_logprobs or
    prompt_alt_tokens_k")."""
    return {"target_prompt_logprobs": resp.target_prompt_logprobs, "prompt_alt_tokens": resp.prompt_alt_tokens,
            "prompt_cache_hit_tokens": resp.prompt_cache_hit_tokens}


def last_n_mask(n: int | None, prompt_len: int, scores_prompt: bool
                ) -> Callable[[types.SampleResponse], types.SampleResponse] | None:
    """prompt_logprobs_last_n (SDK 0.34+): score only the last `n` prompt tokens; earlier entries are None (NaN on
    the wire), top-k rows masked. Computed in full and masked after, which is exactly what the client checks for.
    -> the response's transform (None: no `n`); UserError naming the field for a bad one. `scores_prompt`: the
    request asks for prompt logprobs or their top-k."""
    if n is None:
        return None
    if not scores_prompt:
        raise UserError("prompt_logprobs_last_n: applies to prompt logprobs; set prompt_logprobs")
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or not 1 <= n <= prompt_len - 1:
        raise UserError(f"prompt_logprobs_last_n: must be an integer between 1 and len(prompt) - 1 = "
                        f"{prompt_len - 1}, got {n!r}")
    n = int(n)

    def mask(resp: types.SampleResponse) -> types.SampleResponse:
        cut = prompt_len - n
        lp = None
        if resp.prompt_logprobs is not None:
            lp = np.array([np.nan if x is None else x for x in resp.prompt_logprobs], np.float32)
            lp[:cut] = np.nan
        topk = resp.topk_prompt_logprobs_np
        if topk is not None:
            ids, lps = np.array(topk.token_ids), np.array(topk.logprobs, np.float32)
            ids[:cut], lps[:cut] = 0, MASK_LOGPROB
            topk = TopkLogprobs(token_ids=ids, logprobs=lps)
        elif resp.topk_prompt_logprobs is not None:  # the list form: rows before the suffix become None
            rows = [None if i < cut else row for i, row in enumerate(resp.topk_prompt_logprobs)]
            return types.SampleResponse(sequences=resp.sequences, prompt_logprobs_np=lp,
                                        _topk_prompt_logprobs_list=rows, **_unmasked(resp))
        return types.SampleResponse(sequences=resp.sequences, prompt_logprobs_np=lp, topk_prompt_logprobs_np=topk,
                                    **_unmasked(resp))

    return mask
