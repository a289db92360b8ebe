"""The model, training, checkpoint and sampling routes over HTTP against a fake engine (no JAX, runs in seconds):
wire shapes, idempotency keys, ownership, bad input (always a 4xx or a failed future with a body, never a 500),
session expiry and release, checkpoint REST routing, and `tinker_jax.serve`'s configuration rules.

The real engine and the real SDK are exercised end to end in tests/test_conformance.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import shutil
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zstandard
from fastapi.testclient import TestClient
from tinker import types
from tinker.proto import response_conv
from tinker.proto import tinker_public_pb2 as pb

from server.app import build_app
from server.deps import key_tag
from server.settings import ServerSettings
from tinker_jax.engine import files
from tinker_jax.engine.api import EngineAPI
from tinker_jax.engine.registry import Registry, TinkerPath, check_name
from tinker_jax.errors import NotFound, Overloaded, Unavailable, UserError
from tinker_jax.futures import failed, resolved
from tinker_jax.training.optim import AdamHP, DimuonHP, check_optim_params

KEY, OTHER_KEY = "tml-routes", "tml-other"
BASE = "base-a"
VOCAB = 100


class FakeEngine:
    """EngineAPI without JAX, over the engine's real Registry; one worker thread keeps submission order.
    Knobs: `hold` (an Event) pauses the worker so tests can observe queued requests; `refuse` (a count) makes that
    many next submits raise Overloaded, as a full queue does; `fail_next` (an exception) fails the next request run
    by the worker with it. `tenants` records the tenant of every accepted submit."""

    def __init__(self, data_dir: Path):
        self.registry = Registry(data_dir / "engine.db", data_dir)
        self.models: dict[str, dict[str, Any]] = {}
        self.snapshots: dict[str, str | None] = {}  # sampler id -> base model
        self.calls: list[tuple] = []
        self.tenants: list[str | None] = []
        self.unloaded: list[str] = []
        self.released: list[str] = []
        self.refuse = 0
        self.fail_next: BaseException | None = None
        self.hold = threading.Event()
        self.hold.set()
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def _queue(self, fn, tenant: str | None) -> concurrent.futures.Future:
        if self.refuse:
            self.refuse -= 1
            raise Overloaded("too many requests in flight for this session; retry shortly", retry_after_s=0.2)
        self.tenants.append(tenant)

        def run():
            self.hold.wait(10)
            exc, self.fail_next = self.fail_next, None
            if exc is not None:
                raise exc
            return fn()
        return self._pool.submit(run)

    def _model(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.models:
            raise NotFound(f"model_id: unknown model {model_id!r}")
        return self.models[model_id]

    def _meta(self, path: str) -> dict[str, Any]:
        p = TinkerPath.parse(path)
        if self.registry.get_checkpoint(p) is None:
            raise NotFound(f"path: checkpoint {path} not found")
        return {"base_model": self.registry.get_run(p.run_id).base_model, "lora_rank": 4}

    # --- discovery and runs
    def capabilities(self) -> list[str]:
        return [BASE]

    def tokenizer_path(self, base_model: str) -> Path:
        return Path("/nonexistent") / base_model

    def _new_run(self, base_model: str, rank: int, model_id: str, user_metadata, owner) -> str:
        self.models[model_id] = {"base_model": base_model, "lora_rank": rank, "step": 0}
        self.registry.add_run(model_id, base_model, lora_rank=rank, full_finetune=False, meta={},
                              user_metadata=user_metadata, owner=owner)
        self.calls.append(("create_model", model_id, rank))
        return model_id

    def create_model(self, base_model, *, rank=32, seed=None, train_mlp=True, train_attn=True, train_unembed=True,
                     full_finetune=None, model_id=None, user_metadata=None, owner=None, tenant=None, optimizer=None):
        try:
            if base_model not in self.capabilities():
                raise NotFound(f"base_model: unknown model {base_model!r}")
            if rank > 256:  # the real engine's worker.check_rank, with lora.max_rank 256
                raise UserError(f"lora_config.rank: {rank} exceeds this server's limit of 256")
            model_id = check_name(model_id or f"run-{uuid.uuid4().hex[:8]}", "model_id")
            if model_id in self.models:
                raise UserError(f"model_id: {model_id!r} already exists")
        except UserError as e:
            return failed(e)
        return self._queue(lambda: self._new_run(base_model, rank, model_id, user_metadata, owner), tenant)

    def create_model_from_state(self, path, optimizer, *, model_id=None, base_model=None, user_metadata=None,
                                owner=None, tenant=None, optimizer_config=None):
        try:
            meta = self._meta(path)
        except UserError as e:
            return failed(e)

        def op():
            mid = self._new_run(base_model or meta["base_model"], meta["lora_rank"], model_id, user_metadata, owner)
            self.calls.append(("load_state", mid, path, optimizer))
            return types.LoadWeightsResponse(path=path, model_id=mid)
        return self._queue(op, tenant)

    def unload_model(self, model_id, *, tenant=None):
        def op():
            self.unloaded.append(model_id)
            self.models.pop(model_id, None)
        return self._queue(op, tenant)

    def get_info(self, model_id):
        m = self._model(model_id)
        return types.GetInfoResponse(model_id=model_id, model_name=m["base_model"], is_lora=True,
                                     lora_rank=m["lora_rank"],
                                     model_data=types.get_info_response.ModelData(model_name=m["base_model"]))

    # --- training
    def forward_backward(self, model_id, data, loss_fn, loss_fn_config=None, forward_only=False, *, tenant=None):
        def op():
            self._model(model_id)
            if loss_fn not in ("cross_entropy", "importance_sampling"):
                raise UserError(f"unknown loss_fn {loss_fn!r}")
            outs = []
            for i, d in enumerate(data):
                toks = [t for c in d.model_input.chunks for t in c.tokens]
                if any(not 0 <= t < VOCAB for t in toks):
                    raise UserError(f"datum[{i}].model_input: token id outside the vocabulary [0, {VOCAB})")
                target = d.loss_fn_inputs["target_tokens"]
                if target.shape[0] != len(toks):
                    raise UserError(f"datum[{i}].loss_fn_inputs['target_tokens']: first dimension does not match")
                outs.append({"logprobs": types.TensorData.from_numpy(np.full(len(toks), -1.0, np.float32))})
            self.calls.append(("forward" if forward_only else "forward_backward", model_id, len(data)))
            return types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outs,
                                               metrics={"loss:sum": float(len(data))})
        return self._queue(op, tenant)

    def optim_step(self, model_id, adam, *, tenant=None):
        hp = adam if isinstance(adam, (AdamHP, DimuonHP)) else check_optim_params(adam)

        def op():
            self._model(model_id)["step"] += 1
            self.calls.append(("optim_step", model_id, hp.learning_rate, hp.kind))
            return types.OptimStepResponse(metrics={"learning_rate:mean": hp.learning_rate})
        return self._queue(op, tenant)

    # --- checkpoints
    def _save(self, model_id, kind, name, ttl_seconds=None, user_metadata=None) -> str:
        p = TinkerPath(model_id, kind, check_name(name, "name"))
        d = self.registry.checkpoint_dir(p)
        d.mkdir(parents=True, exist_ok=True)
        (d / "meta.json").write_text(json.dumps({"base_model": self._model(model_id)["base_model"]}))
        self.registry.add_checkpoint(p, size_bytes=123, step=0, ttl_seconds=ttl_seconds, user_metadata=user_metadata)
        return str(p)

    def save_state(self, model_id, name, ttl_seconds=None, user_metadata=None, *, overwrite=True, tenant=None):
        if not overwrite and self.get_checkpoint(f"tinker://{model_id}/weights/{name}") is not None:
            return failed(UserError(f"path: checkpoint tinker://{model_id}/weights/{name} already exists"))
        return self._queue(lambda: types.SaveWeightsResponse(
            path=self._save(model_id, "weights", name, ttl_seconds, user_metadata)), tenant)

    def load_state(self, model_id, path, optimizer, *, tenant=None):
        def op():
            self._meta(path)
            self.calls.append(("load_state", model_id, path, optimizer))
            return types.LoadWeightsResponse(path=path, model_id=model_id)
        return self._queue(op, tenant)

    def save_weights_for_sampler(self, model_id, name, ttl_seconds=None, user_metadata=None, *, tenant=None):
        def op():
            path = self._save(model_id, "sampler_weights", name, ttl_seconds, user_metadata) if name else None
            sid = f"fake-sampler-{uuid.uuid4().hex[:6]}"
            self.snapshots[sid] = self._model(model_id)["base_model"]
            return path, sid
        return self._queue(op, tenant)

    def save_weights_external(self, model_id, name, ttl_seconds=None, user_metadata=None, *, tenant=None):
        return self._queue(lambda: (self._save(model_id, "external_weights", name, ttl_seconds, user_metadata), 123),
                           tenant)

    # The engine's own listing, lookup and archive of checkpoint files (they need only the registry).
    def checkpoint_files(self, path):
        return files.checkpoint_files(self.registry, path)

    def checkpoint_file(self, path, name):
        return files.checkpoint_file(self.registry, path, name)

    def checkpoint_archive(self, path):
        return files.checkpoint_archive(self.registry, path)

    def copy_checkpoint(self, source, run_id, *, owner, ttl_seconds=None):
        return files.copy_checkpoint(self.registry, source, run_id, owner=owner, ttl_seconds=ttl_seconds)

    # --- sampling
    def create_sampler(self, model_path=None, base_model=None, *, tenant=None) -> str:
        base = self._meta(model_path)["base_model"] if model_path else base_model
        sid = f"fake-sampler-{uuid.uuid4().hex[:6]}"
        self.snapshots[sid] = base
        self.calls.append(("create_sampler", model_path, base_model))
        return sid

    def release_sampler(self, sampler_id):
        self.released.append(sampler_id)
        self.snapshots.pop(sampler_id, None)

    def sampler_base_model(self, sampler_id):
        if sampler_id not in self.snapshots:
            raise NotFound(f"sampling_session_id: unknown sampler {sampler_id!r}")
        return self.snapshots[sampler_id]

    def sample(self, sampler_id, prompt, num_samples, sampling_params, include_prompt_logprobs=False,
               topk_prompt_logprobs=0, *, tenant=None, **options):  # options: the engine's, ignored here
        if sampler_id not in self.snapshots:
            return failed(NotFound(f"sampling_session_id: unknown sampler {sampler_id!r}"))
        if not 1 <= num_samples <= 16:  # the real engine's bounds checks, in short (sampling.params)
            return failed(UserError(f"num_samples: must be an integer in [1, 16], got {num_samples!r}"))
        if not isinstance(sampling_params.max_tokens, int) or not 1 <= sampling_params.max_tokens <= 64:
            return failed(UserError(f"sampling_params.max_tokens: must be in [1, 64], got "
                                    f"{sampling_params.max_tokens!r}"))
        if self.refuse:
            self.refuse -= 1
            raise Overloaded("the sampler is full; retry shortly", retry_after_s=1.5)
        self.tenants.append(tenant)
        n = prompt.length
        seqs = [types.SampledSequence(stop_reason="length", sequence_id="",
                                      tokens_np=np.arange(sampling_params.max_tokens, dtype=np.int32),
                                      logprobs_np=np.full(sampling_params.max_tokens, -0.5, np.float32))
                for _ in range(num_samples)]
        plp = np.array([np.nan] + [-1.0 - i for i in range(n - 1)], np.float32) if include_prompt_logprobs else None
        self.calls.append(("sample", sampler_id, num_samples))
        return resolved(types.SampleResponse(sequences=seqs, prompt_logprobs_np=plp))

    # --- runs and checkpoints on record
    def get_run(self, run_id):
        return self.registry.get_run(run_id)

    def list_runs(self):
        return self.registry.list_runs()

    def get_checkpoint(self, path):
        return self.registry.get_checkpoint(TinkerPath.parse(path))

    def list_checkpoints(self, run_id=None):
        return self.registry.list_checkpoints(run_id)

    def weights_info(self, path):
        meta = self._meta(path)
        return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": meta["lora_rank"],
                "train_attn": True, "train_mlp": True, "train_unembed": True}

    def set_checkpoint_public(self, path, public):
        self.registry.set_checkpoint(TinkerPath.parse(path), public=int(public))

    def set_checkpoint_ttl(self, path, ttl_seconds):
        self.registry.set_checkpoint(TinkerPath.parse(path),
                                     expires=None if ttl_seconds is None else time.time() + ttl_seconds)

    def delete_checkpoint(self, path, *, tenant=None):
        p = TinkerPath.parse(path)

        def op():  # on the worker: after every request submitted before it
            shutil.rmtree(self.registry.checkpoint_dir(p), ignore_errors=True)
            return self.registry.delete_checkpoint(p)
        return self._queue(op, None)

    def expire_checkpoints(self):
        paths = [str(p) for p in self.registry.expired()]
        for path in paths:
            self.delete_checkpoint(path)
        return paths

    def drain(self) -> None:
        """Wait until every request queued so far has run (tests only)."""
        self._pool.submit(lambda: None).result(10)

    def storage_usage(self, owner):
        return self.registry.usage(owner)

    # --- lifecycle
    def health(self):
        return {"ok": True, "problems": []}

    def stats(self):
        return {"calls": len(self.calls)}

    def shutdown(self):
        self._pool.shutdown(wait=False)


class Api:
    def __init__(self, http: TestClient, engine: FakeEngine, app: Any):
        self.http, self.engine, self.app = http, engine, app

    def post(self, path: str, body: Any = None, *, key: str | None = KEY, **kw):
        headers = {"X-API-Key": key} if key else {}
        headers.update(kw.pop("headers", {}))
        return self.http.post(f"/api/v1/{path}", json=body, headers=headers, **kw)

    def request(self, method: str, path: str, *, key: str = KEY, **kw):
        return self.http.request(method, f"/api/v1/{path}", headers={"X-API-Key": key}, **kw)

    def result(self, request_id: str, accept: str = "application/json", key: str = KEY) -> Any:
        for _ in range(100):
            r = self.post("retrieve_future", {"request_id": request_id}, headers={"Accept": accept}, key=key)
            assert r.status_code == 200, r.text
            if r.headers["content-type"].startswith("application/x-protobuf"):
                return r.content
            body = r.json()
            if body.get("type") != "try_again":
                return body
        raise AssertionError("future never finished")

    def session(self, key: str = KEY) -> str:
        return self.post("create_session", {"tags": [], "sdk_version": "0.38.0"}, key=key).json()["session_id"]

    def model(self, session_id: str, seq: int = 0, key: str = KEY) -> str:
        r = self.post("create_model", {"session_id": session_id, "model_seq_id": seq, "base_model": BASE,
                                       "lora_config": {"rank": 4}}, key=key)
        assert r.status_code == 200, r.text
        assert self.result(r.json()["request_id"]) == {"model_id": r.json()["model_id"], "type": "create_model"}
        return r.json()["model_id"]


@contextlib.contextmanager
def serving(data_dir: Path, **overrides: Any) -> Iterator[Api]:
    engine = FakeEngine(data_dir)
    settings = ServerSettings(**{"data_dir": data_dir, "api_keys": (KEY, OTHER_KEY), "long_poll_s": 0.2,
                                 "max_body_bytes": 1 << 20, **overrides})
    app = build_app(engine, settings)
    with TestClient(app, raise_server_exceptions=False) as http:  # a 500 is an answer the tests check
        yield Api(http, engine, app)


@pytest.fixture
def api(tmp_path) -> Iterator[Api]:
    with serving(tmp_path) as a:
        yield a


def datum_json(tokens: list[int], targets: list[int] | None = None) -> dict[str, Any]:
    targets = targets if targets is not None else tokens
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}}}


def proto_fwdbwd(model_id: str, seq_id: int, tokens: list[int], loss_fn: str = "cross_entropy",
                 forward_only: bool = False) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn, forward_only=forward_only)
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype, t.dense = pb.DTYPE_INT64, np.asarray(tokens, "<i8").tobytes()
    t.shape.append(len(tokens))
    return msg.SerializeToString()


# --- models and training -----------------------------------------------------------------------------------------


def test_create_model_get_info_and_idempotent_retries(api: Api) -> None:
    sid = api.session()
    body = {"session_id": sid, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 8, "seed": 3},
            "optimizer_config": {"type": "adamw"}, "type": "create_model", "future_field": 1}
    first, retry = api.post("create_model", body).json(), api.post("create_model", body).json()
    assert first == retry == {"request_id": first["request_id"], "model_id": f"{sid}:train:0"}
    assert api.result(first["request_id"])["model_id"] == f"{sid}:train:0"
    assert [c for c in api.engine.calls if c[0] == "create_model"] == [("create_model", f"{sid}:train:0", 8)]

    info = api.post("get_info", {"model_id": f"{sid}:train:0", "type": "get_info"}).json()
    assert info["model_data"]["model_name"] == BASE and info["lora_rank"] == 8 and info["type"] == "get_info"
    assert api.post("get_info", {"model_id": f"{sid}:train:0"}, key=OTHER_KEY).status_code == 404  # not yours
    assert api.post("get_info", {"model_id": "nope:train:0"}).status_code == 404

    for i, (bad, words) in enumerate((({"optimizer_config": {"type": "sgd"}}, "unknown optimizer 'sgd'"),
                                      ({"optimizer_config": {"type": "dimuon", "version": 7}}, "Dimuon version 7"),
                                      ({"base_model": "elsewhere/model"}, "unknown model"),
                                      ({"base_model": "/etc"}, "unknown model"),  # never a local path
                                      ({"lora_config": {"rank": 0}}, "rank"))):
        r = api.post("create_model", {**body, "model_seq_id": 5 + i, **bad}).json()
        err = api.result(r["request_id"])
        assert err["category"] == "user" and words in err["error"], err
    assert api.post("create_model", {**body, "session_id": "missing"}).status_code == 404


def test_forward_backward_proto_zstd_json_and_dedup(api: Api) -> None:
    mid = api.model(api.session())
    proto = proto_fwdbwd(mid, 1, [1, 2, 3])
    headers = {"Content-Type": "application/x-protobuf"}
    a = api.post("forward_backward", content=proto, headers=headers).json()
    b = api.post("forward_backward", content=zstandard.ZstdCompressor().compress(proto),
                 headers={**headers, "Content-Encoding": "zstd"}).json()  # an SDK retry of the same seq_id
    assert a == b and a["model_id"] == mid
    out = response_conv.deserialize_forward_backward_output(
        api.result(a["request_id"], accept="application/x-protobuf"))
    assert out.metrics == {"loss:sum": 1.0} and out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0] * 3

    fwd = api.post("forward_backward", content=proto_fwdbwd(mid, 2, [4, 5], forward_only=True), headers=headers)
    api.result(fwd.json()["request_id"], accept="application/x-protobuf")
    legacy = api.post("forward", {"forward_input": {"data": [datum_json([1, 2])], "loss_fn": "cross_entropy"},
                                  "model_id": mid, "seq_id": 3})
    assert "loss_fn_outputs" in api.result(legacy.json()["request_id"])  # Accept: json -> JSON for old SDKs
    old_json = api.post("forward_backward", {"forward_backward_input": {"data": [datum_json([7])],
                                                                        "loss_fn": "cross_entropy"},
                                             "model_id": mid, "seq_id": 4})
    api.result(old_json.json()["request_id"])
    assert [c[0] for c in api.engine.calls if c[1] == mid][1:] == ["forward_backward", "forward", "forward",
                                                                  "forward_backward"]


@pytest.mark.parametrize("alias", ["adam_params", "optim_params", "optimizer_params"])
def test_optim_step_aliases_and_optimizer_families(api: Api, alias: str) -> None:
    mid = api.model(api.session())
    r = api.post("optim_step", {"model_id": mid, "seq_id": 1, alias: {"learning_rate": 0.5, "new_knob": 1}})
    assert api.result(r.json()["request_id"]) == {"metrics": {"learning_rate:mean": 0.5}}
    empty = api.post("optim_step", {"model_id": mid, "seq_id": 2, alias: {}})  # SDK <= 0.17: defaults
    assert api.result(empty.json()["request_id"])["metrics"] == {"learning_rate:mean": 1e-4}
    # Dimuon's parameters reach the engine as such (which optimizer the run has, the engine checks); an unknown
    # family and a Dimuon step without its required learning rate are refused naming the field.
    dimuon = api.post("optim_step", {"model_id": mid, "seq_id": 3,
                                     alias: {"type": "dimuon", "learning_rate": 0.1}})
    assert api.result(dimuon.json()["request_id"]) == {"metrics": {"learning_rate:mean": 0.1}}
    for seq, (bad, words) in enumerate((({"type": "sgd"}, f"{alias}.type: unknown optimizer 'sgd'"),
                                        ({"type": "dimuon"}, f"{alias}.learning_rate: required")), start=4):
        err = api.result(api.post("optim_step", {"model_id": mid, "seq_id": seq, alias: bad}).json()["request_id"])
        assert err["category"] == "user" and words in err["error"], err
    again = api.post("optim_step", {"model_id": mid, "seq_id": 1, alias: {"learning_rate": 0.5}})
    assert again.json()["request_id"] == r.json()["request_id"]  # a retried step does not step twice
    assert [c for c in api.engine.calls if c[0] == "optim_step"] == [("optim_step", mid, 0.5, "adamw"),
                                                                     ("optim_step", mid, 1e-4, "adamw"),
                                                                     ("optim_step", mid, 0.1, "dimuon")]


def test_bad_input_is_4xx_or_user_error_never_500(api: Api) -> None:
    mid = api.model(api.session())
    proto = {"Content-Type": "application/x-protobuf"}
    cases = [
        (api.post("forward_backward", content=b"\xff\xfe not a protobuf", headers=proto), 400, "protobuf"),
        (api.post("forward_backward", content=b"{bad json", headers={"Content-Type": "application/json"}), 400,
         "JSON"),
        (api.post("forward_backward", content=b"x", headers={**proto, "Content-Encoding": "gzip"}), 415, "gzip"),
        (api.post("forward_backward", content=b"x" * (2 << 20), headers=proto), 413, "limit"),
        (api.post("forward_backward", content=zstandard.ZstdCompressor().compress(b"\0" * (2 << 20)),
                  headers={**proto, "Content-Encoding": "zstd"}), 413, "limit"),
        (api.post("forward_backward", content=proto_fwdbwd("nope:train:9", 1, [1]), headers=proto), 404, "unknown"),
        (api.post("optim_step", {"model_id": 7}), 400, "model_id"),
        (api.post("optim_step", {"model_id": mid, "seq_id": "one"}), 400, "seq_id"),
        (api.post("save_weights", {"model_id": mid, "path": "x", "ttl_seconds": "soon"}), 400, "ttl_seconds"),
        (api.post("load_weights", {"path": "tinker://a/weights/b", "optimizer": True}), 400, "session_id"),
        (api.post("asample", {"prompt": {"chunks": []}, "sampling_params": {"max_tokens": 1}}), 400,
         "sampling_session_id"),
        (api.request("DELETE", f"training_runs/{mid}/checkpoints/bare-name"), 400, "checkpoint_id"),
        (api.request("GET", "training_runs?limit=-1"), 400, "limit"),
    ]
    for resp, status, words in cases:
        assert resp.status_code == status and words in resp.json()["error"], (resp.status_code, resp.text)
        assert "Traceback" not in resp.text

    user_errors = [
        (proto_fwdbwd(mid, 10, [1, 2, 1000]), "vocabulary"),  # token id out of range
        (proto_fwdbwd(mid, 11, [1, 2], loss_fn="nope"), "unknown loss_fn"),
    ]
    mismatched = pb.ForwardBackwardRequest.FromString(proto_fwdbwd(mid, 12, [1, 2, 3]))
    mismatched.data[0].loss_fn_inputs["target_tokens"].dense = np.asarray([1, 2], "<i8").tobytes()
    del mismatched.data[0].loss_fn_inputs["target_tokens"].shape[:]
    mismatched.data[0].loss_fn_inputs["target_tokens"].shape.append(2)
    user_errors.append((mismatched.SerializeToString(), "first dimension"))
    for body, words in user_errors:
        r = api.post("forward_backward", content=body, headers=proto)
        err = api.result(r.json()["request_id"], accept="application/x-protobuf")
        assert err["category"] == "user" and words in err["error"], err
    ok = api.post("forward_backward", content=proto_fwdbwd(mid, 13, [1]), headers=proto)  # still serving
    assert api.result(ok.json()["request_id"], accept="application/x-protobuf")


def test_fake_engine_implements_the_contract(api: Api) -> None:
    assert isinstance(api.engine, EngineAPI)


def test_overloaded_engine_is_429_and_the_retry_runs_once(api: Api) -> None:
    """A full engine queue answers 429 with Retry-After and a JSON body, and forgets the request: the SDK's retry of
    the same seq_id is accepted once the engine has room, and runs exactly once."""
    sid = api.session()
    create = {"session_id": sid, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}}
    api.engine.refuse = 1
    r = api.post("create_model", create)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "retry" in r.json()["error"], r.text
    retry = api.post("create_model", create)
    assert retry.status_code == 200
    mid = api.result(retry.json()["request_id"])["model_id"]

    step = {"model_id": mid, "seq_id": 1, "adam_params": {"learning_rate": 0.25}}
    api.engine.refuse = 1
    assert api.post("optim_step", step).status_code == 429
    accepted = api.post("optim_step", step).json()
    assert api.result(accepted["request_id"]) == {"metrics": {"learning_rate:mean": 0.25}}
    assert api.post("optim_step", step).json() == accepted  # and from now on deduplicated as usual
    api.engine.drain()
    assert [c for c in api.engine.calls if c[0] in ("create_model", "optim_step")] == [
        ("create_model", mid, 4), ("optim_step", mid, 0.25, "adamw")]
    assert api.app.state.store.get_future(accepted["request_id"]).status == "done"

    fwd = {"Content-Type": "application/x-protobuf"}  # decoded and submitted in a worker thread
    api.engine.refuse = 1
    assert api.post("forward_backward", content=proto_fwdbwd(mid, 2, [1, 2]), headers=fwd).status_code == 429
    ok = api.post("forward_backward", content=proto_fwdbwd(mid, 2, [1, 2]), headers=fwd).json()
    api.result(ok["request_id"], accept="application/x-protobuf")

    sampler = api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                                   "base_model": BASE}).json()["sampling_session_id"]
    sample = {"sampling_session_id": sampler, "seq_id": 7, "num_samples": 1, "sampling_params": {"max_tokens": 2},
              "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}}
    api.engine.refuse = 1
    busy = api.post("asample", sample)
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"  # 1.5 s, rounded up to whole seconds
    done = api.post("asample", sample).json()
    assert len(api.result(done["request_id"])["sequences"]) == 1
    assert [c[0] for c in api.engine.calls].count("sample") == 1
    assert set(api.engine.tenants) == {sid}  # every request counted against its session


def test_engine_errors_are_user_only_when_the_engine_says_so(api: Api, monkeypatch) -> None:
    """A UserError from the engine is the client's ("user"); anything else, a plain ValueError included (JAX and
    numpy raise those for their own bugs), is the server's: category "server", logged, never blamed on the user."""
    mid = api.model(api.session())
    gone = Unavailable("process 1 of 2 of the engine stopped (no heartbeat for 20 s); restart the job")
    for seq, (exc, category) in enumerate([(ValueError("operands could not be broadcast"), "server"),
                                           (UserError("adam_params.beta1: must be < 1"), "user"),
                                           (RuntimeError("device lost"), "server"), (gone, "server")], start=1):
        api.engine.fail_next = exc
        r = api.post("optim_step", {"model_id": mid, "seq_id": seq})
        assert r.status_code == 200
        err = api.result(r.json()["request_id"])
        # A server error names the exception's type only: its text may hold server paths (the log has it all).
        # Unavailable is the exception: its message is written for the client (why the server cannot work).
        shown = str(exc) if category == "user" or exc is gone else f"internal error ({type(exc).__name__})"
        assert err["category"] == category and shown in err["error"], err

    def broken_start(*args, **kwargs):  # raised while submitting, before any future exists
        raise ValueError("a bug in the engine's front")

    monkeypatch.setattr(api.engine, "optim_step", broken_start)
    r = api.post("optim_step", {"model_id": mid, "seq_id": 10})
    assert api.result(r.json()["request_id"])["category"] == "server"
    monkeypatch.setattr(api.engine, "get_info", broken_start)
    r = api.post("get_info", {"model_id": mid})  # outside a future: an HTTP 500, not a 400
    assert r.status_code == 500 and r.json() == {"error": "internal server error (ValueError); see the server log",
                                                 "category": "server"}

    def down(*args, **kwargs):
        raise gone

    monkeypatch.setattr(api.engine, "get_info", down)
    r = api.post("get_info", {"model_id": mid})  # a 503 that says why
    assert r.status_code == 503 and r.json() == {"error": str(gone), "category": "server"}


