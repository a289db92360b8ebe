"""Checkpoints through the client: bitwise-exact resume with optimizer state (in a fresh engine, as after a
restart), weights-only loads that reset Adam, crash-safe saves, and clear errors for bad paths.

tiny-qwen3, LoRA rank 4, batches of 4 rows x 16 tokens (the shapes test_train*.py compile too).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time

import jax
import models_util
from models_util import flat
import numpy as np
import pytest
import tinker.types as tt

import tinker_jax
from tinker_jax import atomic
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


def state(tc) -> dict:
    return tc.engine.run_state(tc.model_id)



def params(tc):
    return flat(state(tc)["weights"])


def opt_leaves(tc) -> list[np.ndarray]:
    st = state(tc)
    return [np.asarray(st["count"])] + [np.array(x, copy=True) for x in jax.tree.leaves((st["mu"], st["nu"]))]


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


def test_resume_with_optimizer_is_bitwise_identical(run, model_dir, data_dir, tmp_path):
    # A new engine over a copy of the data_dir (as after a restart, or a restored backup: the first engine still
    # holds the original, one writer per data dir) resumes from the checkpoint, reusing the programs compiled for
    # the original run (restored arrays must look exactly like fresh ones to jit).
    restored = tmp_path / "restored"
    shutil.copytree(data_dir, restored, ignore=shutil.ignore_patterns(".lock"))
    compiled = train.compile_count()
    with tinker_jax.ServiceClient(data_dir=restored, config=EngineConfig(models={"tiny": str(model_dir)})) as fresh:
        tc = fresh.create_training_client_from_state_with_optimizer(run["path"])
        assert state(tc)["step"] == 2
        assert_same(params(tc), run["params"])
        for a, b in zip(opt_leaves(tc), run["opt"]):
            np.testing.assert_array_equal(a, b)
        resumed = [train_step(tc, step) for step in range(3, 6)]
        assert resumed == run["losses"][2:]  # bitwise, not approx
        assert_same(params(tc), run["final"])
        assert train.compile_count() == compiled

        # Contrast: the same weights without the optimizer state diverge after the first update.
        weights_only = fresh.create_training_client_from_state(run["path"])
        assert state(weights_only)["step"] == 0
        other = [train_step(weights_only, step) for step in range(3, 5)]
        assert other[0] == run["losses"][2]  # same weights -> same loss
        assert other[1] != run["losses"][3]  # fresh Adam moments -> a different update


def test_load_state_resets_adam_and_with_optimizer_restores_it(svc, run):
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=1)
    for step in (1, 2, 3):
        train_step(tc, step)
    assert state(tc)["step"] == 3 and state(tc)["count"] == 3
    tc.forward_backward(step_data(9), "cross_entropy").result()  # pending gradient: dropped by a load

    tc.load_state(run["path"]).result()
    st = state(tc)
    assert st["step"] == 0 and st["pending"] == 0 and st["count"] == 0
    moments = jax.tree.leaves((st["mu"], st["nu"]))
    assert moments and not any(np.any(np.asarray(m)) for m in moments)
    assert not any(np.any(g) for g in flat(st["grads"]).values())
    assert_same(params(tc), run["params"])
    # From here it behaves exactly like a client created from the checkpoint's weights only.
    ref = svc.create_training_client_from_state(run["path"])
    assert train_step(tc, 3) == train_step(ref, 3)
    assert_same(params(tc), params(ref))

    tc.load_state_with_optimizer(run["path"]).result()
    assert state(tc)["step"] == 2
    assert_same(params(tc), run["params"])
    for a, b in zip(opt_leaves(tc), run["opt"]):
        np.testing.assert_array_equal(a, b)
    assert train_step(tc, 3) == run["losses"][2]


def _ckpt_dir(svc, path: str) -> pathlib.Path:
    from tinker_jax.engine.registry import TinkerPath

    return svc.engine.checkpoint_dir(TinkerPath.parse(path))


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
        tc.save_state("ck", overwrite=True).result()  # overwrite of an existing name
    with pytest.raises(RuntimeError, match="simulated crash"):
        tc.save_state("ck-new").result()  # a new name
    monkeypatch.setattr(checkpoint, "_checkpointer", real)

    # 2) The write completes but the process dies before the commit (the rename onto the final name).
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".new") and pathlib.Path(dst).name in ("ck", "ck-new"):  # the commit
            raise OSError("simulated crash before commit")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        tc.save_state("ck", overwrite=True).result()
    with pytest.raises(OSError, match="simulated crash"):
        tc.save_state("ck-new").result()
    monkeypatch.setattr(os, "rename", real_rename)

    # Nothing half-written is visible: the old checkpoint is intact under its name, the new name is absent,
    # the registry lists only the good save, and no temporary directories are left behind.
    assert sorted(p.name for p in kind_dir.iterdir()) == ["ck"]
    assert [c.name for c in svc.engine.list_checkpoints(tc.model_id)] == ["ck"]
    tc.load_state(good).result()
    assert_same(params(tc), good_params)
    with pytest.raises(ValueError, match="not found"):
        tc.load_state(good.replace("/ck", "/ck-new")).result()

    # And saving works again afterwards (overwriting the name with the current weights).
    train_step(tc, 3)
    newer = params(tc)
    assert tc.save_state("ck", overwrite=True).result().path == good
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


def test_staged_commit_named_alike_everywhere(tmp_path):
    """A commit that several processes write into: the staging directory's name comes from a token (the same on
    every process), it is swept like any temporary, and `commit` replaces an existing directory whole."""
    out = tmp_path / "kind" / "ck"
    with pytest.raises(ValueError, match="8 hex digits"):
        atomic.staging(out, "not-hex!")
    tmp = atomic.staging(out, "0a1b2c3d")
    assert tmp == atomic.staging(out, "0a1b2c3d") and not tmp.exists()
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    atomic.commit(tmp, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ck"] and [p.name for p in out.iterdir()] == ["new.txt"]
    left = atomic.staging(out, "ffffffff")  # a job killed before its commit leaves this: the start-up sweep's
    left.mkdir()
    assert atomic.sweep(out.parent) == [left] and out.is_dir()


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
        (lambda: tc.load_state("/tmp/some/dir").result(),
         r"expected 'tinker://<run_id>/<weights\|sampler_weights\|external_weights>"),
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


_CRASH_CHILD = r"""
import hashlib, sys
import numpy as np, jax, tinker.types as tt
import tinker_jax
from tinker_jax.config import EngineConfig

