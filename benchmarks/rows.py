"""Measurements -> report rows (units, peers side by side, goals, MFU)."""

from __future__ import annotations

from typing import Any

from benchmarks import models
from benchmarks.peers import SKYRL, skyrl_tx_status
from benchmarks.report import make_row
from benchmarks.suites import Suite
from benchmarks.timing import Stat

TORCH_LORA = "transformers+peft"
TORCH_FULL = "transformers"
TORCH_GEN = "transformers generate"
TORCH_HANDOFF = "transformers+peft disk reload"  # save adapter, load base + adapter from disk, generate
IN_PROCESS = "tinker_jax.ServiceClient in-process"


def _tput(x: Any, work: float) -> Any:
    """seconds Stat -> work/s Stat; reason strings pass through."""
    return x.map(lambda s: work / s) if isinstance(x, Stat) else x


def _peak(res) -> tuple[float | None, str]:
    """The MFU denominator: the larger of the jax and torch matmul medians (the conservative choice)."""
    vals = {k: res.get(f"peak.{k}") for k in ("jax", "torch")}
    nums = {k: v.median for k, v in vals.items() if isinstance(v, Stat)}
    if not nums:
        return None, "no measured peak"
    k = max(nums, key=nums.get)
    return nums[k], f"{k} matmul median"


