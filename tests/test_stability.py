"""engine.stability: the samples recorded for stable_reinforce, and datums resolved against them (no model).

Datums are built the way tinker-cookbook builds them (`recipes/rl_loop.with_sampled_provenance` and
`rl/data_processing.trajectory_to_data`, multi-turn included) with the SDK's own `Datum.with_provenance`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tinker.types as tt

from tinker_jax.engine.stability import StabilityLog
from tinker_jax.errors import UserError
from tinker_jax.sampling import response

PROMPT = [5, 6, 7, 8]
SAMPLED = [11, 12, 13]
LOGPROBS = [-0.5, -1.25, -2.0]


def seq(sid: str, tokens=SAMPLED, logprobs=LOGPROBS) -> tt.SampledSequence:
    return response.sequence(tokens, logprobs, "length", sid)


def rl_loop_datum(sid: str, prompt=PROMPT, sampled=SAMPLED, client_logprobs=None) -> tt.Datum:
    """tinker-cookbook's rl_loop: placeholder targets (0) on the prompt, provenance on both fields."""
    ob = len(prompt) - 1
    datum = tt.Datum(model_input=tt.ModelInput.from_ints(prompt + sampled[:-1]), loss_fn_inputs={
        "target_tokens": [0] * ob + sampled,
        "logprobs": client_logprobs if client_logprobs is not None else [0.0] * ob + [9.0] * len(sampled),
        "advantages": [0.0] * ob + [1.5] * len(sampled)})
    return datum.with_provenance(
        model_input=[tt.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
                     tt.SampledProvenanceSpan(sequence_id=sid, length=len(sampled) - 1)],
        loss_fn_inputs=[tt.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(prompt) - 1),
                        tt.SampledProvenanceSpan(sequence_id=sid, length=len(sampled))])


def arr(td) -> np.ndarray:
    return np.asarray(td.data, np.float32)  # the records are float32, as the sampler returned them


