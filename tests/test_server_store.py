"""server.store and server.futures without HTTP: ids, idempotency, completion order, restart, pruning."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import numpy as np
import pytest
from tinker import types
from tinker.proto import response_conv

from server.errors import ApiError
from server.futures import FutureRegistry
from server.store import Store
from tinker_jax.errors import Overloaded, UserError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "server.sqlite3")
    yield s
    s.close()


def test_sessions_and_ids(store: Store) -> None:
    sid = store.create_session(owner="o", tags=["a"], user_metadata={"k": "v"}, sdk_version="0.38.0")
    assert ":" not in sid and "/" not in sid  # ids are composed with ':' and split on '/' (§1.8)
    row = store.get_session(sid)
    assert (row.owner, row.tags, row.user_metadata, row.finished) == ("o", ["a"], {"k": "v"}, None)

    assert store.model_id_for(sid, 0) == f"{sid}:train:0"  # the client's model_seq_id names the model
    assert store.model_id_for(sid, 3) == f"{sid}:train:3"
    store.add_model(f"{sid}:train:3", sid, "o")
    assert store.model_id_for(sid) == f"{sid}:train:4"  # without one, the counter continues above the models
    assert store.sampler_id_for(sid) == f"{sid}:sample:0"
    with pytest.raises(KeyError):
        store.model_id_for("nope")  # allocating needs a session

    # The SDK's X-Idempotency-Key survives its own HTTP retries: a retried create returns the same session.
    again = store.create_session(owner="o", idempotency_key="k1")
    assert store.create_session(owner="o", idempotency_key="k1") == again != sid

    assert store.finish_session(sid, "success", None).finish_reason == "success"
    assert store.finish_session(sid, "errored", "late").finish_reason == "success"  # first reason wins
    assert store.stale_sessions(older_than_s=-1) == [again]


def test_metrics_steps_count_on_from_a_resume(store: Store) -> None:
    """The console's step of a call: optim_steps so far, from 0, or from the step a resume loaded (mark_step); a
    later load starts the count again from its checkpoint's step. Non-finite and non-numeric values are dropped."""
    for kind in ("forward_backward", "optim_step", "forward_backward", "optim_step", "forward_backward"):
        store.add_metrics("m", kind, {"loss:sum": 1.0, "bad": float("nan"), "flag": True})
    assert [(k, step) for k, step, _, _ in store.metrics_of("m")] == [
        ("forward_backward", 0), ("optim_step", 0), ("forward_backward", 1), ("optim_step", 1),
        ("forward_backward", 2)]
    assert store.metrics_of("m")[0][3] == {"loss:sum": 1.0}
    store.mark_step("r", 40)  # created from a checkpoint saved at step 40
    for kind in ("forward_backward", "optim_step", "forward_backward"):
        store.add_metrics("r", kind, {"loss:sum": 2.0})
    store.mark_step("r", 7)  # then loaded an older checkpoint with its optimizer state
    store.add_metrics("r", "forward_backward", {"loss:sum": 3.0})
    assert [(k, step) for k, step, _, m in store.metrics_of("r") if m] == [
        ("forward_backward", 40), ("optim_step", 40), ("forward_backward", 41), ("forward_backward", 7)]


def test_sampling_sessions(store: Store) -> None:
    sid = store.create_session(owner="o")
    first = store.create_sampling_session(sid, 2, base_model="B", model_path="tinker://m/sampler_weights/x")
    assert first.sampling_session_id == f"{sid}:sample:2"
    assert store.create_sampling_session(sid, 2, base_model="other") == first  # retried create: same sampler
    assert [store.join_sampling_session(first.sampling_session_id) for _ in range(2)] == [1, 2]
    with pytest.raises(KeyError):
        store.join_sampling_session("missing")


def test_idempotent_futures_and_completion_cursor(store: Store) -> None:
    big = 7 * 10**17  # sample seq_ids reach ~1e18 (§1.7)
    assert store.insert_future("r1", "sample", owner="o", idempotency=("sample", "S", big), sampling_session_id="S",
                               clone_id=0) == ("r1", True)
    assert store.insert_future("r2", "sample", owner="o", idempotency=("sample", "S", big)) == ("r1", False)
    assert store.get_future("r2") is None
    store.insert_future("r3", "optim_step", owner="o", idempotency=("train", "M", 2))
    c1 = store.finish_future("r3", "application/json", b"{}")
    c2 = store.fail_future("r1", "boom", "user")
    assert 0 < c1 < c2
    assert store.finish_future("r1", "application/json", b"{}") == 0  # completes once
    row = store.get_future("r1")
    assert (row.status, row.error) == ("error", {"error": "boom", "category": "user"})
    assert [r.request_id for r in store.completions("S", 0, after_cursor=0)] == ["r1"]
    assert store.completions("S", 0, after_cursor=c2) == []

    store.insert_future("r4", "optim_step", owner="o", idempotency=("train", "M", 3))
    store.discard_future("r4")  # the engine refused it: the retry of seq 3 is a new request
    assert store.get_future("r4") is None
    assert store.insert_future("r5", "optim_step", owner="o", idempotency=("train", "M", 3)) == ("r5", True)
    store.discard_future("r3")  # only a pending future can be discarded
    assert store.get_future("r3").status == "done"
    assert store.insert_future("r6", "optim_step", owner="o", idempotency=("train", "M", 2)) == ("r3", False)