def assemble(suite: Suite, sections, res, facts: dict, meta: dict) -> list[dict]:
    shape = facts["shape"]
    skyrl = skyrl_tx_status()
    rows: list[dict] = []
    base = {"model": suite.model, "n_params": shape["n_params"], "dtype": suite.dtype,
            "ours_sampler": {"max_batch": max(suite.sample_batches), "max_seq_len": suite.sampler_seq_len}}
    peak, peak_src = _peak(res)
    giga = 1e12 if suite.peak_dtype == "bfloat16" else 1e9
    unit_flops = "TFLOP/s" if giga == 1e12 else "GFLOP/s"

    if "peak" in sections:
        rows.append(make_row(
            f"matmul peak {suite.peak_n}^3 {suite.peak_dtype} (jax)", unit_flops,
            _scale(res.get("peak.jax"), 1 / giga), {"torch": _scale(res.get("peak.torch"), 1 / giga)}, meta=meta,
            settings={"n": suite.peak_n, "dtype": suite.peak_dtype, "flops": "2 n^3"}))

    if "train" in sections:
        mfu_rows = []
        for s in suite.train:
            lora = s.mode == "lora"
            peer = TORCH_LORA if lora else TORCH_FULL
            ours = _tput(res.get(f"train.{s.label}.ours"), s.tokens)
            peers = {peer: _tput(res.get(f"train.{s.label}.torch"), s.tokens)}
            if lora:
                peers[SKYRL] = skyrl
            what = f"LoRA r{suite.lora_rank} (attn+MLP)" if lora else "full fine-tune"
            settings = {**base, "rows": s.rows, "length": s.length, "tokens_per_step": s.tokens,
                        "step": "forward_backward(cross_entropy) + optim_step (AdamW)",
                        "lora": {"rank": suite.lora_rank, "alpha": suite.lora_alpha,
                                 "targets": "q,k,v,o,gate,up,down"} if lora else None,
                        "warmup": suite.train_warmup, "repeats": suite.train_repeats}
            from benchmarks.peers_torch import MICRO_BATCH_NOTES

            settings["peer_note"] = MICRO_BATCH_NOTES.get((s.rows, s.length, lora))
            goal = ">= 1.5x transformers+peft and >= 3x skyrl-tx" if lora else ">= 1.5x transformers"
            rows.append(make_row(f"train {what} {s.rows}x{s.length}", "tokens/s", ours, peers, meta=meta,
                                 settings=settings, goal=goal))
            if peak:
                fpt = models.train_flops_per_token(shape, s.length, lora)
                to_mfu = lambda x: x.map(lambda t: 100.0 * t * fpt / peak) if isinstance(x, Stat) else x  # noqa: E731
                mfu_rows.append(make_row(
                    f"MFU train {what} {s.rows}x{s.length}", "% MFU", to_mfu(ours),
                    {k: to_mfu(v) for k, v in peers.items()}, meta=meta,
                    settings={**settings, "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_src,
                              "formula": ("4N" if lora else "6N") + " + 3x causal attention forward"},
                    goal=">= 40% on GPU (full fine-tune)" if not lora else None))
        rows.extend(mfu_rows)

    if "sample" in sections:
        for b in suite.sample_batches:
            ours = res.get(f"sample.{b}.ours")
            returned = None
            if isinstance(ours, tuple):
                ours, returned = ours
            peers = {TORCH_GEN: _tput(res.get(f"sample.{b}.torch"), b * suite.max_new), SKYRL: skyrl}
            settings = {**base, "batch": b, "prompt_len": suite.prompt_len, "max_new_tokens": suite.max_new,
                        "decoding": "greedy", "ours_requests": f"{b} x sample(num_samples=1) submitted together",
                        "ours_tokens_returned_per_run": returned,
                        "peer_tokens_per_run": b * suite.max_new, "warmup": suite.sample_warmup,
                        "repeats": suite.sample_repeats}
            rows.append(make_row(f"decode batch {b}, prompt {suite.prompt_len} +{suite.max_new}", "tokens/s",
                                 ours, peers, meta=meta, settings=settings, goal=">= 2x skyrl-tx"))

    if "frontdoor" in sections:
        fd = res.get("frontdoor")
        rest, local = (fd, fd) if isinstance(fd, str) else (fd["rest"], fd["in_process"])
        settings = {**base, "rows": suite.frontdoor_rows, "length": suite.frontdoor_length,
                    "call": "forward_backward(cross_entropy).result()", "rest": "tinker SDK -> uvicorn 127.0.0.1 -> "
                    "server.app.build_app(engine)", "warmup": suite.frontdoor_warmup,
                    "repeats": suite.frontdoor_repeats, "order": "remote and in-process calls alternate"}
        for q in (50, 99):
            rows.append(_latency_row(f"forward_backward round trip p{q}, SDK + REST", rest, local, q, meta, settings))
        over = rest if isinstance(rest, str) else (local if isinstance(local, str) else
                                                   Stat(_paired_diff(rest.samples, local.samples)))
        rows.append(make_row("front-door overhead (REST - in-process), paired median", "ms", over,
                             {SKYRL: skyrl}, meta=meta, settings=settings, goal="< 15 ms p50",
                             higher_is_better=False))

    if "handoff" in sections:
        ho = res.get("handoff.ours")
        peer = {TORCH_HANDOFF: res.get("handoff.torch"), SKYRL: skyrl}
        settings = {**base, "lora_rank": suite.lora_rank, "prompt_len": suite.prompt_len, "sampled_tokens": 1,
                    "before_each_run": "one untimed forward_backward + optim_step",
                    "peer_method": "peft save_pretrained(adapter); from_pretrained(base) + PeftModel.from_pretrained; "
                                   "generate 1 token", "warmup": suite.handoff_warmup,
                    "repeats": suite.handoff_repeats}
        for key, what in (("in_memory", "in memory (save_weights_and_get_sampling_client)"),
                          ("via_path", "via path (save_weights_for_sampler + create_sampling_client)")):
            rows.append(make_row(f"weight handoff to 1st token, {what}", "s", ho if isinstance(ho, str) else ho[key], peer,
                                 meta=meta, settings=settings, goal="< 1 s for a 0.6B model", higher_is_better=False))

    if "coldstart" in sections:
        cs = res.get("coldstart")
        settings = {**base, "rows": suite.coldstart_rows, "length": suite.coldstart_length,
                    "lora_rank": suite.lora_rank, "measured": "spawn -> first forward_backward result",
                    "no_cache_runs": "the first into an empty cache dir (compiles, fills the cache), then fresh "
                                     "dirs with compile_cache=False",
                    "repeats": suite.coldstart_repeats,
                    "breakdown_last_run": None if isinstance(cs, str) else cs["breakdown"]}
        for key, what in (("no_cache", "no compile cache"), ("warm_cache", "warm persistent compile cache")):
            rows.append(make_row(f"cold start to first forward_backward, {what}", "s",
                                 cs if isinstance(cs, str) else cs[key], {}, meta=meta, settings=settings,
                                 higher_is_better=False))
    if "attention" in sections:
        ab = res.get("attention")
        s = suite.train[0]
        main_tput = _tput(res.get(f"train.{s.label}.ours"), s.tokens)
        main, other = ("main", "other") if isinstance(ab, str) else (ab["main"], ab["other"])
        settings = {**base, "rows": s.rows, "length": s.length, "mode": s.mode, "remat": suite.remat,
                    "what": "a second engine that differs from the main run only in the training attention kernel",
                    "repeats": suite.ablation_repeats}
        rows.append(make_row(
            f"ablation: train {s.mode} {s.rows}x{s.length} with {other} attention", "tokens/s",
            ab if isinstance(ab, str) else _tput(ab["other_seconds"], s.tokens),
            {f"ours, {main} attention (the train row)": main_tput}, meta=meta, settings=settings))
        diff = ab if isinstance(ab, str) else ab.get("logprob_abs_diff", "not measured: no logprobs captured")
        rows.append(make_row(
            f"check: mean |target logprob difference|, {main} vs {other} attention, {s.rows}x{s.length}", "nats",
            diff if isinstance(diff, str) else Stat([diff["mean"]]), {}, meta=meta,
            settings={**settings, "max_abs_diff": None if isinstance(diff, str) else diff["max"],
                      "tokens": None if isinstance(diff, str) else diff["tokens"],
                      "note": "first forward_backward of each engine, before any optim_step: the same weights"},
            higher_is_better=False))
    if "tenants" in sections:
        tshape = facts.get("tenants_shape") or (shape if (suite.tenants_model or suite.model) == suite.model else {})
        rows.extend(_tenants_rows(suite, res.get("tenants"), {**base, "n_params": tshape.get("n_params")}, meta))
    if "multiprocess" in sections:
        rows.extend(_multiprocess_rows(suite, res.get("multiprocess"), base, facts, meta))
    if "moe" in sections:
        rows.extend(_moe_rows(suite, res, facts, meta, peak, peak_src))
    if "train" in sections:
        for r in rows:
            if r["metric"].startswith(("train ", "MFU train ")):
                r["settings"]["ours_attention"] = facts.get("attention")
                r["settings"]["ours_remat"] = suite.remat
    return rows


