"""Schema fuzz of the JSON routes (issue 16): Hypothesis takes a valid request of each route, as the SDK sends it,
and changes one field (any JSON value in its place, or none at all), then checks the server's answer:

- never a 5xx, and a submitted request's future never fails as the server's fault ("server" category);
- every error is the one error shape, `{"error": <non-empty>, "category": ...}`;
- a 400 or 404 names the field that was changed (or, for a nested field, its parent), as does a future that fails
  as the client's fault ("user" category).

Against the fake engine of tests/test_server_routes.py, so it runs in seconds; bounded by `max_examples`.
"""

from __future__ import annotations

import itertools
import os
import json
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server_routes import BASE, KEY, Api, datum_json, serving

MISSING = object()  # the field is left out

# Any JSON value: what a confused or hostile client might put anywhere. Integers reach past 64 bits; strings are
# short (size limits have their own tests) but of any character.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)
# Where integers break things: SQLite keeps signed 64-bit, numpy 32-bit token ids, and negatives.
EDGE_INTS = st.sampled_from([-1, 0, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
VALUES = st.one_of(EDGE_INTS, JSON, st.just(MISSING))

_seq = itertools.count(1000)


def seq() -> int:
    """A fresh sequence number: every example is a new request, not a replay of the first (idempotency keys)."""
    return next(_seq)


class Ctx:
    """What the requests refer to: one session, model, saved checkpoint, sampler and finished request."""

    def __init__(self, api: Api):
        self.api = api
        self.session = api.session()
        self.model = api.model(self.session)
        r = api.post("save_weights", {"model_id": self.model, "path": "fuzz", "seq_id": seq()})
        self.path = api.result(r.json()["request_id"])["path"]
        self.sampler = api.post("create_sampling_session", {"session_id": self.session, "sampling_session_seq_id": 0,
                                                            "base_model": BASE}).json()["sampling_session_id"]
        self.request_id = api.post("optim_step", {"model_id": self.model, "seq_id": seq(),
                                                  "adam_params": {}}).json()["request_id"]
        api.result(self.request_id)

    def fresh_session(self) -> str:
        return self.api.session()

    def fresh_model(self) -> str:
        return self.api.model(self.fresh_session())


PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}

# route -> (the body of a valid request, built fresh per example; the fields to change, nested ones dotted)
ROUTES: dict[str, tuple[Callable[[Ctx], dict[str, Any]], list[str]]] = {
    "create_session": (lambda c: {"tags": ["a"], "user_metadata": {"k": "v"}, "sdk_version": "0.38.0",
                                  "type": "create_session"},
                       ["tags", "user_metadata", "sdk_version", "project_id", "display_name"]),
    "session_heartbeat": (lambda c: {"session_id": c.session, "type": "session_heartbeat"}, ["session_id"]),
    "create_model": (lambda c: {"session_id": c.session, "model_seq_id": seq(), "base_model": BASE,
                                "lora_config": {"rank": 4, "seed": 1, "train_mlp": True},
                                "optimizer_config": {"type": "adamw"}, "user_metadata": {"k": "v"}},
                     ["session_id", "model_seq_id", "base_model", "lora_config", "lora_config.rank",
                      "lora_config.seed", "lora_config.train_mlp", "optimizer_config", "optimizer_config.type",
                      "user_metadata"]),
    "get_info": (lambda c: {"model_id": c.model, "type": "get_info"}, ["model_id"]),
    "forward_backward": (lambda c: {"model_id": c.model, "seq_id": seq(),
                                    "forward_backward_input": {"data": [datum_json([1, 2, 3])],
                                                               "loss_fn": "cross_entropy"}},
                         ["model_id", "seq_id", "forward_backward_input", "forward_backward_input.data",
                          "forward_backward_input.loss_fn", "forward_backward_input.loss_fn_config"]),
    "forward": (lambda c: {"model_id": c.model, "seq_id": seq(),
                           "forward_input": {"data": [datum_json([4, 5])], "loss_fn": "cross_entropy"}},
                ["model_id", "seq_id", "forward_input", "forward_input.data", "forward_input.loss_fn"]),
    "optim_step": (lambda c: {"model_id": c.model, "seq_id": seq(),
                              "adam_params": {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12}},
                   ["model_id", "seq_id", "adam_params", "adam_params.learning_rate", "adam_params.beta1",
                    "adam_params.beta2", "adam_params.eps", "adam_params.weight_decay", "adam_params.grad_clip_norm"]),
    "save_weights": (lambda c: {"model_id": c.model, "seq_id": seq(), "path": f"c{seq()}", "ttl_seconds": 3600,
                                "user_metadata": {"k": "v"}},
                     ["model_id", "seq_id", "path", "ttl_seconds", "user_metadata", "overwrite"]),
    "save_weights_for_sampler": (lambda c: {"model_id": c.model, "seq_id": seq(), "path": f"s{seq()}",
                                            "ttl_seconds": 3600},
                                 ["model_id", "seq_id", "path", "ttl_seconds", "sampling_session_seq_id",
                                  "user_metadata"]),
    "load_weights": (lambda c: {"model_id": c.model, "seq_id": seq(), "path": c.path, "optimizer": True},
                     ["model_id", "seq_id", "path", "optimizer", "optimizer_config"]),
    "load_weights#create": (lambda c: {"session_id": c.session, "model_seq_id": seq(), "path": c.path,
                                       "optimizer": False, "user_metadata": {"k": "v"}},
                            ["session_id", "model_seq_id", "path", "optimizer", "base_model", "user_metadata"]),
    "weights_info": (lambda c: {"tinker_path": c.path}, ["tinker_path"]),
    "create_sampling_session": (lambda c: {"session_id": c.session, "sampling_session_seq_id": seq(),
                                           "base_model": BASE},
                                ["session_id", "sampling_session_seq_id", "base_model", "model_path"]),
    "join_sampling_session": (lambda c: {"sampling_session_id": c.sampler}, ["sampling_session_id"]),
    "asample": (lambda c: {"sampling_session_id": c.sampler, "seq_id": seq(), "num_samples": 2, "prompt": PROMPT,
                           "sampling_params": {"max_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                               "stop": ["\n"]},
                           "prompt_logprobs": True, "topk_prompt_logprobs": 0},
                ["sampling_session_id", "seq_id", "num_samples", "prompt", "prompt.chunks", "sampling_params",
                 "sampling_params.max_tokens", "sampling_params.temperature", "sampling_params.top_p",
                 "sampling_params.top_k", "sampling_params.stop", "sampling_params.seed", "prompt_logprobs",
                 "topk_prompt_logprobs", "prompt_logprobs_last_n", "topk_sample_logprobs"]),
    "retrieve_future": (lambda c: {"request_id": c.request_id}, ["request_id"]),
    "retrieve_futures": (lambda c: {"target": {"type": "sampling_session", "sampling_session_id": c.sampler,
                                               "cloned_sampler_id": 0},
                                    "prev_cursor": 0, "timeout": 0, "retrieved_request_ids": []},
                         ["target", "target.sampling_session_id", "target.cloned_sampler_id", "prev_cursor",
                          "timeout", "retrieved_request_ids"]),
    "cancel_future": (lambda c: {"request_id": c.request_id}, ["request_id"]),
    "unload_model": (lambda c: {"model_id": c.fresh_model(), "type": "unload_model"}, ["model_id"]),
    "sessions/{fresh}/finish": (lambda c: {"reason": {"type": "success"}, "detail": "done"},
                                ["reason", "reason.type", "detail"]),
    "client/config": (lambda c: {"sdk_version": "0.38.0"}, ["sdk_version"]),
    "telemetry": (lambda c: {"events": [], "platform": "linux", "sdk_version": "0.38.0", "session_id": c.session},
                  ["events", "platform", "sdk_version", "session_id"]),
}


def mutate(body: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """`body` with `field` (dotted for nested) set to `value`, or removed for MISSING."""
    body = json.loads(json.dumps(body))
    *parents, leaf = field.split(".")
    node = body
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if value is MISSING:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return body


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Iterator[Ctx]:
    # Limits high enough that hundreds of examples never meet them (they have their own tests).
    with serving(tmp_path_factory.mktemp("fuzz"), long_poll_s=1.0, retrieve_futures_poll_s=0.2,
                 max_sessions_per_key=100_000, max_models_per_key=100_000) as api:
        yield Ctx(api)


def _names(field: str) -> list[str]:
    """What an error about `field` may call it: its own name or a parent's (`lora_config` for `lora_config.rank`),
    and a few wire aliases the SDK types use."""
    parts = field.split(".")
    names = parts[:]
    if parts[-1] == "chunks":
        names.append("prompt")
    return names


NOT_SUBMITS = ("retrieve_future", "retrieve_futures", "cancel_future")  # they answer about a request, not with one


def check(ctx: Ctx, route: str, field: str, value: Any) -> None:
    api = ctx.api
    build, _ = ROUTES[route]
    body = mutate(build(ctx), field, value)
    path = route.split("#")[0].replace("{fresh}", ctx.fresh_session())
    # Serialized here: json.dumps writes NaN and Infinity as Python's parser reads them (httpx's json= refuses)
    r = api.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}, key=KEY)
    what = f"{route} {field}={value!r}: {r.status_code} {r.text[:500]}"
    assert r.status_code < 500, what
    if r.status_code >= 400:
        err = r.json()
        assert isinstance(err.get("error"), str) and err["error"] and err.get("category") in ("user", "server"), what
        if r.status_code in (400, 404):
            assert any(n in err["error"] for n in _names(field)), what
        return
    reply = r.json()
    if route in NOT_SUBMITS or not isinstance(reply, dict) or "request_id" not in reply:
        return
    result = api.result(reply["request_id"])
    if isinstance(result, dict) and "error" in result:
        assert result["category"] == "user", f"{what} -> future {result}"
        assert any(n in result["error"] for n in _names(field)), f"{what} -> future {result}"


FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "15")), deadline=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CASES = [(route, field) for route in sorted(ROUTES) for field in ROUTES[route][1]]


