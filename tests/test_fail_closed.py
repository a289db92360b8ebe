"""Issue 16, "fail closed": one regression test per defect the issue found, with two API keys (A and B), over raw
HTTP and, where it is cheap, the real tinker SDK. The engine is the fake one of tests/test_server_routes.py (no JAX);
uvicorn serves it on a loopback port where a real socket matters (the SDK, a slowly sent body).

1. Runs without a recorded owner (made in-process, or re-indexed without one) are nobody's once API keys are set.
2. (The engine registry's durability is tests/test_loss_matrix.py's.)
3. Futures belong to the key that submitted them: retrieve, cancel and acknowledge.
4. Limits: stored fields, LoRA rank (the engine's check, passed through), sessions and models per key, JSON bodies.
5. A corrupt server database stops the server with a message naming the file and the repair command; /healthz
   reports a database or engine that does not work.
Lesser: Content-Type enforced, request bodies read with a timeout, no server path in any error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import tinker
from tinker import types
from tinker.lib.api_future_impl import _APIFuture

from server.app import build_app
from server.deps import key_tag
from server.settings import ServerSettings
from server.store import CorruptDatabase, Store
from server_util import uvicorn_thread
from test_server_routes import BASE, KEY as A, OTHER_KEY as B, Api, FakeEngine, proto_fwdbwd, serving
from tinker_jax import dbfile
from tinker_jax.errors import UserError
from tinker_jax.futures import failed

NOT_FOUND = (tinker.NotFoundError, tinker.RequestFailedError)  # a 404, or a future failed as "not found"


@dataclass
class Live:
    api: Api
    base_url: str
    port: int
    settings: ServerSettings

    @property
    def engine(self) -> FakeEngine:
        return self.api.engine


@contextlib.contextmanager
def live(data_dir: Path, **overrides: Any) -> Iterator[Live]:
    """uvicorn on a free loopback port over the fake engine, in a thread."""
    engine = FakeEngine(data_dir)
    settings = ServerSettings(**{"data_dir": data_dir, "api_keys": (A, B), "long_poll_s": 0.3,
                                 "retrieve_futures_poll_s": 0.3, "max_body_bytes": 1 << 20, **overrides})
    app = build_app(engine, settings)
    with uvicorn_thread(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield Live(Api(http, engine, app), f"http://127.0.0.1:{port}", port, settings)
        engine.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Live]:
    with live(tmp_path_factory.mktemp("data"), body_read_timeout_s=0.5) as s:
        yield s


@contextlib.contextmanager
def sdk(server: Live, key: str) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=key)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close("success").result(timeout=10)


# --- 1. ownerless runs ---------------------------------------------------------------------------------------------


def test_ownerless_run_is_invisible_to_every_key(server: Live) -> None:
    """A run the engine holds without an owner (the in-process client over the same data directory, or one
    re-indexed without owner information) is no key's: listing, reading, loading, sampling, publishing, TTL and
    deleting all answer as for a run that does not exist, over HTTP and through the SDK."""
    api, engine = server.api, server.engine
    run = engine.create_model(BASE, model_id="in-process-run").result()  # owner None
    ckpt = engine.save_state(run, "c").result().path
    sampler_ckpt = engine.save_weights_for_sampler(run, "s").result()[0]
    assert engine.get_run(run).owner is None

    for key in (A, B):
        for scope in ("owned", "accessible"):
            runs = api.request("GET", f"training_runs?limit=1000&access_scope={scope}", key=key).json()
            assert run not in [r["training_run_id"] for r in runs["training_runs"]]
        assert ckpt not in [c["tinker_path"] for c in api.request("GET", "checkpoints", key=key).json()[
            "checkpoints"]]
        base = f"training_runs/{run}/checkpoints/weights/c"
        for method, path in [("GET", f"training_runs/{run}"), ("GET", f"training_runs/{run}?access_scope=accessible"),
                             ("GET", f"training_runs/{run}/checkpoints"), ("GET", f"{base}/archive"),
                             ("POST", f"{base}/publish"), ("DELETE", f"{base}/publish"), ("DELETE", base),
                             ("DELETE", f"training_runs/{run}/checkpoints/s?checkpoint_type=sampler")]:
            assert api.request(method, path, key=key).status_code == 404, (key, method, path)
        assert api.request("PUT", f"{base}/ttl", key=key, json={"ttl_seconds": 60}).status_code == 404
        assert api.post("weights_info", {"tinker_path": ckpt}, key=key).status_code == 404

        sid = api.session(key)
        r = api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                                 "model_path": sampler_ckpt}, key=key)
        assert r.status_code == 404 and "not found" in r.json()["error"]
        load = api.post("load_weights", {"session_id": sid, "model_seq_id": 0, "path": ckpt, "optimizer": True},
                        key=key)
        err = api.result(load.json()["request_id"], key=key)
        assert err["category"] == "user" and "not found" in err["error"]
        assert api.app.state.store.get_model(load.json()["model_id"]) is None  # a failed load keeps no model

    # The real SDK, key B: nothing listed, loading and sampling fail as for a missing checkpoint.
    with sdk(server, B) as service:
        rest = tinker.RestClient(base_url=server.base_url, api_key=B)
        assert run not in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]
        with pytest.raises(NOT_FOUND, match="not found"):
            service.create_training_client_from_state(ckpt).result()
        with pytest.raises(NOT_FOUND, match="not found"):
            service.create_sampling_client(model_path=sampler_ckpt).result()
        with pytest.raises(NOT_FOUND, match="not found"):
            rest.delete_checkpoint_from_tinker_path(ckpt).result()
        with pytest.raises(NOT_FOUND, match="not found"):
            rest.publish_checkpoint_from_tinker_path(ckpt).result()

    # Nothing was touched: still there, still private.
    assert engine.get_checkpoint(ckpt) is not None and not engine.get_checkpoint(ckpt).public
    assert engine.get_checkpoint(sampler_ckpt) is not None


def test_ownerless_run_is_the_local_users_without_keys(tmp_path) -> None:
    """Without API keys (a single-user local server) the user made those runs: they stay visible."""
    with serving(tmp_path, api_keys=()) as api:
        run = api.engine.create_model(BASE, model_id="local-run").result()
        assert [r["training_run_id"] for r in api.request("GET", "training_runs").json()["training_runs"]] == [run]
        assert api.request("GET", f"training_runs/{run}").json()["model_owner"] == "local"


# --- 3. futures are their key's --------------------------------------------------------------------------------------


def test_futures_are_scoped_to_their_key(server: Live) -> None:
    api, engine = server.api, server.engine
    mid = api.model(api.session(A), key=A)
    engine.hold.clear()  # the engine worker is busy: A's requests queue
    try:
        first = api.post("optim_step", {"model_id": mid, "seq_id": 1, "adam_params": {}}, key=A).json()
        queued = api.post("optim_step", {"model_id": mid, "seq_id": 2, "adam_params": {}}, key=A).json()
        victim = queued["request_id"]
        stolen = api.post("retrieve_future", {"request_id": victim}, key=B)
        unknown = api.post("retrieve_future", {"request_id": "0" * 32}, key=B)
        assert stolen.status_code == unknown.status_code == 404  # exactly like an id that never existed
        assert stolen.json()["error"] == unknown.json()["error"].replace("0" * 32, victim)
        assert api.post("cancel_future", {"request_id": victim}, key=B).json() == {"request_id": victim,
                                                                                  "cancelled": False}
        with sdk(server, B) as service:  # the SDK's own poller, given the id (it shows up in errors and logs)
            poll = _APIFuture(types.OptimStepResponse, service.holder, types.UntypedAPIFuture(request_id=victim),
                              time.time(), "OptimStep")
            with pytest.raises(Exception, match="404|not found|unknown"):
                poll.result(timeout=10)
        third = api.post("optim_step", {"model_id": mid, "seq_id": 3, "adam_params": {}}, key=A).json()
        assert api.post("cancel_future", {"request_id": third["request_id"]}, key=A).json()["cancelled"]  # A can
    finally:
        engine.hold.set()
    assert "metrics" in api.result(first["request_id"], key=A)
    assert "metrics" in api.result(victim, key=A)  # B's cancel did nothing: A's step ran
    assert "cancelled" in api.result(third["request_id"], key=A)["error"]
    assert api.post("retrieve_future", {"request_id": victim}, key=B).status_code == 404  # done: still A's only

    # Sampler completions: another key's sampling session is unknown; acknowledging A's ids does nothing.
    sampler = api.post("create_sampling_session", {"session_id": api.session(A), "sampling_session_seq_id": 0,
                                                   "base_model": BASE}, key=A).json()["sampling_session_id"]
    sample = api.post("asample", {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
                                  "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                  "sampling_params": {"max_tokens": 2}}, key=A).json()["request_id"]
    target = {"type": "sampling_session", "sampling_session_id": sampler, "cloned_sampler_id": 0}
    assert api.post("retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 0},
                    key=B).status_code == 404
    own = api.post("create_sampling_session", {"session_id": api.session(B), "sampling_session_seq_id": 0,
                                               "base_model": BASE}, key=B).json()["sampling_session_id"]
    acks = api.post("retrieve_futures", {"target": {**target, "sampling_session_id": own}, "prev_cursor": 0,
                                         "timeout": 0, "retrieved_request_ids": [sample]}, key=B)
    assert acks.status_code == 200 and acks.json()["completions"] == []
    with sqlite3.connect(server.settings.db_path) as db:
        assert db.execute("SELECT retrieved FROM futures WHERE request_id=?", (sample,)).fetchone() == (None,)
    mine = api.post("retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 5}, key=A).json()
    assert [c["request_id"] for c in mine["completions"]] == [sample]


# --- 4. limits -------------------------------------------------------------------------------------------------------


def test_stored_fields_are_capped_and_nothing_is_written(tmp_path) -> None:
    with serving(tmp_path) as api:
        huge_tags = ["t" * 1000] * 200  # 200 KB of tags (the was 200 MB)
        r = api.post("create_session", {"tags": huge_tags, "sdk_version": "0.38.0"})
        assert r.status_code == 400 and r.json()["error"].startswith("tags:"), r.text
        assert "max_metadata_bytes" in r.json()["error"]
        assert api.request("GET", "sessions").json()["sessions"] == []  # nothing written

        big = {"k": "v" * 20_000}
        r = api.post("create_session", {"tags": [], "sdk_version": "0.38.0", "user_metadata": big})
        assert r.status_code == 400 and r.json()["error"].startswith("user_metadata:")
        sid = api.session()
        r = api.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": BASE,
                                      "user_metadata": big})
        assert r.status_code == 400 and r.json()["error"].startswith("user_metadata:")
        assert api.app.state.store.models_of_session(sid) == []
        mid = api.model(sid, seq=1)
        for route, body in [("save_weights", {"model_id": mid, "path": "c", "seq_id": 1}),
                            ("save_weights_for_sampler", {"model_id": mid, "path": "s", "seq_id": 2}),
                            ("load_weights", {"session_id": sid, "model_seq_id": 5, "path": "tinker://x/weights/y",
                                              "optimizer": False})]:
            r = api.post(route, {**body, "user_metadata": big})
            assert r.status_code == 400 and r.json()["error"].startswith("user_metadata:"), (route, r.text)
        assert api.engine.list_checkpoints() == []
        r = api.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": "d" * 20_000})
        assert r.status_code == 400 and r.json()["error"].startswith("detail:")


def test_lora_rank_limit_is_the_engines_and_the_refused_model_does_not_count(tmp_path, monkeypatch) -> None:
    """The route hands the rank to the engine, whose check (`worker.check_rank`) names lora_config.rank; the model
    the store recorded at submit is forgotten, so it does not count against max_models_per_key."""
    with serving(tmp_path, max_models_per_key=1) as api:
        real_create = api.engine.create_model
        seen = []

        def create_model(base_model, *, rank=32, **kw):
            seen.append(rank)
            if rank > 256:
                return failed(UserError(f"lora_config.rank: {rank} exceeds this server's limit of 256"))
            return real_create(base_model, rank=rank, **kw)

        monkeypatch.setattr(api.engine, "create_model", create_model)
        sid = api.session()
        r = api.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": BASE,
                                      "lora_config": {"rank": 10000}})
        err = api.result(r.json()["request_id"])
        assert seen == [10000] and err["category"] == "user" and err["error"].startswith("lora_config.rank:")
        assert api.app.state.store.get_model(r.json()["model_id"]) is None
        api.model(sid, seq=1)  # the one model this key may hold
        r = api.post("create_model", {"session_id": sid, "model_seq_id": 2, "base_model": BASE})
        assert r.status_code == 400 and "max_models_per_key=1" in r.json()["error"], r.text
        assert api.post("create_model", {"session_id": api.session(B), "model_seq_id": 0, "base_model": BASE},
                        key=B).status_code == 200  # another key's budget is its own


def test_open_sessions_per_key(tmp_path) -> None:
    with serving(tmp_path, max_sessions_per_key=2) as api:
        first, _ = api.session(), api.session()
        r = api.post("create_session", {"tags": [], "sdk_version": "0.38.0"})
        assert r.status_code == 400 and "max_sessions_per_key=2" in r.json()["error"], r.text
        assert len(api.request("GET", "sessions").json()["sessions"]) == 2  # nothing written
        assert api.post("create_session", {"tags": []}, key=B).status_code == 200  # B's budget is its own
        # A silent session frees up by itself: then the answer is a 429 with Retry-After (the SDK backs off).
        with sqlite3.connect(api.app.state.settings.db_path) as db:
            db.execute("UPDATE sessions SET last_heartbeat = last_heartbeat - 100 WHERE session_id=?", (first,))
        r = api.post("create_session", {"tags": []})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "expire" in r.json()["error"]
        assert api.post(f"sessions/{first}/finish", {"reason": {"type": "success"}}).status_code == 200
        assert api.post("create_session", {"tags": []}).status_code == 200  # finishing one makes room


def test_storage_usage_is_the_callers(tmp_path) -> None:
    """The SDK's checkpoint-storage call reports what the caller's key holds on disk, nobody else's."""
    with serving(tmp_path) as api:
        mid = api.model(api.session())
        api.result(api.post("save_weights", {"model_id": mid, "path": "c", "seq_id": 1}).json()["request_id"])
        api.engine.create_model(BASE, model_id="nobodys").result()
        api.engine.save_state("nobodys", "c").result()  # an ownerless checkpoint counts for no key
        usage = {key: api.request("GET", "billing/usage/checkpoints/current", key=key).json()["data"][0]
                 for key in (A, B)}
        assert (usage[A]["checkpoint_count"], usage[A]["size_bytes"]) == (1, 123)
        assert (usage[B]["checkpoint_count"], usage[B]["size_bytes"]) == (0, 0)