data_dir, model_dir = sys.argv[1], sys.argv[2]
svc = tinker_jax.ServiceClient(config=EngineConfig(data_dir=data_dir, models={"tiny": model_dir},
                                                   compile_cache=False))
tc = svc.create_lora_training_client("tiny", rank=4, seed=0)
print("model", tc.model_id, flush=True)
rng = np.random.default_rng(0)
for i in range(10_000):
    toks = rng.integers(0, 512, 17)
    d = tt.Datum(model_input=tt.ModelInput.from_ints(toks[:-1].tolist()),
                 loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(toks[1:].astype(np.int64))})
    tc.forward_backward([d], "cross_entropy").result()
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    w = svc.engine.run_state(tc.model_id)["weights"]
    h = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(w))).hexdigest()
    name = f"ck{i % 2}"  # overwrites: a kill can land in the middle of replacing a reported checkpoint
    print("begin", name, h, flush=True)
    tc.save_state(name, overwrite=True).result()
    print("saved", name, h, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_saves_loses_nothing_reported_saved(model_dir, tmp_path):
    """A real SIGKILL at a random moment while a process keeps saving (and overwriting) checkpoints: after a
    restart every checkpoint reported saved loads, holding either the weights reported for it or those of the
    save that was in flight under that name."""
    import hashlib
    import os
    import random
    import signal
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(tmp_path), str(model_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saved: dict[str, str] = {}
    in_flight: dict[str, str] = {}
    model_id = None
    try:
        for line in proc.stdout:
            kind, *rest = line.split()
            if kind == "model":
                model_id = rest[0]
            elif kind == "begin":
                in_flight[rest[0]] = rest[1]
            elif kind == "saved":
                saved[rest[0]] = rest[1]
                if len(saved) == 2:  # both names saved at least once: the next save overwrites one
                    break
        time.sleep(random.uniform(0.0, 0.3))  # somewhere in the next save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    for line in proc.stdout:  # what it printed before dying
        kind, *rest = line.split()
        if kind == "begin":
            in_flight[rest[0]] = rest[1]
        elif kind == "saved":
            saved[rest[0]] = rest[1]
    assert model_id and saved, "the child never reported a save"
    with tinker_jax.ServiceClient(data_dir=tmp_path, config=EngineConfig(models={"tiny": str(model_dir)},
                                                                        compile_cache=False)) as svc:
        for name, h in saved.items():
            tc = svc.create_training_client_from_state_with_optimizer(f"tinker://{model_id}/weights/{name}")
            w = svc.engine.run_state(tc.model_id)["weights"]
            got = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(w))).hexdigest()
            assert got in (h, in_flight.get(name)), name
        # No half-written leftovers are visible after the restart's sweep.
        kind_dir = tmp_path / "checkpoints" / model_id / "weights"
        assert sorted(p.name for p in kind_dir.iterdir()) == sorted(saved)