@pytest.mark.parametrize("route,field", CASES, ids=[f"{r}:{f}" for r, f in CASES])
def test_one_field_changed(ctx: Ctx, route: str, field: str) -> None:
    """FUZZ_EXAMPLES=300 FUZZ_RANDOM=1 for a longer, fresh search (the default is short and repeatable, for CI)."""

    @FUZZ
    @given(value=VALUES)
    def run(value: Any) -> None:
        check(ctx, route, field, value)

    run()


@FUZZ
@given(route=st.sampled_from(sorted(ROUTES)), body=JSON)
def test_whole_body_replaced(ctx: Ctx, route: str, body: Any) -> None:
    """Not an object at all, or an object of unknown fields: a 4xx in the one error shape, never a 500."""
    path = route.split("#")[0].replace("{fresh}", ctx.fresh_session())
    r = ctx.api.post(path, body)
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"], (route, body, r.text)


NON_FINITE = (float("nan"), float("inf"), float("-inf"))  # what Python's json (and so FastAPI) reads from NaN, Infinity


@pytest.mark.parametrize("route,field", CASES, ids=[f"{r}:{f}" for r, f in CASES])
def test_non_finite_numbers(ctx: Ctx, route: str, field: str) -> None:
    """NaN and +-Infinity, which strict JSON has not but Python's parser accepts, in every field: the same checks
    (a 4xx naming the field, or a future failing as the client's fault; never a 5xx, never a hang)."""
    for value in NON_FINITE:
        check(ctx, route, field, value)