def test_every_route_needs_the_key(api: Api) -> None:
    for method, path in [("POST", "create_model"), ("POST", "get_info"), ("POST", "forward_backward"),
                         ("POST", "forward"), ("POST", "optim_step"), ("POST", "save_weights"),
                         ("POST", "save_weights_for_sampler"), ("POST", "load_weights"), ("POST", "unload_model"),
                         ("POST", "weights_info"), ("POST", "create_sampling_session"), ("POST", "asample"),
                         ("POST", "join_sampling_session"), ("POST", "cancel_future"), ("GET", "samplers/x"),
                         ("GET", "training_runs"), ("GET", "training_runs/r"), ("GET", "training_runs/r/checkpoints"),
                         ("GET", "checkpoints"), ("DELETE", "training_runs/r/checkpoints/weights/n"),
                         ("POST", "training_runs/r/checkpoints/weights/n/publish"),
                         ("PUT", "training_runs/r/checkpoints/weights/n/ttl"), ("GET", "sessions")]:
        r = api.http.request(method, f"/api/v1/{path}", headers={"X-API-Key": "tml-wrong"})
        assert r.status_code == 401 and r.json()["error"], (method, path, r.status_code)


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_saves_loads_and_create_via_load(api: Api) -> None:
    sid = api.session()
    mid = api.model(sid)
    r = api.post("save_weights", {"model_id": mid, "path": "c1", "seq_id": 1, "overwrite": False,
                                  "user_metadata": {"step": "1"}})
    path = api.result(r.json()["request_id"])["path"]
    assert path == f"tinker://{mid}/weights/c1"
    clash = api.post("save_weights", {"model_id": mid, "path": "c1", "seq_id": 2})
    assert "already exists" in api.result(clash.json()["request_id"])["error"]
    over = api.post("save_weights", {"model_id": mid, "path": "c1", "seq_id": 3, "overwrite": True})
    assert api.result(over.json()["request_id"])["path"] == path
    for i, name in enumerate(["../x", "/abs", "a/b", ""]):
        bad = api.post("save_weights", {"model_id": mid, "path": name, "seq_id": 10 + i})
        if name == "":  # empty means "unnamed" on the wire: a generated name
            assert api.result(bad.json()["request_id"])["path"].startswith(f"tinker://{mid}/weights/state-")
        else:
            assert "invalid name" in api.result(bad.json()["request_id"])["error"]

    named = api.post("save_weights_for_sampler", {"model_id": mid, "path": "s1", "seq_id": 20, "kind": "snapshot"})
    assert api.result(named.json()["request_id"]) == {"type": "save_weights_for_sampler",
                                                      "path": f"tinker://{mid}/sampler_weights/s1"}
    eph = api.post("save_weights_for_sampler", {"model_id": mid, "seq_id": 21, "sampling_session_seq_id": 4,
                                                "kind": "inflight"})
    assert api.result(eph.json()["request_id"]) == {"type": "save_weights_for_sampler",
                                                    "sampling_session_id": f"{sid}:sample:4"}  # and no path
    sampler = api.request("GET", f"samplers/{sid}:sample:4").json()
    assert sampler == {"sampler_id": f"{sid}:sample:4", "base_model": BASE, "model_path": None}

    legacy = api.post("load_weights", {"model_id": mid, "seq_id": 22, "path": path, "optimizer": True})
    assert api.result(legacy.json()["request_id"])["model_id"] == mid
    body = {"session_id": sid, "model_seq_id": 1, "path": path, "optimizer": False, "type": "load_weights"}
    created = api.post("load_weights", body).json()
    assert created["model_id"] == f"{sid}:train:1"
    assert api.result(created["request_id"])["model_id"] == f"{sid}:train:1"
    assert api.post("load_weights", body).json() == created  # retry: same future
    # model_seq_id is shared with create_model: a create_model retry on the same seq gets the same future.
    same_seq = api.post("create_model", {"session_id": sid, "model_seq_id": 1, "base_model": BASE})
    assert same_seq.json()["request_id"] == created["request_id"]
    assert api.post("get_info", {"model_id": f"{sid}:train:1"}).json()["model_id"] == f"{sid}:train:1"
    assert api.engine.get_run(f"{sid}:train:1").owner == key_tag(KEY)

    missing = api.post("load_weights", {**body, "model_seq_id": 2, "path": f"tinker://{mid}/weights/nope"})
    assert "not found" in api.result(missing.json()["request_id"])["error"]
    other = api.session(OTHER_KEY)  # another key cannot read an unpublished checkpoint
    theirs = api.post("load_weights", {**body, "session_id": other, "model_seq_id": 0}, key=OTHER_KEY)
    assert "not found" in api.result(theirs.json()["request_id"], key=OTHER_KEY)["error"]
    assert api.post("weights_info", {"tinker_path": path}).json()["lora_rank"] == 4
    assert api.post("weights_info", {"tinker_path": path}, key=OTHER_KEY).status_code == 404  # as if missing


