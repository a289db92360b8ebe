"""Ours, a GRPO group: G separate requests of one prompt (tinker-cookbook's RL samples each rollout alone) against
one request of the same prompt with num_samples=G.

    python -m benchmarks.group_bench [--model small-qwen3] [--group 16] [--prompt 448] [--new 16] [--repeats 4]
                                     [--no-prefix-cache] [--distinct] [--json FILE]
In process, one engine; each round two fresh random prompts (so nothing is cached across rounds, nor from one way
to the other), one sampled each way at temperature 1, seconds until every result is back; round 0 (compiles)
untimed. Also reports the sampler's prefill, prompt-cache and KV-page counters over the whole run.
--no-prefix-cache: the engine without sampler.prefix_cache (the separate requests then share a prefill only when
they meet in one prefill batch)
--distinct: G different prompts of that length instead, sent as separate requests at once (an RL batch's first
rollout of each of G problems; prompts longer than sampler.prefill_chunk are prefilled in chunks), and no
num_samples way
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-qwen3")
    p.add_argument("--group", type=int, default=16, help="rollouts per prompt")
    p.add_argument("--prompt", type=int, default=448, help="prompt tokens")
    p.add_argument("--new", type=int, default=16, help="tokens sampled per rollout")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--work-dir", default="/tmp/tinker-jax-bench")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--distinct", action="store_true", help="G different prompts, not one")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import tinker.types as tt

    from benchmarks import data, models
    from benchmarks.ours_client import service_client
    from benchmarks.timing import Stat, machine_info, versions

    work = Path(args.work_dir)
    model_dir = models.ensure_model(work / "models", args.model)
    vocab = models.model_shape(model_dir)["vocab_size"]
    sc = service_client(args.model, model_dir, Path(tempfile.mkdtemp(prefix="group-", dir=work)), dtype="float32",
                        max_tokens_per_batch=4096, sampler_batch=args.group,
                        sampler_seq_len=args.prompt + args.new + 16, compile_cache_dir=work / "jax_cache",
                        prefix_cache=not args.no_prefix_cache)
    try:
        s = sc.create_sampling_client(base_model=args.model)
        runs: dict[str, list[float]] = {"distinct" if args.distinct else "separate": []}
        if not args.distinct:
            runs["num_samples"] = []
        for i in range(1 + args.repeats):
            prompt, other = (data.model_input(x) for x in data.prompts(30 + i, 2, args.prompt, vocab))
            prompts = ([data.model_input(x) for x in data.prompts(300 + i, args.group, args.prompt, vocab)]
                       if args.distinct else [prompt] * args.group)
            params = tt.SamplingParams(max_tokens=args.new, temperature=1.0, seed=i, stop=[])
            t0 = time.perf_counter()
            for f in [s.sample(x, 1, params) for x in prompts]:
                f.result()
            separate = time.perf_counter() - t0
            if i:
                runs["distinct" if args.distinct else "separate"].append(separate)
            if args.distinct:
                continue
            t0 = time.perf_counter()
            s.sample(other, args.group, params).result()
            if i:
                runs["num_samples"].append(time.perf_counter() - t0)
        stats = sc.engine.stats()["models"][args.model]["sampler"]
    finally:
        sc.close()
    out = {"what": (f"{args.group} different {args.prompt}-token prompts, +{args.new} tokens each, {args.model}: "
                    "separate requests at once; seconds until all are back") if args.distinct else
                   (f"{args.group} rollouts of one {args.prompt}-token prompt, +{args.new} tokens each, {args.model}: "
                    "separate requests vs num_samples; seconds until all are back"),
           "prefix_cache": not args.no_prefix_cache,
           "machine": machine_info(), "versions": versions(),
           "seconds": {k: {**Stat(v).spread(), "runs": v} for k, v in runs.items()},
           "sampler": {k: stats.get(k) for k in ("prefill_calls", "prefill_rows_shared", "prompt_cache_hits",
                                                 "kv_pages_copied", "kv_pages_shared", "prefill_chunks",
                                                 "prefill_chunk_calls")}}
    print(json.dumps({k: out[k] for k in ("what", "prefix_cache", "seconds", "sampler")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