def _scale(x: Any, k: float) -> Any:
    return x.map(lambda v: v * k) if isinstance(x, Stat) else x


def _paired_diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def _latency_row(metric: str, rest: Any, local: Any, q: int, meta: dict, settings: dict) -> dict:
    """p50/p99 over the timed calls. The spread of a percentile is given as the min/max of all calls."""
    def pct(x):
        if isinstance(x, str):
            return x
        return _Percentile(x, q)
    return make_row(metric, "ms", pct(rest), {IN_PROCESS: pct(local)}, meta=meta,
                    settings={**settings, "statistic": f"p{q} over {settings['repeats']} calls"},
                    goal="overhead < 15 ms p50" if q == 50 else None, higher_is_better=False)


class _Percentile(Stat):
    """A Stat whose reported figure is a percentile instead of the median."""

    def __init__(self, base: Stat, q: float):
        super().__init__(list(base.samples))
        self.q = q

    @property
    def median(self) -> float:  # the reported figure
        return self.percentile(self.q)

    def spread(self) -> dict:
        d = Stat(self.samples).spread()
        d["statistic"] = f"p{self.q:g}"
        d["value"] = self.percentile(self.q)
        return d


TENANT_DOORS = {"rest": "tinker SDK + REST", "in_process": "in-process tinker_jax client"}
TURNS = "the same clients one at a time"