def test_checkpoint_rest_routing_publish_ttl_delete(api: Api) -> None:
    sid = api.session()
    mid = api.model(sid)
    for seq, name in enumerate(["keep", "gone"], start=1):
        api.result(api.post("save_weights", {"model_id": mid, "path": name, "seq_id": seq}).json()["request_id"])
    api.result(api.post("save_weights_for_sampler", {"model_id": mid, "path": "s", "seq_id": 3}).json()["request_id"])

    listed = types.CheckpointsListResponse.model_validate(api.request("GET", f"training_runs/{mid}/checkpoints").json())
    assert {c.checkpoint_id for c in listed.checkpoints} == {"weights/keep", "weights/gone", "sampler_weights/s"}
    assert {c.checkpoint_type for c in listed.checkpoints} == {"training", "sampler"}
    run = types.TrainingRun.model_validate(api.request("GET", f"training_runs/{mid}").json())
    assert run.base_model == BASE and run.lora_rank == 4 and run.last_sampler_checkpoint.checkpoint_id == \
        "sampler_weights/s"
    runs = types.TrainingRunsResponse.model_validate(api.request("GET", "training_runs?limit=5&offset=0").json())
    assert [r.training_run_id for r in runs.training_runs] == [mid] and runs.cursor.total_count == 1
    assert api.request("GET", "training_runs", key=OTHER_KEY).json()["training_runs"] == []  # not theirs
    assert api.request("GET", f"training_runs/{mid}", key=OTHER_KEY).status_code == 404
    assert api.engine.get_run(mid).owner == key_tag(KEY)  # ownership lives with the run, in the engine
    local = api.engine.create_model(BASE, model_id="in-process").result()  # no owner: with keys, nobody's
    assert api.request("GET", "training_runs", key=OTHER_KEY).json()["training_runs"] == []
    assert api.request("GET", f"training_runs/{local}").status_code == 404

    base = f"training_runs/{mid}/checkpoints/weights/keep"
    assert api.request("POST", f"{base}/publish").status_code == 204
    assert api.request("GET", f"training_runs/{mid}/checkpoints", key=OTHER_KEY).json()["checkpoints"][0][
        "checkpoint_id"] == "weights/keep"  # published: visible (and loadable) to other keys
    assert api.request("GET", f"training_runs/{mid}?access_scope=accessible", key=OTHER_KEY).status_code == 200
    assert api.request("DELETE", f"{base}/publish").status_code == 204  # unpublish, not a delete of ".../publish"
    assert api.request("PUT", f"{base}/ttl", json={"ttl_seconds": 3600}).status_code == 204
    ckpts = {c["checkpoint_id"]: c for c in api.request("GET", "checkpoints").json()["checkpoints"]}
    assert not ckpts["weights/keep"]["public"] and ckpts["weights/keep"]["expires_at"] is not None
    assert api.request("PUT", f"{base}/ttl", json={"ttl_seconds": -5}).status_code == 400
    assert api.request("PUT", f"{base}/ttl", json={"ttl_seconds": None}).status_code == 204

    assert api.request("DELETE", f"training_runs/{mid}/checkpoints/weights/gone").status_code == 204
    assert not (api.engine.registry.checkpoint_dir(TinkerPath(mid, "weights", "gone"))).exists()
    assert api.request("DELETE", f"training_runs/{mid}/checkpoints/weights/gone").status_code == 404
    assert api.request("DELETE", f"training_runs/{mid}/checkpoints/s?checkpoint_type=sampler").status_code == 204
    assert api.request("DELETE", f"training_runs/{mid}/checkpoints/weights/keep", key=OTHER_KEY).status_code == 404
    assert api.request("DELETE", f"training_runs/{mid}/checkpoints/weights/..%2F..%2Fx").status_code in (400, 404)
    remaining = api.request("GET", "checkpoints?limit=10").json()
    assert [c["checkpoint_id"] for c in remaining["checkpoints"]] == ["weights/keep"]
    assert remaining["cursor"] == {"offset": 0, "limit": 10, "total_count": 1}
    # The archive: a 302 to a signed URL (no API key needed there) of a tar of the checkpoint's files; another key
    # gets a 404 for the checkpoint, and a URL whose signature was altered a 403.
    r = api.request("GET", f"{base}/archive", follow_redirects=False)
    assert r.status_code == 302 and "/api/v1/archives/" in r.headers["location"] and r.headers["expires"]
    assert api.request("GET", f"{base}/archive", key=OTHER_KEY, follow_redirects=False).status_code == 404
    tar = api.http.get(r.headers["location"])
    assert tar.status_code == 200 and int(tar.headers["content-length"]) == len(tar.content)
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
        assert t.getnames() == ["meta.json"]  # the checkpoint's files, its record excluded
    assert api.http.get(r.headers["location"].replace("signature=", "signature=0")).status_code == 403
    # External weights: per-file URLs for the owner, 404 for another key, 400 for a checkpoint of another kind.
    ext = api.post("save_weights_external", {"model_id": mid, "path": "hf", "seq_id": 9})
    assert api.result(ext.json()["request_id"])["path"] == f"tinker://{mid}/external_weights/hf"
    urls = api.request("GET", f"training_runs/{mid}/checkpoints/external_weights/hf/external_weights_urls").json()
    assert list(urls["urls"]) == ["meta.json"] and urls["expires"]
    assert api.http.get(urls["urls"]["meta.json"]).status_code == 200
    assert api.request("GET", f"training_runs/{mid}/checkpoints/external_weights/hf/external_weights_urls",
                       key=OTHER_KEY).status_code == 404
    assert api.request("GET", f"{base}/external_weights_urls").status_code == 400
    assert api.request("DELETE", f"training_runs/{mid}/checkpoints/external_weights/hf").status_code == 204

    # TTL expiry: the background pruner has the engine delete it (files too).
    keep = f"tinker://{mid}/weights/keep"
    api.engine.set_checkpoint_ttl(keep, -1)
    from server.lifecycle import expire_checkpoints

    assert expire_checkpoints(api.engine, api.app.state.samplers) == [keep]
    assert api.request("GET", f"training_runs/{mid}/checkpoints").json()["checkpoints"] == []
    api.engine.drain()  # the queued delete has run
    assert api.engine.get_checkpoint(keep) is None
    assert not api.engine.registry.checkpoint_dir(TinkerPath.parse(keep)).exists()


