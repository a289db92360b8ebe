"""vLLM sampler backend (GPU): the JAX Sampler's public interface, served by `vllm.LLM`.

STATUS: implemented, NOT YET RUN. No GPU with vLLM has been available; the code follows vLLM's public API
(LLM, SamplingParams, LoRARequest, RequestOutput; `logprobs_mode` needs vLLM >= 0.10.2) and its tests that
need vLLM and a CUDA GPU are skipped elsewhere. Pick it with `sampler: {backend: vllm}` (the `gpu` extra).

Weights: one `vllm.LLM` per base model (the engine builds one sampler per base). Per WeightSnapshot, decided
once and cached by snapshot identity (`ExportCache`; the export is deleted when the snapshot is collected):
- the base itself (no adapter, and its params are the base decoder's own arrays, compared by the identity of
  the first leaf as scheduler.params_key does): no adapter;
- LoRA (an adapter over the base's params): `export_peft_adapter` into the cache dir, sent as `LoRARequest`;
  vLLM batches up to `max_loras` adapters of rank <= `max_lora_rank`. An adapter on `unembed` (lm_head) is
  served as merged weights instead: vLLM's LoRA does not cover lm_head for most families;
- full fine-tuning (params of its own; with an adapter over them too, should one exist): `export_merged_hf` of
  `snapshot.model()` (adapter merged) and a *reloaded* LLM. Cost per switch: a full HF export to disk plus
  an LLM start (weight load, CUDA graph capture, KV-cache allocation): tens of seconds for a ~1B model,
  minutes for larger ones. Only one merged export is kept; alternating between full-weight snapshots reloads
  every time. (In-memory weight update is not implemented.)

Semantics mirror the JAX sampler: requests go through params.validate_request (same errors, same stop rule:
`stop=None` is the model's EOS ids from config.json + generation_config.json, `[]` is nothing, a non-empty
list replaces EOS). vLLM's own EOS handling is switched off (`ignore_eos`, `generation_config="vllm"`) and
the validated stop ids are passed explicitly, so both backends stop on the same set. Stop tokens and stop
strings are included in the output. Batching: a worker thread hands everything queued for the loaded
weights to one `llm.generate` call; requests arriving meanwhile wait for the next call.
GPU memory: JAX preallocates 75% of a GPU; when training shares the GPU set XLA_PYTHON_CLIENT_MEM_FRACTION
so that it plus `gpu_memory_utilization` (default 0.4) stays below 1.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB

from tinker_jax.errors import Stopped, UserError
from tinker_jax.hf.convert import export_merged_hf, export_peft_adapter
from tinker_jax.hf.model_files import eos_ids_of
from tinker_jax.sampling import response
from tinker_jax.sampling.base import SamplerBase
from tinker_jax.sampling.params import Limits, RequestSpec
from tinker_jax.sampling.snapshot import WeightSnapshot

log = logging.getLogger(__name__)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class VLLMUnavailable(ImportError):
    pass


def require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable("sampler backend 'vllm' needs the vllm package, which is not installed: "
                              "pip install 'tinker-jax[gpu]' (the `gpu` extra; CUDA GPU hosts only)") from e
    return vllm


def _opt(config: Any, name: str, default):
    v = getattr(config, name, None)
    return default if v is None else v


def lora_rank_bucket(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves adapters of `rank`."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"max_lora_rank: {rank} exceeds vLLM's largest ({LORA_RANKS[-1]})")


def sampling_kwargs(spec: RequestSpec, seeded: bool) -> dict[str, Any]:
    """A validated request -> `vllm.SamplingParams(**kwargs)`."""
    return {
        "n": spec.num_samples,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,  # 0 = greedy in both
        "top_p": spec.top_p,
        "top_k": spec.top_k if spec.top_k > 0 else -1,  # -1: no limit in every vLLM version
        "seed": spec.seed % (1 << 63) if seeded else None,  # vLLM seeds sample i with seed + i: keep headroom
        "stop": list(spec.stop_strings),
        "stop_token_ids": list(spec.stop_token_ids),  # the whole stop set, EOS included when stop is None
        "ignore_eos": True,  # ... so vLLM adds no EOS of its own
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,  # stop strings match the text with special tokens, as in stops.py
        "logprobs": 1,  # the sampled token's logprob is always included
        "prompt_logprobs": spec.topk_prompt_logprobs if spec.wants_prompt_logprobs else None,
    }


def llm_kwargs(model_dir, tokenizer_dir, config: Any, dtype: str, max_model_len: int) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` for one weight directory."""
    return {
        "model": str(model_dir), "tokenizer": str(tokenizer_dir), "dtype": dtype, "max_model_len": max_model_len,
        "enable_lora": True, "max_lora_rank": lora_rank_bucket(_opt(config, "max_lora_rank", 64)),
        "max_loras": _opt(config, "max_loras", 4),
        "gpu_memory_utilization": _opt(config, "gpu_memory_utilization", 0.4),
        "max_logprobs": max(20, _opt(config, "max_topk_prompt_logprobs", 20)),
        # The JAX sampler reports log_softmax(logits / T)[token] (kernels.py, "the documented relation");
        # vLLM's default (raw_logprobs) is the untempered distribution. processed_logprobs is taken after
        # temperature *and* top-k/top-p masking, so the two agree exactly when top_k/top_p are off; with them
        # on vLLM's values are renormalised over the kept tokens (never lower than ours). Greedy is untempered
        # in both. Prompt logprobs are untempered in both (vLLM computes them without the sampler).
        "logprobs_mode": "processed_logprobs",
        "generation_config": "vllm",  # no defaults or EOS ids from generation_config.json: ours are explicit
        "seed": 0,
    }


