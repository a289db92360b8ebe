"""Where one training step's time goes: variants of ours on one shape, each timed alone (median of repeats).

Run after the GPU suite (benchmarks/gpu.sh) on the same machine: it reuses the suite's model directory.
    python -m benchmarks.gpu_diagnose [--suite gpu] [--work-dir DIR] [--out FILE]
Variants (LoRA r32 unless noted, the suite's first training shape):
  fb            forward_backward only (no optim_step), remat on, the engine's attention kernel
  fwd           forward only (the loss, no gradient)
  optim         optim_step only (AdamW over the adapters)
  fb-noremat    forward_backward with remat off
  fb-chunk-N    forward_backward with the unembedding in chunks of N tokens (default 2048)
  full-fb       full fine-tuning forward_backward; full-optim its AdamW over all weights
Engine internals are used on purpose: this isolates pieces of the step the public API runs together.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def diagnose(suite_name: str, work_dir: Path, repeats: int = 5, log=print) -> dict:
    import jax

    from benchmarks import data, models
    from benchmarks.suites import get_suite
    from benchmarks.timing import time_runs
    from tinker_jax.training import step as train
    from tinker_jax.training.batching import build_batches
    from tinker_jax.config import EngineConfig
    from tinker_jax.engine import Engine

    suite = get_suite(suite_name)
    shape = suite.train[0]
    model_dir = models.ensure_model(work_dir / "models", suite.model)
    vocab = models.model_shape(model_dir)["vocab_size"]
    datums = data.datums(data.token_batch(1, shape.rows, shape.length, vocab))
    eng = Engine(EngineConfig(data_dir=Path(tempfile.mkdtemp(prefix="diag-", dir=work_dir)),
                              models={"m": str(model_dir)}, dtype=suite.dtype, compile_cache=False,
                              max_tokens_per_batch=suite.max_tokens_per_batch, remat=suite.remat,
                              attention=suite.attention))
    base = eng.base("m")
    batches = build_batches(datums, "cross_entropy", vocab_size=vocab, max_len=1 << 20,
                            max_tokens_per_batch=suite.max_tokens_per_batch)
    results: dict[str, dict] = {}

    def run(name, fn):
        try:
            s = time_runs(fn, warmup=1, repeats=repeats)
            results[name] = {"median_s": s.median, "min_s": min(s.samples), "max_s": max(s.samples)}
        except Exception as e:  # noqa: BLE001 - one variant failing does not stop the others
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        log(f"[diagnose] {name}: {results[name]}")

    def fb(st, remat=suite.remat, forward_only=False):
        def go():
            train.forward_backward(st, batches, "cross_entropy", {}, forward_only=forward_only, remat=remat,
                                   attention=base.attention)
            jax.block_until_ready(st.grads)
        return go

    def optim(st):
        def go():
            train.optim_step(st, learning_rate=1e-5, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0,
                             grad_clip_norm=0.0)
            jax.block_until_ready(st.trainable)
        return go

    lora_id = eng.create_model("m", rank=suite.lora_rank, seed=0, train_unembed=False)
    st = eng.model(lora_id)
    run("fb", fb(st))
    run("fwd", fb(st, forward_only=True))
    run("optim", optim(st))
    run("fb-noremat", fb(st, remat=False))
    default_chunk = train.LOGIT_CHUNK
    for chunk in (512, 8192):
        train.LOGIT_CHUNK = chunk
        train._forward_backward.clear_cache()  # the chunk size is read at trace time
        run(f"fb-chunk-{chunk}", fb(st))
    train.LOGIT_CHUNK = default_chunk
    train._forward_backward.clear_cache()
    eng.unload_model(lora_id)
    full_id = eng.create_model("m", seed=0, full_finetune=True)
    st = eng.model(full_id)
    run("full-fb", fb(st))
    run("full-optim", optim(st))
    eng.unload_model(full_id)
    eng.shutdown()
    return {"suite": suite.name, "shape": shape.label, "tokens": shape.tokens, "attention": base.attention,
            "remat": suite.remat, "device": str(jax.devices()[0]), "jax": jax.__version__, "variants": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_diagnose")
    p.add_argument("--suite", default="gpu")
    p.add_argument("--work-dir", default="/tmp/tinker-jax-bench")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    res = diagnose(args.suite, Path(args.work_dir), args.repeats, log=lambda s: print(s, file=sys.stderr,
                                                                                          flush=True))
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
