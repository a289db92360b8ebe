"""Ours, a batch of requests sent one after another to an idle sampler, with and without `sampler.burst_gap_ms`.

    python -m benchmarks.burst_bench [--model small-qwen3] [--batch 64] [--prompt 32] [--new 32] [--seq-len 128]
                                     [--repeats 5] [--json FILE]
In process, two engines alike but for burst_gap_ms (0: off, and the default), alternating rounds; each round
sends B distinct random prompts as B `sample` requests from a loop that builds each request's ModelInput as it
goes (as a client's rollout loop does), greedy, and times until every result is back; one untimed round each
first (compiles). Also reports each engine's prefill calls and decode steps per round: with the window off, the
first requests that arrive are prefilled and decoded alone for a decode call while the rest wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-qwen3")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="tokens sampled per request")
    p.add_argument("--seq-len", type=int, default=128, help="the sampler's max_seq_len")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work-dir", default="/tmp/tinker-jax-bench")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import tinker.types as tt

    from benchmarks import data, models
    from benchmarks.ours_client import service_client
    from benchmarks.timing import Stat, machine_info, versions
    from tinker_jax.config import SamplerConfig

    work = Path(args.work_dir)
    model_dir = models.ensure_model(work / "models", args.model)
    vocab = models.model_shape(model_dir)["vocab_size"]
    gaps = {"burst_gap_ms=0 (off)": 0.0, f"burst_gap_ms={SamplerConfig.burst_gap_ms:g} (default)":
            SamplerConfig.burst_gap_ms}
    engines = {name: service_client(args.model, model_dir, Path(tempfile.mkdtemp(prefix="burst-", dir=work)),
                                    dtype="float32", max_tokens_per_batch=4096, sampler_batch=args.batch,
                                    sampler_seq_len=args.seq_len,
                                    compile_cache_dir=work / "jax_cache", burst_gap_ms=gap)
               for name, gap in gaps.items()}
    prompts = data.prompts(40, args.batch, args.prompt, vocab)
    params = tt.SamplingParams(max_tokens=args.new, temperature=0.0, seed=0, stop=[])
    runs: dict[str, dict[str, list]] = {name: {"s": [], "prefill_calls": [], "decode_steps": []} for name in gaps}
    try:
        clients = {name: sc.create_sampling_client(base_model=args.model) for name, sc in engines.items()}

        def stats(name: str) -> dict:
            return dict(engines[name].engine.stats()["models"][args.model].get("sampler", {}))

        for i in range(1 + args.repeats):
            for name, s in clients.items():
                before = stats(name)
                t0 = time.perf_counter()
                futs = [s.sample(data.model_input(x), 1, params) for x in prompts]
                n = sum(len(q.tokens) for f in futs for q in f.result().sequences)
                took = time.perf_counter() - t0
                after = stats(name)
                if i:
                    runs[name]["s"].append(took)
                    for k, key in (("prefill_calls", "prefill_calls"), ("decode_steps", "decode_steps_run")):
                        runs[name][k].append(after.get(key, 0) - before.get(key, 0))
                print(f"[burst_bench] round {i} {name}: {took:.2f} s, {n} tokens", flush=True)
    finally:
        for sc in engines.values():
            sc.close()
    out = {"what": __doc__.splitlines()[0], "model": args.model, "batch": args.batch, "prompt": args.prompt,
           "new": args.new, "machine": machine_info(), "versions": versions(), "runs": runs}
    print(f"{'engine':<28} {'s until all back, median [min-max]':>36} {'tokens/s':>9} {'prefill calls':>14} "
          f"{'decode steps':>13}")
    for name, r in runs.items():
        st = Stat(r["s"])
        tps = args.batch * args.new / st.median
        took = f"{st.median:.2f} [{min(r['s']):.2f}-{max(r['s']):.2f}]"
        print(f"{name:<28} {took:>36} {tps:>9.0f} "
              f"{statistics.median(r['prefill_calls']):>14g} {statistics.median(r['decode_steps']):>13g}")
        out[name] = {"median_s": st.median, "tokens_per_s": tps}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