def _tenants_rows(suite: Suite, tn: Any, base: dict, meta: dict) -> list[dict]:
    """Rows of the "tenants" section (benchmarks/tenants_bench.py): per client count and front door, aggregate
    training tokens/s concurrent vs one at a time (and vs one adapter on a large batch, when measured); peak device
    memory; concurrent samplers of different adapters. `tn` is the child's result, or why there is none."""
    fail = tn if isinstance(tn, str) else None
    tn = {} if fail else tn
    rank, ref = suite.tenants_lora_rank, suite.tenants_ref
    doors = ("rest", "in_process") if suite.tenants_frontdoor == "rest" else ("in_process",)
    ref_res = tn.get("ref") or {}
    ref_door = ref_res.get("frontdoor", doors[0])
    ref_name = f"one adapter, {ref.rows}x{ref.length}" if ref else None
    stats = (tn.get("engine_stats") or {}).get("per_phase_kind", {})
    settings = {**base, "model": suite.tenants_model or suite.model, "front_door": suite.tenants_frontdoor,
                "lora": {"rank": rank, "alpha": suite.lora_alpha, "targets": "q,k,v,o,gate,up,down"},
                "rows": suite.tenants_rows, "length": suite.tenants_length, "steps_per_phase": suite.tenants_steps,
                "warmup_phases": suite.tenants_warmup, "repeats": suite.tenants_repeats,
                "step": "forward_backward(cross_entropy) + optim_step (AdamW), submitted back to back, both awaited",
                "concurrent": "every client in its own thread, released together; aggregate tokens / phase wall time",
                "one_at_a_time": "the clients take turns: each client's step completes before the next one starts",
                "engine": "a fresh engine in a child process (benchmarks/tenants_bench.py)",
                "device": tn.get("device"), "attention": (tn.get("engine_stats") or {}).get("attention"),
                "max_requests_per_batch_whole_run": (tn.get("engine_stats") or {}).get("max_requests_per_batch"),
                "child_wall_s": tn.get("child_wall_s")}

    def fig(d: dict | None, key: str) -> Any:
        if fail:
            return fail
        if d is None:
            return "not measured: no result for this configuration"
        if d.get("error"):
            return d["error"]
        return d.get(key, f"not measured: {key} missing")

    out: list[dict] = []
    configs = {c["n"]: c for c in tn.get("configs", [])}
    for n in suite.tenants_counts:
        c = configs.get(n)
        for door in doors:
            peers = {TURNS: fig(c, f"{door}.turns.samples")}
            if ref and door == ref_door:
                peers[ref_name] = fig(ref_res, "samples") if ref_res or fail else \
                    "not measured: no reference phase"
            goal = None
            if ref and n == max(suite.tenants_counts) and suite.name.startswith("gpu"):
                goal = f">= 0.8x {ref_name} (the issue: 32 rank-32 adapters at 8x256 tokens each)"
            st = {k: stats.get(f"{door}.{k}") for k in ("concurrent", "turns")}
            notes = _tenants_train_notes(st, c or {}, doors)
            out.append(make_row(
                f"tenants: {n} LoRA r{rank} clients training concurrently, {suite.tenants_rows}x"
                f"{suite.tenants_length} tokens each ({TENANT_DOORS[door]})", "tokens/s",
                fig(c, f"{door}.concurrent.samples"), peers, meta=meta, goal=goal,
                settings={**settings, "clients": n, "front_door": door,
                          "work_tokens_per_phase": n * suite.tenants_steps * suite.tenants_rows * suite.tenants_length,
                          "ref": {"rows": ref.rows, "length": ref.length, "front_door": ref_door} if ref else None,
                          "create_s": (c or {}).get("create_s"),
                          "warmup_rounds": (c or {}).get(f"{door}.warmup_rounds"),
                          "compiles_in_timed_phases": (c or {}).get(f"{door}.compiles_in_timed_phases"),
                          "step_latency_ms": {k: (c or {}).get(f"{door}.{k}.step_latency_ms")
                                              for k in ("concurrent", "turns")},
                          "engine_stats": st, "notes": notes}))
        mem = fail or (c or {}).get("error") or (c or {}).get("memory") or \
            "not measured: no result for this configuration"
        ref_mem = fail or ref_res.get("memory") or "not measured: no reference phase"
        out.append(make_row(
            f"tenants: peak device memory, {n} LoRA r{rank} adapters training", "GiB", _gib(mem),
            {ref_name: _gib(ref_mem)} if ref else {}, meta=meta, higher_is_better=False,
            goal=("within 10% of one adapter's" if ref and n == max(suite.tenants_counts)
                  and suite.name.startswith("gpu") else None),
            settings={**settings, "clients": n, "source": "jax.devices()[0].memory_stats()['peak_bytes_in_use'] "
                      "after the configuration's phases (a process-wide high-water mark; configurations run in "
                      "ascending size, the one-adapter reference first)",
                      "raw": {"adapters": mem if isinstance(mem, dict) else None,
                              "ref": ref_mem if isinstance(ref_mem, dict) else None}}))
    if suite.tenants_samplers:
        smp = tn.get("sampling")
        if smp is None and not fail:
            smp = {"error": "not measured: no sampling result (fewer clients than samplers?)"}
        for door in doors:
            st = {k: stats.get(f"sample.{door}.{k}") for k in ("concurrent", "turns")}
            out.append(make_row(
                f"tenants: {suite.tenants_samplers} samplers of different LoRA r{rank} adapters sampling "
                f"concurrently, {suite.tenants_num_samples}x +{suite.tenants_max_new} tokens each "
                f"({TENANT_DOORS[door]})", "tokens/s", fig(smp, f"{door}.concurrent.samples"),
                {"the same samplers one at a time": fig(smp, f"{door}.turns.samples")}, meta=meta,
                settings={**settings, "samplers": suite.tenants_samplers, "front_door": door,
                          "prompt_len": suite.tenants_prompt_len, "num_samples": suite.tenants_num_samples,
                          "max_new_tokens": suite.tenants_max_new, "decoding": "greedy",
                          "adapters": "save_weights_and_get_sampling_client() of the last configuration's first "
                                      "clients, after training",
                          "tokens_returned_per_phase": (smp or {}).get(f"{door}.tokens_per_phase"),
                          "warmup_rounds": (smp or {}).get(f"{door}.warmup_rounds"),
                          "compiles_in_timed_phases": (smp or {}).get(f"{door}.compiles_in_timed_phases"),
                          "engine_stats": st, "notes": _tenants_sample_notes(st)}))
    return out