def test_json_bodies_are_capped_by_route_class(tmp_path) -> None:
    with serving(tmp_path, max_json_body_bytes=64 << 10) as api:
        json_headers = {"X-API-Key": A, "Content-Type": "application/json"}
        big = b'{"tags": [], "pad": "' + b"x" * (100 << 10) + b'"}'
        r = api.http.post("/api/v1/create_session", content=big, headers=json_headers)
        assert r.status_code == 413 and "max_json_body_bytes" in r.json()["error"]
        chunked = api.http.post("/api/v1/create_session", content=iter([big[:1000], big[1000:]]),
                                headers=json_headers)  # no Content-Length: counted while reading
        assert chunked.status_code == 413 and "max_json_body_bytes" in chunked.json()["error"]
        # A data-bearing route may be larger (bounded by tokens in the engine): the same size passes the cap.
        mid = api.model(api.session())
        fb = api.post("forward_backward", content=proto_fwdbwd(mid, 1, list(range(1, 90)) * 400),
                      headers={"Content-Type": "application/x-protobuf"})
        assert fb.status_code == 200, fb.text


# --- 5. a corrupt database, health ---------------------------------------------------------------------------------


def _corrupt_a_page(db_path: Path, table: str = "sessions") -> None:
    """Overwrite the root page of `table` with junk, as a torn write or a bad disk sector would."""
    with sqlite3.connect(db_path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    db.close()
    with open(db_path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes([0xA5]) * page_size)


def _a_used_database(path: Path) -> None:
    store = Store(path)
    for _ in range(20):
        store.create_session(owner="o", tags=["x" * 100])
    store.close()


def test_corrupt_server_database_refuses_to_start(tmp_path, monkeypatch, capsys) -> None:
    data = tmp_path / "data"
    db_path = data / "server.sqlite3"
    _a_used_database(db_path)
    assert not db_path.with_name("server.sqlite3-wal").exists()  # closed: the WAL was merged into the file
    _corrupt_a_page(db_path)

    with pytest.raises(CorruptDatabase) as err:
        Store(db_path)
    message = str(err.value)
    assert str(db_path) in message and f"tinker-jax admin reindex --data-dir {data}" in message
    assert isinstance(err.value, dbfile.DatabaseCorrupt) and err.value.path == db_path

    # The app's startup fails the same way (uvicorn would exit); it never serves on the corrupt file.
    with pytest.raises(CorruptDatabase):
        with serving(data):
            pass

    # `tinker-jax serve` checks before building the engine: exit code 2 and the message, no traceback.
    from tinker_jax import cli

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.delenv("TINKER_JAX_API_KEYS", raising=False)

    def no_engine(*a, **kw):
        raise AssertionError("the engine must not be built on a corrupt server database")

    monkeypatch.setattr("tinker_jax.engine.Engine", no_engine)
    assert cli.main(["serve", "--data-dir", str(data), "--model", str(model)]) == 2
    stderr = capsys.readouterr().err
    assert "server database is corrupt" in stderr and "tinker-jax admin reindex" in stderr
    assert "Traceback" not in stderr

    db_path.write_bytes(b"this is not a database at all" * 200)  # a file that is not SQLite at all
    with pytest.raises(CorruptDatabase, match="not a database"):
        Store(db_path)


def test_store_closes_with_its_wal_merged(tmp_path) -> None:
    """After a clean stop the main file alone holds everything (a backup that copies only it loses nothing)."""
    with serving(tmp_path) as api:
        sid = api.session()
    wal = tmp_path / "server.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    copy = tmp_path / "copy" / "server.sqlite3"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "server.sqlite3").read_bytes())
    with sqlite3.connect(copy) as db:
        assert db.execute("SELECT session_id FROM sessions").fetchall() == [(sid,)]
    db.close()


def test_healthz_means_working(tmp_path, monkeypatch) -> None:
    with serving(tmp_path) as api:
        health = lambda: api.http.get("/api/v1/healthz")  # noqa: E731 - no key: probes carry none
        assert health().status_code == 200 and health().json() == {"status": "ok"}

        store = api.app.state.store
        real_ping = store.ping

        def broken_ping() -> None:
            raise sqlite3.DatabaseError(f"database disk image is malformed ({tmp_path})")

        monkeypatch.setattr(store, "ping", broken_ping)
        r = health()
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        assert any(p.startswith("server database: DatabaseError") for p in r.json()["problems"]), r.text
        assert str(tmp_path) not in r.text  # unauthenticated: no server path, even inside SQLite's text
        monkeypatch.setattr(store, "ping", real_ping)
        assert health().status_code == 200

        # A request that failed on a database error makes the next probe run a full integrity check.
        monkeypatch.setattr(store, "create_session", lambda **kw: (_ for _ in ()).throw(
            sqlite3.DatabaseError("database disk image is malformed")))
        assert api.post("create_session", {"tags": []}).status_code == 500
        monkeypatch.setattr(store, "quick_check", lambda: "*** in database main *** Page 2: btreeInitPage() error")
        r = health()
        assert r.status_code == 503 and "integrity check failed" in r.text
        monkeypatch.setattr(store, "quick_check", lambda: "ok")
        assert health().status_code == 200

        monkeypatch.setattr(api.engine, "health", lambda: {"ok": False, "problems": ["worker for base-a died"]},
                            raising=False)
        r = health()
        assert r.status_code == 503 and "engine: worker for base-a died" in r.json()["problems"]


# --- lesser ----------------------------------------------------------------------------------------------------------


def test_content_type_is_enforced(server: Live) -> None:
    http = server.api.http
    body = b'{"tags": [], "sdk_version": "0.38.0"}'
    for headers, status in [({"Content-Type": "text/plain"}, 415), ({}, 415),
                            ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
                            ({"Content-Type": "application/x-protobuf"}, 415),  # proto only where the SDK sends it
                            ({"Content-Type": "application/json; charset=utf-8"}, 200)]:
        r = http.post("/api/v1/create_session", content=body, headers={"X-API-Key": A, **headers})
        assert r.status_code == status, (headers, r.text)
        if status == 415:
            assert r.json()["error"].startswith("Content-Type:")
    assert http.get("/api/v1/sessions", headers={"X-API-Key": A}).status_code == 200  # no body: nothing to check


def test_a_slowly_sent_body_times_out(server: Live) -> None:
    """A client that sends half a body gets 408 after body_read_timeout_s (0.5 s here) and the connection is
    closed, instead of holding a worker and its buffer forever."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nX-API-Key: " + A.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tags\": [")
        t0 = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"body_read_timeout_s" in reply and 0.4 < waited < 5, (waited, reply)


def test_no_error_carries_a_server_path(tmp_path, monkeypatch) -> None:
    with serving(tmp_path) as api:
        where = str(tmp_path)
        sid = api.session()
        mid = api.model(sid)
        api.result(api.post("save_weights", {"model_id": mid, "path": "c", "seq_id": 1}).json()["request_id"])
        bodies = [api.request("GET", f"training_runs/{mid}/checkpoints/weights/c/archive").text]
        for seq, exc in enumerate([UserError(f"path: cannot read {where}/checkpoints/x/meta.json"),
                                   RuntimeError(f"{where}/engine.db: disk I/O error")], start=2):
            api.engine.fail_next = exc  # an engine error naming a file of the data directory
            r = api.post("optim_step", {"model_id": mid, "seq_id": seq})
            bodies.append(str(api.result(r.json()["request_id"])))
        monkeypatch.setattr(api.engine, "get_info", lambda model_id: (_ for _ in ()).throw(
            OSError(f"{where}/models/x: gone")))
        bodies.append(api.post("get_info", {"model_id": mid}).text)  # a 500
        monkeypatch.setattr(api.engine, "weights_info", lambda path: (_ for _ in ()).throw(
            UserError(f"tinker_path: {os.path.realpath(where)}/checkpoints: unreadable")))
        bodies.append(api.post("weights_info", {"tinker_path": f"tinker://{mid}/weights/c"}).text)
        assert "<data-dir>" in bodies[1] and "<data-dir>" in bodies[-1]  # redacted, the rest of the text kept
        for body in bodies:
            assert where not in body and os.path.realpath(where) not in body, body


# --- review: what a published checkpoint reveals, samplers rebuilt, repeated creates, chunked bodies, get_info ------


def _save(api: Api, route: str, mid: str, name: str, seq: int, key: str = A, **extra: Any) -> str:
    r = api.post(route, {"model_id": mid, "path": name, "seq_id": seq, **extra}, key=key)
    assert r.status_code == 200, r.text
    return api.result(r.json()["request_id"], key=key)["path"]


def test_accessible_scope_shows_another_keys_run_only_through_what_it_published(server: Live) -> None:
    """Key A publishes one checkpoint of its run; with access_scope=accessible key B sees the run, but its latest
    checkpoints are chosen among the published ones only, and the run's user_metadata and owner tag are not
    shown. A still sees everything of its own run. The SDK parses B's answer."""
    api = server.api
    r = api.post("create_model", {"session_id": api.session(A), "model_seq_id": 0, "base_model": BASE,
                                  "lora_config": {"rank": 4}, "user_metadata": {"run-notes": "secret-run"}}, key=A)
    mid = r.json()["model_id"]
    api.result(r.json()["request_id"], key=A)
    public = _save(api, "save_weights", mid, "shared", 1)
    private = _save(api, "save_weights", mid, "private-later", 2, user_metadata={"note": "secret-ckpt"})
    private_s = _save(api, "save_weights_for_sampler", mid, "private-sampler", 3)
    assert api.request("POST", f"training_runs/{mid}/checkpoints/weights/shared/publish", key=A).status_code == 204

    listed = api.request("GET", "training_runs?limit=1000&access_scope=accessible", key=B)
    single = api.request("GET", f"training_runs/{mid}?access_scope=accessible", key=B)
    assert listed.status_code == single.status_code == 200
    [run] = [r for r in listed.json()["training_runs"] if r["training_run_id"] == mid]
    for view in (run, single.json()):
        assert view["last_checkpoint"]["tinker_path"] == public and view["last_sampler_checkpoint"] is None
        assert view.get("user_metadata") is None and view["model_owner"] != key_tag(A)
    for text in (listed.text, single.text):
        for secret in ("private-later", "private-sampler", "secret-run", "secret-ckpt", key_tag(A)):
            assert secret not in text, secret
    rest = tinker.RestClient(base_url=server.base_url, api_key=B)
    parsed = rest.get_training_run(mid, access_scope="accessible").result()
    assert parsed.last_checkpoint.tinker_path == public and parsed.user_metadata is None

    own = api.request("GET", f"training_runs/{mid}?access_scope=accessible", key=A).json()
    assert own["last_checkpoint"]["tinker_path"] == private and own["last_sampler_checkpoint"]["tinker_path"] == \
        private_s
    assert own["user_metadata"] == {"run-notes": "secret-run"} and own["model_owner"] == key_tag(A)


def test_a_sampler_rebuilt_from_its_path_is_authorized_again(tmp_path) -> None:
    """B samples A's published checkpoint. Once A unpublishes it (or deletes it and saves private weights under the
    same name), B's sampler, evicted (max_samplers_per_session=1) or after a restart, is not rebuilt from it: the
    sample fails as for a checkpoint that does not exist. A's own sampler on it is rebuilt as before."""
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}

    def sample(api: Api, sampler: str, seq: int, key: str) -> dict[str, Any]:
        r = api.post("asample", {"sampling_session_id": sampler, "seq_id": seq, "num_samples": 1, "prompt": prompt,
                                 "sampling_params": {"max_tokens": 2}}, key=key)
        assert r.status_code == 200, r.text
        return api.result(r.json()["request_id"], key=key)

    def sampler(api: Api, sid: str, seq: int, key: str, **source: str) -> str:
        r = api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": seq, **source},
                     key=key)
        assert r.status_code == 200, r.text
        return r.json()["sampling_session_id"]

    with serving(tmp_path, max_samplers_per_session=1) as api:
        mid = api.model(api.session(A), key=A)
        path = _save(api, "save_weights_for_sampler", mid, "p", 1)
        rest = f"training_runs/{mid}/checkpoints/sampler_weights/p"
        assert api.request("POST", f"{rest}/publish", key=A).status_code == 204
        sid_b, sid_a = api.session(B), api.session(A)
        b_path, a_path = sampler(api, sid_b, 0, B, model_path=path), sampler(api, sid_a, 0, A, model_path=path)
        assert "error" not in sample(api, b_path, 0, B)

        assert api.request("DELETE", f"{rest}/publish", key=A).status_code == 204
        sampler(api, sid_b, 1, B, base_model=BASE)  # evicts b_path's snapshot
        sampler(api, sid_a, 1, A, base_model=BASE)  # evicts a_path's
        err = sample(api, b_path, 1, B)
        assert err.get("category") == "user" and "not found" in err.get("error", ""), err
        assert "error" not in sample(api, a_path, 0, A)  # the owner may

        # Deleted, and private weights saved under the same name: not readable either.
        assert api.request("POST", f"{rest}/publish", key=A).status_code == 204
        assert "error" not in sample(api, b_path, 2, B)  # published again: rebuilt
        sampler(api, sid_b, 2, B, base_model=BASE)
        assert api.request("DELETE", rest, key=A).status_code == 204
        assert _save(api, "save_weights_for_sampler", mid, "p", 2) == path
        err = sample(api, b_path, 3, B)
        assert err.get("category") == "user" and "not found" in err.get("error", ""), err

    with serving(tmp_path) as api:  # a restart: nothing in memory, the sampler is rebuilt from the store's row
        err = sample(api, b_path, 4, B)
        assert err.get("category") == "user" and "not found" in err.get("error", ""), err
        assert "error" not in sample(api, a_path, 1, A)


