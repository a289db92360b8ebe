"""Orbax checkpoints of one run: named items `state` ({"weights", "opt"}) and `meta` (JSON).

- LoRA: `weights` is the adapter ({projection: {"a", "b"}}, the projections the run adapts; models.lora);
  full fine-tuning: every weight of the model (the nnx state as a pure dict).
- `opt` ({"mu", "nu", "count"}, Adam's moments shaped like `weights` and its step count) is present in training
  checkpoints and absent in sampler ones.
The write is atomic (tinker_jax.atomic): a process killed mid-save never leaves a half-written checkpoint under
the final name, and overwriting a name swaps directories only after the new one is complete.

Each checkpoint also carries its own record, `tinker.json` beside the Orbax items (`RECORD`): its tinker path, the
owner tag of its run (never a key), when it was created, expires and whether it is published, its step, size and
user metadata, and its run's configuration. It is committed with the checkpoint, and publish / TTL rewrite it
(atomically) before the registry; the registry (engine.db) is an index of these records and can always be rebuilt
from them (engine.index). Restores go into
targets shaped and placed like the live state, so shardings and dtypes are kept.

Format 1 (before stacked adapter pools) stored `trainable` (the nnx pure dict, adapters under
blocks/{attn,mlp}/<proj>/lora_{a,b} and lm_head/lora_{a,b}) and `opt_state` (optax's AdamW state leaves); it is
still read.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from tinker_jax import atomic
from tinker_jax.atomic import atomic_dir, recover
from tinker_jax.errors import UserError

FORMAT_VERSION = 2
RECORD = "tinker.json"  # the checkpoint's own record (see above)
RECORD_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or does not fit the model it is loaded into."""


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _abstract(tree):
    """Restore targets shaped and placed like `tree`. Host values (numpy), and on several processes an array held
    by one process's device (a step count), come back as numpy: a target without a sharding would make Orbax
    place it as it was saved, which fails on another mesh or set of processes."""
    many = jax.process_count() > 1

    def one(x):
        sharding = getattr(x, "sharding", None)  # arrays and ShapeDtypeStructs
        if many and isinstance(x, jax.Array) and x.is_fully_addressable:
            sharding = None
        if sharding is None:
            return np.zeros(np.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def save(path: str | Path, *, weights: Any, opt: Any | None, meta: dict, record: dict | None = None) -> dict | None:
    """Write a checkpoint atomically. `opt` None: a sampler checkpoint (weights only). `record` (the checkpoint's
    own record, without its size) is completed with `size_bytes` and committed with it; returns it."""
    with atomic_dir(path) as tmp:
        tmp.rmdir()  # Orbax creates the directory itself (and refuses an existing one)
        write_staged(tmp, weights=weights, opt=opt, meta=meta)
        return _finish(tmp, record)


def save_files(path: str | Path, write: Callable[[Path], Any], record: dict) -> dict:
    """Write a checkpoint of plain files (an external_weights export: `write(tmp)` fills the empty directory `tmp`)
    atomically, with its record; returns the record. It has no Orbax items, so nothing restores from it."""
    with atomic_dir(path) as tmp:
        write(tmp)
        return _finish(tmp, record)


def write_staged(tmp: Path, *, weights: Any, opt: Any | None, meta: dict) -> None:
    """Write the Orbax items into `tmp` (which must not exist). On several processes every process calls it with
    the same global arrays and writes its own shards; Orbax's barriers return once all are written. Then one
    process calls `commit_staged`."""
    items = {"weights": weights} if opt is None else {"weights": weights, "opt": opt}
    if jax.process_count() > 1:  # Orbax refuses arrays held by one process's device: host copies (small scalars)
        items = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable
                             else x, items)
    meta = dict(meta, with_optimizer=opt is not None, format_version=FORMAT_VERSION)
    _checkpointer().save(tmp, ocp.args.Composite(state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)))


def commit_staged(tmp: Path, path: str | Path, record: dict | None) -> dict | None:
    """Complete `tmp` (written by every process) with its record and make it `path`, atomically: the checkpoint is
    listed only after every process wrote its shards. -> the record."""
    try:
        record = _finish(tmp, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.commit(tmp, path)
    return record


def _finish(tmp: Path, record: dict | None) -> dict | None:
    if record is not None:
        record = dict(record, version=RECORD_VERSION, size_bytes=size_bytes(tmp))
        write_record(tmp, record)
    return record


def is_record_file(name: str) -> bool:
    """The record, or a temporary of it that a process killed inside `write_record` left behind: never a
    checkpoint's content (not listed, downloaded, copied or counted; it may name the owner)."""
    return name == RECORD or (name.startswith(f".{RECORD}.") and name.endswith(".tmp"))


def size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not is_record_file(f.name))


def new_record(path, *, owner: str | None, created: float, public: bool, expires: float | None, step: Any,
               user_metadata: dict | None, run: dict) -> dict:
    """The one layout of a checkpoint's record (`path` a TinkerPath; `run`: its run's configuration, created time
    and user metadata). `save` adds `size_bytes` and `version`."""
    return {"path": str(path), "run_id": path.run_id, "kind": path.kind, "name": path.name, "owner": owner,
            "created": created, "public": public, "expires": expires, "step": step,
            "user_metadata": dict(user_metadata or {}), "run": run}


def write_record(path: str | Path, record: dict) -> None:
    """Replace a checkpoint's record atomically (a temporary file, flushed, then renamed over it)."""
    path = Path(path)
    tmp = path / f".{RECORD}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / RECORD)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (a full disk); gone already after the rename