def test_resolve_writes_the_recorded_logprobs_and_the_sampled_mask():
    log = StabilityLog(max_tokens=1000, idle_s=60)
    log.record("s1", PROMPT, [seq("a:0"), seq("a:1", [21, 22, 23], [-0.1, -0.2, -0.3])])
    (out,) = log.resolve([rl_loop_datum("a:1", sampled=[21, 22, 23])], "s1")
    # the client's logprobs (9.0) are replaced by the record; prompt positions are not sampled
    np.testing.assert_array_equal(arr(out.loss_fn_inputs["logprobs"]), np.float32([0, 0, 0, -0.1, -0.2, -0.3]))
    np.testing.assert_array_equal(arr(out.loss_fn_inputs["sampled_mask"]), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(arr(out.loss_fn_inputs["advantages"]), [0, 0, 0, 1.5, 1.5, 1.5])
    assert out.model_input.to_ints() == PROMPT + [21, 22]
    assert out.loss_fn_input_spans is None  # resolved rows are plain datums


def test_multi_turn_trajectory_spans_two_requests():
    """trajectory_to_data: turn 2's prompt is turn 1's prompt + action + a new observation; its new observation
    tokens are a prompt span of turn 2's request at the offset where they begin."""
    log = StabilityLog(max_tokens=1000, idle_s=60)
    p1, a1 = [1, 2, 3], [4, 5]
    p2, a2 = p1 + a1 + [6, 7], [8, 9, 10]
    log.record("s", p1, [seq("t1", a1, [-0.4, -0.6])])
    log.record("s", p2, [seq("t2", a2, [-1.0, -1.5, -0.25])])
    full = p2 + a2
    spans = [tt.PromptProvenanceSpan(sequence_id="t1", length=3), tt.SampledProvenanceSpan(sequence_id="t1", length=2),
             tt.PromptProvenanceSpan(sequence_id="t2", offset=5, length=2),
             tt.SampledProvenanceSpan(sequence_id="t2", length=3)]
    target_spans = [tt.PromptProvenanceSpan(sequence_id="t1", offset=1, length=2), *spans[1:]]
    input_spans = [*spans[:-1], tt.SampledProvenanceSpan(sequence_id="t2", length=2)]
    d = tt.Datum(model_input=tt.ModelInput.from_ints(full[:-1]),
                 loss_fn_inputs={"target_tokens": full[1:], "advantages": [1.0] * (len(full) - 1)})
    (out,) = log.resolve([d.with_provenance(model_input=input_spans, loss_fn_inputs=target_spans)], "s")
    np.testing.assert_array_equal(arr(out.loss_fn_inputs["sampled_mask"]), [0, 0, 1, 1, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(arr(out.loss_fn_inputs["logprobs"]), [0, 0, -0.4, -0.6, 0, 0, -1.0, -1.5, -0.25])


@pytest.mark.parametrize("case, match", [
    ("no_spans", r"datum\[0\]\.loss_fn_input_spans: stable_reinforce needs provenance"),
    ("unknown", r"datum\[0\]\.loss_fn_input_spans\[0\]\.sequence_id: no recorded sample 'zz:0'"),
    ("other_session", r"no recorded sample 'a:0' in this session"),
    ("wrong_target", r"datum\[0\]\.loss_fn_inputs\['target_tokens'\]\[4\] is 99 but "
                     r"datum\[0\]\.loss_fn_input_spans\[1\] says it is the recorded token 12"),
    ("wrong_context", r"datum\[0\]\.model_input\[1\] is 66 but datum\[0\]\.model_input_spans\[0\] says it is the "
                      r"recorded token 6"),
    ("wrong_shift", r"datum\[0\]\.model_input\[4\] is 99 but target_tokens\[3\], a sampled token, is 11"),
    ("past_the_end", r"loss_fn_input_spans\[1\]: offset 1 \+ length 3 is past the 3 sampled tokens"),
    ("bad_tiling", r"loss_fn_input_spans: the spans cover 5 positions but target_tokens has 6"),
])
def test_refusals_name_the_field(case, match):
    log = StabilityLog(max_tokens=1000, idle_s=60)
    log.record("s1", PROMPT, [seq("a:0")])
    d = rl_loop_datum("zz:0" if case == "unknown" else "a:0")
    tenant = "s2" if case == "other_session" else "s1"
    if case == "no_spans":
        d = tt.Datum(model_input=d.model_input, loss_fn_inputs=d.loss_fn_inputs)
    elif case == "wrong_target":
        d = _with_targets(d, [0, 0, 0, 11, 99, 13])
    elif case == "wrong_context":
        d = _with_input(d, [5, 66, 7, 8, 11, 12])
    elif case == "wrong_shift":
        d = _with_input(d, [5, 6, 7, 8, 99, 12])
    elif case == "past_the_end":
        d = _with_spans(d, loss=[tt.PromptProvenanceSpan(sequence_id="a:0", offset=1, length=3),
                                 tt.SampledProvenanceSpan(sequence_id="a:0", offset=1, length=3)])
    elif case == "bad_tiling":
        d = _with_spans(d, loss=[tt.PromptProvenanceSpan(sequence_id="a:0", offset=1, length=2),
                                 tt.SampledProvenanceSpan(sequence_id="a:0", length=3)])
    with pytest.raises(UserError, match=match):
        log.resolve([d], tenant)


def _with_targets(d, targets):
    td = tt.TensorData(data=targets, dtype="int64", shape=[len(targets)])
    return dataclasses.replace(d, loss_fn_inputs=dict(d.loss_fn_inputs, target_tokens=td))


def _with_input(d, tokens):
    return dataclasses.replace(d, model_input=tt.ModelInput.from_ints(tokens))


def _with_spans(d, loss):
    return dataclasses.replace(d, loss_fn_input_spans=loss)


def test_records_are_per_session():
    """Two sessions may use the same sequence id (in-process ids, another server's): neither replaces the other's."""
    log = StabilityLog(max_tokens=1000, idle_s=60)
    log.record("s1", PROMPT, [seq("x:0")])
    log.record("s2", PROMPT, [seq("x:0", [11, 12, 14], [-1.0, -1.0, -1.0])])
    (one,) = log.resolve([rl_loop_datum("x:0")], "s1")
    np.testing.assert_array_equal(arr(one.loss_fn_inputs["logprobs"])[3:], np.float32(LOGPROBS))
    with pytest.raises(UserError, match="recorded token 14"):
        log.resolve([rl_loop_datum("x:0")], "s2")


def test_a_flood_from_one_session_evicts_its_own_records_first():
    cost = len(PROMPT) + len(SAMPLED)
    log = StabilityLog(max_tokens=4 * cost, idle_s=60)
    log.record("quiet", PROMPT, [seq("q:0")])
    log.record("loud", PROMPT, [seq(f"l:{i}") for i in range(10)])  # over budget from its 4th record on
    assert len(log) == 4
    log.resolve([rl_loop_datum("q:0")], "quiet")  # still there
    log.resolve([rl_loop_datum("l:9"), rl_loop_datum("l:8"), rl_loop_datum("l:7")], "loud")  # its newest three
    with pytest.raises(UserError, match="'l:6'"):
        log.resolve([rl_loop_datum("l:6")], "loud")
    log.record("quiet", PROMPT, [seq("q:0")])  # the same id again replaces the record (its only one)
    assert len(log) == 4
    log.resolve([rl_loop_datum("q:0")], "quiet")


def test_records_expire_when_idle_and_the_least_recently_used_go_first():
    now = [0.0]
    log = StabilityLog(max_tokens=3 * (len(PROMPT) + len(SAMPLED)), idle_s=100, clock=lambda: now[0])
    log.record("s", PROMPT, [seq("a"), seq("b"), seq("c")])
    now[0] = 50
    log.resolve([rl_loop_datum("a")], "s")  # a use keeps "a" fresh
    log.record("s", PROMPT, [seq("d")])  # over budget: "b", the least recently used, goes
    assert len(log) == 3
    with pytest.raises(UserError, match="'b'"):
        log.resolve([rl_loop_datum("b")], "s")
    now[0] = 120  # "c" (recorded at 0) is idle past 100 s; "a" (used at 50) and "d" are not
    log.resolve([rl_loop_datum("a"), rl_loop_datum("d")], "s")
    with pytest.raises(UserError, match="'c'.*kept 100 s after their last use"):
        log.resolve([rl_loop_datum("c")], "s")
