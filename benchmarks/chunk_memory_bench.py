"""Device memory a long prompt's chunked prefill holds beside the sampler's KV pool, and its time.

    python -m benchmarks.chunk_memory_bench [--model small-qwen3] [--prompt 4000] [--longs 1,3] [--chunk 512]
                                            [--repeats 1] [--json FILE]

One Sampler (fp32, 4 rows of up to --prompt + 200 tokens, a pool of 4 such rows, prefill_chunk --chunk (0: whole
prompts), no prefix cache), driven from this thread; per N in --longs, after an untimed round (it compiles), --repeats
runs of N random prompts of --prompt tokens (+4 tokens) submitted at once and stepped until done. Reported (of the
last run; seconds: each run's and their median): the most device bytes alive after any step beyond those
alive before the run (jax.live_arrays: what a prefill holds from one step to the next; transients inside a step are
not seen), the steps and seconds it took, and the pool's own size. Where a long prompt's chunks write pool pages
(kernels.prefill_pages) the first is ~0; where they wrote a prompt-sized cache of their own, it is that cache per
prompt prefilling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-qwen3")
    p.add_argument("--prompt", type=int, default=4000)
    p.add_argument("--longs", default="1,3", help="comma-separated: long prompts submitted at once, per run")
    p.add_argument("--chunk", type=int, default=512, help="sampler prefill_chunk (0: whole prompts)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/tinker-jax-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from tinker import types

    from benchmarks import models
    from tinker_jax.hf.weights import load_decoder
    from tinker_jax.sampling import Sampler, snapshot_of

    snap = snapshot_of(load_decoder(models.ensure_model(Path(args.work_dir) / "models", args.model)), name="base")
    seq = args.prompt + 200
    s = Sampler(snap.cfg, [snap.cfg.eos_token_id or 0], max_batch=4, max_seq_len=seq,
                prefill_lengths=(16, -(-args.prompt // 512) * 512), prefill_batches=(1, 4), prefill_token_budget=4096,
                decode_steps=4, prefill_chunk=args.chunk, kv_cache_tokens=4 * seq,
                prefix_cache=False).drive(lambda: None)
    live = lambda: sum(x.nbytes for x in jax.live_arrays())  # noqa: E731
    rng = np.random.default_rng(0)
    out = {"model": args.model, "prompt": args.prompt, "chunk": args.chunk,
           "pool_mib": round(sum(x.nbytes for x in s._pool) / 2**20, 1), "runs": []}
    try:
        for n in (int(x) for x in args.longs.split(",")):
            times = []
            for r in range(1 + args.repeats):  # round 0 untimed: it compiles
                base, peak, steps = live(), 0, 0
                chunks, calls = s.stats["prefill_chunks"], s.stats["prefill_chunk_calls"]
                t0 = time.perf_counter()
                futs = [s.submit(snap, rng.integers(3, snap.cfg.vocab_size, args.prompt).tolist(),
                                 types.SamplingParams(max_tokens=4, seed=1, stop=[])) for _ in range(n)]
                while not all(f.done() for f in futs):
                    s.step()
                    steps += 1
                    peak = max(peak, live() - base)
                [f.result() for f in futs]
                if r:
                    times.append(round(time.perf_counter() - t0, 2))
            row = {"longs": n, "held_beside_pool_mib": round(peak / 2**20, 1), "steps": steps,
                   "seconds": float(np.median(times)), "runs": times, "chunks": s.stats["prefill_chunks"] - chunks,
                   "chunk_calls": s.stats["prefill_chunk_calls"] - calls}
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        s.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
