"""The orchestrator behind `tinker-jax bench`: measure ours and the peers, then assemble rows.

On a CPU (shared with other work) ours and the peer alternate step by step. On a GPU the peers (PyTorch) run first
and release their memory before ours starts: JAX keeps what it allocated, so the other order could starve the peer.
Every measurement is guarded: a missing dependency makes its figure
"unavailable: <reason>", an error "failed: <reason>", and once the suite's time budget is spent the remaining
figures are "skipped: ...". The table and the JSON always come out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sys
import threading
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.suites import SECTIONS, SUITES, Suite, get_suite

DEFAULT_WORK_DIR = Path(os.environ.get("TINKER_JAX_BENCH_DIR", Path.home() / ".cache" / "tinker-jax-bench"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="cpu", choices=sorted(SUITES),
                   help="cpu (small-qwen3, 2 cores, < 10 min), gpu (Qwen3-0.6B shape, bf16; see benchmarks/gpu.sh), "
                        "gpu-dryrun (the gpu suite at toy size), quick (tiny smoke run). Default cpu. Section moe "
                        "(Qwen3-MoE) runs by default in the cpu suite; in the others with --only (e.g. peak,moe)")
    p.add_argument("--out", metavar="FILE", help="write the rows as JSON here (default: print only)")
    p.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--work-dir", metavar="DIR", default=str(DEFAULT_WORK_DIR),
                   help="model directories and compile cache, reused across runs (default %(default)s)")
    p.add_argument("--time-budget", type=float, metavar="S", help="seconds before remaining figures are skipped "
                                                                  "(default: the suite's)")
    p.add_argument("--quick", action="store_true", help="shorthand for --suite quick")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not point this process's JAX at the persistent compile cache in the work dir (slower "
                        "warm-up, same figures; leaves the process's JAX config untouched, e.g. inside pytest)")


class Interrupted(BaseException):  # not an Exception: no failure handler may swallow it
    """SIGTERM (e.g. gpu.sh's time limit): stop measuring, still write what was measured."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


class Results:
    """key -> measured value (a Stat, a dict/tuple of them) or a reason string; guarded and deadline-aware."""

    def __init__(self, budget_s: float, log: Callable[[str], None]):
        self.budget_s, self.log = budget_s, log
        self.deadline = time.monotonic() + budget_s
        self.values: dict[str, Any] = {}
        self.interrupted = False

    def run(self, key: str, fn: Callable[[], Any], unavailable: str | None = None) -> Any:
        if unavailable:
            self.values[key] = unavailable
        elif self.interrupted:
            self.values[key] = "skipped: the run was interrupted (SIGTERM: time limit)"
        elif time.monotonic() > self.deadline:
            self.values[key] = f"skipped: the suite's time budget ({self.budget_s:.0f} s) was spent"
        else:
            t0 = time.monotonic()
            try:
                self.values[key] = fn()
            except Interrupted:
                self.interrupted = True
                self.values[key] = "skipped: the run was interrupted (SIGTERM: time limit)"
            except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
                self.values[key] = reason(e)
                self.log(traceback.format_exc(limit=6))
            self.log(f"[bench] {key}: {_brief(self.values[key])[:400]} ({time.monotonic() - t0:.1f} s)")
        return self.values[key]

    def get(self, key: str, *path) -> Any:
        v = self.values.get(key, "unavailable: not measured in this invocation")
        for p in path:
            if isinstance(v, str):
                return v
            v = v[p]
        return v


def _brief(v: Any) -> str:
    from benchmarks.timing import Stat

    if isinstance(v, Stat):
        return f"median {v.median:.4g} over {len(v.samples)}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_brief(x)}" for k, x in v.items() if k != "breakdown")
    if isinstance(v, tuple):
        return _brief(v[0])
    return str(v)[:200]


def _once(state: dict, key: str, build):
    """state[key], built by `build()` on first use; a failed build is remembered and raised again on every use
    (one engine or peer model per section, never a second attempt mid-run)."""
    if key + "_error" in state:
        raise state[key + "_error"]
    if key not in state:
        try:
            state[key] = build()
        except Exception as e:
            state[key + "_error"] = e
            raise
    return state[key]


def _import_reason(*modules: str) -> str | None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001
            return f"unavailable: cannot import {m} ({type(e).__name__}: {e})"
    return None