# --- sampling ----------------------------------------------------------------------------------------------------


def test_sampling_sessions_asample_and_refusals(api: Api) -> None:
    sid = api.session()
    mid = api.model(sid)
    path = api.result(api.post("save_weights_for_sampler", {"model_id": mid, "path": "s", "seq_id": 1}).json()[
        "request_id"])["path"]
    from_path = api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                                     "model_path": path}).json()
    assert from_path == {"sampling_session_id": f"{sid}:sample:0", "type": "create_sampling_session"}
    assert not [c for c in api.engine.calls if c[0] == "create_sampler"]  # reused the save's snapshot
    from_base = api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 1,
                                                     "base_model": BASE}).json()["sampling_session_id"]
    assert api.request("GET", f"samplers/{from_base}").json()["base_model"] == BASE
    assert api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 2,
                                                "base_model": "nope"}).status_code == 400
    assert api.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 3,
                                                "model_path": "tinker://x/weights/y"}).status_code == 404

    req = {"sampling_session_id": from_base, "seq_id": 0, "num_samples": 2, "type": "sample",
           "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3, 4]}]},
           "sampling_params": {"max_tokens": 3, "stop": ["\n"], "temperature": 1.0, "top_k": -1, "top_p": 1.0},
           "prompt_logprobs": True, "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0, "prompt_alt_tokens_k": 0,
           "record_stability_info": False}
    first = api.post("asample", req, headers={"X-Tinker-Sampling-Backpressure": "1"}).json()
    assert first["sample_sequence_ids"] == [f"{from_base}:0:0", f"{from_base}:0:1"]
    assert api.post("asample", req).json() == first  # (sampling_session_id, seq_id) deduplicates
    resp = response_conv.deserialize_sample_response(api.result(first["request_id"], "application/x-protobuf"))
    assert len(resp.sequences) == 2 and resp.sequences[0].logprobs == [-0.5] * 3
    assert resp.prompt_logprobs == [None, -1.0, -2.0, -3.0]

    last2 = api.post("asample", {**req, "seq_id": 1, "prompt_logprobs_last_n": 2}).json()
    masked = response_conv.deserialize_sample_response(api.result(last2["request_id"], "application/x-protobuf"))
    assert masked.prompt_logprobs == [None, None, -2.0, -3.0]
    for i, (extra, words) in enumerate([({"prompt_logprobs_last_n": 9}, "prompt_logprobs_last_n")]):
        r = api.post("asample", {**req, "seq_id": 10 + i, **extra}).json()
        err = api.result(r["request_id"])
        assert err["category"] == "user" and words in err["error"], err

    # Clones: join_sampling_session numbers them from 1; GET samplers and asample check ownership.
    assert api.post("join_sampling_session", {"sampling_session_id": from_base}).json()["client_counter"] == 1
    assert api.post("join_sampling_session", {"sampling_session_id": from_base}, key=OTHER_KEY).status_code == 404
    assert api.request("GET", f"samplers/{from_base}", key=OTHER_KEY).status_code == 404

    # Ephemeral samplers live in memory only: after their snapshot is gone the future says so.
    eph = api.result(api.post("save_weights_for_sampler", {"model_id": mid, "seq_id": 2,
                                                           "sampling_session_seq_id": 7}).json()["request_id"])
    samplers = api.app.state.samplers
    samplers.release_session(sid)
    r = api.post("asample", {**req, "sampling_session_id": eph["sampling_session_id"], "seq_id": 0}).json()
    assert "gone" in api.result(r["request_id"])["error"]
    again = api.post("asample", {**req, "seq_id": 50}).json()  # base-model samplers are rebuilt transparently
    assert len(api.result(again["request_id"], "application/json")["sequences"]) == 2
    assert ("create_sampler", None, BASE) in api.engine.calls


