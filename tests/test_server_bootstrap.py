"""The bootstrap routes over real HTTP on loopback, driven by the unmodified tinker SDK (0.38) where it can be.

uvicorn runs in a thread on a free 127.0.0.1 port; engine futures are registered straight into the app's registry
(the training/sampling routes do not exist yet) and fetched with the SDK's own future poller.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tinker
import zstandard
from tinker import types
from tinker.lib.api_future_impl import _APIFuture
from tinker.lib.client_connection_pool_type import ClientConnectionPoolType

from server.app import build_app
from server.deps import key_tag
from server.settings import ServerSettings
from server_util import uvicorn_thread
from tinker_jax.errors import UserError

API_KEY = "tml-test"
OWNER = key_tag(API_KEY)  # futures registered in-process belong to this key, as the routes would record
LONG_POLL_S = 0.4  # short, so try_again paths run in well under a second


class TinyEngine:
    """The one engine method the bootstrap routes use."""

    def capabilities(self) -> list[str]:
        return ["Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B"]

    def health(self) -> dict:  # /healthz asks
        return {"ok": True, "problems": []}


@dataclass
class Server:
    base_url: str
    app: object
    http: httpx.Client  # one client: a fresh httpx client per call costs ~50 ms of TLS setup

    def url(self, path: str) -> str:
        return f"{self.base_url}/api/v1/{path}"

    @property
    def futures(self):
        return self.app.state.futures

    @property
    def store(self):
        return self.app.state.store


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("data"), api_keys=(API_KEY,),
                              long_poll_s=LONG_POLL_S, retrieve_futures_poll_s=LONG_POLL_S)
    app = build_app(TinyEngine(), settings)
    with uvicorn_thread(app) as port, httpx.Client(timeout=10) as http:
        yield Server(f"http://127.0.0.1:{port}", app, http)


@pytest.fixture(scope="module")
def service_client(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    yield client
    client.close("success").result(timeout=10)


def post(server: Server, path: str, body=None, *, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    headers.update(kw.pop("headers", {}))
    return server.http.post(server.url(path), json=body, headers=headers, **kw)


def sdk_future(client: tinker.ServiceClient, model_cls: type, request_id: str, request_type: str):
    """The SDK's own retrieve_future poller (what every TrainingClient/SamplingClient call returns)."""
    return _APIFuture(model_cls, client.holder, types.UntypedAPIFuture(request_id=request_id), time.time(),
                      request_type)


# --- bootstrap with the SDK --------------------------------------------------------------------------------------