def to_sequence(out: Any, stop_token_ids: Sequence[int], sequence_id: str) -> types.SampledSequence:
    """One vLLM CompletionOutput -> SampledSequence."""
    tokens = [int(t) for t in out.token_ids]
    lps = [float(d[t].logprob) for t, d in zip(tokens, out.logprobs or [])]
    if len(lps) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(tokens)} tokens")
    if out.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sequence with reason {out.finish_reason!r}")
    # vLLM checks max_tokens before stop ids; the JAX sampler calls a last stop token "stop" either way.
    reason = "stop" if tokens and tokens[-1] in stop_token_ids else out.finish_reason
    return response.sequence(tokens, lps, reason, sequence_id)


def to_prompt_logprobs(prompt: Sequence[int], plps: Any, k: int):
    """vLLM prompt_logprobs ([None, {token: Logprob}, ...]) -> (prompt logprobs [P], TopkLogprobs | None)."""
    P = len(prompt)
    if plps is None or len(plps) != P:
        raise RuntimeError(f"vLLM returned prompt logprobs for {0 if plps is None else len(plps)} of {P} tokens")
    target = np.array([plps[i][prompt[i]].logprob for i in range(1, P)], np.float32)
    if not k:
        return response.prompt_logprobs_array(target, P), None
    ids, lps = np.zeros((P - 1, k), np.int32), np.full((P - 1, k), MASK_LOGPROB, np.float32)
    for i in range(1, P):  # vLLM gives the top k by rank plus the prompt token, whatever its rank
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in plps[i].items() if lp.rank is not None and lp.rank <= k)
        for j, (_, t, v) in enumerate(ranked[:k]):
            ids[i - 1, j], lps[i - 1, j] = t, v
    return response.prompt_logprobs_array(target, P), response.topk_prompt_logprobs(ids, lps, P, k)


@dataclass(frozen=True)
class Target:
    kind: str  # "base" | "lora" | "merged"
    path: Path | None = None  # the adapter directory (lora)
    serial: int = 0  # unique per snapshot: the LoRARequest id (lora), the weights' key (merged)