def test_a_repeated_create_keeps_the_live_model(tmp_path) -> None:
    """Once the first create's idempotency key is pruned, a create (or create-via-load) naming the same model
    again is refused (400, naming the model) before the engine sees it; the live model keeps its store row: it
    still answers, still counts against max_models_per_key."""
    with serving(tmp_path, max_models_per_key=1) as api:
        sid = api.session()
        mid = api.model(sid)
        ckpt = _save(api, "save_weights", mid, "c", 1)
        time.sleep(0.01)
        assert api.app.state.store.prune(0, 0) >= 2  # retrieved_ttl_s passed: the keys are gone
        n_calls = len(api.engine.calls)
        for route, body in [("create_model", {"base_model": BASE, "lora_config": {"rank": 4}}),
                            ("load_weights", {"path": ckpt, "optimizer": False})]:
            r = api.post(route, {"session_id": sid, "model_seq_id": 0, **body})
            assert r.status_code == 400 and mid in r.json()["error"] and "exists" in r.json()["error"], r.text
        assert len(api.engine.calls) == n_calls  # the engine was not asked
        assert api.app.state.store.get_model(mid) is not None
        assert api.post("get_info", {"model_id": mid}).status_code == 200
        r = api.post("create_model", {"session_id": sid, "model_seq_id": 1, "base_model": BASE})
        assert r.status_code == 400 and "max_models_per_key=1" in r.json()["error"], r.text


