"""`tinker-jax plan` (tinker_jax/plan.py): per-device memory from config.json alone.

The exact lines (parameters, trainable weights, gradients, Adam state, KV cache) are checked against numbers
worked out by hand below from the rule table (models/sharding.py: vocab -> tensor, embed -> fsdp, heads /
kv_heads / mlp -> tensor, head_dim and the stacked [L] axis never split; a dim whose size the mesh axes do not
divide stays whole), and against the real code: a tiny model loaded by the project's decoder and placed on 8
virtual CPU devices, and a real AdapterPool. The activation formula is checked against jax's own list of the
residuals the real training step saves, so a decoder change that moves activation memory fails here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models_util as mu
from tinker_jax import cli
from tinker_jax import plan as P
from tinker_jax.models.config import config_from_hf

ROOT = Path(__file__).resolve().parents[1]

# A tiny Qwen3 (q/k norm, tied embeddings): D 64, L 2, N 4, K 2, H 16, F 96, V 256.
TINY = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 256,
        "tie_word_embeddings": True, "max_position_embeddings": 512}
# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json): untied, GQA 32/8, no biases, no q/k norm.
LLAMA8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
           "tie_word_embeddings": False, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0}

# Its parameters on one device of fsdp=2 x tensor=4: V/4 = 32064, D/2 = 2048, N*H/4 = 1024, K*H/4 = 256,
# F/4 = 3584 (every dim divides); the RMSNorm scales (embed only) split over fsdp alone.
LLAMA8B_FSDP2_TP4 = (2 * 32064 * 2048  # embed [V/4, D/2], lm_head [D/2, V/4]
                     + 32 * (2 * 2048  # attn_norm, mlp_norm [D/2]
                             + 2048 * 1024 + 2 * 2048 * 256 + 1024 * 2048  # q, k, v, o
                             + 3 * 2048 * 3584)  # gate, up, down
                     + 2048)  # final_norm


def _write(tmp_path: Path, name: str, d: dict) -> Path:
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(d))
    return out


# ------------------------------------------------------------------------------------------- hand arithmetic


def test_tiny_qwen3_parameters_by_hand(tmp_path):
    cfg = P.read_config(_write(tmp_path, "tiny", TINY))
    p = P.plan(cfg, P.parse_mesh("fsdp=2,tensor=2"))
    D, L, NH, KH, H, F, V = 64, 2, 64, 32, 16, 96, 256
    layer = (2 * D  # attn_norm, mlp_norm
             + D * NH + 2 * D * KH + NH * D  # q, k, v, o
             + 2 * H  # q_norm, k_norm
             + 3 * D * F)  # gate, up, down
    assert p.n_params == V * D + L * layer + D == 78208 == cfg.n_params  # tied: no lm_head
    # fsdp=2 halves every embed dim; tensor=2 halves vocab, heads, kv_heads, mlp; head_dim stays whole.
    embed = (V // 2) * (D // 2)
    layer_dev = (2 * (D // 2)
                 + (D // 2) * (NH // 2) + 2 * (D // 2) * (KH // 2) + (NH // 2) * (D // 2)
                 + 2 * H
                 + 3 * (D // 2) * (F // 2))
    assert p.params_per_device == embed + L * layer_dev + D // 2 == 19680
    assert p.line("parameters").bytes == 19680 * 4  # the engine's default dtype: float32
    assert p.mesh.devices == 4 and p.replicated == ()


def test_llama3_8b_parameters_by_hand(tmp_path):
    cfg = P.read_config(_write(tmp_path, "llama8b", LLAMA8B))
    D, L, N, K, H, F, V = 4096, 32, 32, 8, 128, 14336, 128256
    layer = 2 * D + D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    total = 2 * V * D + L * layer + D  # untied: embed [V, D] and lm_head [D, V]
    assert total == 8_030_261_248  # Llama 3 8B's published count

    p = P.plan(cfg, P.parse_mesh("fsdp=2,tensor=4"), dtype="bfloat16")
    assert p.n_params == total
    assert p.params_per_device == LLAMA8B_FSDP2_TP4 == 1_003_882_496  # 1/8 of the weights, plus half of each norm
    assert p.line("parameters").bytes == 2 * LLAMA8B_FSDP2_TP4

    # tensor=3 divides only the vocabulary (128256 = 3 x 42752); heads (4096), kv heads (1024) and mlp (14336)
    # do not, so those dims stay whole on every device (spec_for's rule) and the plan says so.
    p3 = P.plan(cfg, P.parse_mesh("fsdp=2,tensor=3"), dtype="bfloat16")
    layer_dev3 = 2 * 2048 + 2048 * 4096 + 2 * 2048 * 1024 + 4096 * 2048 + 3 * 2048 * 14336
    assert p3.params_per_device == 2 * 42752 * 2048 + L * layer_dev3 + 2048
    text = "\n".join(p3.replicated)
    for dim in ("heads dim 4096", "kv_heads dim 1024", "mlp dim 14336"):
        assert f"{dim} is not divisible by tensor=3" in text
    assert "vocab" not in text and "embed dim" not in text


def test_lora_vs_full_state_by_hand(tmp_path):
    cfg = P.read_config(_write(tmp_path, "tiny", TINY))
    mesh = P.parse_mesh("fsdp=2,tensor=2")
    R = 4
    lora = P.plan(cfg, mesh, lora_rank=R)
    # One adapter on this device: a [in, R] split like its kernel's input, b [R, out] like its output (L = 2 for
    # the per-layer projections). q: a D/2, b NH/2; k, v: b KH/2; o: a NH/2, b D/2; gate, up: b F/2; down: a F/2;
    # unembed (no L): a D/2, b V/2.
    per_layer = ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 48) + (48 + 32)) * R
    unembed = (32 + 128) * R
    slot = (2 * per_layer + unembed) * 4  # fp32
    assert slot == 17408
    assert lora.pool_slots == 4  # lora.initial_slots; slot 0 is the null adapter
    assert lora.line("trainable").bytes == 4 * slot
    assert lora.line("optimizer").bytes == 2 * 4 * slot  # Adam mu and nu
    assert lora.line("gradients").bytes == 4 * slot + 2 * slot  # accumulator + the step's copy and its gradient
    assert lora.trainable_params == (2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 96)) + 64 + 256) * R

    full = P.plan(cfg, mesh, full=True)
    params = 19680  # per device, test_tiny_qwen3_parameters_by_hand
    assert full.line("trainable").bytes == params * 4  # FullState: an fp32 copy
    assert full.line("optimizer").bytes == 2 * params * 4
    assert full.line("gradients").bytes == 2 * params * 4  # accumulator + the step's fresh gradient
    assert full.line("parameters").bytes == lora.line("parameters").bytes  # the shared base either way
    assert full.trainable_params == full.n_params


def test_kv_cache_bytes(tmp_path):
    cfg = P.read_config(_write(tmp_path, "tiny", TINY))
    L, K, H = 2, 2, 16
    # The pool holds rows x seq len tokens by default, in pages of 16 (plus one scratch page per batch shard).
    one = P.plan(cfg, P.PlanMesh(), sampler_batch=3, sampler_seq_len=100, dtype="bfloat16")
    assert one.line("kv_cache").bytes == 2 * L * (19 + 1) * 16 * K * H * 2  # k and v, ceil(300 / 16) + 1 pages, bf16
    budget = P.plan(cfg, P.PlanMesh(), sampler_batch=3, sampler_seq_len=100, sampler_kv_tokens=64,
                    sampler_page_size=8, dtype="bfloat16")
    assert budget.line("kv_cache").bytes == 2 * L * (8 + 1) * 8 * K * H * 2
    # On fsdp=2 x tensor=2 the sampler rounds 3 rows up to 4; pages split over fsdp, the 2 kv heads over tensor.
    two = P.plan(cfg, P.parse_mesh("fsdp=2,tensor=2"), sampler_batch=3, sampler_seq_len=100, dtype="bfloat16")
    assert two.line("kv_cache").bytes == 2 * L * (13 + 1) * 16 * (K // 2) * H * 2  # 400 tokens: 13 pages a shard
    assert any("3 rounded up to 4" in n for n in two.notes)
    # tensor=4 does not divide 2 kv heads: they stay whole (pages still split over fsdp)
    four = P.plan(cfg, P.parse_mesh("fsdp=2,tensor=4"), sampler_batch=4, sampler_seq_len=100, dtype="bfloat16")
    assert four.line("kv_cache").bytes == 2 * L * (13 + 1) * 16 * K * H * 2


def test_sampler_dtype_copies_the_base_weights(tmp_path):
    """sampler.dtype bfloat16 on a float32 engine: the KV cache and adapter table in bf16, plus a bf16 copy of the
    base weights (the engine's `_cast`); the same dtype as the engine adds nothing."""
    cfg = P.read_config(_write(tmp_path, "tiny", TINY))
    mesh = P.parse_mesh("fsdp=2,tensor=2")
    fp32 = P.plan(cfg, mesh, lora_rank=4, sampler_batch=4, sampler_seq_len=100)
    same = P.plan(cfg, mesh, lora_rank=4, sampler_batch=4, sampler_seq_len=100, sampler_dtype="float32")
    bf16 = P.plan(cfg, mesh, lora_rank=4, sampler_batch=4, sampler_seq_len=100, sampler_dtype="bfloat16")
    assert same.total == fp32.total
    params = 19680  # per device, test_tiny_qwen3_parameters_by_hand
    assert bf16.line("kv_cache").bytes * 2 == fp32.line("kv_cache").bytes
    assert bf16.line("sampler_weights").bytes == fp32.line("sampler_weights").bytes // 2 + params * 2
    assert bf16.line("parameters").bytes == params * 4  # training's base weights stay fp32
    full = P.plan(cfg, mesh, full=True, sampler_dtype="bfloat16")
    assert full.line("sampler_weights").bytes == params * 2  # a snapshot of the run, cast
    # On a bf16 engine the sampler already computes in bf16: a full run's snapshot stays an fp32 copy, as the engine
    # takes it (it casts only to a sampler dtype other than its own).
    same_bf16 = P.plan(cfg, mesh, full=True, dtype="bfloat16", sampler_dtype="bfloat16")
    engine_bf16 = P.plan(cfg, mesh, full=True, dtype="bfloat16")
    assert same_bf16.line("sampler_weights").bytes == engine_bf16.line("sampler_weights").bytes == params * 4


def test_sampler_quantize_counts_int8_projections(tmp_path):
    """sampler.quantize int8: the sampler's copy of the base weights is what models.quant makes of a real decoder
    (int8 block projections and MoE experts + a scale per column, the rest in the sampler's dtype), as a full run's
    snapshot, as a LoRA engine's extra copy, and split over a mesh; a bad mode names the flag."""
    from flax import nnx

    from tinker_jax.models import quant
    from tinker_jax.models.decoder import Decoder

    moe = {**TINY, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "tie_word_embeddings": False}
    for name, d in (("moe", moe), ("tiny", TINY)):  # the MoE model's experts are int8 too, its lm_head is not
        cfg = P.read_config(_write(tmp_path, name, d))
        dec = Decoder(cfg, rngs=nnx.Rngs(params=0))
        quant.quantize_blocks(dec)
        real = sum(x.nbytes for x in jax.tree.leaves(nnx.split(dec, nnx.Param)[1]))
        full = P.plan(cfg, P.parse_mesh(""), full=True, sampler_quantize="int8")
        assert full.line("sampler_weights").bytes == real, name
    one = P.parse_mesh("")
    plain = P.plan(cfg, one, lora_rank=4, sampler_batch=4, sampler_seq_len=100)
    q8 = P.plan(cfg, one, lora_rank=4, sampler_batch=4, sampler_seq_len=100, sampler_quantize="int8")
    assert q8.line("sampler_weights").bytes - plain.line("sampler_weights").bytes == real
    split = P.plan(cfg, P.parse_mesh("fsdp=2,tensor=2"), full=True, sampler_quantize="int8")
    assert real / 4 <= split.line("sampler_weights").bytes < real  # sharded, the replicated norms aside
    with pytest.raises(P.PlanError, match="--sampler-quantize"):
        P.plan(cfg, one, sampler_quantize="int4")


def test_llama3_8b_kv_cache_and_fit(tmp_path):
    cfg = P.read_config(_write(tmp_path, "llama8b", LLAMA8B) / "config.json")  # a config.json path works too
    p = P.plan(cfg, P.parse_mesh("fsdp=8"), dtype="bfloat16", sampler_batch=64, sampler_seq_len=4096,
               device_memory="80GiB")
    assert p.line("kv_cache").bytes == 2 * 32 * (64 * 4096 // (8 * 16) + 1) * 16 * 8 * 128 * 2  # pages per shard
    assert p.device_memory == 80 * 2**30 and p.total == sum(x.bytes for x in p.lines)
    assert p.verdict in ("fits", "tight") and p.fits
    tiny_device = P.plan(cfg, P.parse_mesh("fsdp=8"), dtype="bfloat16", device_memory="1GiB")
    assert tiny_device.verdict == "does not fit" and tiny_device.fits is False


def test_sampler_workspace_takes_the_samplers_largest_call(tmp_path):
    """The line is the largest of the calls the sampler's settings make possible: prompts up to prefill_chunk
    prefilled whole in 8 rows (the largest row bucket), longer ones in chunks, up to 8 prompts' chunks in a call
    while rows x attended slots stay within the token budget; without chunks, the longest bucket in the rows the
    token budget allows (16,384 / 4,096 = 4); the paged kernel gathers no context."""
    cfg = P.read_config(_write(tmp_path, "llama8b", LLAMA8B))
    d = P.dims(cfg, P.PlanMesh().abstract(), 32, 0)
    kw = dict(dtype="bfloat16", sampler_batch=64, sampler_seq_len=4096)
    p = P.plan(cfg, **kw)
    line = p.line("sampler_workspace")
    assert not line.exact and "a prefill of 8 rows x 512 tokens" in line.note
    assert "512-token chunks of up to 8 prompts of up to 4096 tokens" in line.note
    layer = P._largest_layer(P._param_table(P._abstract_params(cfg, "bfloat16"), P.PlanMesh().abstract()),
                             lambda name, local: P._nbytes(local[1:], 2))
    rows = dict(chunk_rows=(1, 2, 4, 8), chunk_budget=16384)
    est = P.sampler_transients(d, 32, 2, layer, rows=64, prefill_rows=8, prefill_len=512, chunk=512, seq_len=4096,
                               paged_decode=False, **rows)
    assert line.bytes == max(est.values())
    # 16,384 attended slots (4 rows of 4,096, or 8 of 2,048) against one row of 4,608: their scores, k and v
    one = P.sampler_transients(d, 32, 2, layer, rows=64, prefill_rows=8, prefill_len=512, chunk=512, seq_len=4096,
                               paged_decode=False)["chunk"]
    assert est["chunk"] - one > (16384 - 4608) * (2 * 8 * 128 * 2 + 4 * 32 * 512 * 4)
    whole = P.plan(cfg, **kw, sampler_prefill_chunk=0).line("sampler_workspace")
    assert "a prefill of 4 rows x 4096 tokens" in whole.note and "-token chunk" not in whole.note
    assert whole.bytes > line.bytes  # [4, 32, 4096, 4096] attention scores
    paged = P.plan(cfg, **kw, sampler_decode_attention="paged").line("sampler_workspace")
    gathered = 2 * 64 * 4096 * 8 * 128 * 2  # k and v of one layer's context, 64 rows x 4096 slots, bf16
    assert est["decode"] - P.sampler_transients(d, 32, 2, layer, rows=64, prefill_rows=8, prefill_len=512, chunk=512,
                                                seq_len=4096, paged_decode=True, **rows)["decode"] == gathered
    assert paged.bytes <= line.bytes
    assert P.plan(cfg, **{**kw, "sampler_batch": 0}).line("sampler_workspace").bytes == 0


def test_expert_axis_splits_experts_and_rows(tmp_path):
    cfg = P.read_config(_write(tmp_path, "tiny", TINY))
    a = P.plan(cfg, P.parse_mesh("fsdp=2"))
    b = P.plan(cfg, P.parse_mesh("fsdp=2,expert=4"))
    size = {x.name: x.bytes for x in a.lines}
    with_ep = {x.name: x.bytes for x in b.lines}
    assert b.mesh.devices == 8
    for name in ("parameters", "trainable", "gradients", "optimizer"):  # a dense model: weights replicated over it
        assert with_ep[name] == size[name], name
    assert with_ep["activations"] < size["activations"]  # ... and rows split over it
    assert any("no MoE layers" in n for n in b.notes)
    moe = P.read_config(_write(tmp_path, "moe", {**TINY, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
                                                "num_experts_per_tok": 2, "moe_intermediate_size": 32}))
    one, two = (P.plan(moe, P.parse_mesh(m), full=True) for m in ("fsdp=2", "fsdp=2,expert=2"))
    experts = 2 * 3 * 64 * 32 * 8  # layers x (gate, up, down) x D x I x E, fp32 bytes per parameter below
    assert one.params_per_device - two.params_per_device == experts // 4  # half of each fsdp shard's experts


def test_moe_plan_counts_every_expert_and_its_adapters(tmp_path):
    """Qwen3-MoE: all experts are parameters (and so is the router); a LoRA adapter has one A/B pair per expert.
    Counted by hand for 8 experts of width 32, 2 layers, rank 8."""
    moe = {**TINY, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "tie_word_embeddings": False}
    cfg = P.read_config(_write(tmp_path, "moe", moe))
    D, V, L, E, I, R = 64, 256, 2, 8, 32, 8
    attn = D * 64 + 2 * D * 32 + 64 * D + 2 * 16  # q, k, v, o (16-wide heads: 4 query, 2 kv) + q/k norms
    ffn = D * E + 3 * D * I * E  # router + experts
    assert P.plan(cfg, P.parse_mesh("fsdp=2")).n_params == L * (attn + ffn + 2 * D) + 2 * V * D + D == cfg.n_params
    lora = L * ((D + 64) + 2 * (D + 32) + (64 + D) + E * 3 * (D + I)) * R + (D + V) * R
    assert P.plan(cfg, P.parse_mesh("fsdp=2"), lora_rank=R).trainable_params == lora


def test_parse_helpers():
    assert P.parse_mesh("data=2, fsdp=4,tensor=2") == P.PlanMesh(data=2, fsdp=4, tensor=2)
    assert P.parse_bytes("80GiB") == 80 * 2**30 and P.parse_bytes("16 GB") == 16 * 10**9
    assert P.parse_bytes("1.5GiB") == 3 * 2**29 and P.parse_bytes("123") == 123
    # AdapterPool's growth (engine/pools.py): 4 slots, then by half (at least 2) up to max_slots
    assert [P.pool_capacity(n, 4, 64) for n in (1, 3, 4, 5, 6, 9, 63)] == [4, 4, 6, 6, 9, 13, 64]
    # batching: rows bucketed to powers of two, at least data x fsdp; the default row length fills each shard once
    assert P.micro_batch(8192, 1024, 8) == (1024, 8)
    assert P.micro_batch(8192, 4096, 8) == (4096, 8)  # 2 rows' worth, padded to one row per batch shard
    assert P.default_seq_len(8192, 16, 4096) == 512 and P.default_seq_len(1 << 20, 1, 4096) == 4096


# ------------------------------------------------------------------------------------------- against the code


def test_matches_the_real_model_and_pool():
    """The plan's counts equal the arrays the project builds: the tiny Qwen3 loaded by the decoder, placed on a
    real fsdp=2 x tensor=4 mesh of the 8 virtual CPU devices, and a real rank-4 AdapterPool on it."""
    from tinker_jax.engine.pools import AdapterPool
    from tinker_jax.models.sharding import MeshConfig, make_mesh, state_shardings

    model = mu.jax_model("tiny-qwen3")
    cfg = model.cfg
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    p = P.plan(P.read_config(mu.tiny_model_dir("tiny-qwen3")), P.parse_mesh("fsdp=2,tensor=4"), lora_rank=4)
    assert p.n_params == sum(x.size for x in leaves) == cfg.n_params

    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    placed = [jax.device_put(x, s) for x, s in zip(leaves, jax.tree.leaves(state_shardings(params, mesh)))]
    dev0 = jax.devices()[0]

    def on_dev0(tree) -> int:
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev0)

    assert on_dev0(placed) == p.line("parameters").bytes
    pool = AdapterPool(cfg, 4, mesh, capacity=4)
    assert pool.capacity == p.pool_slots
    assert on_dev0(pool.weights) == p.line("trainable").bytes
    assert on_dev0(pool.mu) + on_dev0(pool.nu) == p.line("optimizer").bytes


def _saved_bytes(f, arg) -> int:
    saved_residuals = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals
    return sum(math.prod(a.shape) * a.dtype.itemsize for a, src in saved_residuals(f, arg)
               if "argument" not in src and "constant" not in src)


@pytest.mark.parametrize("arch,dtype,param_dtype,mode", [
    ("Qwen3ForCausalLM", "bfloat16", "float32", "full"),  # full fine-tuning in bf16: fp32 weights cast per layer
    ("Qwen3ForCausalLM", "bfloat16", "bfloat16", "uniform"),  # one LoRA run
    ("LlamaForCausalLM", "float32", "float32", "gather"),  # several LoRA runs; no q/k norm
])
def test_activation_formula_matches_saved_residuals(arch, dtype, param_dtype, mode):
    """plan.residual_bytes against what jax saves for the backward pass of the real training loss
    (training.step.target_logprobs through the Decoder), with and without remat: per layer exactly (the difference
    of a 2-layer and a 1-layer model), outside the layers within 1%."""
    from tinker_jax.models import lora as lm
    from tinker_jax.training.step import target_logprobs

    B, T, R = 2, 24, 4
    hf = {"architectures": [arch], "hidden_size": 40, "num_attention_heads": 6, "num_key_value_heads": 2,
          "head_dim": 8, "intermediate_size": 56, "vocab_size": 104}
    batch = {"tokens": jnp.zeros((B, T), jnp.int32), "positions": jnp.zeros((B, T), jnp.int32),
             "mask": jnp.ones((B, T), jnp.float32), "targets": jnp.zeros((B, T), jnp.int32)}

    def traced(layers: int, remat: bool) -> int:
        cfg = config_from_hf({**hf, "num_hidden_layers": layers})
        model = nnx.eval_shape(lambda: _decoder(cfg, param_dtype, dtype))
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
        if mode == "full":
            return _saved_bytes(lambda st: target_logprobs(nnx.merge(graphdef, st), batch, (), remat).sum(), state)
        S = B + 1
        w = {n: {k: jnp.zeros(s, jnp.float32) for k, s in v.items()} for n, v in lm.shapes(cfg, R, S).items()}
        slots = jnp.zeros(B, jnp.int32) if mode == "uniform" else jnp.arange(1, B + 1, dtype=jnp.int32)

        def loss(w):
            rows = (lm.LoraRows(w, jnp.ones((S, len(lm.NAMES))), slots, 0, B, mode),)
            return target_logprobs(nnx.merge(graphdef, state), batch, rows, remat).sum()
        return _saved_bytes(loss, w)

    cfg = config_from_hf({**hf, "num_hidden_layers": 1})
    table = P._param_table(P._abstract_params(cfg, param_dtype), P.PlanMesh().abstract())
    layer_w = sum(math.prod(loc[1:]) for name, _, _, loc in table
                  if name.startswith("blocks.") and name.endswith(".kernel"))
    rank = None if mode == "full" else R
    d = P.dims(cfg, P.PlanMesh().abstract(), rank, layer_w)
    for remat in (False, True):
        one, two = traced(1, remat), traced(2, remat)
        layer, outside = P.residual_bytes(d, B * T, B, T, P.DTYPES[dtype], mode=mode, remat=remat, rank=rank,
                                          cast_weights=mode == "full" and dtype != param_dtype)
        assert layer == two - one, (remat, layer, two - one)
        assert outside == pytest.approx(2 * one - two, rel=0.01), remat


def test_sampler_transients_cover_the_real_kernels(monkeypatch):
    """plan.sampler_transients against XLA's memory analysis (temporaries + outputs not aliased to inputs) of the
    sampler's real prefill, chunk and decode programs, compiled while a Sampler serves requests of those shapes: the
    estimate is never under what XLA:CPU assigns, and within 3x of it."""
    from tinker import types

    from tinker_jax.models.decoder import Decoder
    from tinker_jax.sampling import Sampler, WeightSnapshot, kernels

    hf = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256, "vocab_size": 2048,
          "num_hidden_layers": 2, "tie_word_embeddings": True, "max_position_embeddings": 1024}
    cfg = config_from_hf(hf)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    snap = WeightSnapshot(cfg, graphdef, params, name="x")
    got: dict[str, int] = {}
    for kern, name in ((kernels._prefill_kernel, "prefill"), (kernels._prefill_pages_kernel, "chunk"),
                       (kernels._decode_kernel, "decode")):
        def on(pl, key, shardings, _on=kern.on, _name=name, **bind):
            f = _on(pl, key, shardings, **bind)

            def measured(*args):
                m = f.lower(*args).compile().memory_analysis()
                got[_name] = max(got.get(_name, 0),
                                 m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
                return f(*args)
            return measured
        monkeypatch.setattr(kern, "on", on)

    amesh = P.PlanMesh().abstract()
    table = P._param_table(P._abstract_params(cfg, "float32"), amesh)
    layer = P._largest_layer(table, lambda name, local: P._nbytes(local[1:], 4))
    d = P.dims(cfg, amesh, None, 0)
    S, B = 512, 4
    # A 256 bucket of 2 rows; two 450-token prompts in chunks, a call of 2 rows each step.
    for prompt, n, chunk in ((250, 2, None), (450, 2, 128)):
        got.clear()
        T = 1 << (prompt - 2).bit_length()
        with Sampler(cfg, [0], max_batch=B, max_seq_len=S, prefill_lengths=(T,), prefill_batches=(n,),
                     decode_steps=2, decode_lengths=(S,), prefix_cache=False, prefill_chunk=chunk) as s:
            for f in [s.submit(snap, list(range(3, 3 + prompt)), types.SamplingParams(max_tokens=2, seed=i),
                               include_prompt_logprobs=True) for i in range(n)]:
                f.result(timeout=300)
        est = P.sampler_transients(d, cfg.n_layers, 4, layer, rows=B, prefill_rows=n, prefill_len=T, chunk=chunk,
                                   seq_len=S, paged_decode=False, chunk_rows=(n,), chunk_budget=16384)
        if chunk:  # the two prompts' chunks in one call each step
            assert s.stats["prefill_chunks"] == 2 * s.stats["prefill_chunk_calls"] == 2 * 4
        calls = ("chunk",) if chunk else ("prefill", "decode")  # (a lone row decodes in a smaller row bucket)
        assert set(calls) <= set(got), got
        for call in calls:
            assert got[call] <= est[call] <= 3 * got[call], (call, got[call], est[call])


def _decoder(cfg, param_dtype: str, dtype: str):
    from tinker_jax.models.decoder import Decoder

    return Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype), dtype=jnp.dtype(dtype))