def test_cancel_future_drops_queued_work(api: Api) -> None:
    mid = api.model(api.session())
    api.engine.hold.clear()  # the engine worker is busy
    try:
        first = api.post("optim_step", {"model_id": mid, "seq_id": 1, "adam_params": {}}).json()
        queued = api.post("optim_step", {"model_id": mid, "seq_id": 2, "adam_params": {}}).json()
        assert api.post("cancel_future", {"request_id": queued["request_id"]}).json()["cancelled"]
    finally:
        api.engine.hold.set()
    assert "metrics" in api.result(first["request_id"])
    assert "cancelled" in api.result(queued["request_id"])["error"]
    assert len([c for c in api.engine.calls if c[0] == "optim_step"]) == 1


# --- sessions ------------------------------------------------------------------------------------------------------


def test_a_request_finishing_while_the_server_stops_is_recorded(tmp_path) -> None:
    """An app that stops its engine (build_app(stop_engine=True), as `tinker-jax serve`) records the result of a
    request that finishes during the engine's shutdown (a checkpoint write in flight): after a restart the client
    retrieves the saved path. (The results were dropped: it read "the server restarted before this request
    finished", and so did the SDK's retry, for a checkpoint that was saved.)"""

    class Finishing(FakeEngine):
        def shutdown(self):  # as Engine.shutdown: what is in flight finishes
            self.hold.set()
            self._pool.shutdown(wait=True)

    engine = Finishing(tmp_path)
    settings = ServerSettings(data_dir=tmp_path, api_keys=(KEY, OTHER_KEY), long_poll_s=0.2)
    with TestClient(build_app(engine, settings, stop_engine=True)) as http:
        api = Api(http, engine, None)
        mid = api.model(api.session())
        engine.hold.clear()  # the engine is busy with the save when the server is told to stop
        rid = api.post("save_weights", {"model_id": mid, "path": "ck", "seq_id": 1}).json()["request_id"]
    with serving(tmp_path) as again:  # a restart on the same data dir
        assert again.result(rid)["path"] == f"tinker://{mid}/weights/ck"
        retry = again.post("save_weights", {"model_id": mid, "path": "ck", "seq_id": 1}).json()["request_id"]
        assert retry == rid  # the SDK's retry of that seq_id: the same recorded answer