def test_sdk_bootstrap_session_capabilities_heartbeat_finish(server: Server) -> None:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ServiceClient.get_server_capabilities is deprecated
        caps = client.get_server_capabilities()
    assert [m.model_name for m in caps.supported_models] == TinyEngine().capabilities()
    assert caps.supported_models[0].trainable and caps.supported_models[0].sampleable
    rest = tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
    assert rest.get_server_capabilities().result().supported_models == caps.supported_models

    session_id = client.holder.get_session_id()  # the lazy create_session a first training call triggers
    row = server.store.get_session(session_id)
    assert row is not None and row.finished is None and row.sdk_version == tinker.__version__

    async def beat():  # the SDK sends this every 10 s; call it once directly instead of waiting
        with client.holder.aclient(ClientConnectionPoolType.SESSION) as c:
            return await c.service.session_heartbeat(session_id=session_id, max_retries=0, timeout=10)

    assert client.holder.run_coroutine_threadsafe(beat()).result(timeout=10).type == "session_heartbeat"
    assert server.store.get_session(session_id).last_heartbeat >= row.last_heartbeat

    client.close("success", detail="done").result(timeout=10)  # POST /sessions/{id}/finish
    assert server.store.get_session(session_id).finish_reason == "success"
    finished = post(server, "session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    assert finished.status_code == 410  # tells the SDK to stop heartbeating
    assert post(server, "session_heartbeat", {"session_id": "nope"}).status_code == 404


def test_wrong_key_is_401(server: Server) -> None:
    for key in (None, "tml-wrong"):
        resp = post(server, "client/config", {"sdk_version": "0.38.0"}, key=key)
        assert resp.status_code == 401 and resp.json()["error"]
    assert server.http.get(server.url("healthz")).json() == {"status": "ok"}  # liveness needs no key
    bad = tinker.ServiceClient(base_url=server.base_url, api_key="tml-wrong")
    with pytest.raises(tinker.AuthenticationError), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        bad.get_server_capabilities()


def test_client_config_advertises_only_implemented_flags(server: Server) -> None:
    config = types.ClientConfigResponse.model_validate(post(server, "client/config", {"sdk_version": "0.38.0"}).json())
    assert config.proto_compress_fwdbwd and config.pjwt_auth_enabled  # POST /auth/token exists (server.tokens)
    assert not config.sample_use_retrieve_futures and config.sample_join_sampling_session
    assert not config.custom_loss_server_side
    dyn = post(server, "client/dynamic_config", {"sdk_version": "0.38.0"}).json()
    assert types.ClientDynamicConfigResponse.model_validate(dyn) == \
        types.ClientDynamicConfigResponse(sample_cancel_enabled=True)  # /cancel_future exists
    assert post(server, "telemetry", {"events": [], "platform": "linux", "sdk_version": "0.38.0",
                                      "session_id": "sessionless-x", "process_uuid": "u"}).json() == \
        {"status": "accepted"}


# --- futures over HTTP -------------------------------------------------------------------------------------------


def test_retrieve_future_long_polls_then_try_again(server: Server) -> None:
    pending: concurrent.futures.Future = concurrent.futures.Future()
    rid = server.futures.register(pending, "optim_step", owner=OWNER)
    t0 = time.monotonic()
    resp = post(server, "retrieve_future", {"request_id": rid, "allow_metadata_only": True})
    held = time.monotonic() - t0
    assert resp.status_code == 200 and held >= LONG_POLL_S * 0.9  # held, not answered at once
    assert resp.json() == {"type": "try_again", "request_id": rid, "queue_state": "active"}

    threading.Timer(0.05, pending.set_result, args=({"metrics": {"grad_norm:mean": 0.5}},)).start()
    t0 = time.monotonic()
    resp = post(server, "retrieve_future", {"request_id": rid})
    assert time.monotonic() - t0 < LONG_POLL_S  # woken by the completion, not by the timeout
    assert resp.json() == {"metrics": {"grad_norm:mean": 0.5}}

    missing = post(server, "retrieve_future", {"request_id": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_sdk_future_poller_reads_proto_results_and_errors(server: Server, service_client) -> None:
    """Each engine future completes after a few try_again rounds; the SDK's poller must decode what we serve."""
    fwd: concurrent.futures.Future = concurrent.futures.Future()
    smp: concurrent.futures.Future = concurrent.futures.Future()
    opt: concurrent.futures.Future = concurrent.futures.Future()
    bad: concurrent.futures.Future = concurrent.futures.Future()
    ids = [server.futures.register(fwd, "forward_backward", owner=OWNER),
           server.futures.register(smp, "sample", owner=OWNER, sampling_session_id="S", seq_id=0),
           server.futures.register(opt, "optim_step", owner=OWNER),
           server.futures.register(bad, "forward_backward", owner=OWNER)]
    polls = [sdk_future(service_client, types.ForwardBackwardOutput, ids[0], "ForwardBackward"),
             sdk_future(service_client, types.SampleResponse, ids[1], "Sample"),
             sdk_future(service_client, types.OptimStepResponse, ids[2], "OptimStep"),
             sdk_future(service_client, types.ForwardBackwardOutput, ids[3], "ForwardBackward")]
    time.sleep(2.5 * LONG_POLL_S)

    logprobs = np.array([-0.5, -1.5, -2.0], np.float32)
    fwd.set_result(types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(logprobs)}],
        metrics={"loss:sum": 4.0}))
    smp.set_result(types.SampleResponse(
        sequences=[types.SampledSequence(stop_reason="stop", sequence_id="", tokens_np=np.array([5, 2], np.int32),
                                         logprobs_np=np.array([-0.1, -0.2], np.float32))],
        _prompt_logprobs_list=[None, -0.75]))
    opt.set_result(types.OptimStepResponse(metrics={"lr:mean": 1e-4}))
    bad.set_exception(UserError("loss_fn_config.beta: unknown key for loss 'ppo'"))

    out = polls[0].result(timeout=10)
    assert out.metrics == {"loss:sum": 4.0} and out.loss_fn_outputs[0]["logprobs"].tolist() == logprobs.tolist()
    sample = polls[1].result(timeout=10)
    assert sample.sequences[0].tokens == [5, 2] and sample.prompt_logprobs == [None, -0.75]
    assert polls[2].result(timeout=10).metrics == {"lr:mean": 1e-4}
    with pytest.raises(tinker.RequestFailedError) as err:
        polls[3].result(timeout=10)
    assert err.value.category == types.RequestErrorCategory.User and "loss_fn_config.beta" in err.value.message


