"""Checkpoints through the client: bitwise-exact resume with optimizer state (in a fresh engine, as after a
restart), weights-only loads that reset Adam, crash-safe saves, and clear errors for bad paths.

tiny-qwen3, LoRA rank 4, batches of 4 rows x 16 tokens (the shapes test_train*.py compile too).
"""

from __future__ import annotations

import pathlib

import jax
import models_util
import numpy as np
import pytest
import tinker.types as tt

import tinker_jax
from tinker_jax.engine import checkpoints as checkpoint
from tinker_jax.training import step as train
from tinker_jax.config import EngineConfig

PRESET = "tiny-qwen3"
RANK = 4
ADAM = tt.AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=10.0)


def datum(tokens, targets, **inputs) -> tt.Datum:
    fields = {"target_tokens": tt.TensorData.from_numpy(np.asarray(targets, np.int64))}
    fields.update({k: tt.TensorData.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()})
    return tt.Datum(model_input=tt.ModelInput.from_ints([int(t) for t in tokens]), loss_fn_inputs=fields)


def step_data(step: int) -> list[tt.Datum]:
    rng = np.random.default_rng(1000 + step)
    out = []
    for n in (5, 9, 16, 12):
        toks = rng.integers(0, 512, n + 1)
        out.append(datum(toks[:-1], toks[1:], weights=rng.uniform(0.5, 1.5, n)))
    return out


def state(tc):
    return tc.engine.model(tc.model_id)


def flat(tree) -> dict[str, np.ndarray]:
    if hasattr(tree, "to_pure_dict"):
        tree = tree.to_pure_dict()
    return {jax.tree_util.keystr(p): np.array(x, copy=True) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def params(tc):
    return flat(state(tc).trainable)


def opt_leaves(tc) -> list[np.ndarray]:
    return [np.array(x, copy=True) for x in jax.tree.leaves(state(tc).opt_state)]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def train_step(tc, step: int) -> float:
    loss = tc.forward_backward(step_data(step), "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(ADAM).result()
    return loss


@pytest.fixture(scope="module")
def model_dir():
    return models_util.tiny_model_dir(PRESET)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_data")


@pytest.fixture(scope="module")
def svc(model_dir, data_dir):
    s = tinker_jax.ServiceClient(data_dir=data_dir, config=EngineConfig(models={"tiny": str(model_dir)}))
    yield s
    s.close()


@pytest.fixture(scope="module")
def run(svc):
    """An uninterrupted 5-step run that saved its full state after step 2."""
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=0)
    losses, saved = [], {}
    for step in range(1, 6):
        losses.append(train_step(tc, step))
        if step == 2:
            saved = dict(path=tc.save_state("step2").result().path, params=params(tc), opt=opt_leaves(tc))
    return dict(tc=tc, losses=losses, final=params(tc), **saved)


def test_resume_with_optimizer_is_bitwise_identical(run, model_dir, data_dir):
    # A new engine over the same data_dir (as after a process restart) resumes from the checkpoint, reusing
    # the programs compiled for the original run (restored arrays must look exactly like fresh ones to jit).
    compiled = train.compile_count()
    with tinker_jax.ServiceClient(data_dir=data_dir, config=EngineConfig(models={"tiny": str(model_dir)})) as fresh:
        tc = fresh.create_training_client_from_state_with_optimizer(run["path"])
        assert state(tc).step == 2
        assert_same(params(tc), run["params"])
        for a, b in zip(opt_leaves(tc), run["opt"]):
            np.testing.assert_array_equal(a, b)
        resumed = [train_step(tc, step) for step in range(3, 6)]
        assert resumed == run["losses"][2:]  # bitwise, not approx
        assert_same(params(tc), run["final"])
        assert train.compile_count() == compiled

        # Contrast: the same weights without the optimizer state diverge after the first update.
        weights_only = fresh.create_training_client_from_state(run["path"])
        assert state(weights_only).step == 0
        other = [train_step(weights_only, step) for step in range(3, 5)]
        assert other[0] == run["losses"][2]  # same weights -> same loss
        assert other[1] != run["losses"][3]  # fresh Adam moments -> a different update


def test_load_state_resets_adam_and_with_optimizer_restores_it(svc, run):
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=1)
    for step in (1, 2, 3):
        train_step(tc, step)
    assert state(tc).step == 3
    tc.forward_backward(step_data(9), "cross_entropy").result()  # pending gradient: dropped by a load

    tc.load_state(run["path"]).result()
    st = state(tc)
    assert st.step == 0 and st.pending == 0
    assert int(st.opt_state.count) == 0 and int(st.opt_state.inner_state[0].count) == 0
    moments = jax.tree.leaves((st.opt_state.inner_state[0].mu, st.opt_state.inner_state[0].nu))
    assert moments and not any(np.any(np.asarray(m)) for m in moments)
    assert not any(np.any(g) for g in flat(st.grads).values())
    assert_same(params(tc), run["params"])
    # From here it behaves exactly like a client created from the checkpoint's weights only.
    ref = svc.create_training_client_from_state(run["path"])
    assert train_step(tc, 3) == train_step(ref, 3)
    assert_same(params(tc), params(ref))

    tc.load_state_with_optimizer(run["path"]).result()
    assert state(tc).step == 2
    assert_same(params(tc), run["params"])
    for a, b in zip(opt_leaves(tc), run["opt"]):
        np.testing.assert_array_equal(a, b)
    assert train_step(tc, 3) == run["losses"][2]