# ------------------------------------------------------------------------- the registry against the disk (no model)


def _registry(tmp_path):
    from tinker_jax.engine.registry import Registry

    return Registry(tmp_path / "engine.db", tmp_path)


def _save_files(reg, p, files_: dict, *, owner="alice", step=0, meta=None, run=None):
    rec = checkpoint.new_record(p, owner=owner, created=time.time(), public=False, expires=None, step=step,
                                user_metadata=meta or {}, run=run or {"base_model": "base"})

    def fill(t):
        for name, data in files_.items():
            (t / name).write_bytes(data)
    return checkpoint.save_files(reg.checkpoint_dir(p), fill, rec)


def test_reindex_takes_every_field_from_the_record(tmp_path):
    """An overwrite that committed its files (and record) but died before its row: the next start's re-index takes
    the new size, time, step and metadata from the record (it compared only public and expires, so the archive
    cache, keyed on time and size, kept serving the old version's tar and the quota counted the old size)."""
    import tarfile

    from tinker_jax.engine import files, index
    from tinker_jax.engine.registry import TinkerPath

    reg = _registry(tmp_path)
    reg.add_run("run1", "base", lora_rank=4, full_finetune=False, meta={}, owner="alice")
    p = TinkerPath("run1", "external_weights", "ck")
    reg.add_checkpoint_record(p, _save_files(reg, p, {"w.bin": b"OLD" * 10}, step=1, meta={"v": 1}))
    files.checkpoint_archive(reg, str(p))
    time.sleep(0.01)
    _save_files(reg, p, {"w.bin": b"NEW!" * 100}, step=2, meta={"v": 2})  # no row written: the process died
    report = index.reindex(reg, tmp_path / "checkpoints")
    assert report.updated == 1
    info = reg.get_checkpoint(p)
    assert (info.size_bytes, info.step, info.user_metadata) == (400, 2, {"v": 2}) and reg.usage("alice") == (1, 400)
    with tarfile.open(files.checkpoint_archive(reg, str(p))) as t:
        assert t.extractfile("w.bin").read() == b"NEW!" * 100
    assert index.reindex(reg, tmp_path / "checkpoints").updated == 0  # agreeing rows are left alone


def test_offline_commands_see_an_interrupted_overwrite(tmp_path):
    """`tinker-jax admin reindex` and `chown` do not sweep: a checkpoint that exists only as the moved-aside copy of
    an overwrite killed between its renames was dropped from the index, and chown skipped its record, so the next
    start recovered it with the old owner (and, being the run's newest, gave the run back to the old owner)."""
    import io

    from server import admin
    from tinker_jax.engine import index
    from tinker_jax.engine.registry import Registry, TinkerPath

    reg = _registry(tmp_path)
    reg.add_run("r", "base", lora_rank=4, full_finetune=False, meta={}, owner="old")
    for name in ("a", "b"):
        p = TinkerPath("r", "external_weights", name)
        reg.add_checkpoint_record(p, _save_files(reg, p, {"w": b"x"}, owner="old"))
        time.sleep(0.01)
    reg.close()
    ck = tmp_path / "checkpoints/r/external_weights/b"
    ck.rename(ck.with_name(".b.deadbeef.old"))
    out = io.StringIO()
    assert admin.reindex(tmp_path, out=out) == 0 and "0 index rows without files dropped" in out.getvalue()
    assert admin.chown(tmp_path, "r", "new", out=io.StringIO()) == 0
    for kind_dir in (tmp_path / "checkpoints").glob("*/*"):  # the engine's start
        atomic.sweep(kind_dir)
    reg = Registry(tmp_path / "engine.db", tmp_path)
    index.reindex(reg, tmp_path / "checkpoints")
    assert reg.get_run("r").owner == "new"
    assert {n: checkpoint.read_record(tmp_path / f"checkpoints/r/external_weights/{n}")["owner"]
            for n in "ab"} == {"a": "new", "b": "new"}