def reason(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"unavailable: {type(e).__name__}: {e}"
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"failed: {type(e).__name__}: {msg}"


Builder = Callable[[], tuple[Any, Callable[[], None]]]  # -> (step or {name: step}, close)


def compare(res: Results, key: str, entries: dict[str, tuple[Builder | None, str | None]], *, warmup: int,
            repeats: int, post: Callable[[str, list], Any]) -> None:
    """Build each available contender, run their steps interleaved (timing.interleave), and store
    res.values[f"{key}.{name}"] = post(name, [(seconds, return value), ...]), or the reason it has no figure.
    A builder may return {sub: step} (several figures from one contender: stored as a dict under its name)."""
    from benchmarks.timing import interleave

    live = {n: b for n, (b, why) in entries.items() if not why}
    for n, (_, why) in entries.items():
        if why:
            res.values[f"{key}.{n}"] = why
    if not live:
        return

    def job():
        steps, closers, failed = {}, [], {}
        try:
            for n, build in live.items():
                try:
                    fn, close = build()
                except Exception as e:  # noqa: BLE001
                    failed[n] = reason(e)
                    continue
                closers.append(close)
                subs = fn if isinstance(fn, dict) else {None: fn}
                steps.update({(n, sub): f for sub, f in subs.items()})
            timed, errors = interleave(steps, warmup=warmup, repeats=repeats)
            for (n, _), e in errors.items():
                failed[n] = reason(e)
                res.log("".join(traceback.format_exception(e, limit=6)))
            out: dict[str, Any] = {}
            for (n, sub), samples in timed.items():
                if n in failed:
                    continue
                v = post(n, samples)
                if sub is None:
                    out[n] = v
                else:
                    out.setdefault(n, {})[sub] = v
            return out, failed
        finally:
            steps.clear()
            for close in closers:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    res.log(traceback.format_exc(limit=3))

    got = res.run(key, job)
    for n in live:
        res.values[f"{key}.{n}"] = got if isinstance(got, str) else got[1].get(n, got[0].get(n))


def _seconds(_, samples) -> Any:
    from benchmarks.timing import Stat

    return Stat([t for t, _ in samples])


def _returned(_, samples) -> Any:  # steps that time themselves (handoff)
    from benchmarks.timing import Stat

    return Stat([float(r) for _, r in samples])


def _rate(name, samples) -> Any:  # ours: (tokens/s per run, tokens per run); torch: seconds (rows know the work)
    from benchmarks.timing import Stat

    if name == "torch":
        return Stat([t for t, _ in samples])
    return Stat([r / t for t, r in samples]), [float(r) for _, r in samples]


def measure(suite: Suite, work_dir: Path, sections: tuple[str, ...], res: Results, log,
            compile_cache: bool = True) -> dict:
    """Run every measurement of the suite into `res`; returns facts the rows need (model shape, paths).

    Interleaved suites (CPU) build ours and the peer side by side and alternate their steps; the GPU suite runs
    every peer measurement first (phase "torch"), frees it, then ours (phase "ours")."""
    from benchmarks import data, handoff_bench, models, peers_torch, sample_bench, train_bench

    model_dir = models.ensure_model(work_dir / "models", suite.model)
    shape = models.model_shape(model_dir)
    vocab = shape["vocab_size"]
    train_tokens = {s.label: data.token_batch(1, s.rows, s.length, vocab) for s in suite.train}
    prompts = {b: data.prompts(2, b, suite.prompt_len, vocab) for b in suite.sample_batches}
    handoff_tokens = data.token_batch(3, suite.train[0].rows, suite.train[0].length, vocab)
    handoff_prompt = data.prompts(4, 1, suite.prompt_len, vocab)[0]
    facts: dict[str, Any] = {"model_dir": str(model_dir), "shape": shape}
    torch_missing = _import_reason("torch", "transformers")
    peft_missing = torch_missing or _import_reason("peft")
    state: dict[str, Any] = {}  # the engine (ours) and the torch model shared by the sampling runs
    capture: dict[str, Any] = {}  # ours' first logprobs on suite.train[0] (compared in "attention")

    def engine():
        """The one in-process ServiceClient for all of ours (built on first use; a failure is remembered)."""
        def build():
            from benchmarks.ours_client import service_client

            engine_dir = Path(tempfile.mkdtemp(prefix="engine-", dir=work_dir))
            facts["engine_dir"] = str(engine_dir)
            return service_client(
                suite.model, model_dir, engine_dir, dtype=suite.dtype,
                max_tokens_per_batch=suite.max_tokens_per_batch, sampler_batch=max(suite.sample_batches),
                sampler_seq_len=suite.sampler_seq_len,
                compile_cache_dir=work_dir / "jax_cache" if compile_cache else None,
                remat=suite.remat, attention=suite.attention)

        return _once(state, "sc", build)

    def hf_model():
        if "hf" not in state:
            state["hf"] = peers_torch.load_model(model_dir, suite.dtype)
        return state["hf"]

    def no_close():
        return None

    def comparisons(who: tuple[str, ...]):
        """(key, entries, warmup, repeats, post) for every comparison of the suite, limited to `who`."""
        out = []
        if "train" in sections:
            for s in suite.train:
                lora = s.mode == "lora"
                rank = suite.lora_rank if lora else None
                out.append((f"train.{s.label}", {
                    "torch": (lambda s=s, rank=rank: peers_torch.train_step(
                        model_dir, train_tokens[s.label], lora_rank=rank, lora_alpha=suite.lora_alpha,
                        dtype=suite.dtype), peft_missing if lora else torch_missing),
                    "ours": (lambda s=s, rank=rank: train_bench.train_step(
                        engine(), suite.model, train_tokens[s.label], lora_rank=rank,
                        capture=capture if s == suite.train[0] else None), None),
                }, suite.train_warmup, suite.train_repeats, _seconds))
        if "sample" in sections:
            for b in suite.sample_batches:
                out.append((f"sample.{b}", {
                    "torch": (lambda b=b: (peers_torch.generate_step(hf_model(), prompts[b], suite.max_new),
                                           no_close), torch_missing),
                    "ours": (lambda b=b: sample_bench.sample_step(
                        engine(), suite.model, prompts[b], suite.max_new), None),
                }, suite.sample_warmup, suite.sample_repeats, _rate))
        if "handoff" in sections:
            out.append(("handoff", {
                "torch": (lambda: peers_torch.handoff_step(model_dir, handoff_prompt, lora_rank=suite.lora_rank,
                                                           lora_alpha=suite.lora_alpha, dtype=suite.dtype),
                          peft_missing),
                "ours": (lambda: handoff_bench.handoff_steps(
                    engine(), suite.model, handoff_tokens, handoff_prompt, lora_rank=suite.lora_rank), None),
            }, suite.handoff_warmup, suite.handoff_repeats, _returned))
        return [(k, {n: e for n, e in ents.items() if n in who}, w, r, p) for k, ents, w, r, p in out]

    try:
        if "peak" in sections:
            from benchmarks import peak

            res.run("peak.torch", lambda: peak.torch_peak(suite.peak_n, suite.peak_dtype), torch_missing)
            res.run("peak.jax", lambda: peak.jax_peak(suite.peak_n, suite.peak_dtype))
        phases = [("torch", "ours")] if suite.interleave else [("torch",), ("ours",)]
        for who in phases:
            for key, entries, warmup, repeats, post in comparisons(who):
                compare(res, key, entries, warmup=warmup, repeats=repeats, post=post)
            if "torch" in who:
                state.pop("hf", None)
                if not torch_missing:
                    peers_torch.free_memory()
        if "frontdoor" in sections:
            from benchmarks import frontdoor_bench

            fd_tokens = data.token_batch(5, suite.frontdoor_rows, suite.frontdoor_length, vocab)
            res.run("frontdoor", lambda: frontdoor_bench.measure_frontdoor(
                engine(), suite.model, fd_tokens, Path(facts["engine_dir"]) / "server", lora_rank=suite.lora_rank,
                warmup=suite.frontdoor_warmup, repeats=suite.frontdoor_repeats), frontdoor_bench.unavailable_reason())
    finally:
        state.pop("hf", None)
        if "sc" in state:
            sc = state.pop("sc")
            attention = _attention_in_use(sc.engine, suite.model)
            if attention:
                facts["attention"] = attention
            sc.close()
        if facts.get("engine_dir"):
            shutil.rmtree(facts["engine_dir"], ignore_errors=True)
    if "coldstart" in sections:
        from benchmarks.coldstart_bench import measure_coldstart

        res.run("coldstart", lambda: measure_coldstart(
            model_dir, work_dir / "coldstart", rows=suite.coldstart_rows, length=suite.coldstart_length,
            rank=suite.lora_rank, dtype=suite.dtype, repeats=suite.coldstart_repeats))
    if "attention" in sections:
        res.run("attention", lambda: _attention_ablation(suite, model_dir, work_dir, train_tokens, capture, facts,
                                                         compile_cache))
    if "tenants" in sections:
        from benchmarks import tenants_bench

        def tenants():
            spec = _tenants_spec(suite, work_dir, model_dir, compile_cache)
            facts["tenants_shape"] = models.model_shape(Path(spec.model_dir))
            return tenants_bench.measure_tenants(spec, work_dir / "tenants", log=log,
                                                 timeout=max(300.0, res.deadline - time.monotonic()))
        res.run("tenants", tenants, tenants_bench.unavailable_reason(suite.tenants_frontdoor))
    if "multiprocess" in sections:
        from benchmarks import multiprocess_bench

        def multiprocess():
            spec = _multiprocess_spec(suite, work_dir, model_dir)
            facts["multiprocess_shapes"] = {multiprocess_bench.run_label(r): models.model_shape(Path(r["model_dir"]))
                                            for r in spec.runs}
            return multiprocess_bench.measure_multiprocess(spec, work_dir / "multiprocess", log=log,
                                                           timeout=suite.mp_timeout_s)
        res.run("multiprocess", multiprocess, multiprocess_bench.unavailable_reason())
    if "moe" in sections:
        _measure_moe(suite, work_dir, res, facts, compile_cache)
    return facts


def _measure_moe(suite: Suite, work_dir: Path, res: Results, facts: dict, compile_cache: bool) -> None:
    """The "moe" section: suite.moe_model in an engine of its own (built after the main one is closed), LoRA
    training at suite.moe_train and decode at suite.moe_sample_batches, ours against transformers(+peft) on the same
    weights, data and shapes, in the suite's order (interleaved step by step, or the peer first on a GPU)."""
    from benchmarks import data, models, peers_torch, sample_bench, train_bench

    name = suite.moe_model
    got = res.run("moe.model", lambda: {"dir": str(models.ensure_model(work_dir / "models", name))})
    if isinstance(got, str):
        return
    model_dir = Path(got["dir"])
    shape = models.model_shape(model_dir)
    rank = suite.moe_lora_rank
    facts["moe_shape"] = shape
    facts["moe_ours_lora_params"] = models.lora_params(model_dir, rank)
    vocab = shape["vocab_size"]
    tokens = {s.label: data.token_batch(11, s.rows, s.length, vocab) for s in suite.moe_train}
    prompts = {b: data.prompts(12, b, suite.moe_prompt_len, vocab) for b in suite.moe_sample_batches}
    torch_missing = _import_reason("torch", "transformers")
    peft_missing = torch_missing or _import_reason("peft")
    state: dict[str, Any] = {}

    def engine():
        def build():
            from benchmarks.ours_client import service_client

            state["dir"] = Path(tempfile.mkdtemp(prefix="engine-moe-", dir=work_dir))
            return service_client(
                name, model_dir, state["dir"], dtype=suite.dtype,
                max_tokens_per_batch=max(8192, *(s.tokens for s in suite.moe_train)),
                sampler_batch=max(suite.moe_sample_batches),
                sampler_seq_len=suite.moe_prompt_len + suite.moe_max_new + 16,
                compile_cache_dir=work_dir / "jax_cache" if compile_cache else None,
                remat=suite.remat, attention=suite.attention)

        return _once(state, "sc", build)

    def hf_model():
        if "hf" not in state:
            state["hf"] = peers_torch.load_model(model_dir, suite.dtype)
        return state["hf"]

    def comparisons(who: tuple[str, ...]):
        out = []
        for s in suite.moe_train:
            out.append((f"moe.train.{s.label}", {
                "torch": (lambda s=s: peers_torch.train_step(
                    model_dir, tokens[s.label], lora_rank=rank, lora_alpha=suite.lora_alpha, dtype=suite.dtype,
                    targets=peers_torch.MOE_LORA_TARGETS), peft_missing),
                "ours": (lambda s=s: train_bench.train_step(engine(), name, tokens[s.label], lora_rank=rank,
                                                            train_unembed=True), None),
            }, suite.moe_train_warmup, suite.moe_train_repeats, _seconds))
        for b in suite.moe_sample_batches:
            out.append((f"moe.sample.{b}", {
                "torch": (lambda b=b: (peers_torch.generate_step(hf_model(), prompts[b], suite.moe_max_new),
                                       lambda: None), torch_missing),
                "ours": (lambda b=b: sample_bench.sample_step(engine(), name, prompts[b], suite.moe_max_new), None),
            }, suite.moe_sample_warmup, suite.moe_sample_repeats, _rate))
        return [(k, {n: e for n, e in ents.items() if n in who}, w, r, p) for k, ents, w, r, p in out]

    try:
        for who in ([("torch", "ours")] if suite.interleave else [("torch",), ("ours",)]):
            for key, entries, warmup, repeats, post in comparisons(who):
                compare(res, key, entries, warmup=warmup, repeats=repeats, post=post)
            if "torch" in who:
                state.pop("hf", None)
                if not torch_missing:
                    peers_torch.free_memory()
    finally:
        state.pop("hf", None)
        if "sc" in state:
            state.pop("sc").close()
        if state.get("dir"):
            shutil.rmtree(state["dir"], ignore_errors=True)
        facts["moe_peer_lora"] = peers_torch.LORA_NOTES.get(str(model_dir)) if not peft_missing else None


def _multiprocess_spec(suite: Suite, work_dir: Path, model_dir: Path):
    from benchmarks import models
    from benchmarks.multiprocess_bench import MultiprocessSpec

    runs = []
    for name, rows, length in suite.mp_runs:
        name = name or suite.model
        d = model_dir if name == suite.model else models.ensure_model(work_dir / "models", name)
        runs.append({"model_name": name, "model_dir": str(d), "rows": rows, "length": length})
    return MultiprocessSpec(runs=runs, dtype=suite.dtype, rank=suite.lora_rank, warmup=suite.mp_warmup,
                            repeats=suite.mp_repeats, fsdp=suite.mp_fsdp, tensor=suite.mp_tensor,
                            processes=suite.mp_processes,
                            max_tokens_per_batch=max(suite.max_tokens_per_batch, *(r * n for _, r, n in suite.mp_runs)))


def _tenants_spec(suite: Suite, work_dir: Path, model_dir: Path, compile_cache: bool):
    from benchmarks import models
    from benchmarks.tenants_bench import TenantsSpec

    name = suite.tenants_model or suite.model
    if name != suite.model:
        model_dir = models.ensure_model(work_dir / "models", name)
    ref = suite.tenants_ref
    return TenantsSpec(
        model_name=name, model_dir=str(model_dir), dtype=suite.dtype, frontdoor=suite.tenants_frontdoor,
        counts=tuple(suite.tenants_counts), rows=suite.tenants_rows, length=suite.tenants_length,
        steps=suite.tenants_steps, rank=suite.tenants_lora_rank, samplers=suite.tenants_samplers,
        num_samples=suite.tenants_num_samples, prompt_len=suite.tenants_prompt_len, max_new=suite.tenants_max_new,
        warmup=suite.tenants_warmup, repeats=suite.tenants_repeats,
        max_tokens_per_batch=max(suite.max_tokens_per_batch, ref.tokens if ref else 0),
        ref_rows=ref.rows if ref else 0, ref_length=ref.length if ref else 0, remat=suite.remat,
        attention=suite.attention, compile_cache_dir=str(work_dir / "jax_cache") if compile_cache else None)


def _attention_in_use(engine, model: str) -> str | None:
    """The training attention kernel the engine used for `model` (after its cuDNN probe); None if the model was
    never loaded (engine.stats() reports a kernel only for loaded models)."""
    try:
        s = engine.stats()["models"].get(model)
    except Exception:  # noqa: BLE001 - a record, never a failure
        return None
    return s["attention"] if s and s.get("loaded") else None


def _attention_ablation(suite: Suite, model_dir: Path, work_dir: Path, train_tokens: dict, capture: dict,
                        facts: dict, compile_cache: bool) -> dict:
    """Ours on suite.train[0] again, in a fresh engine whose only difference is the attention kernel (einsum if
    the main run used a fused one, else "xla"): its step time, and how far its first logprobs (before any update,
    so the same weights) are from the main run's."""
    import numpy as np

    from benchmarks import train_bench
    from benchmarks.ours_client import service_client
    from benchmarks.timing import Stat, interleave

    main = facts.get("attention")
    if main is None:
        return "not measured: the main run built no engine"
    other = "einsum" if main != "einsum" else "xla"
    s = suite.train[0]
    engine_dir = Path(tempfile.mkdtemp(prefix="engine-ablation-", dir=work_dir))
    sc = service_client(suite.model, model_dir, engine_dir, dtype=suite.dtype,
                        max_tokens_per_batch=suite.max_tokens_per_batch, sampler_batch=1, sampler_seq_len=64,
                        compile_cache_dir=work_dir / "jax_cache" if compile_cache else None, remat=suite.remat,
                        attention=other)
    try:
        mine: dict = {}
        step, close = train_bench.train_step(sc, suite.model, train_tokens[s.label],
                                             lora_rank=suite.lora_rank if s.mode == "lora" else None, capture=mine)
        timed, errors = interleave({"step": step}, warmup=1, repeats=suite.ablation_repeats)
        close()
        if errors:
            raise next(iter(errors.values()))
        out: dict = {"main": main, "other": other, "label": s.label,
                     "other_seconds": Stat([t for t, _ in timed["step"]])}
        if "logprobs" in capture and "logprobs" in mine:
            d = np.concatenate([np.abs(a - b).ravel() for a, b in zip(capture["logprobs"], mine["logprobs"])])
            out["logprob_abs_diff"] = {"mean": float(d.mean()), "max": float(d.max()), "tokens": int(d.size)}
        return out
    finally:
        sc.close()
        shutil.rmtree(engine_dir, ignore_errors=True)


def _shape_or_none(suite: Suite, work_dir: Path) -> dict | None:
    from benchmarks import models

    d = work_dir / "models" / f"{suite.model}-seed0"
    return models.model_shape(d) if (d / "config.json").is_file() else None


def run(suite: Suite, work_dir: Path, out: Path | None = None, sections: tuple[str, ...] | None = None,
        time_budget_s: float | None = None, log: Callable[[str], None] | None = None,
        compile_cache: bool = True) -> list[dict]:
    from benchmarks import report, rows
    from benchmarks.timing import machine_info, versions

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    sections = tuple(sections or suite.sections)
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise ValueError(f"--only: unknown sections {bad}; known: {', '.join(SECTIONS)}")
    work_dir = Path(work_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    res = Results(time_budget_s or suite.time_budget_s, log)
    meta = {"suite": suite.name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": versions(), "caveats": list(suite.caveats)}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        facts = measure(suite, work_dir, sections, res, log, compile_cache)
    except Interrupted:
        res.interrupted = True
        facts = {"shape": _shape_or_none(suite, work_dir)}
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if facts.get("shape") is None:
        raise RuntimeError("interrupted before the model directory was written: nothing to report")
    meta["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["machine"]["suite_wall_s"] = round(time.monotonic() - started, 1)
    out_rows = rows.assemble(suite, sections, res, facts, meta)
    print(report.table(out_rows), flush=True)
    if out is not None:
        report.write_json(out_rows, Path(out))
        print(f"wrote {len(out_rows)} rows to {out}", flush=True)
    else:
        report.validate_rows(out_rows)
    return out_rows


def run_from_args(args: argparse.Namespace) -> int:
    suite = get_suite("quick" if args.quick else args.suite)
    # libgomp's default active spin-wait made torch 10-25x slower on a 2-core machine shared with other work
    # (measured: generate 16x8 tokens 10-25 s -> 1.0-1.5 s); must be set before torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if suite.name.startswith("gpu"):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and jax share the chip
    sections = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else None
    run(suite, Path(args.work_dir), Path(args.out) if args.out else None, sections, args.time_budget,
        compile_cache=not args.no_compile_cache)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description="tinker_jax benchmarks vs peers")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def _command():
    from tinker_jax.cli import Subcommand

    return Subcommand("benchmark ours against peers (transformers+peft, ...) in one invocation; table + JSON",
                      add_arguments, run_from_args)


COMMAND = _command()  # `tinker-jax bench` (registered in pyproject.toml under tinker_jax.commands)