def _gib(m: Any) -> Any:
    if isinstance(m, dict):
        if "peak_bytes_in_use" not in m:
            return "unavailable: memory_stats() has no peak_bytes_in_use"
        return Stat([m["peak_bytes_in_use"] / 2**30])
    return m


def _per(a: int | None, b: int | None) -> str:
    return f"{a / b:.1f}" if a is not None and b else "-"


def _tenants_train_notes(st: dict, c: dict, doors: tuple) -> str | None:
    cc, tt = st.get("concurrent"), st.get("turns")
    if not cc or not tt:
        return None
    per = _per(cc["requests_batched"], cc["micro_batches"])
    parts = [f"batching (Engine.stats() deltas over the timed phases): concurrent {cc['requests_batched']} "
             f"forward_backward requests in {cc['micro_batches']} micro-batches ({per} per micro-batch, "
             f"{cc['rounds']} scheduler rounds, {cc['optim_steps']} optim steps); one at a time "
             f"{tt['requests_batched']} in {tt['micro_batches']} ({tt['rounds']} rounds)"]
    lat = {d: (c.get(f"{d}.turns.step_latency_ms") or {}).get("median") for d in doors}
    if lat.get("rest") and lat.get("in_process"):
        share = 100 * (1 - lat["in_process"] / lat["rest"])
        parts.append(f"one step one at a time (median): {lat['rest']:.1f} ms through the SDK + REST, "
                     f"{lat['in_process']:.1f} ms in process: the front door adds "
                     f"{lat['rest'] - lat['in_process']:.1f} ms per step ({share:.0f}%)")
    return "; ".join(parts)


def _tenants_sample_notes(st: dict) -> str | None:
    cc, tt = st.get("concurrent"), st.get("turns")
    if not cc or not tt:
        return None
    return (f"decode calls: concurrent {cc['sampler.decode_calls']} for {cc['sampler.tokens_generated']} tokens "
            f"({_per(cc['sampler.tokens_generated'], cc['sampler.decode_calls'])} tokens per call), one at a time "
            f"{tt['sampler.decode_calls']} for {tt['sampler.tokens_generated']} "
            f"({_per(tt['sampler.tokens_generated'], tt['sampler.decode_calls'])} per call); prefill calls "
            f"{cc['sampler.prefill_calls']} vs {tt['sampler.prefill_calls']}")