def test_silent_client_session_expires_and_releases_models(tmp_path) -> None:
    with serving(tmp_path, session_timeout_s=2.0, session_check_interval_s=0.1) as api:
        _expire_silent_session(api)


def _expire_silent_session(api: Api) -> None:
    live = api.session()
    sid = api.session()
    mid = api.model(sid)
    eph = api.result(api.post("save_weights_for_sampler", {"model_id": mid, "seq_id": 1,
                                                           "sampling_session_seq_id": 0}).json()["request_id"])
    deadline = time.time() + 10
    while mid not in api.engine.unloaded and time.time() < deadline:
        api.post("session_heartbeat", {"session_id": live})  # this one keeps beating
        time.sleep(0.1)
    assert mid in api.engine.unloaded and api.engine.released  # models and sampler snapshots released
    assert api.app.state.store.get_session(sid).finish_reason == "expired"
    assert api.post("session_heartbeat", {"session_id": sid}).status_code == 410  # tells the SDK it is over
    assert api.app.state.store.get_session(live).finished is None
    assert eph["sampling_session_id"].startswith(sid)
    # A finished session cannot make new models.
    r = api.post("create_model", {"session_id": sid, "model_seq_id": 5, "base_model": BASE})
    assert r.status_code == 400 and "finished" in r.json()["error"]


