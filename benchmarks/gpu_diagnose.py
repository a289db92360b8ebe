"""Where one training step's time goes: variants of ours on one shape, each timed alone (median of repeats).

Run after the GPU suite (benchmarks/gpu.sh) on the same machine: it reuses the suite's model directory.
    python -m benchmarks.gpu_diagnose [--suite gpu] [--work-dir DIR] [--out FILE]
Variants (LoRA r32 on q/k/v/o/gate/up/down unless noted, the suite's first training shape):
  fb            forward_backward only (no optim_step), the suite's remat, the engine's attention kernel
  fwd           forward only (the loss, no gradient)
  optim         optim_step only (AdamW over one adapter's slot of the pool)
  fb-noremat    forward_backward with remat off
  fb-chunk-N    forward_backward with the unembedding in chunks of N tokens (default training.step.LOGIT_CHUNK)
  fb-adapters-N the same rows and tokens, spread over N adapters of the same pool (one micro-batch in "gather"
                mode, as the engine batches N tenants' requests), N = the shape's rows
  fb-separate-N the same N adapters' rows as N micro-batches of one adapter each, back to back (no batching)
  optim-adapters-N  one AdamW call over the N adapters' slots
  full-fb       full fine-tuning forward_backward; full-optim its AdamW over all weights
The step functions of tinker_jax.training.step are driven directly, as the engine's worker drives them (one base
model, an AdapterPool per rank, micro-batches from training.batching.plan): this isolates pieces of the step that
the public API runs together (forward_backward without its optim_step, one micro-batch without the scheduler).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def diagnose(suite_name: str, work_dir: Path, repeats: int = 5, log=print) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks import data, models
    from benchmarks.suites import get_suite
    from benchmarks.timing import time_runs
    from tinker_jax.config import EngineConfig
    from tinker_jax.engine.pools import AdapterPool, FullState
    from tinker_jax.hf.weights import load_decoder
    from tinker_jax.models.config import load_config
    from tinker_jax.models.decoder import probe_attention
    from tinker_jax.models.lora import LoraSpec
    from tinker_jax.models.sharding import batch_shards, make_mesh, rows_sharding, state_shardings
    from tinker_jax.training import batching, step
    from tinker_jax.training.optim import AdamHP

    suite = get_suite(suite_name)
    shape = suite.train[0]
    model_dir = models.ensure_model(work_dir / "models", suite.model)
    cfg = load_config(model_dir)
    datums = data.datums(data.token_batch(1, shape.rows, shape.length, cfg.vocab_size))
    config = EngineConfig(data_dir=work_dir, models={"m": str(model_dir)}, dtype=suite.dtype, compile_cache=False,
                          max_tokens_per_batch=suite.max_tokens_per_batch, remat=suite.remat,
                          attention=suite.attention)
    mesh = make_mesh(config.mesh)
    attention = config.training_attention(jax.default_backend())
    if attention == "cudnn" and config.attention == "auto":  # as Engine.attention_for: probe before using cuDNN
        why = probe_attention("cudnn", cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        attention = "einsum" if why else "cudnn"
    dtype = jnp.bfloat16 if suite.dtype == "bfloat16" else jnp.float32
    graphdef, base = nnx.split(load_decoder(model_dir, dtype=dtype,
                                            shardings_fn=lambda st: state_shardings(st, mesh)), nnx.Param)
    rows_sh = rows_sharding(mesh)
    row_multiple = batch_shards(mesh)
    rows = batching.validate(datums, "cross_entropy", vocab_size=cfg.vocab_size, max_len=1 << 20)
    hp = AdamHP(learning_rate=1e-5)
    results: dict[str, dict] = {}

    def run(name, fn):
        try:
            s = time_runs(fn, warmup=1, repeats=repeats)
            results[name] = {"median_s": s.median, "min_s": min(s.samples), "max_s": max(s.samples)}
        except Exception as e:  # noqa: BLE001 - one variant failing does not stop the others
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        log(f"[diagnose] {name}: {results[name]}")

    def planned(parts):
        mbs = batching.plan(parts, suite.max_tokens_per_batch, row_multiple)
        return [(mb.layout, step.device_batch(mb.arrays(), rows_sh), len(mb.segments)) for mb in mbs]

    def split_rows(n: int) -> list:
        """`rows` as n requests (one per adapter), in datum order."""
        k = len(rows.tokens) // n
        return [batching.RequestRows(rows.loss_fn, rows.config, rows.tokens[i * k:(i + 1) * k],
                                     rows.targets[i * k:(i + 1) * k], rows.inputs[i * k:(i + 1) * k], rows.topk)
                for i in range(n)]

    pool = AdapterPool(cfg, suite.lora_rank, mesh, config.lora.initial_slots, config.lora.max_slots + 1)  # as engine
    spec = LoraSpec.from_flags(suite.lora_rank, train_unembed=False, alpha=suite.lora_alpha)
    slot = pool.alloc("diag-0", spec)

    def lora_fb(batches, remat=suite.remat, forward_only=False):
        def go():
            for layout, db, nseg in batches:
                assert nseg == 1
                if forward_only:
                    out = step.lora_forward(base, (pool.weights,), (pool.scale,), db, graphdef=graphdef,
                                            layout=layout, attention=attention)
                else:
                    (pool.grads,), *out = step.lora_forward_backward(
                        base, (pool.weights,), (pool.grads,), (pool.scale,), db, graphdef=graphdef, layout=layout,
                        remat=remat, attention=attention)
                jax.block_until_ready(out)
        return go

    def lora_optim(slots):
        k = batching.bucket(len(slots), 1)
        sl = np.zeros(k, np.int32)
        sl[: len(slots)] = slots
        hps = np.zeros((k, 6), np.float32)
        hps[: len(slots)] = np.asarray(hp.array())
        valid = np.arange(k) < len(slots)

        def go():
            (pool.weights, pool.grads, pool.mu, pool.nu, pool.count, gnorm) = step.lora_optim_step(
                pool.weights, pool.grads, pool.mu, pool.nu, pool.count, sl, hps, valid)
            jax.block_until_ready(gnorm)
        return go

    one = planned([batching.Part(rows, suite.lora_rank, slot)])
    run("fb", lora_fb(one))
    run("fwd", lora_fb(one, forward_only=True))
    run("optim", lora_optim([slot]))
    run("fb-noremat", lora_fb(one, remat=False))
    default_chunk = step.LOGIT_CHUNK
    try:
        for chunk in (512, 8192):
            step.LOGIT_CHUNK = chunk  # read at trace time: drop the compiled programs around each change
            step.lora_forward_backward.clear_cache()
            run(f"fb-chunk-{chunk}", lora_fb(one))
    finally:
        step.LOGIT_CHUNK = default_chunk
        step.lora_forward_backward.clear_cache()
    n = shape.rows
    if n > 1:
        slots = [slot] + [pool.alloc(f"diag-{i}", LoraSpec.from_flags(suite.lora_rank, train_unembed=False,
                                                                      alpha=suite.lora_alpha, seed=i))
                          for i in range(1, n)]
        parts = [batching.Part(r, suite.lora_rank, s) for r, s in zip(split_rows(n), slots)]
        run(f"fb-adapters-{n}", lora_fb(planned(parts)))
        run(f"fb-separate-{n}", lora_fb([b for part in parts for b in planned([part])]))
        run(f"optim-adapters-{n}", lora_optim(slots))
    pool_info = {"capacity": pool.capacity, "in_use": pool.in_use()}
    pool = None  # release the adapter pool's device memory before full fine-tuning

    full = FullState.create(base, mesh)
    fbatches = planned([batching.Part(rows, 0, 0)])

    def full_fb():
        for layout, db, _ in fbatches:
            full.grads, *out = step.full_forward_backward(full.params, full.grads, db, graphdef=graphdef,
                                                          layout=layout, remat=suite.remat, attention=attention)
        jax.block_until_ready(out)

    def full_optim():
        (full.params, full.grads, full.mu, full.nu, full.count, gnorm) = step.full_optim_step(
            full.params, full.grads, full.mu, full.nu, full.count, hp.array())
        jax.block_until_ready(gnorm)

    run("full-fb", full_fb)
    run("full-optim", full_optim)
    full = None
    return {"suite": suite.name, "shape": shape.label, "tokens": shape.tokens, "attention": attention,
            "remat": suite.remat, "lora_rank": suite.lora_rank, "pool": pool_info,
            "micro_batches": {"one_adapter": len(one)}, "device": str(jax.devices()[0]), "jax": jax.__version__,
            "variants": results}


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
