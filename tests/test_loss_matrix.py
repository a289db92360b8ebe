"""Checkpoints and their owners survive the loss of either database (issue 16).

Every checkpoint directory carries its own record (owner, TTL, published flag, its run's configuration); the
engine's registry is an index rebuilt from those records at every start, and the server's database holds only
short-lived state. The loss matrix: a data directory made through the real SDK with two API keys, then each
database deleted alone, its WAL alone, all of them, or a page of each corrupted. After a restart every saved
checkpoint is listed for its owner with its flags, loads bit-identical weights, and stays invisible to the other
key; or (a corrupt server database) the server refuses to start with a message naming the repair, and after
`tinker-jax admin reindex` all of that holds again.

Also, engine-level: records are written with the checkpoint and rewritten by publish / TTL on the path's turn,
a registry row with no files is dropped, a checkpoint saved before records existed gets one, the per-owner quota,
the LoRA rank, seed and tokens-per-request limits, and the start-up sweep putting back an interrupted replacement.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path

import httpx
import models_util
from models_util import flat
import numpy as np
import pytest
import tinker
import tinker.types as tt

import tinker_jax
from server import admin
from server.deps import key_tag
from server.settings import ServerSettings
from server.store import Store
from test_conformance import LiveServer
from tinker_jax import atomic, dbfile
from tinker_jax.config import EngineConfig, LoraConfig
from tinker_jax.engine import checkpoints, index
from tinker_jax.engine import requests as rq
from tinker_jax.engine.registry import FILE as REGISTRY_FILE, Registry, TinkerPath
from tinker_jax.engine.scheduler import Request
from tinker_jax.errors import Overloaded, UserError

BASE = "tiny"
KEY_A, KEY_B = "tml-owner-a", "tml-owner-b"
A, B = key_tag(KEY_A), key_tag(KEY_B)
SERVER_DB = "server.sqlite3"


def _data(seed: int) -> list[tt.Datum]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 512, 9)
    return [tt.Datum(model_input=tt.ModelInput.from_ints(toks[:-1].tolist()),
                     loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(toks[1:].astype(np.int64))})]


def _config(model_dir: Path, data: Path, **kw) -> EngineConfig:
    return EngineConfig(data_dir=data, models={BASE: str(model_dir)}, max_seq_len=64, compile_cache=False, **kw)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return models_util.tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def golden(model_dir, tmp_path_factory):
    """A data directory made through the SDK with two keys, copied while the server runs (so the registry's newest
    rows are still in its WAL, as after a kill): checkpoints by owner, their flags and weights."""
    data = tmp_path_factory.mktemp("golden")
    live = LiveServer(_config(model_dir, data), ServerSettings(data_dir=data, api_keys=(KEY_A, KEY_B),
                                                               long_poll_s=5.0))
    live.start()
    out = {"paths": {A: set(), B: set()}, "weights": {}}
    try:
        for key, owner, seed in ((KEY_A, A, 1), (KEY_B, B, 2)):
            service = tinker.ServiceClient(base_url=live.base_url, api_key=key)
            live.clients.append(service)
            tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=seed).result()
            tc.forward_backward(_data(seed), "cross_entropy").result()
            tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
            state = tc.save_state(f"state-{seed}", ttl_seconds=None if owner == A else 86_400).result().path
            sampler = tc.save_weights_for_sampler(f"sampler-{seed}").result().path
            out["paths"][owner] |= {state, sampler}
            out["weights"][state] = flat(live.engine.run_state(tc.model_id)["weights"])
            if owner == A:
                tinker.RestClient(base_url=live.base_url, api_key=key).publish_checkpoint_from_tinker_path(sampler).result()
                out["a_state"], out["a_published"] = state, sampler
            else:
                out["b_ttl"] = state
        copy = tmp_path_factory.mktemp("golden-copy") / "data"
        shutil.copytree(data, copy)
    finally:
        live.close_clients()
        live.stop()
    assert any(p.stat().st_size for p in copy.glob(f"{REGISTRY_FILE}-wal")), "the copy should hold a live WAL"
    out["dir"] = copy
    return out


def _remove(d: Path, *names: str) -> None:
    for name in names:
        (d / name).unlink(missing_ok=True)


def _merge_wal(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def _corrupt_page(path: Path) -> None:
    """Merge the WAL into the file, then overwrite its second page (a b-tree page) with garbage."""
    _merge_wal(path)
    size = path.stat().st_size
    page = 4096
    assert size >= 2 * page, size
    with open(path, "r+b") as f:
        f.seek(page)
        f.write(np.random.default_rng(0).integers(0, 256, page, dtype=np.uint8).tobytes())


CELLS = {
    "registry deleted": lambda d: _remove(d, REGISTRY_FILE, f"{REGISTRY_FILE}-wal", f"{REGISTRY_FILE}-shm"),
    "registry WAL lost": lambda d: _remove(d, f"{REGISTRY_FILE}-wal", f"{REGISTRY_FILE}-shm"),
    "server database deleted": lambda d: _remove(d, SERVER_DB, f"{SERVER_DB}-wal", f"{SERVER_DB}-shm"),
    "everything deleted": lambda d: _remove(d, *(f"{n}{s}" for n in (REGISTRY_FILE, SERVER_DB)
                                                 for s in ("", "-wal", "-shm"))),
    "registry page corrupted": lambda d: _corrupt_page(d / REGISTRY_FILE),
    "server database page corrupted": lambda d: _corrupt_page(d / SERVER_DB),
}


def _listed(base_url: str, key: str) -> dict[str, dict]:
    r = httpx.get(f"{base_url}/api/v1/checkpoints", headers={"X-API-Key": key}, params={"limit": 1000})
    assert r.status_code == 200, r.text
    return {c["tinker_path"]: c for c in r.json()["checkpoints"]}


def _weights_info(base_url: str, key: str, path: str) -> int:
    return httpx.post(f"{base_url}/api/v1/weights_info", headers={"X-API-Key": key},
                      json={"tinker_path": path}).status_code


@pytest.mark.parametrize("cell", list(CELLS))
def test_checkpoints_survive_losing_a_database(cell, golden, model_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(golden["dir"], data)
    CELLS[cell](data)
    settings = ServerSettings(data_dir=data, api_keys=(KEY_A, KEY_B), long_poll_s=5.0)

    if cell == "server database page corrupted":  # refused, with the repair named; then repaired offline
        with pytest.raises(dbfile.DatabaseCorrupt, match="tinker-jax admin reindex"):
            Store(settings.db_path)
        probe = subprocess.run([sys.executable, "-m", "tinker_jax.cli", "admin", "check", "--data-dir", str(data)],
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 1 and f"{SERVER_DB}: CORRUPT" in probe.stdout, probe.stdout + probe.stderr
        assert admin.reindex(data) == 0
        assert list(data.glob(f"{SERVER_DB}.corrupt-*")), "the corrupt file is kept for inspection"

    live = LiveServer(_config(model_dir, data), settings)
    live.start()
    try:
        if cell == "registry page corrupted":
            assert list(data.glob(f"{REGISTRY_FILE}.corrupt-*")), "the corrupt registry is set aside, not served"
        for key, owner, other in ((KEY_A, A, B), (KEY_B, B, A)):
            listed = _listed(live.base_url, key)
            assert set(listed) == golden["paths"][owner], (cell, key)  # all of its own, none of the other's
        a, b = _listed(live.base_url, KEY_A), _listed(live.base_url, KEY_B)
        assert a[golden["a_published"]]["public"] is True and a[golden["a_state"]]["public"] is False
        assert b[golden["b_ttl"]]["expires_at"] is not None and a[golden["a_state"]]["expires_at"] is None
        # The other key: nothing unpublished (404, as for a path that does not exist); the published one, yes.
        assert _weights_info(live.base_url, KEY_B, golden["a_state"]) == 404
        assert _weights_info(live.base_url, KEY_A, golden["b_ttl"]) == 404
        assert _weights_info(live.base_url, KEY_B, golden["a_published"]) == 200
        assert _weights_info(live.base_url, KEY_A, golden["a_state"]) == 200
        for path in (golden["a_state"], golden["b_ttl"]):
            run = live.engine.get_run(TinkerPath.parse(path).run_id)
            mid = live.engine.create_model_from_state(path, optimizer=True, owner=run.owner).result().model_id
            got, want = flat(live.engine.run_state(mid)["weights"]), golden["weights"][path]
            assert set(got) == set(want) and want
            for k, v in want.items():
                np.testing.assert_array_equal(got[k], v, err_msg=f"{cell}: {path} {k}")
    finally:
        live.stop()


# ------------------------------------------------------------------------------------------- engine level


def _service(model_dir, data, **kw) -> tinker_jax.ServiceClient:
    return tinker_jax.ServiceClient(config=_config(model_dir, data, **kw))


def _save_owned(svc, owner: str, name: str, **kw) -> str:
    """A checkpoint of a run created as the server would (with an owner)."""
    mid = svc.engine.create_model(BASE, rank=4, seed=3, owner=owner).result()
    return svc.engine.save_state(mid, name, **kw).result().path


def test_records_and_reindex(model_dir, tmp_path):
    """The record is committed with the checkpoint and rewritten first by publish / TTL; a fresh registry is
    rebuilt from records exactly; rows without files are dropped; a checkpoint without a record gets one."""
    data = tmp_path / "data"
    with _service(model_dir, data) as svc:
        eng = svc.engine
        path = _save_owned(svc, A, "x", user_metadata={"note": "kept"})
        p = TinkerPath.parse(path)
        d = eng.checkpoint_dir(p)
        record = checkpoints.read_record(d)
        assert record["owner"] == A and record["public"] is False and record["expires"] is None
        assert record["size_bytes"] == checkpoints.size_bytes(d) > 0 and record["user_metadata"] == {"note": "kept"}
        eng.set_checkpoint_public(path, True)
        eng.set_checkpoint_ttl(path, 3600)
        record = checkpoints.read_record(d)
        assert record["public"] is True and record["expires"] > time.time() + 3000
        before = eng.get_checkpoint(path)
        run_before = eng.get_run(p.run_id)
    (data / REGISTRY_FILE).unlink()
    for side in dbfile.SIDE_FILES:
        (data / f"{REGISTRY_FILE}{side}").unlink(missing_ok=True)
    with _service(model_dir, data) as svc:
        assert svc.engine.get_checkpoint(path) == before
        run = svc.engine.get_run(p.run_id)
        assert (run.owner, run.base_model, run.lora_rank, run.created) == \
            (A, run_before.base_model, run_before.lora_rank, run_before.created)

    reg = Registry(data / REGISTRY_FILE, data)
    try:
        ghost = TinkerPath(p.run_id, "weights", "ghost")
        reg.add_checkpoint(ghost, size_bytes=1, step=0)  # a row whose files are gone
        (d / checkpoints.RECORD).unlink()  # a checkpoint saved before records existed
        report = index.reindex(reg, data / "checkpoints")
        assert (report.dropped, report.records_written, report.unowned) == (1, 1, 0), report.summary()
        assert reg.get_checkpoint(ghost) is None
        assert checkpoints.read_record(d)["owner"] == A and checkpoints.read_record(d)["public"] is True
        assert not index.reindex(reg, data / "checkpoints").changed()  # idempotent
    finally:
        reg.close()


def test_publish_waits_for_an_earlier_save_on_its_path(model_dir, tmp_path):
    with _service(model_dir, tmp_path / "data") as svc:
        mid = svc.engine.create_model(BASE, rank=4, owner=A).result()
        path = f"tinker://{mid}/weights/p"
        w = svc.engine._workers[BASE]
        with w.hold():
            save = svc.engine.save_state(mid, "p")
            publisher = threading.Thread(target=svc.engine.set_checkpoint_public, args=(path, True))
            publisher.start()
            time.sleep(0.3)
            assert publisher.is_alive()  # waiting for the save's turn, not failing on a missing checkpoint
        save.result()
        publisher.join(30)
        assert not publisher.is_alive()
        assert svc.engine.get_checkpoint(path).public
        assert checkpoints.read_record(svc.engine.checkpoint_dir(TinkerPath.parse(path)))["public"] is True


def test_quota_rank_and_token_limits(model_dir, tmp_path):
    with _service(model_dir, tmp_path / "data", checkpoint_quota_bytes=1, lora=LoraConfig(max_rank=16)) as svc:
        eng = svc.engine
        mid = eng.create_model(BASE, rank=4, owner=A).result()
        with pytest.raises(UserError, match="checkpoint_quota_bytes"):
            eng.save_state(mid, "too-big").result()
        assert eng.get_checkpoint(f"tinker://{mid}/weights/too-big") is None
        local = eng.create_model(BASE, rank=4).result()  # in-process runs (no owner) are not limited
        eng.save_state(local, "fine").result()
        fine = f"tinker://{local}/weights/fine"
        with pytest.raises(UserError, match="copying .* checkpoint_quota_bytes"):  # a copy counts toward the owner
            eng.copy_checkpoint(fine, "copied-a", owner=A)
        assert eng.registry.get_run("copied-a") is None and eng.registry.usage(A) == (0, 0)
        assert eng.copy_checkpoint(fine, "copied-local", owner=None).endswith("/weights/fine")
        with pytest.raises(UserError, match=r"lora_config\.rank: 10000 exceeds .* limit of 16"):
            eng.create_model(BASE, rank=10000, owner=A).result()
        with pytest.raises(UserError, match=r"lora_config\.seed: must be a 64-bit integer"):  # stored as INTEGER
            eng.create_model(BASE, rank=4, seed=2**64, owner=A).result()
    with _service(model_dir, tmp_path / "data2", max_tokens_per_request=8) as svc:
        mid = svc.engine.create_model(BASE, rank=4).result()
        with pytest.raises(UserError, match="max_tokens_per_request"):
            svc.engine.forward_backward(mid, _data(0) * 2, "cross_entropy").result()
        svc.engine.forward_backward(mid, _data(0), "cross_entropy").result()  # 8 tokens: within


def test_queued_requests_are_checked_on_their_turn(model_dir, tmp_path):
    """Requests queued behind others act on what their turn finds, not on what was there when they were sent:
    - two save_state(overwrite=False) of one name queued together: the first saves, the second is refused (it
      replaced the first; only the name's record, listed once the first is written, was checked);
    - an unload sent twice (a retry), then the same model_id created again: the second unload leaves the new run
      alone (it removed the new run's entry: NotFound for every request, its LoRA slot never freed);
    - a delete cancelled while it waits for its path's turn never runs (it ran all the same), and deletes count
      against their key's bound of requests in flight;
    - a sample the sampler refuses with an error of another kind leaves the key's count in flight as it was (one
      more each time, until every request of the key was refused as Overloaded).
    The in-process TrainingClient.save_state honours `overwrite` (False by default, as the SDK's)."""
    with _service(model_dir, tmp_path / "data", max_queued_per_tenant=3) as svc:
        eng = svc.engine
        mid = eng.create_model(BASE, rank=4, seed=3, model_id="again").result()
        w = eng._workers[BASE]
        with w.hold():
            first, second = (eng.save_state(mid, "once", overwrite=False) for _ in range(2))
        assert first.result().path.endswith("/weights/once")
        with pytest.raises(UserError, match=r"path: checkpoint .*/weights/once already exists"):
            second.result()

        eng.unload_model(mid).result()
        with w.hold():
            recreated = eng.create_model(BASE, rank=4, seed=4, model_id="again")  # queued, its entry made
            # A retried unload of the first "again", queued before this create, reaches the worker now (run here
            # directly: the worker is held, and a queued retry's turn comes at a moment no test can pick).
            w._op_unload(Request("unload", rq.Unload(), Future(), run="again"))
        assert recreated.result() == "again"
        assert eng.get_info("again").model_id == "again" and "again" in w.runs
        eng.unload_model("again").result()
        assert "again" not in w.runs and not w.pools  # its LoRA slot, the pool's last, is free again

        path = svc.create_lora_training_client(BASE, rank=4, seed=1).save_state("kept").result().path
        with w.hold():
            blocker = eng.save_state(TinkerPath.parse(path).run_id, "kept")  # the delete waits for it
            delete = eng.delete_checkpoint(path)
            assert delete.cancel()
        blocker.result()
        time.sleep(0.5)  # the path work thread would have run it by now
        assert eng.get_checkpoint(path) is not None
        with w.hold():  # deletes count against their key's bound as other requests do (they were not counted)
            blocker = eng.save_state(TinkerPath.parse(path).run_id, "kept")
            deletes = [eng.delete_checkpoint(path, tenant="d") for _ in range(3)]
            with pytest.raises(Overloaded):
                eng.delete_checkpoint(path, tenant="d")
        blocker.result()
        assert [d.result() for d in deletes] == [True, False, False]

        sampler = eng.create_sampler(base_model=BASE)
        for _ in range(4):  # beyond max_queued_per_tenant=3 if each left its count behind
            with pytest.raises(TypeError):
                eng.sample(sampler, tt.ModelInput.from_ints([1, 2, 3]), 1, tt.SamplingParams(max_tokens=2),
                           tenant="t", sequence_ids=7)
        assert eng.stats()["inflight"].get("t", 0) == 0

        tc = svc.create_lora_training_client(BASE, rank=4, seed=2)
        tc.save_state("named").result()
        with pytest.raises(UserError, match="already exists"):
            tc.save_state("named").result()
        assert tc.save_state("named", overwrite=True).result().path.endswith("/weights/named")


def test_a_round_outliving_shutdown_still_indexes_its_checkpoint(model_dir, tmp_path, monkeypatch):
    """shutdown() waits STOP_WAIT_S for each worker's round in progress; one that runs longer (a slow capture, a
    stuck device call) keeps the registry and the data dir's lock: its save is written, indexed and reported saved
    (the registry used to be closed under it: files on disk, the client told the save failed), and no second
    engine takes the data dir while it may still write."""
    from tinker_jax.datadir import DataDirInUse
    from tinker_jax.engine import core, worker

    monkeypatch.setattr(core, "STOP_WAIT_S", 0.3)
    slow_capture = worker.BaseWorker._state_of

    def slow(self, run, opt):
        time.sleep(2.0)
        return slow_capture(self, run, opt)

    svc = _service(model_dir, tmp_path / "data")
    eng = svc.engine
    mid = eng.create_model(BASE, rank=4, seed=3).result()
    monkeypatch.setattr(worker.BaseWorker, "_state_of", slow)
    save = eng.save_state(mid, "late")
    time.sleep(0.5)  # the save's round has started
    t0 = time.monotonic()
    eng.shutdown()
    assert time.monotonic() - t0 < 1.8  # it did not wait for the round
    assert save.result(timeout=60).path.endswith("/weights/late")
    assert eng.registry.get_checkpoint(TinkerPath.parse(save.result().path)) is not None
    with pytest.raises(DataDirInUse):
        _service(model_dir, tmp_path / "data")


def test_a_copy_and_an_archive_wait_for_a_save_replacing_their_source(model_dir, tmp_path):
    """copy_weights and the archive download take their turn on the checkpoint's path: a copy sent while a save
    replaces its source copies the new version (it copied the old record beside whatever files were there)."""
    import concurrent.futures

    with _service(model_dir, tmp_path / "data") as svc:
        eng = svc.engine
        mid = eng.create_model(BASE, rank=4, seed=3).result()
        path = eng.save_state(mid, "x", user_metadata={"v": "1"}).result().path
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with eng._workers[BASE].hold():
                again = eng.save_state(mid, "x", user_metadata={"v": "2"})
                copy = pool.submit(eng.copy_checkpoint, path, "copied", owner=None)
                archive = pool.submit(eng.checkpoint_archive, path)
                time.sleep(0.3)
                assert not copy.done() and not archive.done()  # waiting for the save
            copied = copy.result(timeout=60)
            assert archive.result(timeout=60).is_file()
        assert again.done() and eng.get_checkpoint(copied).user_metadata == {"v": "2"}


@contextlib.contextmanager
def _save_waiting_for_the_disk(eng, owner: str, name: str):
    """A save of a new run of `owner` that its worker has reserved quota for (on its loop) but not yet written (its
    I/O thread is busy until the block ends). -> (the save's future, the bytes reserved)."""
    mid = eng.create_model(BASE, rank=4, seed=3, owner=owner).result()
    disk_busy = threading.Event()
    eng._workers[BASE]._io.submit(disk_busy.wait)  # the worker's writes wait behind this
    try:
        queued = eng.save_state(mid, name)
        deadline = time.monotonic() + 60
        while not eng.quota.reserved(owner):
            assert time.monotonic() < deadline and not queued.done(), "the save was never reserved"
            time.sleep(0.05)
        yield queued, eng.quota.reserved(owner)
    finally:
        disk_busy.set()


def test_quota_counts_a_save_still_queued_for_the_disk(model_dir, tmp_path):
    """One ledger per engine (engine.quota): a save that its worker has reserved but not yet written counts against
    a copy_weights of the same owner (each worker used to count its own queued saves only, and a copy none); once
    written, it counts from the registry and the ledger holds nothing."""
    with _service(model_dir, tmp_path / "size", checkpoint_quota_bytes=10**12) as svc:  # what such a save takes
        with _save_waiting_for_the_disk(svc.engine, A, "one") as (queued, need):
            pass
        size = svc.engine.get_checkpoint(queued.result().path).size_bytes
    # Room for the save, not for the save and the copy of a checkpoint of the same size
    quota = need + size // 2
    with _service(model_dir, tmp_path / "data", checkpoint_quota_bytes=quota) as svc:
        eng = svc.engine
        fine = eng.save_state(eng.create_model(BASE, rank=4, seed=3).result(), "fine").result().path  # no owner
        assert quota - need < eng.get_checkpoint(fine).size_bytes <= quota  # a copy fits, but not beside the save
        with _save_waiting_for_the_disk(eng, A, "queued") as (queued, _):
            assert eng.registry.usage(A) == (0, 0)
            with pytest.raises(UserError, match="copying .* checkpoint_quota_bytes"):
                eng.copy_checkpoint(fine, "copied", owner=A)
        assert queued.result().path.endswith("/weights/queued")
        assert eng.quota.reserved(A) == 0 and eng.registry.usage(A)[0] == 1
        assert eng.registry.get_run("copied") is None


def test_sweep_puts_back_an_interrupted_replacement(tmp_path):
    parent = tmp_path / "weights"
    target = parent / "x"
    old = parent / ".x.0123abcd.old"
    old.mkdir(parents=True)
    (old / "f").write_text("previous")
    (parent / ".x.4567ef01.new").mkdir()
    atomic.sweep(parent)
    assert (target / "f").read_text() == "previous"
    assert sorted(p.name for p in parent.iterdir()) == ["x"]


def test_admin_check_backup_and_chown(model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    with _service(model_dir, data) as svc:  # an in-process run: no owner
        mid = svc.engine.create_model(BASE, rank=4).result()
        path = svc.engine.save_state(mid, "local").result().path
    assert admin.check(data) == 0 and "all consistent" in capsys.readouterr().out
    assert admin.backup(data, tmp_path / "backup") == 0
    copy = sqlite3.connect(tmp_path / "backup" / REGISTRY_FILE)
    assert copy.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 1
    copy.close()
    assert admin.chown(data, mid, A) == 0
    d = data / "checkpoints" / mid / "weights" / "local"
    assert checkpoints.read_record(d)["owner"] == A
    (data / REGISTRY_FILE).unlink()  # the owner survives a lost registry: it is in the record
    reg = Registry.open(data / REGISTRY_FILE, data)
    try:
        index.reindex(reg, data / "checkpoints")
        assert reg.get_run(mid).owner == A and reg.get_checkpoint(TinkerPath.parse(path)) is not None
    finally:
        reg.close()
    assert os.path.exists(data / REGISTRY_FILE)


def test_engine_health_reports_a_model_that_cannot_work(model_dir, tmp_path):
    broken = tmp_path / "broken-model"  # a valid config, weights that cannot be read: the load fails on its thread
    broken.mkdir()
    shutil.copy(model_dir / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    config = EngineConfig(data_dir=tmp_path / "data", models={BASE: str(model_dir), "broken": str(broken)},
                          max_seq_len=64, compile_cache=False)
    with tinker_jax.ServiceClient(config=config) as svc:
        svc.engine.create_model(BASE, rank=4).result()
        assert svc.engine.health() == {"ok": True, "problems": []}
        with pytest.raises(RuntimeError, match="base model broken could not be loaded"):
            svc.engine.create_model("broken", rank=4).result()
        health = svc.engine.health()
        assert not health["ok"] and any(p.startswith("model broken: load failed") for p in health["problems"]), health
        # Several processes (a stand-in for replicas.Processes): a lost process on the leader, and a follower that
        # stopped following, are each reported on their own.
        svc.engine.procs = types.SimpleNamespace(gone=None)
        svc.engine.follow_error = RuntimeError("the leader went away")
        try:
            assert "this process stopped following the leader (RuntimeError)" in svc.engine.health()["problems"]
            svc.engine.procs.gone, svc.engine.follow_error = "process 1 of 2 of the engine stopped", None
            assert "process 1 of 2 of the engine stopped" in svc.engine.health()["problems"]
        finally:
            svc.engine.procs, svc.engine.follow_error = None, None


def test_leftovers_belong_to_their_own_name_only(tmp_path):
    """Names may contain dots: `.model.v2.{id}.new` is model.v2's save in progress, never model's leftover."""
    kind = tmp_path / "weights"
    (kind / "model").mkdir(parents=True)
    other_new = kind / ".model.v2.0123abcd.new"
    other_old = kind / ".model.v2.89abcdef.old"
    other_new.mkdir()
    other_old.mkdir()
    atomic.remove(kind / "model")
    assert not (kind / "model").exists() and other_new.is_dir() and other_old.is_dir()
    assert atomic.recover(kind / "model") == kind / "model" and not (kind / "model").exists()  # not model.v2's
    assert other_old.is_dir()
    (kind / ".gone.fedcba98.deleted").mkdir()  # a delete killed between its rename and its removal
    removed = {p.name for p in atomic.sweep(kind)}
    assert ".gone.fedcba98.deleted" in removed and ".model.v2.0123abcd.new" in removed
    assert (kind / "model.v2").is_dir()  # model.v2's interrupted replacement put back, not model's


def test_one_writer_per_data_dir(model_dir, tmp_path, capsys):
    from tinker_jax.datadir import DataDirInUse

    data = tmp_path / "data"
    with _service(model_dir, data):
        with pytest.raises(DataDirInUse, match="in use by another tinker_jax engine"):
            _service(model_dir, data)
        assert admin.reindex(data) == 1 and "refused" in capsys.readouterr().out  # no repair under a live writer
        assert admin.chown(data, "any-run", A) == 1
    assert admin.reindex(data) == 0  # released at shutdown
    with _service(model_dir, data):
        pass


def test_reindex_owner_is_the_newest_record_and_a_bad_record_keeps_its_row(model_dir, tmp_path):
    data = tmp_path / "data"
    with _service(model_dir, data) as svc:
        mid = svc.engine.create_model(BASE, rank=4, owner=A).result()
        old = TinkerPath.parse(svc.engine.save_state(mid, "old").result().path)
        new = TinkerPath.parse(svc.engine.save_state(mid, "new").result().path)
    root = data / "checkpoints"
    for p, owner, created in ((old, B, 1.0), (new, A, 2.0)):  # records disagree: the newer says A
        d = root / p.run_id / p.kind / p.name
        checkpoints.write_record(d, {**checkpoints.read_record(d), "owner": owner, "created": created})
    reg = Registry.open(data / REGISTRY_FILE, data)
    try:
        reg.set_run_owner(mid, B)
        index.reindex(reg, root)
        assert reg.get_run(mid).owner == A
        (root / old.run_id / old.kind / old.name / checkpoints.RECORD).write_text("[not a record")
        report = index.reindex(reg, root)
        assert report.unreadable == [str(old)] and reg.get_checkpoint(old) is not None  # reported, not dropped
        assert (root / old.run_id / old.kind / old.name / checkpoints.RECORD).read_text() == "[not a record"
    finally:
        reg.close()


def test_delete_needs_no_served_model(model_dir, tmp_path):
    """A checkpoint of a base model the server no longer serves can still be deleted (and expire): a delete
    touches files and the index only, on its path's turn."""
    data = tmp_path / "data"
    with _service(model_dir, data) as svc:
        mid = svc.engine.create_model(BASE, rank=4).result()
        path = svc.engine.save_state(mid, "keep", ttl_seconds=1).result().path
    config = EngineConfig(data_dir=data, models={}, max_seq_len=64, compile_cache=False)  # nothing served
    with tinker_jax.ServiceClient(config=config) as svc:
        assert svc.engine.get_checkpoint(path) is not None
        assert svc.engine.delete_checkpoint(path).result(timeout=30) is True
        assert svc.engine.get_checkpoint(path) is None and not svc.engine._workers
        p = TinkerPath.parse(path)
        assert not (data / "checkpoints" / p.run_id / p.kind / p.name).exists()