def test_a_chunked_body_with_content_length_zero_is_checked(server: Live) -> None:
    """`Content-Length: 0` beside `Transfer-Encoding: chunked` (h11 reads the chunked body) must not skip the body
    checks: a text/plain body (a page's no-preflight request) or one over the size cap is refused."""
    def send(body: bytes, content_type: bytes) -> bytes:
        head = (b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nX-API-Key: " + A.encode() +
                b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                          for i in range(0, len(body), 65536))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head)
            with contextlib.suppress(OSError):  # the server may answer and close before reading it all
                sock.sendall(chunks + b"0\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
                if b"\r\n\r\n" in reply:
                    break
        return reply

    sessions = len(server.api.request("GET", "sessions?limit=1000").json()["sessions"])
    small = b'{"tags": [], "sdk_version": "0.38.0"}'
    big = b'{"tags": [], "pad": "' + b"x" * (5 << 20) + b'"}'  # over max_json_body_bytes (4 MiB)
    for body, content_type in [(small, b"text/plain"), (big, b"application/json")]:
        reply = send(body, content_type)
        assert reply[9:10] == b"4" and not reply.startswith(b"HTTP/1.1 2"), reply[:200]
    assert len(server.api.request("GET", "sessions?limit=1000").json()["sessions"]) == sessions  # none made


def test_get_info_names_the_served_model_not_a_server_path(tmp_path, monkeypatch) -> None:
    """The engine's model directory never reaches a client as `tokenizer_id`: the served name does (the SDK's
    get_tokenizer loads `tokenizer_id`, else the model name)."""
    with serving(tmp_path) as api:
        mid = api.model(api.session())
        real = api.engine.get_info

        def get_info(model_id):
            info = real(model_id)  # as the engine answered before: its model directory
            data = info.model_data.model_copy(update={"tokenizer_id": str(tmp_path / "models" / "weights-dir")})
            return info.model_copy(update={"model_data": data})

        monkeypatch.setattr(api.engine, "get_info", get_info)
        r = api.post("get_info", {"model_id": mid})
        assert r.status_code == 200 and r.json()["model_data"]["tokenizer_id"] == BASE, r.text
        assert str(tmp_path) not in r.text
