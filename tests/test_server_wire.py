"""server.wire against the SDK's own serialisers and parsers (tinker 0.38).

Requests are built the way the SDK builds them (its proto writer, its pydantic JSON dumps) and decoded by us;
results are encoded by us and decoded by the SDK's response reader, so both directions prove client compatibility.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker._compat import model_dump
from tinker.proto import response_conv
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.types._pydantic_types.datum import Datum as PydanticDatum
from tinker.types.topk_logprobs import TopkLogprobs

from server import wire
from tinker_jax.errors import UserError

# --- helpers -----------------------------------------------------------------------------------------------------


def dense(td: types.TensorData) -> np.ndarray:
    assert td.sparse_crow_indices is None, "decoded tensors must be dense"
    return np.asarray(td._numpy).reshape(td.shape)


def assert_datum_equal(got: types.Datum, want: types.Datum) -> None:
    """types.Datum compares TensorData by identity, so compare field by field (sparse inputs densified with 0)."""
    assert got.model_input.chunks == want.model_input.chunks
    assert sorted(got.loss_fn_inputs) == sorted(want.loss_fn_inputs)
    for name, td in want.loss_fn_inputs.items():
        g = got.loss_fn_inputs[name]
        assert g.dtype == td.dtype, name
        np.testing.assert_array_equal(dense(g), td.to_numpy(pad_value=0), err_msg=name)
    assert got.model_input_spans == want.model_input_spans
    assert got.loss_fn_input_spans == want.loss_fn_input_spans


def sdk_fwdbwd_request() -> types.ForwardBackwardRequest:
    """Three datums covering what SDK 0.38 puts on the wire: int64/float32 inputs, 2-D top-K targets that the SDK
    auto-sparsifies (CSR), an image chunk, provenance spans, and numeric + string loss config."""
    seq = [5, 17, 2, 99, 31, 7]
    sft = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                      loss_fn_inputs={"target_tokens": seq[1:], "weights": [0.0, 1.0, 1.0, 0.5, -2.0]})
    targets = torch.zeros(4, 3, dtype=torch.int64)
    targets[0, 0], targets[2, 1] = 11, 42
    weights = torch.zeros(4, 3)
    weights[0, 0], weights[2, 1] = 1.0, 0.25
    topk = types.Datum(
        model_input=types.ModelInput(chunks=[
            types.EncodedTextChunk(tokens=[1, 2]),
            types.ImageChunk(data=b"\x89PNG...", format="png", expected_tokens=1),
            types.EncodedTextChunk(tokens=[3]),
        ]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights})
    rl = types.Datum(
        model_input=types.ModelInput.from_ints([4, 5, 6]),
        loss_fn_inputs={"target_tokens": np.array([5, 6, 7]), "logprobs": [-1.0, -2.0, -0.5],
                        "advantages": [0.5, 0.5, 0.5]},
    ).with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id="s:sample:0:0:0", length=2),
                     types.SampledProvenanceSpan(sequence_id="s:sample:0:0:1", offset=1, length=1)],
        loss_fn_inputs=[types.SampledProvenanceSpan(sequence_id="s:sample:0:0:1", length=3)])
    fb_input = types.ForwardBackwardInput(
        data=[sft, topk, rl], loss_fn="ppo",
        loss_fn_config={"clip_low_threshold": 0.7, "clip_high_threshold": 1.3, "loss_id": "abc"})
    return types.ForwardBackwardRequest(forward_backward_input=fb_input, model_id="sess:train:0", seq_id=7)


# --- requests: forward_backward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_proto_forward_backward_roundtrip(compress: bool) -> None:
    req = sdk_fwdbwd_request()
    assert req.forward_backward_input.data[1].loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = True  # what TrainingClient.forward() sends
    body = msg.SerializeToString()
    encoding = None
    if compress:  # exactly what the SDK does when client/config says proto_compress_fwdbwd
        body, encoding = zstandard.ZstdCompressor().compress(body), "zstd"

    call = wire.decode_forward_backward(wire.decompress(body, encoding, 1 << 20), "application/x-protobuf")

    assert call.forward_only is True
    got, want = call.request, req
    assert (got.model_id, got.seq_id) == (want.model_id, want.seq_id)
    assert got.forward_backward_input.loss_fn == "ppo"
    # v2 carries strings, so it wins over the numbers-only legacy map
    assert got.forward_backward_input.loss_fn_config == want.forward_backward_input.loss_fn_config
    for g, w in zip(got.forward_backward_input.data, want.forward_backward_input.data, strict=True):
        assert_datum_equal(g, w)


def test_proto_loss_config_v1_only_and_unset_seq_id() -> None:
    msg = pb.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")  # SDK < 0.28: no v2 map; seq_id 0 = unset
    msg.loss_fn_config["beta"] = 0.1
    call = wire.decode_forward_backward(msg.SerializeToString(), "application/x-protobuf")
    assert call.request.forward_backward_input.loss_fn_config == {"beta": pytest.approx(0.1)}
    assert call.request.seq_id is None and call.forward_only is False
    assert call.request.forward_backward_input.data == []


def test_json_forward_backward_old_sdk() -> None:
    """SDK <= 0.24 JSON bodies: pydantic-dumped datums, <= 0.17 chunks without "type", sparse CSR as lists."""
    pyd = PydanticDatum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 0.0]})
    old = {"model_input": {"chunks": [{"tokens": [7, 8]}]},  # no "type": inferred as encoded_text
           "loss_fn_inputs": {"target_tokens": {"data": [8, 9], "dtype": "int64", "shape": [2], "extra": 1},
                              "weights": {"data": [0.5], "dtype": "float32", "shape": [2, 2],
                                          "sparse_crow_indices": [0, 0, 1], "sparse_col_indices": [1]}}}
    body = {"forward_backward_input": {"data": [model_dump(pyd, exclude_none=True, mode="json"), old],
                                       "loss_fn": "cross_entropy", "loss_fn_config": None},
            "model_id": "s:train:1", "seq_id": 3, "type": "forward_backward", "future_field": True}
    call = wire.decode_forward_backward(json.dumps(body).encode(), "application/json")
    assert (call.request.model_id, call.request.seq_id, call.forward_only) == ("s:train:1", 3, False)
    d0, d1 = call.request.forward_backward_input.data
    assert d0.model_input.to_ints() == [1, 2, 3]
    np.testing.assert_array_equal(dense(d0.loss_fn_inputs["target_tokens"]), [2, 3, 4])
    assert d1.model_input.to_ints() == [7, 8]
    np.testing.assert_array_equal(dense(d1.loss_fn_inputs["weights"]), [[0, 0], [0, 0.5]])
    assert call.request.forward_backward_input.loss_fn_config is None

    fwd = {"forward_input": body["forward_backward_input"], "model_id": "s:train:1"}  # legacy POST /forward
    call = wire.decode_forward_backward(json.dumps(fwd).encode(), "application/json")
    assert call.forward_only is True and call.request.seq_id is None


def _proto_with_weights(dense_bytes: bytes, shape: list[int]) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2], dtype="<i4").tobytes()
    datum.loss_fn_inputs["weights"].dtype = pb.DTYPE_FLOAT32
    datum.loss_fn_inputs["weights"].shape.extend(shape)
    datum.loss_fn_inputs["weights"].dense = dense_bytes
    return msg.SerializeToString()


@pytest.mark.parametrize("body, content_type, field", [
    (_proto_with_weights(b"\x00" * 7, [2]), "application/x-protobuf", "data[0].loss_fn_inputs.weights.dense"),
    (_proto_with_weights(b"\x00" * 12, [2]), "application/x-protobuf", "data[0].loss_fn_inputs.weights"),
    (b"\xff\xff\xff", "application/x-protobuf", "request body: not a valid ForwardBackwardRequest"),
    (b"[1, 2]", "application/json", "request body"),
    (json.dumps({"forward_backward_input": {"data": [{"model_input": {"chunks": [{"type": "video"}]}}],
                                            "loss_fn": "x"}, "model_id": "m"}).encode(),
     "application/json", "forward_backward_input.data[0].model_input.chunks[0].type"),
    (json.dumps({"forward_backward_input": {"data": [{"model_input": {"chunks": []}, "loss_fn_inputs": {
        "weights": {"data": [1.0], "dtype": "float32", "shape": [2, 2], "sparse_crow_indices": [0, 1, 5],
                    "sparse_col_indices": [0]}}}], "loss_fn": "x"}, "model_id": "m"}).encode(),
     "application/json", "forward_backward_input.data[0].loss_fn_inputs.weights.sparse_crow_indices"),
    (json.dumps({"forward_backward_input": {"data": [{"model_input": {"chunks": []}, "loss_fn_inputs": {
        "target_tokens": {"data": [1.5], "dtype": "int64"}}}], "loss_fn": "x"}, "model_id": "m"}).encode(),
     "application/json", "forward_backward_input.data[0].loss_fn_inputs.target_tokens.data"),
    (json.dumps({"forward_backward_input": {"data": [], "loss_fn": "x"}, "model_id": 5}).encode(),
     "application/json", "model_id"),
])
def test_malformed_forward_backward_names_the_field(body: bytes, content_type: str, field: str) -> None:
    with pytest.raises(UserError, match="^" + re.escape(field)):
        wire.decode_forward_backward(body, content_type)


def test_decompress_limits() -> None:
    blob = zstandard.ZstdCompressor().compress(b"x" * 1000)
    assert wire.decompress(blob, "zstd", 1000) == b"x" * 1000
    with pytest.raises(UserError, match="exceeds"):
        wire.decompress(blob, "zstd", 999)
    with pytest.raises(UserError, match="invalid zstd"):
        wire.decompress(b"not zstd", "zstd", 1000)
    with pytest.raises(UserError, match="not supported"):
        wire.decompress(b"", "br", 1000)
    assert wire.decompress(b"raw", None, 1) == b"raw"  # identity is not capped here (the middleware caps it)


# --- requests: lenient JSON --------------------------------------------------------------------------------------


def test_parse_sample_request_like_sdk_038() -> None:
    targets = types.TensorData(data=[3, 9], dtype="int64", shape=[3, 2],
                               sparse_crow_indices=[0, 1, 1, 2], sparse_col_indices=[0, 1])
    req = types.SampleRequest(
        num_samples=2, prompt=types.ModelInput.from_ints([1, 2, 3, 4]),
        sampling_params=types.SamplingParams(max_tokens=5, stop=[], temperature=0.7, seed=2**63),
        sampling_session_id="s:sample:0", seq_id=3_000_000_007, prompt_logprobs=True, topk_prompt_logprobs=2,
        target_prompt_logprobs=model_dump_tensor(targets))
    body = model_dump(req, exclude_unset=False, exclude_none=True, mode="json")  # what SDK >= 0.18 sends
    got = wire.parse_request(types.SampleRequest, json.loads(json.dumps(body)))
    assert got == req
    assert got.sampling_params.stop == []  # [] disables EOS: must not be mistaken for "missing"
    np.testing.assert_array_equal(wire.dense_array(got.target_prompt_logprobs, pad_value=-1),
                                  [[3, -1], [-1, -1], [-1, 9]])


def model_dump_tensor(td: types.TensorData):
    from tinker.types._pydantic_types.tensor_data import TensorData as PydTensorData
    return PydTensorData(data=td.data, dtype=td.dtype, shape=td.shape, sparse_crow_indices=td.sparse_crow_indices,
                         sparse_col_indices=td.sparse_col_indices)


def test_parse_request_is_lenient() -> None:
    # SDK <= 0.17 style: only set fields, chunk without type, explicit nulls; newer SDKs add unknown fields.
    body = {"prompt": {"chunks": [{"tokens": [1, 2], "future": 1}]}, "sampling_params": {"max_tokens": 4},
            "sampling_session_id": "s:sample:1", "seq_id": 0, "topk_sample_logprobs": None, "brand_new": [1]}
    req = wire.parse_request(types.SampleRequest, body)
    assert req.prompt.to_ints() == [1, 2] and req.num_samples == 1 and req.topk_sample_logprobs == 0
    assert req.sampling_params == types.SamplingParams(max_tokens=4)

    optim = wire.parse_request(types.OptimStepRequest, {"model_id": "m", "seq_id": 2, "adam_params": {}})
    assert optim.optim_params == types.AdamParams()  # SDK defaults applied server side (§1.4)

    session = wire.parse_request(types.CreateSessionRequest, {"tags": [], "sdk_version": "0.13.0"})
    assert session.user_metadata is None  # required-but-nullable field may be absent

    model = wire.parse_request(types.CreateModelRequest, {
        "session_id": "s", "model_seq_id": 0, "base_model": "B", "type": "create_model",
        "lora_config": {"rank": 8, "seed": None, "train_unembed": False, "new_knob": 1},
        "optimizer_config": {"type": "adamw"}})
    assert model.lora_config == types.LoraConfig(rank=8, train_unembed=False)


def test_parse_request_errors_name_the_field() -> None:
    with pytest.raises(UserError, match=r"^CreateModelRequest\.base_model: Field required"):
        wire.parse_request(types.CreateModelRequest, {"session_id": "s", "model_seq_id": 0})
    with pytest.raises(UserError, match=r"^SampleRequest\.prompt\.chunks\[0\]\.tokens\[1\]"):
        wire.parse_request(types.SampleRequest, {"prompt": {"chunks": [{"tokens": [1, "x"]}]},
                                                 "sampling_params": {}})
    with pytest.raises(UserError, match=r"^SampleRequest\.prompt\.chunks: a ModelInput needs"):
        wire.parse_request(types.SampleRequest, {"prompt": {"tokens": [1]}, "sampling_params": {}})


# --- results: ForwardBackwardOutput ------------------------------------------------------------------------------


def test_forward_backward_output_decodes_with_sdk_reader() -> None:
    def td(arr) -> types.TensorData:
        return types.TensorData.from_numpy(np.asarray(arr))

    outputs = [
        {"logprobs": td(np.array([-1.0, -2.5, -0.25], np.float32)), "ids": td(np.array([3, 4, 5], np.int64))},
        {"logprobs": td(np.array([-0.5], np.float32)), "ids": td(np.array([9], np.int64))},
        {"logprobs": td(np.arange(6, dtype=np.float32).reshape(3, 2))},  # top-K shape, no "ids": new record
        {"logprobs": td(np.array([], np.float32)), "ids": td(np.array([], np.int64))},
    ]
    out = types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
                                      metrics={"loss:sum": 3.75, "tokens:sum": 4.0})
    blob = wire.encode_forward_backward_output(out)
    assert len(pb.ForwardBackwardOutput.FromString(blob).loss_fn_outputs) == 3  # runs of equal field layouts

    got = response_conv.deserialize_forward_backward_output(blob)
    assert got.loss_fn_output_type == "ArrayRecord"
    assert got.metrics == {"loss:sum": 3.75, "tokens:sum": 4.0}
    assert len(got.loss_fn_outputs) == len(outputs)
    for g, w in zip(got.loss_fn_outputs, outputs, strict=True):
        for name, want in w.items():
            assert g[name].dtype == want.dtype and g[name].shape == want.shape
            np.testing.assert_array_equal(g[name].to_numpy(), want.to_numpy())
    assert got.loss_fn_outputs[2]["ids"].shape == [0]  # a field missing from a datum is an empty slice

    empty = response_conv.deserialize_forward_backward_output(wire.encode_forward_backward_output(
        types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[], metrics={"loss:sum": 0})))
    assert empty.loss_fn_outputs == [] and empty.metrics == {"loss:sum": 0.0}

    as_json = json.loads(wire.downgrade_to_json("forward_backward", blob))  # SDK <= 0.18.0
    assert as_json["loss_fn_outputs"][2]["logprobs"] == {"data": [0, 1, 2, 3, 4, 5], "dtype": "float32",
                                                         "shape": [3, 2]}
    assert as_json["metrics"]["loss:sum"] == 3.75


@pytest.mark.parametrize("key", ["loss", "loss:sum:extra"])
def test_metric_keys_need_exactly_one_colon(key: str) -> None:
    out = types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[], metrics={key: 1.0})
    with pytest.raises(ValueError, match="exactly one colon"):
        wire.encode_forward_backward_output(out)


# --- results: SampleResponse -------------------------------------------------------------------------------------


def test_sample_response_decodes_with_sdk_reader() -> None:
    topk_seq = TopkLogprobs(token_ids=np.array([[7, 1], [8, 0]], np.int32),
                            logprobs=np.array([[-0.1, -2.0], [-0.2, -99999.0]], np.float32))
    sequences = [
        types.SampledSequence(stop_reason="stop", sequence_id="x", tokens_np=np.array([7, 8], np.int32),
                              logprobs_np=np.array([-0.1, -0.2], np.float32), topk_logprobs_np=topk_seq),
        types.SampledSequence(stop_reason="length", sequence_id="y", _tokens_list=[3, 4, 5],
                              _logprobs_list=[-1.0, -1.5, -3.0]),
    ]
    topk_prompt = [None, [(5, -0.5), (6, -1.25)], [(9, -0.75)]]  # row 2 shorter than k: sentinel-padded
    target = types.TensorData(data=np.array([-0.5, -3.0], np.float32), dtype="float32", shape=[2, 2],
                              sparse_crow_indices=[0, 1, 2], sparse_col_indices=[1, 0])
    alt = types.PromptAltTokens(tokens=types.TensorData.from_numpy(np.array([[4], [2]], np.int64)),
                                logprobs=types.TensorData.from_numpy(np.array([[-1.0], [-2.0]], np.float32)))
    resp = types.SampleResponse(sequences=sequences, _prompt_logprobs_list=[None, -0.5, -0.75],
                                _topk_prompt_logprobs_list=topk_prompt, target_prompt_logprobs=target,
                                prompt_alt_tokens=alt, prompt_cache_hit_tokens=2)

    got = response_conv.deserialize_sample_response(wire.encode_sample_response(resp))

    assert [s.stop_reason for s in got.sequences] == ["stop", "length"]
    assert [s.tokens for s in got.sequences] == [[7, 8], [3, 4, 5]]
    np.testing.assert_allclose(got.sequences[1].logprobs, [-1.0, -1.5, -3.0])
    assert got.sequences[0].topk_logprobs == [[(7, pytest.approx(-0.1)), (1, -2.0)], [(8, pytest.approx(-0.2))]]
    assert got.sequences[1].topk_logprobs is None
    assert got.prompt_logprobs == [None, -0.5, -0.75]  # None travelled as NaN
    assert got.topk_prompt_logprobs == [None, [(5, -0.5), (6, -1.25)], [(9, -0.75)]]
    assert got.target_prompt_logprobs.sparse_crow_indices == [0, 1, 2]
    assert got.target_prompt_logprobs.sparse_col_indices == [1, 0]
    np.testing.assert_array_equal(got.target_prompt_logprobs._numpy, [-0.5, -3.0])
    assert got.prompt_alt_tokens.tokens.tolist() == [[4], [2]]
    assert got.prompt_alt_tokens.logprobs.tolist() == [[-1.0], [-2.0]]
    assert got.prompt_cache_hit_tokens == 2

    as_json = json.loads(wire.downgrade_to_json("sample", wire.encode_sample_response(resp)))  # SDK <= 0.18.0
    assert as_json["prompt_logprobs"] == [None, -0.5, -0.75]
    assert as_json["sequences"][1] == {"stop_reason": "length", "tokens": [3, 4, 5], "logprobs": [-1.0, -1.5, -3.0]}
    assert as_json["topk_prompt_logprobs"][0] is None


def test_sample_response_minimal_and_invalid() -> None:
    resp = types.SampleResponse(sequences=[types.SampledSequence(
        stop_reason="length", sequence_id="z", tokens_np=np.array([1], np.int32), logprobs_np=np.array([-1.0]))])
    got = response_conv.deserialize_sample_response(wire.encode_sample_response(resp))
    assert got.prompt_logprobs is None and got.topk_prompt_logprobs is None and got.prompt_alt_tokens is None

    bad = types.SampleResponse(sequences=[types.SampledSequence(
        stop_reason="length", sequence_id="z", tokens_np=np.array([1, 2]), logprobs_np=np.array([-1.0]))])
    with pytest.raises(ValueError, match=r"sequences\[0\]\.logprobs"):
        wire.encode_sample_response(bad)


# --- results: JSON kinds -----------------------------------------------------------------------------------------


def test_json_results_parse_with_sdk_models() -> None:
    # The ephemeral save (save_weights_and_get_sampling_client) is parsed as the *Internal* model (path optional).
    ephemeral = wire.encode_result("save_weights_for_sampler",
                                   types.SaveWeightsForSamplerResponseInternal(sampling_session_id="s:sample:3"))
    assert ephemeral.content_type == "application/json"
    assert "path" not in json.loads(ephemeral.body)  # SDK <= 0.19 asserts path is None on ephemeral saves
    parsed = types.SaveWeightsForSamplerResponseInternal.model_validate_json(ephemeral.body)
    assert parsed.sampling_session_id == "s:sample:3" and parsed.path is None

    optim = wire.encode_result("optim_step", {"metrics": {"grad_norm:mean": math.pi}})
    assert types.OptimStepResponse.model_validate_json(optim.body).metrics == {"grad_norm:mean": math.pi}

    with pytest.raises(ValueError, match="'error'"):
        wire.encode_result("optim_step", {"error": "looks like a failure to the client"})
    with pytest.raises(TypeError):
        wire.encode_result("sample", {"sequences": []})


def test_tensor_guards() -> None:
    # A few bytes of CSR must not make the server allocate gigabytes.
    huge = {"data": [1.0], "dtype": "float32", "shape": [1 << 20, 1 << 20], "sparse_crow_indices": [0, 1],
            "sparse_col_indices": [0]}
    with pytest.raises(ValueError, match=r"^w\.shape: .* exceeds"):
        wire.tensor_from_json(huge, "w")
    # An engine bug in a CSR result is caught before the client sees it.
    broken = types.TensorData(data=np.array([1.0], np.float32), dtype="float32", shape=[2, 2],
                              sparse_crow_indices=[0, 2, 2], sparse_col_indices=[0])
    resp = types.SampleResponse(sequences=[], target_prompt_logprobs=broken)
    with pytest.raises(ValueError, match=r"^target_prompt_logprobs\.sparse_crow_indices"):
        wire.encode_sample_response(resp)
    # bf16 / int32 proto tensors widen the way the SDK widens them.
    bf16 = pb.Tensor(dtype=pb.DTYPE_BFLOAT16, dense=np.array([0x3F80, 0xC000], "<u2").tobytes())
    np.testing.assert_array_equal(dense(wire.tensor_from_proto(bf16, "t")), [1.0, -2.0])
    i32 = wire.tensor_from_proto(pb.Tensor(dtype=pb.DTYPE_INT32, dense=np.array([7], "<i4").tobytes()), "t")
    assert i32.dtype == "int64" and dense(i32).tolist() == [7]
