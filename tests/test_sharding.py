"""Sharded loading and SPMD execution on 8 virtual CPU devices (tests/conftest.py sets the XLA flag).

Meshes fsdp=2 x tensor=4, data=2 x fsdp=4 and (a MoE model) expert=2 x fsdp=2 x tensor=2: every parameter must be placed as the logical-axis rules say
(golden PartitionSpecs for a few, the rule table for all, no matrix left replicated), and the jitted
forward and cross-entropy gradient (full weights, and LoRA adapter pools with several runs in one batch) on
batch-sharded inputs must equal the single-device result.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models_util as mu
import tinker.types as tt
from tinker_jax.engine.pools import AdapterPool
from tinker_jax.hf.weights import load_decoder
from tinker_jax.models.lora import LoraSpec
from tinker_jax.models.sharding import (DEFAULT_RULES, MeshConfig, batch_sharding, make_mesh, pool_shardings,
                                        rows_sharding, spec_for, state_shardings)
from tinker_jax.training import batching, step

MESHES = {"fsdp2xtp4": MeshConfig(fsdp=2, tensor=4), "dp2xfsdp4": MeshConfig(data=2, fsdp=4),
          "ep2xfsdp2xtp2": MeshConfig(expert=2, fsdp=2, tensor=2)}

# path in the Decoder state -> PartitionSpec, per mesh (tiny sizes: V 512, D 64, N*H 64, K*H 32, F 96, L 2).
GOLDEN = {
    "fsdp2xtp4": {
        ("embed",): P("tensor", "fsdp"),
        ("final_norm", "scale"): P("fsdp"),
        ("blocks", "attn_norm", "scale"): P(None, "fsdp"),
        ("blocks", "attn", "q", "kernel"): P(None, "fsdp", "tensor"),
        ("blocks", "attn", "k", "kernel"): P(None, "fsdp", "tensor"),  # K*H = 32 divides by 4
        ("blocks", "attn", "o", "kernel"): P(None, "tensor", "fsdp"),
        ("blocks", "mlp", "gate", "kernel"): P(None, "fsdp", "tensor"),
        ("blocks", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
        ("blocks", "attn", "q_norm", "scale"): P(None, None),  # qwen3 only
        ("blocks", "attn", "q", "bias"): P(None, "tensor"),  # qwen2 only
        ("lm_head", "kernel"): P("fsdp", "tensor"),  # untied only
    },
    "dp2xfsdp4": {
        ("embed",): P(None, "fsdp"),
        ("final_norm", "scale"): P("fsdp"),
        ("blocks", "attn", "q", "kernel"): P(None, "fsdp", None),
        ("blocks", "attn", "v", "kernel"): P(None, "fsdp", None),
        ("blocks", "attn", "o", "kernel"): P(None, None, "fsdp"),
        ("blocks", "mlp", "up", "kernel"): P(None, "fsdp", None),
        ("blocks", "mlp", "down", "kernel"): P(None, None, "fsdp"),
        ("blocks", "attn", "k_norm", "scale"): P(None, None),
        ("blocks", "attn", "k", "bias"): P(None, None),
        ("lm_head", "kernel"): P("fsdp", None),
    },
    # Expert parallelism (tiny-qwen3-moe-mixed: E 8, I 24, dense layers in `dense_blocks`): experts over `expert`,
    # inside each expert as a dense weight.
    "ep2xfsdp2xtp2": {
        ("embed",): P("tensor", "fsdp"),
        ("final_norm", "scale"): P("fsdp"),
        ("blocks", "attn", "q", "kernel"): P(None, "fsdp", "tensor"),
        ("blocks", "attn", "o", "kernel"): P(None, "tensor", "fsdp"),
        ("blocks", "mlp", "router"): P(None, "fsdp"),
        ("blocks", "mlp", "gate"): P(None, "expert", "fsdp", "tensor"),
        ("blocks", "mlp", "up"): P(None, "expert", "fsdp", "tensor"),
        ("blocks", "mlp", "down"): P(None, "expert", "tensor", "fsdp"),
        ("dense_blocks", "attn", "q", "kernel"): P(None, "fsdp", "tensor"),
        ("dense_blocks", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
    },
}

# Which families run on which mesh (all three are covered; each run is a separate SPMD compile).
CASES = [("fsdp2xtp4", "tiny-qwen3"), ("fsdp2xtp4", "tiny-llama3"), ("dp2xfsdp4", "tiny-qwen2"),
         ("dp2xfsdp4", "tiny-qwen3"), ("ep2xfsdp2xtp2", "tiny-qwen3-moe-mixed")]

LOGIT_ATOL = 1e-5
GRAD_RTOL = 1e-4


def _mesh(name):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, see conftest.py)")
    return make_mesh(MESHES[name])


def _load(preset, mesh):
    moe_impl = "ragged" if mesh.shape["expert"] > 1 else "auto"  # what the engine picks on an expert axis
    return load_decoder(mu.tiny_model_dir(preset), shardings_fn=lambda st: state_shardings(st, mesh),
                        moe_impl=moe_impl)


def _variables(model, kind):
    """{path tuple of str: nnx.Variable} for every variable of `kind` in `model`."""
    flat = nnx.to_flat_state(nnx.state(model, kind))
    return {tuple(str(k) for k in path): var for path, var in flat}


def _batch(mesh, preset, seed, rows=8, length=10):
    """tokens/positions/targets/weights/segment_ids; row 1 packs two sequences, row 3 ends in padding."""
    V = mu.vocab_size(preset)
    tokens = mu.random_tokens(seed, (rows, length), V)
    targets = mu.random_tokens(seed + 1, (rows, length), V)
    seg = np.ones((rows, length), np.int32)
    positions = mu.arange_positions(rows, length)
    seg[1, 4:], positions[1, 4:] = 2, np.arange(length - 4)
    seg[3, 7:], positions[3, 7:] = 0, 0
    weights = (seg != 0).astype(np.float32)
    host = dict(tokens=tokens, positions=positions, targets=targets, weights=weights, segment_ids=seg)
    sh = batch_sharding(mesh, 2)
    dev = {k: jax.device_put(v, sh) for k, v in host.items()}
    return host, dev


def _assert_placed_by_rules(model, mesh, kind=nnx.Param):
    for path, var in _variables(model, kind).items():
        value = var[...]
        axes = tuple(var.get_metadata().get("axes", ()))
        assert axes, f"{path}: parameter has no logical axes metadata"
        want = NamedSharding(mesh, spec_for(axes, value.shape, mesh))
        assert value.sharding.is_equivalent_to(want, value.ndim), \
            f"{path}: placed {value.sharding.spec}, rules say {want.spec}"
        # Each device really holds only its block.
        shard = value.addressable_shards[0].data.shape
        assert shard == want.shard_shape(value.shape), f"{path}: shard {shard} vs {want.shard_shape(value.shape)}"
        # Independently of spec_for: a matrix with a dim whose rule names mesh axes (of size > 1) that
        # divide it must not be left fully replicated.
        if len(axes) == 2 and any(_shardable(dim, ax, mesh) for dim, ax in zip(value.shape[-2:], axes)):
            assert not value.sharding.is_fully_replicated, f"{path} {value.shape} {axes}: fully replicated"


def _shardable(dim, axis, mesh) -> bool:
    mesh_axes = DEFAULT_RULES.get(axis) if axis else None
    if mesh_axes is None:
        return False
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    n = int(np.prod([mesh.shape[a] for a in mesh_axes]))
    return n > 1 and dim % n == 0


@pytest.mark.parametrize("mesh_name,preset", CASES)
def test_sharded_load_placement_and_spmd_parity(mesh_name, preset):
    mesh = _mesh(mesh_name)
    model = _load(preset, mesh)
    params = _variables(model, nnx.Param)

    golden = {p: s for p, s in GOLDEN[mesh_name].items() if p in params}
    assert len(golden) >= 7, sorted(golden)
    for path, spec in golden.items():
        value = params[path][...]
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), \
            f"{mesh_name} {preset} {path}: {value.sharding.spec}, expected {spec}"
    _assert_placed_by_rules(model, mesh)
    # Same values as the single-device load.
    ref_model = mu.jax_model(preset)
    ref_params = _variables(ref_model, nnx.Param)
    assert set(ref_params) == set(params)
    for path, var in params.items():
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(ref_params[path][...]), err_msg=str(path))

    host, dev = _batch(mesh, preset, seed=11)
    # Forward: logits equal the single-device forward.
    logits, _ = mu.forward(model, dev["tokens"], dev["positions"], dev["segment_ids"])
    ref_logits, _ = mu.forward(ref_model, host["tokens"], host["positions"], host["segment_ids"])
    assert len(logits.sharding.device_set) == 8
    real = host["weights"] > 0
    err = np.abs(np.asarray(logits) - np.asarray(ref_logits))[real].max()
    assert err <= LOGIT_ATOL, f"{mesh_name} {preset}: sharded vs single-device logits differ by {err:.3g}"

    # Cross-entropy gradient w.r.t. every base parameter.
    args = ("tokens", "positions", "targets", "weights")
    loss, grads = mu.ce_grads(model, *(dev[k] for k in args), dev["segment_ids"])
    ref_loss, ref_grads = mu.ce_grads(ref_model, *(host[k] for k in args), host["segment_ids"])
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    _assert_grads_close(grads, ref_grads, f"{mesh_name} {preset}")


def test_sharded_load_reads_each_block_once(caplog):
    """With a placement, each device's block is read from the files alone (a process never reads what its devices
    do not hold); on one process holding every device that is every byte, once (replicas share a read)."""
    mesh = _mesh(CASES[0][0])
    with caplog.at_level("INFO", logger="tinker_jax.hf.weights"):
        load_decoder(mu.tiny_model_dir("tiny-qwen3"), shardings_fn=lambda st: state_shardings(st, mesh))
    (read, total), = [tuple(map(int, m)) for m in re.findall(r"read (\d+) of the weights' (\d+) bytes", caplog.text)]
    assert read == total > 0


def _assert_grads_close(grads, ref_grads, what):
    flat = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    ref = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(ref_grads)}
    assert set(flat) == set(ref) and flat, f"{what}: grad trees differ"
    bad = {}
    for path, g in flat.items():
        r = np.asarray(ref[path][...])
        assert np.abs(r).max() > 0, f"{what} {path}: zero reference gradient"
        e = mu.rel_err(np.asarray(g[...]), r)
        if e > GRAD_RTOL:
            bad[path] = e
    assert not bad, f"{what}: relative grad error > {GRAD_RTOL}: {bad}"


RUNS = {"a": LoraSpec(4, seed=1), "b": LoraSpec(4, seed=2, targets=("q", "v", "unembed")), "c": LoraSpec(8, seed=3)}


def _pools(mesh, cfg):
    """Rank-4 and rank-8 pools on `mesh` holding runs a, b (rank 4) and c (rank 8), every B perturbed off zero
    (a fresh B = 0 gives dL/dA == 0) with the same values on every mesh."""
    pools = {4: AdapterPool(cfg, 4, mesh), 8: AdapterPool(cfg, 8, mesh)}
    slots = {}
    for i, (name, spec) in enumerate(RUNS.items()):
        pool = pools[spec.rank]
        slots[name] = pool.alloc(name, spec)
        rng = np.random.default_rng(30 + i)
        w = pool.read(slots[name], spec).weights
        w = {n: {"a": ab["a"], "b": (0.05 * rng.standard_normal(ab["b"].shape)).astype(np.float32)}
             for n, ab in w.items()}
        pool.write(slots[name], spec, w)
    return pools, slots


def _requests(preset):
    V = mu.vocab_size(preset)
    out = {}
    for i, (name, lens) in enumerate({"a": (10, 7, 3), "b": (9,), "c": (6, 10)}.items()):
        toks = mu.random_tokens(40 + i, (len(lens), 11), V)
        data = [tt.Datum(model_input=tt.ModelInput.from_ints(t[:n].tolist()),
                         loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(t[1:n + 1].astype(np.int64))})
                for t, n in zip(toks, lens)]
        out[name] = batching.validate(data, "cross_entropy", vocab_size=V, max_len=64)
    return out


def _pool_step(mesh, dec, preset):
    graphdef, base = nnx.split(dec, nnx.Param)
    pools, slots = _pools(mesh, dec.cfg)
    reqs = _requests(preset)
    parts = [batching.Part(reqs[n], RUNS[n].rank, slots[n]) for n in RUNS]
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    (mb,) = batching.plan(parts, 4096, rows)
    assert [s.mode for s in mb.segments] == ["gather", "uniform"] and mb.shape[0] % rows == 0
    db = step.device_batch(mb.arrays(), rows_sharding(mesh))
    ranks = [seg.rank for seg in mb.segments]
    grads, loss, _, lp = step.lora_forward_backward(
        base, tuple(pools[r].weights for r in ranks), tuple(pools[r].grads for r in ranks),
        tuple(pools[r].scale for r in ranks), db, graphdef=graphdef, layout=mb.layout)
    for r, g in zip(ranks, grads):
        pools[r].grads = g
    per_run = {n: jax.tree.map(np.asarray, pools[RUNS[n].rank].read_grads(slots[n], RUNS[n])) for n in RUNS}
    loss, lp = np.asarray(loss), np.asarray(lp)  # per datum (row layouts differ between meshes)
    by_datum = {(p, d): (loss[r], lp[r, :n]) for p, d, r, n in mb.rows}
    return pools, by_datum, per_run


# qwen3: tied embeddings, so the unembedding adapter has no base weight of its own (it adds to embed's logits).
@pytest.mark.parametrize("mesh_name", ["fsdp2xtp4", "dp2xfsdp4"])
def test_sharded_lora_pools_match_single_device(mesh_name):
    preset = "tiny-qwen3"
    mesh = _mesh(mesh_name)
    pools, out, grads = _pool_step(mesh, _load(preset, mesh), preset)
    # Adapters follow their base kernel's sharding: a [.., in, R] along the input axis, b along the output axis.
    for pool in pools.values():
        want = pool_shardings(pool.weights, mesh)
        for n, ab in pool.weights.items():
            for k, x in ab.items():
                assert x.sharding.is_equivalent_to(want[n][k], x.ndim), f"{n}.{k}: {x.sharding.spec}"
        assert not pool.weights["q"]["a"].sharding.is_fully_replicated  # embed -> fsdp
        assert not pool.grads["down"]["b"].sharding.is_fully_replicated
    _, ref, ref_grads = _pool_step(make_mesh(MeshConfig()), mu.jax_model(preset), preset)
    assert set(out) == set(ref) and len(out) == 6
    for key, (loss, lp) in out.items():
        np.testing.assert_allclose(loss, ref[key][0], rtol=1e-5)
        np.testing.assert_allclose(lp, ref[key][1], atol=LOGIT_ATOL)
    for name in RUNS:
        assert set(grads[name]) == set(RUNS[name].targets)
        for n in grads[name]:
            for k in ("a", "b"):
                r = ref_grads[name][n][k]
                assert np.abs(r).max() > 0, f"{name} {n}.{k}: zero reference gradient"
                e = mu.rel_err(grads[name][n][k], r)
                assert e <= GRAD_RTOL, f"{mesh_name} run {name} {n}.{k}: relative grad error {e:.3g}"