def test_restart_marks_pending_lost_and_prune(tmp_path) -> None:
    path = tmp_path / "db.sqlite3"
    s = Store(path)
    s.insert_future("p", "forward_backward", owner="o", idempotency=("train", "M", 1))
    s.insert_future("q", "optim_step", owner="o")
    s.finish_future("q", "application/json", b"{}")
    s.close()

    s = Store(path)  # a new process: the engine that owned "p" is gone
    assert s.mark_lost() == 1
    assert s.get_future("p").status == "lost"
    assert s.insert_future("x", "sample", owner="o")[1]
    s.mark_retrieved(["q"], "other")  # not theirs: no effect
    assert s.prune(future_ttl_s=3600, retrieved_ttl_s=-1) == 0
    s.mark_retrieved(["q"], "o")
    assert s.prune(future_ttl_s=3600, retrieved_ttl_s=-1) == 1  # q was fetched: gone
    assert s.get_future("q") is None and s.get_future("p") is not None
    assert s.prune(future_ttl_s=-1, retrieved_ttl_s=3600) == 1  # p finished (lost) long enough ago
    assert s.insert_future("p2", "forward_backward", owner="o", idempotency=("train", "M", 1)) == ("p2", True)
    first = s.create_session(owner="o", idempotency_key="k1")
    assert s.create_session(owner="o", idempotency_key="k1") == first  # the SDK's retry
    s.prune(future_ttl_s=3600, retrieved_ttl_s=3600)
    assert s.create_session(owner="o", idempotency_key="k1") == first  # young: kept
    s.prune(future_ttl_s=-1, retrieved_ttl_s=3600)  # as old as a finished future's time to live: gone
    assert s.create_session(owner="o", idempotency_key="k1") != first
    s.close()


def test_completion_cursor_only_grows_across_prune_and_restart(tmp_path) -> None:
    """An SDK poller that outlives a restart holds the last cursor it was given and asks for completions after it:
    a restart after every completed future was pruned must not give cursors from 0 again."""
    path = tmp_path / "db.sqlite3"
    s = Store(path)
    for i in range(5):
        s.insert_future(f"r{i}", "sample", owner="o", sampling_session_id="S", clone_id=0)
        held = s.finish_future(f"r{i}", "application/json", b"{}")
    s.mark_retrieved([f"r{i}" for i in range(5)], "o")
    assert s.prune(future_ttl_s=3600, retrieved_ttl_s=-1) == 5  # no future left to say how far the cursor went
    s.close()
    s = Store(path)
    s.insert_future("after", "sample", owner="o", sampling_session_id="S", clone_id=0)
    assert s.finish_future("after", "application/json", b"{}") > held
    assert [r.request_id for r in s.completions("S", 0, after_cursor=held)] == ["after"]
    s.close()


def test_a_transaction_that_cannot_begin_lets_go_of_the_store(tmp_path) -> None:
    """BEGIN IMMEDIATE failing (another process holds the file's write lock past busy_timeout) raises to its caller
    and leaves the store usable from every thread once the other process lets go (it used to keep the store's lock:
    every later call, from any other thread, hung)."""
    import sqlite3

    path = tmp_path / "db.sqlite3"
    s = Store(path)
    sid = s.create_session(owner="o")
    s._db.execute("PRAGMA busy_timeout=100")  # not 30 s: the test waits for it
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a sqlite3 shell writing to the file
    errors, failed, stay = [], threading.Event(), threading.Event()

    def first():  # stays alive afterwards, as a server's threads do (a dead owner's id could be reused by the next)
        try:
            s.heartbeat(sid)
        except sqlite3.OperationalError as e:
            errors.append(e)
        failed.set()
        stay.wait()

    threading.Thread(target=first, daemon=True).start()
    try:
        assert failed.wait(30) and "locked" in str(errors[0]), errors
        other.execute("ROLLBACK")
        other.close()
        got = []
        other_thread = threading.Thread(target=lambda: got.extend([s.get_session(sid), s.heartbeat(sid)]),
                                        daemon=True)
        other_thread.start()  # daemon: a hang fails the test instead of blocking it
        other_thread.join(10)
        assert not other_thread.is_alive(), "the store's lock was never released"
    finally:
        stay.set()
    assert got[0].session_id == sid
    s.close()