class ExportCache:
    """WeightSnapshot -> how vLLM serves it; exports happen once per snapshot (keyed by identity).

    `base` has `.path` (the HF directory vLLM loads) and `.decoder` (the base Decoder whose params a base or
    LoRA snapshot shares); without a decoder every snapshot is served as merged weights."""

    def __init__(self, base: Any, root: str | Path, max_lora_rank: int):
        self.base, self.root, self.max_lora_rank = base, Path(root), max_lora_rank
        decoder = getattr(base, "decoder", None)
        # The base's first weight array: a snapshot whose params start with this very array shares the base's.
        self._base_leaf = jax.tree.leaves(nnx.state(decoder, nnx.Param))[0] if decoder is not None else None
        self._entries: dict[int, tuple[weakref.ref, Target]] = {}
        self._ids = itertools.count(1)  # LoRARequest ids: never reused, so vLLM's adapter cache is never stale
        self._merged: tuple[weakref.ref, Path] | None = None
        self.exports = 0

    def target(self, snap: Any) -> Target:
        hit = self._entries.get(id(snap))
        if hit is not None and hit[0]() is snap:
            return hit[1]
        t = self._classify(snap)
        self._entries[id(snap)] = (weakref.ref(snap), t)
        weakref.finalize(snap, self._forget, id(snap), t.path)
        return t

    def _forget(self, key: int, path: Path | None) -> None:
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is None:
            self._entries.pop(key, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def shares_base(self, snap: WeightSnapshot) -> bool:
        """Whether `snap`'s params are the base decoder's own (identity of the first leaf, as params_key)."""
        leaves = jax.tree.leaves(snap.params)
        return self._base_leaf is not None and bool(leaves) and leaves[0] is self._base_leaf

    def _classify(self, snap: WeightSnapshot) -> Target:
        adapter = snap.adapter
        if not self.shares_base(snap):
            return Target("merged", None, next(self._ids))  # full fine-tuning (any adapter is merged too)
        if adapter is None:
            return Target("base")
        if "unembed" in adapter.spec.targets:  # vLLM's LoRA does not cover lm_head: merged weights
            return Target("merged", None, next(self._ids))
        if adapter.spec.rank > self.max_lora_rank:
            raise UserError(f"snapshot: LoRA rank {adapter.spec.rank} exceeds the vLLM sampler's max_lora_rank "
                            f"{self.max_lora_rank} (sampler config max_lora_rank)")
        n = next(self._ids)
        path = export_peft_adapter(adapter, snap.cfg, self.root / f"adapter-{n}", str(self.base.path))
        self.exports += 1
        return Target("lora", path, n)

    def merged_dir(self, snap: WeightSnapshot) -> Path:
        """`snap` exported with its adapter (if any) merged; replaces the previous merged export (one merged LLM
        at a time)."""
        if self._merged is not None and self._merged[0]() is snap:
            return self._merged[1]
        if self._merged is not None:
            shutil.rmtree(self._merged[1], ignore_errors=True)
            self._merged = None
        path = export_merged_hf(snap.model(), self.root / f"merged-{next(self._ids)}", self.base.path,
                                adapter=snap.adapter)
        self.exports += 1
        self._merged = (weakref.ref(snap), path)
        return path


@dataclass(eq=False)
class _Request:
    snapshot: Any
    spec: RequestSpec
    seeded: bool
    future: Future
    sequence_ids: list[str]


class VLLMSampler(SamplerBase):
    """Same interface as sampling.Sampler (submit / sample / compute_logprobs / start / stop), on vLLM."""

    _thread_name = "tinker-jax-vllm"

    def __init__(self, base: Any, config: Any = None, *, cache_dir: str | Path | None = None):
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # JAX may hold CUDA: never fork
        # vLLM's FlashInfer top-k/top-p sampler asserts on processed_logprobs (it returns no logprobs).
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        self._vllm = require_vllm()
        self.base, self.config, cfg = base, config, base.cfg
        self.eos_token_ids = eos_ids_of(cfg, base.path)
        self.max_seq_len = min(int(_opt(config, "max_seq_len", 4096)), cfg.max_position_embeddings or 1 << 30)
        self.limits = Limits(cfg.vocab_size, self.max_seq_len, int(_opt(config, "max_num_samples", 128)),
                             int(_opt(config, "max_topk_prompt_logprobs", 20)), 1 << 16, True)
        decoder = getattr(base, "decoder", None)
        self.dtype = np.dtype(decoder.dtype).name if decoder is not None else "auto"
        self._own_dir = cache_dir is None
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="tinker_jax_vllm_"))
        self.exports = ExportCache(base, self.cache_dir, lora_rank_bucket(_opt(config, "max_lora_rank", 64)))
        self._llm, self._llm_key = None, None
        self._cv = threading.Condition()
        self._incoming: list[_Request] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._uids = itertools.count()

    def stop(self, timeout: float | None = None) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread, leftover, self._incoming = self._thread, self._incoming, []
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        for req in leftover:
            if not req.future.done():
                req.future.set_exception(Stopped("sampler: stopped"))
        if thread is None or not thread.is_alive():
            self._close_llm()
            if self._own_dir:
                shutil.rmtree(self.cache_dir, ignore_errors=True)

    def submit(self, snapshot: Any, prompt_tokens: Sequence[int], params: types.SamplingParams, num_samples: int = 1,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
               sequence_ids: Sequence[str] | None = None, tenant: str = "local",
               topk_sample_logprobs: int = 0, target_prompt_logprobs: Any = None,
               prompt_alt_tokens_k: int = 0) -> Future:
        """Enqueue one request; the Future resolves to a SampleResponse (or holds a UserError naming the field).
        `tenant` is accepted for the engine's sake and ignored (vLLM schedules its own batch)."""
        del tenant
        fut: Future = Future()
        uid = next(self._uids)
        try:
            if not isinstance(snapshot, WeightSnapshot):
                raise UserError(f"snapshot: expected a WeightSnapshot, got {type(snapshot).__name__}")
            if snapshot.cfg != self.base.cfg:
                raise UserError("snapshot: its model config does not match this sampler's base model")
            if topk_sample_logprobs:
                raise UserError("topk_sample_logprobs: not supported by the vllm sampler backend (the jax one has it)")
            for name, value in (("target_prompt_logprobs", target_prompt_logprobs is not None),
                                ("prompt_alt_tokens_k", prompt_alt_tokens_k)):
                if value:
                    raise UserError(f"{name}: not supported by the vllm sampler backend (the jax one has it)")
            spec, ids = self._request(uid, prompt_tokens, params, num_samples, include_prompt_logprobs,
                                      topk_prompt_logprobs, sequence_ids)
        except UserError as e:
            fut.set_exception(e)
            return fut
        with self._cv:
            if self._stopping:
                fut.set_exception(Stopped("sampler: stopped"))
                return fut
            self._incoming.append(_Request(snapshot, spec, params.seed is not None, fut, ids))
            self._cv.notify_all()
        self.start()
        return fut

    # ------------------------------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._incoming):
                    self._cv.wait()
                if self._stopping:
                    return
                batch, self._incoming = self._incoming, []
            groups: dict[Any, list[tuple[_Request, Target]]] = {}
            for req in batch:
                try:
                    t = self.exports.target(req.snapshot)
                except Exception as e:  # noqa: BLE001 - an export failure fails its own request
                    req.future.set_exception(e)
                    continue
                groups.setdefault("base" if t.kind != "merged" else ("merged", t.serial), []).append((req, t))
            for key in sorted(groups, key=lambda k: k != self._llm_key):  # the loaded weights first
                try:
                    self._generate(key, groups[key])
                except Exception as e:  # noqa: BLE001
                    log.exception("vllm sampler: generate failed")
                    for req, _ in groups[key]:
                        if not req.future.done():
                            req.future.set_exception(e)

    def _generate(self, key: Any, group: list[tuple[_Request, Target]]) -> None:
        vllm = self._vllm
        if self._llm is None or self._llm_key != key:
            path = self.base.path if key == "base" else self.exports.merged_dir(group[0][0].snapshot)
            self._close_llm()
            self._llm = vllm.LLM(**llm_kwargs(path, self.base.path, self.config, self.dtype, self.max_seq_len))
            self._llm_key = key
        from vllm.lora.request import LoRARequest

        loras = [LoRARequest(f"snapshot-{t.serial}", t.serial, str(t.path)) if t.kind == "lora" else None
                 for _, t in group]
        outs = self._llm.generate([{"prompt_token_ids": list(r.spec.prompt)} for r, _ in group],
                                  [vllm.SamplingParams(**sampling_kwargs(r.spec, r.seeded)) for r, _ in group],
                                  use_tqdm=False, lora_request=loras)
        for (req, _), out in zip(group, outs):
            try:
                s = req.spec
                seqs = [to_sequence(o, s.stop_token_ids, req.sequence_ids[i])
                        for i, o in enumerate(sorted(out.outputs, key=lambda o: o.index))]
                lp, topk = (to_prompt_logprobs(s.prompt, out.prompt_logprobs, s.topk_prompt_logprobs)
                            if s.wants_prompt_logprobs else (None, None))
                req.future.set_result(response.sample_response(seqs, lp, topk))
            except Exception as e:  # noqa: BLE001
                req.future.set_exception(e)

    def _close_llm(self) -> None:
        llm, self._llm, self._llm_key = self._llm, None, None
        if llm is None:
            return
        try:  # best effort: free the GPU memory before a reload
            shutdown = getattr(llm, "shutdown", None) or llm.llm_engine.engine_core.shutdown
            shutdown()
        except Exception as e:  # noqa: BLE001
            log.warning("vllm sampler: engine shutdown failed (%s)", e)
        del llm
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