def test_old_sdk_accept_json_gets_json_results(server: Server) -> None:
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[
        {"logprobs": types.TensorData.from_numpy(np.array([-1.0], np.float32))}], metrics={"loss:sum": 1.0}))
    rid = server.futures.register(done, "forward", owner=OWNER)
    as_proto = post(server, "retrieve_future", {"request_id": rid},
                    headers={"Accept": "application/x-protobuf, application/json"})  # SDK 0.18.1 - 0.24
    assert as_proto.headers["content-type"] == "application/x-protobuf"
    as_json = post(server, "retrieve_future", {"request_id": rid}, headers={"Accept": "application/json"})
    assert as_json.json()["loss_fn_outputs"] == [{"logprobs": {"data": [-1.0], "dtype": "float32", "shape": [1]}}]


def test_retrieve_futures_reports_sampler_completions(server: Server) -> None:
    futs = [concurrent.futures.Future() for _ in range(3)]
    session = server.store.create_session(owner=OWNER)  # retrieve_futures checks the sampler is the caller's
    r = server.store.create_sampling_session(session, 0, base_model="Qwen/Qwen3-0.6B").sampling_session_id
    ids = [server.futures.register(futs[0], "sample", owner=OWNER, sampling_session_id=r, seq_id=0),
           server.futures.register(futs[1], "sample", owner=OWNER, sampling_session_id=r, seq_id=1),
           server.futures.register(futs[2], "sample", owner=OWNER, sampling_session_id=r,
                                   seq_id=1_000_000_000)]  # clone 1
    target = {"type": "sampling_session", "sampling_session_id": r, "cloned_sampler_id": 0}

    quick = post(server, "retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 0})
    assert quick.json()["completions"] == []

    threading.Timer(0.1, futs[1].set_exception, args=(RuntimeError("sampler died"),)).start()
    first = types.FuturesRetrieveResponse.model_validate(
        post(server, "retrieve_futures", {"target": target, "prev_cursor": 0, "retrieved_request_ids": []}).json())
    assert [(c.state, c.request_id) for c in first.completions] == [("failed", ids[1])]

    one = types.SampleResponse(sequences=[types.SampledSequence(stop_reason="length", sequence_id="",
                                                                tokens_np=np.array([1], np.int32))])
    futs[2].set_result(one)  # other clone: not reported to clone 0
    futs[0].set_result(one)
    second = types.FuturesRetrieveResponse.model_validate(
        post(server, "retrieve_futures", {"target": target, "prev_cursor": first.cursor}).json())
    assert [(c.state, c.request_id) for c in second.completions] == [("finished", ids[0])]
    assert second.completions[0].response_payload_uncompressed_size > 0 and second.cursor > first.cursor


# --- transport and errors ----------------------------------------------------------------------------------------


def test_zstd_bodies_and_error_shape(server: Server) -> None:
    body = json.dumps({"tags": [], "sdk_version": "0.38.0", "user_metadata": {}, "type": "create_session"}).encode()
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json", "Content-Encoding": "zstd"}
    ok = server.http.post(server.url("create_session"), content=zstandard.ZstdCompressor().compress(body),
                    headers=headers)
    assert ok.status_code == 200 and ok.json()["type"] == "create_session"

    garbage = server.http.post(server.url("create_session"), content=b"not zstd", headers=headers)
    assert garbage.status_code == 400 and "zstd" in garbage.json()["error"]
    brotli = server.http.post(server.url("create_session"), content=body, headers={**headers, "Content-Encoding": "br"})
    assert brotli.status_code == 415

    not_json = server.http.post(server.url("create_session"), content=b"{oops",
                                headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["category"] == "user"
    untyped = server.http.post(server.url("create_session"), content=b"{}", headers={"X-API-Key": API_KEY})
    assert untyped.status_code == 415 and "Content-Type" in untyped.json()["error"]  # the SDK always sends one
    assert "Traceback" not in not_json.text
    bad_field = post(server, "create_session", {"tags": "not-a-list", "sdk_version": "0.38.0"})
    assert bad_field.status_code == 400 and bad_field.json()["error"].startswith("CreateSessionRequest.tags")

    retried = [post(server, "create_session", {"tags": []}, headers={"X-Idempotency-Key": "stainless-retry-1"})
               for _ in range(2)]
    assert retried[0].json()["session_id"] == retried[1].json()["session_id"]
    unknown = post(server, "sessions/nope/finish", {"reason": {"type": "success"}, "detail": None})
    assert unknown.status_code == 404 and unknown.json()["error"]