def test_registry_long_poll_wakes_on_completion(store: Store) -> None:
    """retrieve() sleeps on an event (no polling) and wakes as soon as the engine thread finishes the future."""

    async def scenario() -> None:
        reg = FutureRegistry(store, long_poll_s=5.0)
        reg.bind_loop(asyncio.get_running_loop())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        rid = reg.register(fut, "optim_step", owner="o", model_id="M")
        threading.Timer(0.2, fut.set_result, args=(types.OptimStepResponse(metrics={"lr:mean": 1.0}),)).start()
        t0 = time.monotonic()
        reply = await reg.retrieve(rid, accept_proto=False, owner="o")
        assert 0.15 < time.monotonic() - t0 < 2.0
        assert json.loads(reply.body) == {"metrics": {"lr:mean": 1.0}}

        slow: concurrent.futures.Future = concurrent.futures.Future()
        rid2 = reg.register(slow, "forward_backward", owner="o")
        reply = await reg.retrieve(rid2, accept_proto=True, timeout=0.1, owner="o")
        assert json.loads(reply.body) == {"type": "try_again", "request_id": rid2, "queue_state": "active"}

        slow.set_exception(UserError("unknown loss_fn 'x'"))
        reply = await reg.retrieve(rid2, accept_proto=True, owner="o")
        assert json.loads(reply.body) == {"error": "unknown loss_fn 'x'", "category": "user"}

        with pytest.raises(ApiError) as err:
            await reg.retrieve("missing", accept_proto=True, owner="o")
        assert err.value.status == 404
        with pytest.raises(ApiError) as err:  # another key's request: exactly like an unknown one
            await reg.retrieve(rid, accept_proto=True, owner="someone else")
        assert err.value.status == 404 and "unknown request_id" in err.value.message

        # Another key asking for a request id while its owner waits on it leaves the owner's wake-up in place (it
        # used to remove the shared event: the owner heard of its result only when its long poll ran out).
        pending: concurrent.futures.Future = concurrent.futures.Future()
        rid3 = reg.register(pending, "optim_step", owner="o")
        waiting = asyncio.ensure_future(reg.retrieve(rid3, accept_proto=False, owner="o"))
        await asyncio.sleep(0.1)
        with pytest.raises(ApiError):
            await reg.retrieve(rid3, accept_proto=False, owner="someone else")
        t0 = time.monotonic()
        pending.set_result(types.OptimStepResponse(metrics={}))
        reply = await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - t0 < 2.0 and json.loads(reply.body) == {"metrics": {}}

    asyncio.run(scenario())


def test_requests_the_engine_stops_under_read_as_lost(store: Store) -> None:
    """A request failed by the engine's shutdown (Stopped) is recorded as lost, as after a restart: a sample's poll
    answers 410, which the SDK resubmits (recorded as a server error it answered 200 with an error, and the SDK
    gave up), and a training request says the server restarted before it finished."""
    from tinker_jax.errors import Stopped

    async def scenario() -> None:
        reg = FutureRegistry(store, long_poll_s=5.0)
        reg.bind_loop(asyncio.get_running_loop())
        sample: concurrent.futures.Future = concurrent.futures.Future()
        train: concurrent.futures.Future = concurrent.futures.Future()
        rs = reg.register(sample, "sample", owner="o", sampling_session_id="S")
        rt = reg.register(train, "forward_backward", owner="o", model_id="M")
        sample.set_exception(Stopped("sampler: stopped"))
        train.set_exception(Stopped("engine: shut down"))
        reply = await reg.retrieve(rs, accept_proto=False, owner="o")
        assert reply.status == 410
        reply = await reg.retrieve(rt, accept_proto=False, owner="o")
        assert "restarted before this request finished" in json.loads(reply.body)["error"]
        assert store.get_future(rs).status == store.get_future(rt).status == "lost"

    asyncio.run(scenario())


