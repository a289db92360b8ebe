"""Orbax checkpoints of a TrainState: named items `state` (weights, optimizer leaves) and `meta` (JSON).

Orbax writes into a temporary directory and renames it on commit, so a process killed mid-save never leaves
a half-written checkpoint under the final name; overwriting a name swaps directories only after the new
one is complete. Restores go into a target built from the live state, so shardings and dtypes are kept.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tinker_jax.training.step import TrainState, commit, make_optimizer

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def recover(path: str | Path) -> Path:
    """Undo an overwrite interrupted between its two renames (old moved aside, new not yet in place)."""
    path = Path(path)
    if not path.exists():
        olds = sorted(path.parent.glob(f".{path.name}.*.old"), key=lambda p: p.stat().st_mtime)
        if olds:
            olds[-1].rename(path)
    return path


def save(path: str | Path, state: TrainState, *, kind: str, with_optimizer: bool, meta: dict) -> Path:
    """Write `state` to `path` atomically. kind: "training" (weights + optimizer) or "sampler" (weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    items = {"trainable": state.trainable.to_pure_dict()}
    if with_optimizer:
        items["opt_state"] = jax.tree.leaves(state.opt_state)
    meta = dict(meta, kind=kind, step=state.step, with_optimizer=with_optimizer, format_version=FORMAT_VERSION)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.new")
    try:
        _checkpointer().save(tmp, ocp.args.Composite(state=ocp.args.StandardSave(items),
                                                     meta=ocp.args.JsonSave(meta)))
        if path.exists():  # replace an older checkpoint of the same name only once the new one is complete
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)  # the commit failed: put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written leftovers (a SIGKILL can still leave one)
        raise
    return path


def read_meta(path: str | Path) -> dict:
    path = recover(path)
    f = path / "meta" / "metadata"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        # Fall back to Orbax's own reader (its on-disk layout of JSON items may differ across versions).
        try:
            return _checkpointer().restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is unreadable ({e})") from None


def restore_into(path: str | Path, state: TrainState, *, with_optimizer: bool) -> dict:
    """Load weights (and optimizer state and step if `with_optimizer`) from `path` into `state` in place."""
    path = Path(path)
    meta = read_meta(path)
    if with_optimizer and not meta.get("with_optimizer"):
        raise CheckpointError(f"checkpoint {path} holds no optimizer state (kind {meta.get('kind')!r})")
    target = {"trainable": _abstract(state.trainable.to_pure_dict())}
    if meta.get("with_optimizer"):  # Orbax must be given every saved item, even for a weights-only load
        target["opt_state"] = _abstract(jax.tree.leaves(state.opt_state))
    try:
        got = _checkpointer().restore(
            path, ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} does not match this model ({type(e).__name__}: {e})") from None
    trainable = state.trainable
    trainable.replace_by_pure_dict(got["trainable"])
    state.trainable = trainable
    state.grads = jax.tree.map(lambda x: x * 0, state.grads)
    state.pending = 0
    if with_optimizer:
        state.opt_state = jax.tree.unflatten(jax.tree.structure(state.opt_state), got["opt_state"])
        state.step = int(meta.get("step", 0))
    else:  # weights only: a fresh optimizer (Adam moments and step count reset)
        state.opt_state = commit(make_optimizer().init(state.trainable), state.trainable)
        state.step = 0
    return meta


def load_trainable(path: str | Path, like: nnx.State) -> nnx.State:
    """Just the trained weights (e.g. a sampler checkpoint) shaped like `like`."""
    target = {"trainable": _abstract(like.to_pure_dict())}
    if read_meta(path).get("with_optimizer"):  # a training checkpoint: the restore must name every item
        target["opt_state"] = _abstract(jax.tree.leaves(make_optimizer().init(like)))
    try:
        got = _checkpointer().restore(
            Path(path), ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} does not match this model ({type(e).__name__}: {e})") from None
    out = jax.tree.map(lambda x: x, like)
    out.replace_by_pure_dict(got["trainable"])
    return out