def _ckpt_dir(svc, path: str) -> pathlib.Path:
    from tinker_jax.engine.registry import TinkerPath

    return svc.engine.registry.checkpoint_dir(TinkerPath.parse(path))


def test_crash_during_save_keeps_previous_checkpoint(svc, monkeypatch):
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=2)
    train_step(tc, 1)
    good = tc.save_state("ck").result().path
    good_params = params(tc)
    train_step(tc, 2)  # the live weights move on
    kind_dir = _ckpt_dir(svc, good).parent

    # 1) Orbax dies part-way through writing: a partial tree and then an exception.
    real = checkpoint._checkpointer

    class Crashing:
        def save(self, directory, args):
            d = pathlib.Path(directory)
            (d / "state").mkdir(parents=True)
            (d / "state" / "partial").write_bytes(b"\0" * 100)
            raise RuntimeError("simulated crash while writing")

        def restore(self, *a, **k):
            return real().restore(*a, **k)

    monkeypatch.setattr(checkpoint, "_checkpointer", Crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tc.save_state("ck").result()  # overwrite of an existing name
    with pytest.raises(RuntimeError, match="simulated crash"):
        tc.save_state("ck-new").result()  # a new name
    monkeypatch.setattr(checkpoint, "_checkpointer", real)

    # 2) The write completes but the process dies before the commit (the rename onto the final name).
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.endswith(".new") and pathlib.Path(target).name in ("ck", "ck-new"):  # the commit
            raise OSError("simulated crash before commit")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        tc.save_state("ck").result()
    with pytest.raises(OSError, match="simulated crash"):
        tc.save_state("ck-new").result()
    monkeypatch.setattr(pathlib.Path, "rename", real_rename)

    # Nothing half-written is visible: the old checkpoint is intact under its name, the new name is absent,
    # the registry lists only the good save, and no temporary directories are left behind.
    assert sorted(p.name for p in kind_dir.iterdir()) == ["ck"]
    assert [c["name"] for c in svc.engine.registry.list_checkpoints(tc.model_id)] == ["ck"]
    tc.load_state(good).result()
    assert_same(params(tc), good_params)
    with pytest.raises(ValueError, match="not found"):
        tc.load_state(good.replace("/ck", "/ck-new")).result()

    # And saving works again afterwards (overwriting the name with the current weights).
    train_step(tc, 3)
    newer = params(tc)
    assert tc.save_state("ck").result().path == good
    tc2 = svc.create_training_client_from_state(good)
    assert_same(params(tc2), newer)
    assert sorted(p.name for p in kind_dir.iterdir()) == ["ck"]


def test_overwrite_killed_between_renames_is_recovered(svc):
    """A SIGKILL after the old checkpoint was moved aside but before the new one took its name: the next
    reader puts the old one back instead of reporting the checkpoint missing."""
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=3)
    train_step(tc, 1)
    good = tc.save_state("ow").result().path
    good_params = params(tc)
    final = _ckpt_dir(svc, good)
    final.rename(final.with_name(f".{final.name}.deadbeef.old"))  # the state such a kill leaves behind
    tc2 = svc.create_training_client_from_state(good)
    assert_same(params(tc2), good_params)
    assert sorted(p.name for p in final.parent.iterdir()) == ["ow"]


def test_bad_paths_give_clear_errors(svc, run):
    tc = run["tc"]
    sampler_path = tc.save_weights_for_sampler("samp").result().path
    missing = run["path"].replace("step2", "no-such-ckpt")
    cases = [
        (lambda: tc.load_state(missing).result(), r"checkpoint .*no-such-ckpt not found"),
        (lambda: tc.load_state_with_optimizer(missing).result(), r"not found"),
        (lambda: tc.load_state_with_optimizer(sampler_path).result(), r"holds no optimizer state.*sampler"),
        (lambda: svc.create_training_client_from_state_with_optimizer(sampler_path),
         r"holds no optimizer state"),
        (lambda: svc.create_training_client_from_state(missing), r"not found"),
        (lambda: tc.load_state("/tmp/some/dir").result(), r"expected 'tinker://<run_id>/<weights\|sampler_weights>"),
        (lambda: tc.load_state(f"tinker://{tc.model_id}/checkpoints/step2").result(), r"expected 'tinker://"),
        (lambda: tc.load_state(f"tinker://{tc.model_id}/weights/../x").result(), r"invalid name|expected"),
        (lambda: tc.save_state("../escape").result(), r"name: invalid name"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()

    # A checkpoint of a differently shaped adapter (rank 8) does not load into a rank-4 client.
    other = svc.create_lora_training_client("tiny", rank=8, seed=0)
    path8 = other.save_state("rank8").result().path
    before = params(tc)
    with pytest.raises(ValueError, match="does not match this model"):
        tc.load_state(path8).result()
    assert_same(params(tc), before)  # ... and the failed load changed nothing
    assert np.isfinite(train_step(tc, 6))  # still usable