def _multiprocess_rows(suite: Suite, mp: Any, base: dict, facts: dict, meta: dict) -> list[dict]:
    """Rows of the "multiprocess" section (benchmarks/multiprocess_bench.py), per shape: the step's seconds in
    `mp_processes` processes against one process (same mesh, same devices in all), and the ratio of the medians.
    `mp` is {"single": result, "multi": result} (either may be a reason string), or why there is none at all."""
    devices = suite.mp_fsdp * suite.mp_tensor
    per = devices // max(1, suite.mp_processes)
    one = f"1 process x {devices} CPU devices, same mesh"
    variants = {k: (mp if isinstance(mp, str) else mp.get(k, "not measured: no result")) for k in ("single", "multi")}
    shapes = facts.get("multiprocess_shapes") or {}
    out: list[dict] = []
    for name, rows_, length in suite.mp_runs:
        model = name or suite.model
        label = f"{model}-{rows_}x{length}"

        def fig(v: Any, key: str = "step_samples", label: str = label) -> Any:
            if isinstance(v, str):
                return v
            run = (v.get("runs") or {}).get(label)
            return run.get(key, f"not measured: {key} missing") if run else "not measured: no result for this shape"

        def run_of(v: Any, label: str = label) -> dict:
            return {} if isinstance(v, str) else (v.get("runs") or {}).get(label) or {}

        single, multi = fig(variants["single"]), fig(variants["multi"])
        s_run, m_run = run_of(variants["single"]), run_of(variants["multi"])
        followers = [] if isinstance(variants["multi"], str) else variants["multi"].get("followers") or []
        f_runs = [(f.get("runs") or {}).get(label) or {} for f in followers]
        notes = None
        if isinstance(single, Stat) and isinstance(multi, Stat):
            d = [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(m_run.get("losses", []), s_run.get("losses", []))]
            extra_ms = 1e3 * (multi.median - single.median)
            agree = f"{max(d):.1e}" if d else "? (no losses)"
            notes = (f"{multi.median / single.median:.2f}x the one-process step: +{extra_ms:.0f} ms per step; "
                     f"losses of the {len(d)} steps agree to {agree} (relative) between the two variants")

        def med(x: Any) -> float | None:
            return round(x.median, 5) if isinstance(x, Stat) else None
        settings = {
            **{k: v for k, v in base.items() if k != "ours_sampler"}, "model": model,
            "n_params": (shapes.get(label) or {}).get("n_params"), "rows": rows_,
            "length": length, "tokens_per_step": rows_ * length,
            "step": "forward_backward(cross_entropy) + optim_step (AdamW), submitted back to back, both awaited",
            "lora": {"rank": suite.lora_rank, "targets": "q,k,v,o,gate,up,down"},
            "mesh": {"fsdp": suite.mp_fsdp, "tensor": suite.mp_tensor},
            "multi": f"{suite.mp_processes} processes x {per} simulated CPU devices (scripts/local_cluster.py: "
                     "jax.distributed over loopback, gloo collectives; process 0 publishes each round on the round "
                     "log, the others replay it); process 0's step times",
            "single": f"1 process x {devices} simulated CPU devices (XLA_FLAGS), the same script",
            "warmup": suite.mp_warmup, "repeats": suite.mp_repeats,
            "forward_backward_s_median": {"single": med(fig(variants["single"], "fb_samples")),
                                          "multi": med(fig(variants["multi"], "fb_samples"))},
            "follower_step_s_median": [med(r.get("step_samples")) for r in f_runs],
            "warmup_step_s": {"single": s_run.get("warmup_s"), "multi": m_run.get("warmup_s")},
            "compiles_in_timed_steps": {"single": s_run.get("compiles_in_timed_steps"),
                                        "multi": m_run.get("compiles_in_timed_steps")},
            "rounds_per_timed_step": {"single": s_run.get("rounds_per_timed_step"),
                                      "multi": m_run.get("rounds_per_timed_step")},
            "child_wall_s": {k: None if isinstance(v, str) else v.get("wall_s") for k, v in variants.items()},
            "cpu_collectives": None if isinstance(variants["multi"], str) else variants["multi"].get("cpu_collectives"),
            "notes": notes,
            "meaning": "on CPU the gloo collectives over loopback dominate: the overhead of the round log and the "
                       "cross-process collectives on this machine, not a speed claim for GPUs or TPUs"}
        what = (f"LoRA r{suite.lora_rank} step, {model} {rows_}x{length}, "
                f"fsdp={suite.mp_fsdp} x tensor={suite.mp_tensor}")
        out.append(make_row(f"multiprocess: {what}, {suite.mp_processes} processes x {per} CPU devices", "s", multi,
                            {one: single}, meta=meta, settings=settings, higher_is_better=False))
        ratio = Stat([multi.median / single.median]) if isinstance(single, Stat) and isinstance(multi, Stat) else (
            multi if isinstance(multi, str) else single)
        out.append(make_row(f"multiprocess: step time ratio, {suite.mp_processes} processes / 1 process, {what}",
                            "x", ratio, {}, meta=meta, higher_is_better=False,
                            settings={**settings, "statistic": "ratio of the two medians (one figure)"}))
    probes = {k: {} if isinstance(v, str) else v.get("psum_ms") or {} for k, v in variants.items()}
    for axis, size in (("fsdp", suite.mp_fsdp), ("tensor", suite.mp_tensor)):
        if size < 2:
            continue
        m, s1 = probes["multi"].get(axis), probes["single"].get(axis)
        where = "" if m is None else (" (across processes)" if m.get("across_processes") else " (within each process)")

        def probe_fig(v: Any, p: dict | None) -> Any:
            return v if isinstance(v, str) else (p or {}).get("ms_samples", "not measured: no psum probe")
        out.append(make_row(
            f"multiprocess: one all-reduce (psum) over the {axis} axis, {size} devices{where}, "
            f"{suite.mp_processes} processes x {per} CPU devices", "ms",
            probe_fig(variants["multi"], m), {one: probe_fig(variants["single"], s1)}, meta=meta,
            higher_is_better=False,
            settings={"mesh": {"fsdp": suite.mp_fsdp, "tensor": suite.mp_tensor}, "array_per_device": "8 x 64 fp32",
                      "program": "one jitted shard_map of 50 dependent psums over the axis; figure = run time / 50",
                      "repeats": 10, "when": "in each variant's child, after its training steps",
                      "cpu_collectives": None if isinstance(variants["multi"], str) else
                      variants["multi"].get("cpu_collectives")}))
    return out


