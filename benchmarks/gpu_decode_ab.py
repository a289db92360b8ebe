"""Decode A/B: ours at the GPU suite's largest sampling batch under sampler settings that trade host round trips
and loop overhead (SamplerConfig.decode_steps, decode_unroll), each in a fresh engine, in one invocation.

    python -m benchmarks.gpu_decode_ab [--suite gpu] [--work-dir DIR] [--out FILE]
Reuses the suite's model directory and compile cache. Prints one JSON line per variant as it finishes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

VARIANTS = ({"decode_steps": 8, "decode_unroll": False}, {"decode_steps": 32, "decode_unroll": False},
            {"decode_steps": 32, "decode_unroll": True}, {"decode_steps": 8, "decode_unroll": True})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_decode_ab")
    p.add_argument("--suite", default="gpu")
    p.add_argument("--work-dir", default="/tmp/tinker-jax-bench")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import shutil

    from benchmarks import data, models, sample_bench
    from benchmarks.ours_client import service_client
    from benchmarks.suites import get_suite
    from benchmarks.timing import interleave

    suite = get_suite(args.suite)
    work = Path(args.work_dir)
    model_dir = models.ensure_model(work / "models", suite.model)
    vocab = models.model_shape(model_dir)["vocab_size"]
    b = max(suite.sample_batches)
    prompts = data.prompts(2, b, suite.prompt_len, vocab)
    out = []
    for v in VARIANTS:
        d = Path(tempfile.mkdtemp(prefix="ab-", dir=work))
        sc = service_client(suite.model, model_dir, d, dtype=suite.dtype, max_tokens_per_batch=8192,
                            sampler_batch=b, sampler_seq_len=suite.sampler_seq_len,
                            compile_cache_dir=work / "jax_cache", **v)
        try:
            run, close = sample_bench.sample_step(sc, suite.model, prompts, suite.max_new)
            timed, errors = interleave({"run": run}, warmup=0, repeats=1 + args.repeats)  # 1st run: compiles
            close()
            if errors:
                raise errors["run"]
            (first, _), *rest = timed["run"]
            rates = [n / t for t, n in rest]
            row = {**v, "batch": b, "tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                   "first_run_s": first}
        except Exception as e:  # noqa: BLE001 - the other variants still run
            row = {**v, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        finally:
            sc.close()
            shutil.rmtree(d, ignore_errors=True)
        print(json.dumps(row), flush=True)
        out.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