def test_record_temporaries_are_not_checkpoint_content(tmp_path):
    """A process killed inside a record rewrite (publish, TTL) leaves its temporary in the checkpoint: it is not
    listed, archived, copied or counted (it names the owner)."""
    import tarfile

    from tinker_jax.engine import files
    from tinker_jax.engine.registry import TinkerPath

    reg = _registry(tmp_path)
    reg.add_run("r", "base", lora_rank=4, full_finetune=False, meta={}, owner=None)
    p = TinkerPath("r", "external_weights", "c")
    reg.add_checkpoint_record(p, _save_files(reg, p, {"w": b"x"}))
    (reg.checkpoint_dir(p) / ".tinker.json.1234.5678.tmp").write_text('{"owner": "alice"}')
    assert files.checkpoint_files(reg, str(p)) == {"w": 1}
    with tarfile.open(files.checkpoint_archive(reg, str(p))) as t:
        assert t.getnames() == ["w"]
    copy = files.copy_checkpoint(reg, str(p), "r2", owner=None)
    assert files.checkpoint_files(reg, copy) == {"w": 1}
    assert reg.get_checkpoint(TinkerPath.parse(copy)).size_bytes == 1


def test_a_copy_carries_the_copiers_run_metadata(tmp_path):
    """The copy's record holds its own run's metadata ({"copied_from": ...}), not the source run's: a registry
    rebuilt from the records showed the source owner's run metadata on the copier's run."""
    from tinker_jax.engine import files, index
    from tinker_jax.engine.registry import Registry, TinkerPath

    reg = _registry(tmp_path)
    reg.add_run("alice-run", "base", lora_rank=4, full_finetune=False, meta={"base_model": "base"}, owner="alice",
                user_metadata={"secret": "alice-private"})
    src = TinkerPath("alice-run", "weights", "ck")
    reg.add_checkpoint_record(src, _save_files(reg, src, {"w": b"x"}, run={
        "base_model": "base", "lora_rank": 4, "created": 1.0, "user_metadata": {"secret": "alice-private"}}))
    files.copy_checkpoint(reg, str(src), "bob-copy", owner="bob")
    reg.close()
    for f in tmp_path.glob("engine.db*"):
        f.unlink()
    reg = Registry(tmp_path / "engine.db", tmp_path)
    index.reindex(reg, tmp_path / "checkpoints")
    run = reg.get_run("bob-copy")
    assert (run.owner, run.user_metadata) == ("bob", {"copied_from": str(src)})


def test_idle_archive_sweep_tolerates_archives_gone_meanwhile(tmp_path):
    """Other paths' turns run beside an archive build (a delete drops its archives): a tar the sweep lists and then
    cannot stat is skipped (it raised FileNotFoundError into the download)."""
    from tinker_jax.engine import files
    from tinker_jax.engine.registry import TinkerPath

    reg = _registry(tmp_path)
    reg.add_run("r", "base", lora_rank=4, full_finetune=False, meta={}, owner=None)
    p = TinkerPath("r", "weights", "c")
    reg.add_checkpoint_record(p, _save_files(reg, p, {"w": b"x"}))
    gone = tmp_path / "archives" / ("0" * 32)
    gone.mkdir(parents=True)
    (gone / "x.tar").symlink_to(gone / "missing")  # listed by the glob, gone by the stat
    assert files.checkpoint_archive(reg, str(p)).is_file()


def test_names_with_a_trailing_newline_are_refused():
    from tinker_jax.engine.registry import TinkerPath, check_name
    from tinker_jax.errors import UserError

    for bad in ("ckpt\n", "a\nb", "\nckpt"):
        with pytest.raises(UserError, match="^name: invalid name"):
            check_name(bad, "name")
    with pytest.raises(UserError):
        TinkerPath.parse("tinker://run1/weights/ckpt\n")
    assert check_name("ckpt.v2:1-a_b", "name") == "ckpt.v2:1-a_b"


def test_a_delete_cut_short_never_brings_back_an_old_copy(tmp_path, monkeypatch):
    """A checkpoint with a stale moved-aside copy (an overwrite whose cleanup failed) deleted by a process that dies
    before the files are removed: the copy went aside after the checkpoint, so the next start's `recover` put it
    back as the checkpoint. Now both are out of reach before anything is removed."""
    out = tmp_path / "kind" / "ck"
    out.mkdir(parents=True)
    (out / "new.txt").write_text("new")
    stale = out.with_name(".ck.0a1b2c3d.old")
    stale.mkdir()
    (stale / "old.txt").write_text("old")

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.remove(out)
    monkeypatch.undo()
    assert atomic.entries(out.parent) == [] and not atomic.recover(out).exists()
    atomic.sweep(out.parent)
    assert list(out.parent.iterdir()) == []