# ------------------------------------------------------------------------------------------- the command line


def test_cli_json_end_to_end(tmp_path):
    d = _write(tmp_path, "llama8b", LLAMA8B)
    out = subprocess.run(
        [sys.executable, "-m", "tinker_jax.cli", "plan", str(d / "config.json"), "--mesh", "fsdp=2,tensor=4",
         "--lora-rank", "16", "--param-dtype", "bfloat16", "--batch-tokens", "4096", "--remat",
         "--device-memory", "80GiB", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert j["n_params"] == 8_030_261_248 and j["devices"] == 8 and j["mode"] == "lora" and j["lora_rank"] == 16
    assert j["per_device_bytes"]["parameters"] == 2 * LLAMA8B_FSDP2_TP4
    assert j["total_bytes"] == sum(j["per_device_bytes"].values())
    assert j["remat"] and j["per_device_bytes"]["activations"] == j["activations_bytes"]["remat"]
    assert j["seq_len"] == 2048 and j["rows"] == 2 and j["tokens_per_device"] == 2048  # 4096 tokens / 2 shards
    assert j["fits"] is True and j["verdict"] in ("fits", "tight")
    assert {x["name"]: x["exact"] for x in j["lines"]}["activations"] is False


def test_cli_text(tmp_path, capsys):
    d = _write(tmp_path, "tiny", TINY)
    assert cli.main(["plan", str(d), "--mesh", "fsdp=2", "--full", "--device-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "trainable", "gradients", "optimizer", "activations", "kv_cache", "total",
                 "fits", "estimate"):
        assert word in out


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "foo=2"], "--mesh: unknown axis 'foo'"),
    (["--mesh", "fsdp=0"], "--mesh: fsdp=0 must be >= 1"),
    (["--mesh", "fsdp=two"], "--mesh: fsdp='two' is not an integer"),
    (["--mesh", "fsdp"], "--mesh: expected AXIS=SIZE"),
    (["--mesh", "fsdp=2,fsdp=4"], "--mesh: axis 'fsdp' given twice"),
    (["--device-memory", "80XB"], "--device-memory: expected a size"),
    (["--lora-rank", "0"], "--lora-rank: must be a positive integer"),
    (["--adapters", "64"], "--adapters: at most 63 LoRA runs"),
    (["--batch-tokens", "0"], "--batch-tokens: must be >= 1"),
])
def test_cli_bad_flags(tmp_path, capsys, argv, message):
    d = _write(tmp_path, "tiny", TINY)
    assert cli.main(["plan", str(d), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_model_and_exclusive_flags(tmp_path, capsys):
    assert cli.main(["plan", str(tmp_path / "missing")]) == 2
    assert "MODEL:" in capsys.readouterr().err
    bad = _write(tmp_path, "mixtral", {**TINY, "architectures": ["MixtralForCausalLM"]})
    assert cli.main(["plan", str(bad)]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --full and --lora-rank are mutually exclusive
        cli.main(["plan", str(bad), "--full", "--lora-rank", "8"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert P.parse_mesh(None) == P.PlanMesh()