def test_registry_submit_dedupes_and_classifies_errors(store: Store) -> None:
    async def scenario() -> None:
        reg = FutureRegistry(store)
        calls = []

        def start() -> concurrent.futures.Future:
            calls.append(1)
            f: concurrent.futures.Future = concurrent.futures.Future()
            f.set_result(types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[
                {"logprobs": types.TensorData.from_numpy(np.array([-1.0], np.float32))}], metrics={"loss:sum": 1}))
            return f

        rid, started = reg.submit("forward_backward", start, owner="o", idempotency=("train", "M", 1), model_id="M")
        retry = reg.submit("forward_backward", start, owner="o", idempotency=("train", "M", 1))
        assert started and retry == (rid, False)
        assert calls == [1]  # a retried submit does not run twice
        reply = await reg.retrieve(rid, accept_proto=True, owner="o")
        out = response_conv.deserialize_forward_backward_output(reply.body)
        assert out.metrics == {"loss:sum": 1.0} and reply.content_type == "application/x-protobuf"

        def bad_input() -> concurrent.futures.Future:
            raise UserError("data[0]: empty datum")

        def bug() -> concurrent.futures.Future:
            raise RuntimeError("engine crashed")

        def value_error_bug() -> concurrent.futures.Future:  # not a UserError: the server's fault
            raise ValueError("operands could not be broadcast together")

        for start_fn, category in ((bad_input, "user"), (bug, "server"), (value_error_bug, "server")):
            rid, _ = reg.submit("forward_backward", start_fn, owner="o")
            assert json.loads((await reg.retrieve(rid, accept_proto=True, owner="o")).body)["category"] == category

        # Overloaded: nothing was queued, so neither the future nor its key is kept; the retry starts afresh.
        def full() -> concurrent.futures.Future:
            raise Overloaded("queue full", retry_after_s=2)

        with pytest.raises(Overloaded):
            reg.submit("forward_backward", full, owner="o", idempotency=("train", "M", 2), model_id="M")
        rid, started = reg.submit("forward_backward", start, owner="o", idempotency=("train", "M", 2), model_id="M")
        assert started and calls == [1, 1]
        assert (await reg.retrieve(rid, accept_proto=True, owner="o")).content_type == "application/x-protobuf"

        wrong = concurrent.futures.Future()
        wrong.set_result({"not": "a ForwardBackwardOutput"})
        wrong_id = reg.register(wrong, "forward", owner="o")
        body = json.loads((await reg.retrieve(wrong_id, accept_proto=True, owner="o")).body)
        assert body["category"] == "server" and "encode" in body["error"]

    asyncio.run(scenario())


def test_lost_sample_answers_410(tmp_path) -> None:
    """A sample whose promise died with the previous process gets 410, which makes the SDK resubmit it."""
    s = Store(tmp_path / "db.sqlite3")
    s.insert_future("smp", "sample", owner="o")
    s.insert_future("trn", "optim_step", owner="o")
    s.mark_lost()
    reg = FutureRegistry(s)
    sample = asyncio.run(reg.retrieve("smp", accept_proto=True, owner="o"))
    train = asyncio.run(reg.retrieve("trn", accept_proto=False, owner="o"))
    assert sample.status == 410 and train.status == 200
    assert json.loads(train.body)["category"] == "server"
    s.close()


def test_registry_limits_unfinished_requests_per_key(store: Store) -> None:
    """One key cannot fill the engine's queues: past max_queued_per_key its submits are refused (429, nothing
    stored, nothing started), another key's still go in, and a finished request frees its place."""
    reg = FutureRegistry(store, max_queued_per_key=2)
    pending: list[concurrent.futures.Future] = []

    def start() -> concurrent.futures.Future:
        pending.append(concurrent.futures.Future())
        return pending[-1]

    reg.submit("optim_step", start, owner="a", idempotency=("train", "M", 1))
    reg.submit("optim_step", start, owner="a", idempotency=("train", "M", 2))
    with pytest.raises(Overloaded, match="max_queued_per_key"):
        reg.submit("optim_step", start, owner="a", idempotency=("train", "M", 3))
    assert len(pending) == 2 and reg.queued("a") == 2
    reg.submit("optim_step", start, owner="b", idempotency=("train", "N", 1))  # another key is not held back
    assert len(pending) == 3

    def refused() -> concurrent.futures.Future:
        raise UserError("lora_config.rank: too large")

    pending[0].set_result(types.OptimStepResponse(metrics={}))  # a's first finishes: its place is free again
    assert reg.queued("a") == 1
    reg.submit("optim_step", refused, owner="a", idempotency=("train", "M", 3))  # a refusal does not keep a place
    assert reg.queued("a") == 1
    _, started = reg.submit("optim_step", start, owner="a", idempotency=("train", "M", 4))
    assert started and reg.queued("a") == 2 and len(pending) == 4
    reg.close()