def test_finish_releases_and_rest_sessions(api: Api) -> None:
    sid = api.session()
    mid = api.model(sid)
    listed = api.request("GET", "sessions").json()["sessions"]
    assert sid in listed and sid not in api.request("GET", "sessions", key=OTHER_KEY).json()["sessions"]
    assert api.request("GET", f"sessions/{sid}").json()["training_run_ids"] == [mid]
    assert api.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": None}).status_code == 200
    # The unload is submitted, not awaited (server.lifecycle.release_session): the engine's queue runs it soon after
    # (under a loaded CI the answer came back first).
    deadline = time.time() + 10
    while not api.engine.unloaded and time.time() < deadline:
        time.sleep(0.02)
    assert api.engine.unloaded == [mid]


# --- server.serve -----------------------------------------------------------------------------------------------


def test_serve_configuration_rules(tmp_path, monkeypatch) -> None:
    from server import serve
    from server.settings import api_keys

    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("example.com")
    with pytest.raises(ValueError, match="without an API key"):
        serve.check_exposure("0.0.0.0", ())
    serve.check_exposure("0.0.0.0", ("tml-k",))
    serve.check_exposure("127.0.0.1", ())
    monkeypatch.setenv("TINKER_JAX_API_KEYS", "tml-a, tml-b")
    assert api_keys("tml-c") == ("tml-c", "tml-a", "tml-b")

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    configured = {"alias": str(model), "other": "/elsewhere"}
    assert serve.resolve_models([str(model)], configured) == {str(model): str(model), "alias": str(model)}
    assert serve.resolve_models(["other"], configured) == {"other": "/elsewhere"}
    with pytest.raises(ValueError, match="not a model directory"):
        serve.resolve_models(["missing"], configured)

    written = []
    monkeypatch.setattr("tinker_jax.hf.init_model.init_model",
                        lambda out, preset, force=False: written.append((Path(out), preset)))
    cfg = serve.build_config([], None, str(tmp_path / "data"))
    assert cfg.models == {"small-qwen3": str(tmp_path / "data" / "models" / "small-qwen3")}
    assert written == [(tmp_path / "data" / "models" / "small-qwen3", "small-qwen3")]
    assert serve.build_config([str(model)], None, str(tmp_path)).models == {str(model): str(model)}


