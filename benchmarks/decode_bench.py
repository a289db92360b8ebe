"""How far ours' decode step is from the machine's limit (issue 14): tokens/s, the step-time breakdown, the floor.

    python -m benchmarks.decode_bench [--suite gpu|gpu-dryrun|cpu] [--work-dir DIR] [--out FILE]
                                      [--set decode_steps=32 --set decode_unroll=true ...] [--no-rl]
                                      [--variant decode_attention=paged --variant quantize=int8 ...]

One engine (the suite's model and dtype; sampler max_batch = the largest batch, `--set` overrides other sampler
settings). For each batch B: B distinct prompts of `prompt` tokens, greedy, no stop token:
  - first_s: max_tokens 1 (the prefill and the first token), full_s: max_tokens `new`; medians over the repeats
    after two untimed runs of each (compiles: the prefill batches a burst of requests is split into vary);
  - step_ms = (full_s - first_s) / (decode steps run by full - by first): one decode step, host work included;
  - device_ms: the sampler's `decode_seconds` per step (dispatch to outputs on the host; a prefill still queued
    ahead of the decode is in it), host_ms = step_ms - device_ms;
  - the floor of a step: memory, the bytes a step must read (the sampler's weights as stored, int8 kernels under
    sampler.quantize, the embedding table of an untied model excepted, plus every row's KV context, averaged over
    the `new` steps) over the read bandwidth measured in this run (a sum over a large array); compute, its FLOPs
    (2 N per row + attention over the context) over the matmul peak measured in this run. floor_ms is the larger;
    `x_floor` = step_ms / floor_ms.
RL-shaped row (unless --no-rl): P prompts x S samples each (num_samples), `rl_prompt` tokens, up to `rl_new` tokens
stopping on the model's EOS, at temperature 1, all submitted at once; tokens/s of the tokens returned (after an
untimed run of an eighth of the prompts).
Variants (`--variant KEY=VALUE[,...]`, repeatable): after the rest, the batch the issue's goal is set at (the
largest up to 64) again, in a fresh engine per variant with its settings on top of `--set`'s: an A/B in one
invocation (`variants` in the JSON; a variant that fails records its error).

Prints a table and one JSON object (written to --out, and rewritten after every measurement, so a run stopped by
gpu.sh's time limit keeps what it measured). Not a test: no figure is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Shapes per suite: decode batches, prompt/new tokens, the RL row (prompts, samples each, prompt, max new), repeats,
# and the bytes of the bandwidth probe's array. gpu: the shapes on the Qwen3-0.6B shape.
SHAPES = {
    "gpu": dict(batches=(64, 256), prompt=128, new=256, rl=(64, 16, 512, 1024), repeats=3, probe_mib=2048,
                peak_n=8192),
    "gpu-dryrun": dict(batches=(2, 4), prompt=16, new=8, rl=(2, 4, 16, 16), repeats=1, probe_mib=64, peak_n=256),
    "cpu": dict(batches=(1, 16, 64), prompt=32, new=32, rl=(8, 4, 64, 64), repeats=3, probe_mib=256, peak_n=2048),
}


def bandwidth_gbs(mib: int, repeats: int = 10) -> float:
    """Device memory read bandwidth, GB/s: a jitted sum over a `mib` MiB fp32 array of random values reads each byte
    once, as a decode step reads its weights (median of timed runs). A copy (read + write) measured 6.5 GB/s on the
    2-core CPU VM, against 35 GB/s for the sum, and a batch-1 step read its weights faster than the copy's figure."""
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import time_runs

    x = jax.random.normal(jax.random.key(0), (mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    secs = time_runs(lambda: f(x).block_until_ready(), warmup=2, repeats=repeats)
    return mib * 2**20 / secs.median / 1e9


def step_floor(cfg, weight_bytes: int, n_params: int, cache_bytes: int, batch: int, context: float,
               bandwidth: float, peak: float) -> dict:
    """The least time one decode step of `batch` rows with `context` cached tokens each can take on this machine:
    {"memory_ms", "compute_ms", "ms" (the larger), "bytes", "flops"}. weight_bytes: what a step reads of the
    sampler's weights; bandwidth in GB/s, peak in FLOP/s."""
    kv_per_token = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * cache_bytes
    read = weight_bytes + batch * context * kv_per_token
    flops = batch * (2.0 * n_params + 4.0 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim)
    mem_ms, flop_ms = read / (bandwidth * 1e9) * 1e3, flops / peak * 1e3
    return {"memory_ms": mem_ms, "compute_ms": flop_ms, "ms": max(mem_ms, flop_ms), "bytes": read, "flops": flops}


def weights_read(cfg, params) -> int:
    """Bytes of the sampler's weights one decode step reads: all of them (in their stored dtypes: int8 kernels
    under sampler.quantize), but for an untied model's embedding table, of which the lookup reads B rows only."""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:
        total -= params["embed"][...].nbytes
    return int(total)


def top_ops(trace_dir: Path, window: str = "_decode_round", n: int = 40) -> list[dict]:
    """The `n` ops with the most total time in a jax.profiler trace under `trace_dir`, counting only those that
    start inside a host span named like `window` (the sampler's decode calls): device kernels on a GPU, XLA thunks
    on a CPU; Python frames (names starting with "$") and the executor's own spans are left out."""
    import collections
    import gzip

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        return []
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    wins = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if window in e["name"])
    total, count = collections.Counter(), collections.Counter()
    for e in spans:
        name = e["name"]
        if name.startswith("$") or name.startswith(("ThunkExecutor", "SlinkyThreadPool", "PjitFunction")):
            continue
        if not any(a <= e["ts"] <= b for a, b in wins):
            continue
        where = names.get((e["pid"], e.get("tid"))) or procs.get(e["pid"], "?")
        if where == "python" or where.startswith("tf_PjRt"):
            continue
        total[(where, name)] += e["dur"]
        count[(where, name)] += 1
    return [{"where": w, "op": o, "ms": t / 1e3, "count": count[(w, o)]} for (w, o), t in total.most_common(n)]


def settings_of(pairs: list[str]) -> dict:
    """KEY=VALUE sampler settings -> a dict (true / false and integers converted)."""
    out = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="gpu", choices=sorted(SHAPES))
    p.add_argument("--work-dir", default="/tmp/tinker-jax-bench")
    p.add_argument("--out", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler setting (tinker_jax.config.SamplerConfig), e.g. decode_steps=32")
    p.add_argument("--no-rl", action="store_true", help="skip the RL-shaped row")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="after the rows, time the batch of the goal (the largest up to 64) again in a fresh engine "
                        "with these sampler settings too (A/B in one invocation; repeatable), e.g. "
                        "decode_attention=paged")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also trace one +new run of the largest batch with jax.profiler into DIR, and put its top "
                        "ops by total time during decode calls into the JSON (`profile`)")
    args = p.parse_args(argv)

    import numpy as np
    import tinker.types as tt

    from benchmarks import data, models, peak
    from benchmarks.ours_client import service_client
    from benchmarks.suites import get_suite
    from benchmarks.timing import machine_info, versions
    from tinker_jax.models.config import load_config

    suite, shape = get_suite(args.suite), SHAPES[args.suite]
    overrides = settings_of(args.set)
    work = Path(args.work_dir)
    model_dir = models.ensure_model(work / "models", suite.model)
    cfg = load_config(model_dir)
    n_params = models.model_shape(model_dir)["n_params"]
    out: dict = {"what": __doc__.splitlines()[0], "suite": args.suite, "model": suite.model, "dtype": suite.dtype,
                 "machine": machine_info(), "versions": versions(), "sampler_settings": overrides, "rows": []}
    log = lambda *a: print("[decode_bench]", *a, file=sys.stderr, flush=True)  # noqa: E731

    import jax

    out["device"] = str(jax.devices()[0])
    out["bandwidth_gbs"] = bandwidth_gbs(shape["probe_mib"])
    out["matmul_peak_flops"] = peak.jax_peak(shape["peak_n"], suite.dtype, repeats=5).median
    log(f"bandwidth {out['bandwidth_gbs']:.1f} GB/s, matmul peak {out['matmul_peak_flops'] / 1e12:.2f} TFLOP/s")

    P, new = shape["prompt"], shape["new"]
    rl_prompts, rl_samples, rl_prompt, rl_new = shape["rl"]
    seq = max(P + new, rl_prompt + rl_new) + 16
    def save() -> None:  # after every measurement: a run stopped by gpu.sh's time limit keeps what it measured
        if args.out:
            args.out.write_text(json.dumps(out, indent=1))

    def open_engine(settings: dict, rows: int):
        """A fresh engine with these sampler settings and `rows` decode rows, its model loaded: (client, sampler,
        KV bytes per value, weight bytes a step reads)."""
        sc = service_client(suite.model, model_dir, Path(tempfile.mkdtemp(prefix="decode-", dir=work)),
                            dtype=suite.dtype, max_tokens_per_batch=8192, sampler_batch=rows,
                            sampler_seq_len=seq, compile_cache_dir=work / "jax_cache", **settings)
        try:
            sampler = sc.create_sampling_client(base_model=suite.model)
            sampler.sample(data.model_input([1, 2, 3]), 1, tt.SamplingParams(max_tokens=1)).result()  # loads it
            worker = sc.engine._worker(suite.model)
            return (sc, sampler, np.dtype(worker.sampler.cache_dtype).itemsize,
                    weights_read(cfg, worker.sample_base))
        except BaseException:
            sc.close()
            raise

    def batch_run(sc, sampler, prompts: np.ndarray, max_tokens: int) -> tuple[float, int, dict]:
        def stats() -> dict:
            return dict(sc.engine.stats()["models"][suite.model].get("sampler", {}))

        params = tt.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0, stop=[])
        before = stats()
        t0 = time.perf_counter()
        futs = [sampler.sample(data.model_input(x), 1, params) for x in prompts]
        n = sum(len(s.tokens) for f in futs for s in f.result().sequences)
        took = time.perf_counter() - t0
        after = stats()
        return took, n, {k: after.get(k, 0) - before.get(k, 0) for k in ("decode_steps_run", "decode_seconds",
                                                                          "decode_calls", "prefill_calls")}

    def measure(sc, sampler, b: int, cache_bytes: int, weight_bytes: int) -> dict:
        """One batch row: B distinct prompts, +1 and +new, timed after two untimed runs of each."""
        prompts = data.prompts(21, b, P, cfg.vocab_size)
        firsts, fulls = [], []
        for i in range(2 + shape["repeats"]):  # runs 0, 1: compiles (prefill batches vary with arrival), untimed
            f, g = batch_run(sc, sampler, prompts, 1), batch_run(sc, sampler, prompts, new)
            if i > 1:
                firsts.append(f)
                fulls.append(g)
        first_s = statistics.median(x[0] for x in firsts)
        full_s = statistics.median(x[0] for x in fulls)
        steps = statistics.median(g[2]["decode_steps_run"] - f[2]["decode_steps_run"] for f, g in zip(firsts, fulls))
        dev = statistics.median((g[2]["decode_seconds"] - f[2]["decode_seconds"]) for f, g in zip(firsts, fulls))
        tokens = fulls[0][1]
        step_ms = (full_s - first_s) / max(steps, 1) * 1e3
        floor = step_floor(cfg, weight_bytes, n_params, cache_bytes, b, P + new / 2, out["bandwidth_gbs"],
                           out["matmul_peak_flops"])
        row = {"batch": b, "prompt": P, "new": new, "tokens_per_s": tokens / full_s, "tokens": tokens,
               "first_s": first_s, "full_s": full_s, "full_s_runs": [x[0] for x in fulls],
               "decode_steps": steps, "decode_calls": fulls[0][2]["decode_calls"], "step_ms": step_ms,
               "device_ms": dev / max(steps, 1) * 1e3, "host_ms": step_ms - dev / max(steps, 1) * 1e3,
               "floor": floor, "x_floor": step_ms / floor["ms"]}
        log(json.dumps({k: row[k] for k in ("batch", "tokens_per_s", "step_ms", "device_ms", "x_floor")}))
        return row

    sc, sampler, cache_bytes, weight_bytes = open_engine(overrides, max(shape["batches"]))
    out["weight_bytes_per_step"] = weight_bytes
    try:
        sampler_cfg = sc.engine.config.sampler
        for b in shape["batches"]:
            out["rows"].append(measure(sc, sampler, b, cache_bytes, weight_bytes))
            save()

        if args.profile:
            b = max(shape["batches"])
            prompts = data.prompts(21, b, P, cfg.vocab_size)
            with jax.profiler.trace(str(args.profile)):
                batch_run(sc, sampler, prompts, new)
            out["profile"] = {"batch": b, "dir": str(args.profile), "top_ops": top_ops(args.profile)}
            save()
            for r in out["profile"]["top_ops"][:15]:
                log(f"{r['ms']:9.1f} ms {r['count']:6d}  {r['where'][:30]:30s} {r['op']}")

        if not args.no_rl:
            eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else (cfg.eos_token_id or (None,))[0]
            prompts = data.prompts(22, rl_prompts, rl_prompt, cfg.vocab_size)
            params = tt.SamplingParams(max_tokens=rl_new, temperature=1.0, seed=1,
                                       stop=[int(eos)] if eos is not None else [])
            runs = []
            # Run 0, untimed: an eighth of the prompts, to compile what the row meets (the timed run is long: 64 x 16
            # sequences of up to 1,024 tokens on the GPU).
            for i, group in enumerate((prompts[: max(1, len(prompts) // 8)], prompts)):
                t0 = time.perf_counter()
                futs = [sampler.sample(data.model_input(x), rl_samples, params) for x in group]
                seqs = [s for f in futs for s in f.result().sequences]
                runs.append((time.perf_counter() - t0, sum(len(s.tokens) for s in seqs),
                             sum(s.stop_reason == "stop" for s in seqs)))
            took, n, stopped = runs[1]
            out["rl"] = {"prompts": rl_prompts, "samples": rl_samples, "prompt": rl_prompt, "max_new": rl_new,
                         "eos": eos, "seconds": took, "tokens": n, "tokens_per_s": n / took,
                         "sequences_stopped_on_eos": stopped, "max_batch": sampler_cfg.max_batch}
            log(json.dumps({k: out["rl"][k] for k in ("seconds", "tokens", "tokens_per_s")}))
            save()
    finally:
        sc.close()

    # A/B rows: the batch the goal is set at (the largest up to 64), each variant in a fresh engine with
    # the --set settings and its own (a failing variant records its error; the others still run).
    out["variants"] = []
    vb = max([b for b in shape["batches"] if b <= 64] or [min(shape["batches"])])
    for spec in args.variant:
        extra = settings_of(spec.split(","))
        row: dict = {"settings": extra}
        try:
            vsc, vsampler, vcache, vweights = open_engine({**overrides, **extra}, vb)  # only the rows it needs
            try:
                row.update(measure(vsc, vsampler, vb, vcache, vweights))
            finally:
                vsc.close()
        except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"variant {extra}: {row['error']}")
        out["variants"].append(row)
        save()

    print(f"{'batch':>6} {'tokens/s':>10} {'step ms':>8} {'device':>7} {'host':>6} {'floor ms':>9} "
          f"{'(mem/compute)':>14} {'x floor':>8}")
    for r in out["rows"]:
        f = r["floor"]
        print(f"{r['batch']:>6} {r['tokens_per_s']:>10,.0f} {r['step_ms']:>8.2f} {r['device_ms']:>7.2f} "
              f"{r['host_ms']:>6.2f} {f['ms']:>9.3f} {f['memory_ms']:>6.3f}/{f['compute_ms']:<7.3f} "
              f"{r['x_floor']:>8.1f}")
    for r in out["variants"]:
        what = ",".join(f"{k}={v}" for k, v in r["settings"].items())
        print(f"variant {what}: " + (r["error"] if "error" in r else
                                     f"batch {r['batch']}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_ms']:.2f} "
                                     f"ms (x{r['x_floor']:.1f} floor)"))
    if "rl" in out:
        r = out["rl"]
        print(f"RL: {r['prompts']} prompts x {r['samples']} samples, {r['prompt']} +<= {r['max_new']}: "
              f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens']} tokens in {r['seconds']:.1f} s)")
    save()
    return out


if __name__ == "__main__":
    main()