class RecordError(RuntimeError):
    """A checkpoint's record exists but cannot be read (an I/O error, or not a JSON object): the server's problem,
    never a reason to rewrite it from the registry (the record is the truth)."""


def read_record(path: str | Path) -> dict | None:
    """A checkpoint's record; None when it has none (saved before records existed)."""
    f = Path(path) / RECORD
    try:
        out = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{f}: unreadable record ({type(e).__name__}: {e})") from e
    if not isinstance(out, dict):
        raise RecordError(f"{f}: not a JSON object")
    return out


def read_meta(path: str | Path) -> dict:
    """The checkpoint's metadata. Reads only: it may run on any thread (a moved-aside copy of a checkpoint that an
    interrupted overwrite left is read in place; `recover` puts it back on the path's turn)."""
    name = Path(path).name
    path = atomic.resolve(path)
    f = path / "meta" / "metadata"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {name} does not exist")
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        # Fall back to Orbax's own reader (its on-disk layout of JSON items may differ across versions).
        try:
            return _checkpointer().restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {name} is unreadable ({type(e).__name__})") from None


def restore(path: str | Path, like_weights: Any, like_opt: Any | None = None) -> tuple[Any, Any | None, dict]:
    """Read weights (and, when `like_opt` is given, the optimizer state) shaped and placed like the targets.
    -> (weights, opt or None, meta). CheckpointError when it has no optimizer state but one was asked for, or does
    not fit the targets."""
    path = recover(path)
    meta = read_meta(path)
    if like_opt is not None and not meta.get("with_optimizer"):
        raise CheckpointError(f"checkpoint {path.name} holds no optimizer state (kind {meta.get('kind')!r}); load "
                              "it without the optimizer")
    if meta.get("format_version", 1) < 2:
        return (*_restore_v1(path, meta, like_weights, like_opt), meta)
    target = {"weights": _abstract(like_weights)}
    if meta.get("with_optimizer"):  # Orbax must be given every saved item, even for a weights-only load
        opt_like = like_opt if like_opt is not None else {"mu": like_weights, "nu": like_weights,
                                                          "count": np.zeros((), np.int32)}
        target["opt"] = _abstract(opt_like)
    got = _restore(path, target)
    return got["weights"], (got["opt"] if like_opt is not None else None), meta


# What Orbax raises when a checkpoint's tree does not fit the target (the client's mistake); anything else (I/O,
# device memory) is the server's and propagates as it is.
_MISMATCH = (ValueError, KeyError, TypeError)


def _restore(path: Path, target: Any) -> Any:
    try:
        return _checkpointer().restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except _MISMATCH as e:
        raise CheckpointError(f"checkpoint {path.name} does not match this model ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------------- format 1

_V1_GROUPS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def _v1_lora_tree(tree: dict) -> dict:
    """{projection: {"a", "b"}} -> format 1's nnx layout (blocks/<group>/<proj>/lora_{a,b}, lm_head/lora_{a,b})."""
    out: dict = {}
    for name, w in tree.items():
        node = {"lora_a": w["a"], "lora_b": w["b"]}
        if name == "unembed":
            out["lm_head"] = node
        else:
            out.setdefault("blocks", {}).setdefault(_V1_GROUPS[name], {})[name] = node
    return out


def _v1_lora_back(tree: dict) -> dict:
    out = {}
    for group in tree.get("blocks", {}).values():
        for name, node in group.items():
            out[name] = {"a": node["lora_a"], "b": node["lora_b"]}
    if "lm_head" in tree:
        out["unembed"] = {"a": tree["lm_head"]["lora_a"], "b": tree["lm_head"]["lora_b"]}
    return out


def _restore_v1(path: Path, meta: dict, like_weights: Any, like_opt: Any | None):
    import optax  # format 1 stored optax's state leaves

    lora = not meta.get("full_finetune", False)
    trainable_like = _v1_lora_tree(like_weights) if lora else like_weights
    target = {"trainable": _abstract(trainable_like)}
    opt_tmpl = None
    if meta.get("with_optimizer"):
        opt_tmpl = optax.inject_hyperparams(optax.adamw)(
            learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0).init(
            jax.tree.map(lambda x: np.zeros(x.shape, np.float32), trainable_like))
        target["opt_state"] = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                               for x in jax.tree.leaves(opt_tmpl)]
    try:
        got = _checkpointer().restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except _MISMATCH as e:
        raise CheckpointError(f"checkpoint {path.name} (format 1) does not match this model ({type(e).__name__})"
                              ) from None
    weights = _v1_lora_back(got["trainable"]) if lora else got["trainable"]
    opt = None
    if like_opt is not None:
        state = jax.tree.unflatten(jax.tree.structure(opt_tmpl), got["opt_state"])
        adam = state.inner_state[0]  # ScaleByAdamState(count, mu, nu)
        mu, nu = (_v1_lora_back(x) if lora else x for x in (adam.mu, adam.nu))
        place = lambda tree, like: jax.tree.map(  # noqa: E731
            lambda x, l: jax.device_put(np.asarray(x, l.dtype), getattr(l, "sharding", None)), tree, like)
        opt = {"mu": place(mu, like_opt["mu"]), "nu": place(nu, like_opt["nu"]),
               "count": np.asarray(adam.count, np.int32)}
    return weights, opt