def test_console_page_and_state_are_scoped_to_the_key(api: Api) -> None:
    """The console's page and files are public (no data in them); its state is behind the key and holds only the
    caller's runs, their recorded metrics (a point per step) and checkpoints with signed download links."""
    assert api.http.get("/", follow_redirects=False).headers["location"] == "/console"
    assert "tinker-jax console" in api.http.get("/console").text
    assert api.http.get("/console/static/uPlot.iife.min.js").status_code == 200
    for bad in ("..%2Fsettings.py", "console.py", "uPlot.LICENSE"):
        assert api.http.get(f"/console/static/{bad}").status_code == 404
    assert api.http.get("/api/v1/console/state").status_code == 401  # the data needs a key

    mid = api.model(api.session())
    for seq in (1, 3):
        fb = api.post("forward_backward", {"forward_backward_input": {"data": [datum_json([1, 2, 3])],
                                                                      "loss_fn": "cross_entropy"},
                                           "model_id": mid, "seq_id": seq})
        api.result(fb.json()["request_id"])
        api.result(api.post("optim_step", {"model_id": mid, "seq_id": seq + 1}).json()["request_id"])
    api.result(api.post("save_weights", {"model_id": mid, "path": "c", "seq_id": 5}).json()["request_id"])
    mine = api.request("GET", "console/state").json()
    run = next(r for r in mine["runs"] if r["id"] == mid)
    assert run["metrics"]["loss:sum"] == [[0, 1.0], [1, 1.0]]  # one point per step (the fake's loss is 1.0)
    assert run["metrics"]["learning_rate:mean"] == [[0, 1e-4], [1, 1e-4]]
    (ckpt,) = [c for c in mine["checkpoints"] if c["run_id"] == mid]
    assert ckpt["type"] == "training" and "signature=" in ckpt["downloads"][0]["url"]
    assert mid in [m for s in mine["sessions"] for m in s["models"]]
    theirs = api.request("GET", "console/state", key=OTHER_KEY).json()
    assert theirs["runs"] == [] and theirs["checkpoints"] == [] and theirs["sessions"] == []
