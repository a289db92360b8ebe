"""The same LoRA training step on an 8-device mesh (fsdp=2 x tensor=4, the virtual CPU devices from
conftest.py) and on one device gives the same losses, logprobs, gradients and updated adapters."""

from __future__ import annotations

import jax
import models_util
from models_util import flat, rel
import numpy as np
import pytest
import tinker.types as tt

import tinker_jax
from tinker_jax.training import step as train
from tinker_jax.config import EngineConfig
from tinker_jax.models.sharding import MeshConfig

PRESET = "tiny-qwen3"
RANK = 4


def datum(tokens, targets, **inputs) -> tt.Datum:
    fields = {"target_tokens": tt.TensorData.from_numpy(np.asarray(targets, np.int64))}
    fields.update({k: tt.TensorData.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()})
    return tt.Datum(model_input=tt.ModelInput.from_ints([int(t) for t in tokens]), loss_fn_inputs=fields)


def step_data(seed: int) -> list[tt.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (5, 9, 16, 12):  # [4, 16]: 4 rows divide the fsdp axis
        toks = rng.integers(0, 512, n + 1)
        out.append(datum(toks[:-1], toks[1:], weights=rng.uniform(0.5, 1.5, n)))
    return out




def test_mesh_step_matches_single_device(tmp_path_factory):
    assert jax.device_count() >= 8, "conftest.py should provide 8 virtual CPU devices"
    model_dir = str(models_util.tiny_model_dir(PRESET))
    one = tinker_jax.ServiceClient(config=EngineConfig(data_dir=tmp_path_factory.mktemp("one"),
                                                       models={"tiny": model_dir}))
    mesh = tinker_jax.ServiceClient(config=EngineConfig(data_dir=tmp_path_factory.mktemp("mesh"),
                                                        models={"tiny": model_dir},
                                                        mesh=MeshConfig(fsdp=2, tensor=4)))
    try:
        a = one.create_lora_training_client("tiny", rank=RANK, seed=0)
        b = mesh.create_lora_training_client("tiny", rank=RANK, seed=0)
        st = lambda tc: tc.engine.run_state(tc.model_id)  # noqa: E731
        worker = mesh.engine._workers["tiny"]
        pool = worker.pools[RANK]

        # The mesh run really is sharded: the adapter pool and the base weights are split over the 8 devices.
        leaves = jax.tree.leaves(pool.weights) + jax.tree.leaves(worker.base)
        assert all(len(x.sharding.device_set) == 8 for x in leaves)
        sharded = [x for x in jax.tree.leaves(pool.weights) if not x.sharding.is_fully_replicated]
        assert len(sharded) >= len(jax.tree.leaves(pool.weights)) // 2
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(worker.base))
        pa, pb = flat(st(a)["weights"]), flat(st(b)["weights"])
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # same seeded init

        adam = tt.AdamParams(learning_rate=1e-2, eps=1e-8, weight_decay=0.01, grad_clip_norm=5.0)
        for step in range(2):
            data = step_data(step)
            oa = a.forward_backward(data, "cross_entropy").result()
            ob = b.forward_backward(data, "cross_entropy").result()
            assert ob.metrics["loss:sum"] == pytest.approx(oa.metrics["loss:sum"], rel=1e-5)
            for x, y in zip(oa.loss_fn_outputs, ob.loss_fn_outputs):
                np.testing.assert_allclose(y["logprobs"].to_numpy(), x["logprobs"].to_numpy(), rtol=0, atol=1e-5)
            assert rel(flat(st(b)["grads"]), flat(st(a)["grads"])) < 1e-5
            ma = a.optim_step(adam).result().metrics
            mb = b.optim_step(adam).result().metrics
            assert mb["grad_norm:mean"] == pytest.approx(ma["grad_norm:mean"], rel=1e-5)
        pa, pb = flat(st(a)["weights"]), flat(st(b)["weights"])
        assert rel(pb, pa) < 1e-5
        for k in pa:
            np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=1e-5 * max(1.0, np.abs(pa[k]).max()), err_msg=k)
        assert any(np.any(v) for k, v in pa.items() if k.endswith("['b']"))  # the adapters moved
        # Still sharded after the update (optim_step keeps the placement).
        assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(worker.pools[RANK].weights))
        assert all(x.sharding.is_equivalent_to(y.sharding, x.ndim) for x, y in
                   zip(jax.tree.leaves(worker.pools[RANK].weights), leaves))

        # Save and resume (with optimizer) on the mesh: the next step is bitwise the uninterrupted one, and the
        # restored (sharded) state reuses the compiled programs.
        path = b.save_state("mesh-step2").result().path
        compiled = train.compile_count()
        c = mesh.create_training_client_from_state_with_optimizer(path)
        data = step_data(2)
        losses = [t.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] for t in (b, c)]
        assert losses[0] == losses[1]
        for t in (b, c):
            t.optim_step(adam).result()
        pb, pc = flat(st(b)["weights"]), flat(st(c)["weights"])
        for k in pb:
            np.testing.assert_array_equal(pc[k], pb[k], err_msg=k)
        assert train.compile_count() == compiled
    finally:
        one.close()
        mesh.close()