MOE_OURS_EXPERTS = ("ours: experts and their per-expert adapters through jax.lax.ragged_dot (tinker_jax.models.moe), "
                    "which on CPU and GPU (jax 0.10/0.11) lowers to a dense product: every (token, expert) assignment "
                    "row against all E experts, so the expert matmuls cost E x their active FLOPs")


def _moe_peer_note(peer: dict | None, ours_params: dict | None, versions: dict) -> str:
    """Which modules the peft peer adapted (read back from the model), against ours' adapter."""
    from benchmarks.peers_torch import MOE_LORA_TARGETS

    if not peer:
        return "the peer built no LoRA model in this run: what peft adapts was not recorded"
    kinds = peer.get("adapted") or {}

    def kind(leaf: str, what: dict) -> str:
        per = f" per expert (x{what['experts']})" if what.get("experts", 1) > 1 else ""
        return f"{leaf} ({what['wrapper']}, rank {what['rank']}{per}, scale {what['scale']:g})"
    parts = [f"peft {versions.get('peft')} on transformers {versions.get('transformers')}: target_modules "
             f"{', '.join(MOE_LORA_TARGETS)} resolved to modules {peer['peft_target_modules']} and fused "
             f"parameters {peer['peft_target_parameters']}; adapted: "
             + "; ".join(kind(k, v) for k, v in sorted(kinds.items()))]
    if "gate_up_proj" in kinds:
        parts.append("a layer's experts are the fused parameters experts.gate_up_proj [E,2I,D] and "
                     "experts.down_proj [E,D,I]; gate and up share one adapter of rank 2r (peft's rank_pattern, "
                     "alpha_pattern 2 alpha: the same scale) where ours has one of rank r on each; peft folds "
                     "W + scale * B@A into every expert's weight (torch.baddbmm over all E) at every forward, then "
                     f"transformers' experts implementation ({peer.get('experts_implementation')}) computes each "
                     "token's k experts; the router (mlp.gate) is adapted by neither side")
    else:
        parts.append("peft did not adapt the experts' fused parameters")
    if ours_params:
        parts.append(f"trainable parameters: peer {peer['trainable_params']:,}, ours {ours_params['total']:,}")
    return "; ".join(parts)


def _moe_rows(suite: Suite, res, facts: dict, meta: dict, peak: float | None, peak_src: str) -> list[dict]:
    """Rows of the "moe" section: LoRA training tokens/s (and MFU on the ACTIVE parameters when the peak was
    measured) and decode tokens/s of suite.moe_model, ours against transformers(+peft) in the same run."""
    failed = res.get("moe.model")
    why = failed if isinstance(failed, str) and not failed.startswith("unavailable: not measured") else None

    def fig(key: str) -> Any:
        return why or res.get(key)
    shape = facts.get("moe_shape") or {}
    rank = suite.moe_lora_rank
    model = suite.moe_model
    base = {"model": model, "n_params": shape.get("n_params"), "n_active_params": shape.get("n_active_params"),
            "n_experts": shape.get("n_experts"), "n_experts_per_tok": shape.get("n_experts_per_tok"),
            "dtype": suite.dtype, "ours_experts": MOE_OURS_EXPERTS}
    giga = 1e12 if suite.peak_dtype == "bfloat16" else 1e9
    out: list[dict] = []
    what = f"LoRA r{rank} (attn+experts+unembed)"
    peer_note = _moe_peer_note(facts.get("moe_peer_lora"), facts.get("moe_ours_lora_params"), meta.get("versions", {}))
    from benchmarks.peers_torch import MICRO_BATCH_NOTES, MOE_LORA_TARGETS

    for s in suite.moe_train:
        ours = _tput(fig(f"moe.train.{s.label}.ours"), s.tokens)
        peers = {TORCH_LORA: _tput(fig(f"moe.train.{s.label}.torch"), s.tokens)}
        settings = {**base, "rows": s.rows, "length": s.length, "tokens_per_step": s.tokens,
                    "step": "forward_backward(cross_entropy) + optim_step (AdamW)",
                    "lora": {"rank": rank, "alpha": suite.lora_alpha,
                             "ours_targets": "q,k,v,o; gate,up,down of every expert; unembed (train_unembed=True: "
                                             "tinker_jax's defaults); the router is not adapted",
                             "ours_trainable_params": facts.get("moe_ours_lora_params"),
                             "peer_targets_asked": list(MOE_LORA_TARGETS), "peer": facts.get("moe_peer_lora")},
                    "notes": peer_note, "peer_note": MICRO_BATCH_NOTES.get((s.rows, s.length, True)),
                    "warmup": suite.moe_train_warmup, "repeats": suite.moe_train_repeats,
                    "ours_remat": suite.remat}
        metric = f"moe: train {what} {s.rows}x{s.length}, {model}"
        out.append(make_row(metric, "tokens/s", ours, peers, meta=meta, settings=settings))
        if peak and shape.get("n_active_params"):
            fpt = models.train_flops_per_token(shape, s.length, lora=True, active=True)

            def to_mfu(x: Any, fpt: float = fpt) -> Any:
                return x.map(lambda t: 100.0 * t * fpt / peak) if isinstance(x, Stat) else x
            out.append(make_row(
                f"moe: MFU on active parameters, train {what} {s.rows}x{s.length}, {model}", "% MFU", to_mfu(ours),
                {k: to_mfu(v) for k, v in peers.items()}, meta=meta,
                settings={**settings, "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_src,
                          "peak_unit": "TFLOP/s" if giga == 1e12 else "GFLOP/s",
                          "formula": "4 x n_active_params + 3x causal attention forward (n_active_params: "
                                     "ModelConfig.n_active_params, the k routed experts of E plus the router, "
                                     "attention and both untied embedding tables; adapter FLOPs ignored): the "
                                     "useful work, not the E x larger expert work ours' dense ragged_dot does"}))
    for b in suite.moe_sample_batches:
        ours = fig(f"moe.sample.{b}.ours")
        returned = None
        if isinstance(ours, tuple):
            ours, returned = ours
        peers = {TORCH_GEN: _tput(fig(f"moe.sample.{b}.torch"), b * suite.moe_max_new)}
        settings = {**base, "batch": b, "prompt_len": suite.moe_prompt_len, "max_new_tokens": suite.moe_max_new,
                    "decoding": "greedy", "ours_requests": f"{b} x sample(num_samples=1) submitted together, "
                    "base model (no adapter)", "ours_tokens_returned_per_run": returned,
                    "peer_tokens_per_run": b * suite.moe_max_new,
                    "ours_sampler": {"max_batch": max(suite.moe_sample_batches),
                                     "max_seq_len": suite.moe_prompt_len + suite.moe_max_new + 16},
                    "warmup": suite.moe_sample_warmup, "repeats": suite.moe_sample_repeats}
        out.append(make_row(f"moe: decode batch {b}, prompt {suite.moe_prompt_len} +{suite.moe_max_new}, {model}",
                            "tokens/s", ours, peers, meta=meta, settings=settings))
    return out
