"""What StableReinforce trains on: the samples a sampler produced, recorded under each sequence's id when the
request asked for it (`record_stability_info`), and looked up through a training datum's provenance spans.

A record holds the request's prompt (shared by its samples), the sampled tokens and their logprobs, exactly as
the sampler returned them (fp32). A `stable_reinforce` forward_backward names, with `loss_fn_input_spans`, which
recorded token every target position is (and, with `model_input_spans`, which recorded token every input
position is). `resolve` checks the datum against the records and writes the two inputs the loss reads:
`logprobs` (the recorded sampler logprobs at sampled positions, 0 elsewhere) and `sampled_mask` (1 at sampled
positions). What the client sent under those keys is replaced: the behaviour policy is the server's record, so
a mis-padded or stale client array cannot skew the importance ratio, and a target that is not the token the
sampler drew is refused instead of trained on.

Targets under a prompt span are not compared with the prompt: tinker-cookbook's rl_loop fills them with
placeholder ids, and they carry no loss (the objective reads sampled positions only).

Records belong to the tenant that sampled them (a REST session; in process, the one local tenant), as the SDK
documents ("session-scoped"), and live `idle_s` after their last use, within `max_tokens` recorded tokens
(prompt + sampled, per sequence); over the budget, the tenant holding the most tokens loses its least recently
used record first. A datum naming an expired, unknown or another session's sequence is a user error saying so.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tinker.types as tt

from tinker_jax.errors import UserError
from tinker_jax.training.batching import datum_tokens, tensor_array


@dataclass(frozen=True)
class Record:
    tenant: str
    prompt: np.ndarray  # [P] int32, the same array for every sample of one request
    tokens: np.ndarray  # [S] int32 sampled tokens
    logprobs: np.ndarray  # [S] float32 their logprobs under the sampler's distribution

    @property
    def cost(self) -> int:
        return len(self.prompt) + len(self.tokens)


class StabilityLog:
    """Per tenant, sequence_id -> Record, least recently used first. Over the token budget, the tenant holding the
    most tokens loses its least recently used record first, so one session's flood of samples does not push out
    another's. The lock guards the dicts only (no I/O under it)."""

    def __init__(self, max_tokens: int, idle_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_tokens, self.idle_s, self._clock = int(max_tokens), float(idle_s), clock
        self._records: dict[str, OrderedDict[str, tuple[Record, float]]] = {}  # tenant -> its records
        self._tokens: dict[str, int] = {}  # tenant -> tokens its records hold
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(r) for r in self._records.values())

    def record(self, tenant: str, prompt: Sequence[int], sequences: Sequence[tt.SampledSequence]) -> None:
        shared = np.asarray(prompt, np.int32)
        now = self._clock()
        with self._lock:
            for seq in sequences:
                logprobs = seq.logprobs_np if seq.logprobs_np is not None else seq.logprobs
                if not seq.sequence_id or logprobs is None:
                    continue
                tokens = seq.tokens_np if seq.tokens_np is not None else seq.tokens
                rec = Record(tenant, shared, np.asarray(tokens, np.int32), np.asarray(logprobs, np.float32))
                self._drop(tenant, seq.sequence_id)  # (may forget the tenant's dict: taken again below)
                self._records.setdefault(tenant, OrderedDict())[seq.sequence_id] = (rec, now)
                self._tokens[tenant] = self._tokens.get(tenant, 0) + rec.cost
            self._evict(now)

    def _drop(self, tenant: str, sequence_id: str | None = None) -> None:
        """Forget one record of `tenant` (its least recently used when sequence_id is None)."""
        mine = self._records.get(tenant)
        if not mine:
            return
        if sequence_id is None:
            _, old = mine.popitem(last=False)
        else:
            old = mine.pop(sequence_id, None)
        if old is not None:
            self._tokens[tenant] -= old[0].cost
        if not mine:
            del self._records[tenant], self._tokens[tenant]

    def _evict(self, now: float) -> None:
        for tenant in list(self._records):
            while tenant in self._records and now - next(iter(self._records[tenant].values()))[1] > self.idle_s:
                self._drop(tenant)
        while self._tokens and sum(self._tokens.values()) > self.max_tokens:
            self._drop(max(self._tokens, key=self._tokens.__getitem__))

    def _get(self, sequence_id: str, tenant: str, where: str) -> Record:
        now = self._clock()
        with self._lock:
            self._evict(now)
            mine = self._records.get(tenant)
            hit = mine.get(sequence_id) if mine else None
            if hit is not None:
                mine[sequence_id] = (hit[0], now)
                mine.move_to_end(sequence_id)
                return hit[0]
        raise UserError(f"{where}.sequence_id: no recorded sample {sequence_id!r} in this session (sample with "
                        f"record_stability_info=True; records are kept {self.idle_s:.0f} s after their last use, "
                        f"up to {self.max_tokens} tokens per server)")

    # ------------------------------------------------------------------------------------------ datums
    def resolve(self, datums: Sequence[tt.Datum], tenant: str) -> list[tt.Datum]:
        """The datums with `logprobs` and `sampled_mask` taken from the records their spans name."""
        return [self._resolve(d, i, tenant) for i, d in enumerate(datums)]

    def _resolve(self, d: tt.Datum, i: int, tenant: str) -> tt.Datum:
        where = f"datum[{i}]"
        spans = d.loss_fn_input_spans
        if not spans:
            raise UserError(f"{where}.loss_fn_input_spans: stable_reinforce needs provenance on every datum "
                            "(Datum.with_provenance naming the sampled sequences behind its targets)")
        if "target_tokens" not in d.loss_fn_inputs:
            raise UserError(f"{where}.loss_fn_inputs: missing ['target_tokens'] required by loss_fn "
                            "'stable_reinforce'")
        targets = _ids(d.loss_fn_inputs["target_tokens"], f"{where}.loss_fn_inputs['target_tokens']")
        n = len(targets)
        logprobs, sampled = np.zeros(n, np.float32), np.zeros(n, np.float32)
        for j, span, rec, pos, src in self._walk(spans, n, tenant, f"{where}.loss_fn_input_spans",
                                                 "target_tokens"):
            if isinstance(span, tt.SampledProvenanceSpan):
                _same(targets[pos:pos + span.length], src, pos, f"{where}.loss_fn_inputs['target_tokens']",
                      f"{where}.loss_fn_input_spans[{j}]")
                logprobs[pos:pos + span.length] = rec.logprobs[span.offset:span.offset + span.length]
                sampled[pos:pos + span.length] = 1.0
        tokens = np.asarray(datum_tokens(d, i), np.int64)
        # A sampled target is fed back as the next input (inputs are the targets shifted by one): otherwise the
        # recorded logprob was not drawn in this datum's context.
        p = np.flatnonzero(sampled[:-1] > 0)
        bad = p[tokens[p + 1] != targets[p]] if len(tokens) == n else p[:0]
        if len(bad):
            q = int(bad[0])
            raise UserError(f"{where}.model_input[{q + 1}] is {int(tokens[q + 1])} but target_tokens[{q}], a sampled "
                            f"token, is {targets[q]:g}: the inputs must be the targets shifted by one")
        if d.model_input_spans:
            for j, span, rec, pos, src in self._walk(d.model_input_spans, len(tokens), tenant,
                                                     f"{where}.model_input_spans", "model_input"):
                _same(tokens[pos:pos + span.length], src, pos, f"{where}.model_input",
                      f"{where}.model_input_spans[{j}]")
        inputs = {k: v for k, v in d.loss_fn_inputs.items() if k not in ("logprobs", "sampled_mask")}
        inputs["logprobs"] = tt.TensorData.from_numpy(logprobs)
        inputs["sampled_mask"] = tt.TensorData.from_numpy(sampled)
        return tt.Datum(model_input=d.model_input, loss_fn_inputs=inputs)

    def _walk(self, spans, n: int, tenant: str, where: str, field: str):
        """(index, span, record, first position, the record's tokens for it) for spans tiling `n` positions."""
        total = sum(int(s.length) for s in spans)
        if total != n:
            raise UserError(f"{where}: the spans cover {total} positions but {field} has {n}; they must tile it")
        pos = 0
        for j, span in enumerate(spans):
            rec = self._get(span.sequence_id, tenant, f"{where}[{j}]")
            src = rec.tokens if isinstance(span, tt.SampledProvenanceSpan) else rec.prompt
            kind = "sampled tokens" if isinstance(span, tt.SampledProvenanceSpan) else "prompt tokens"
            if span.offset + span.length > len(src):
                raise UserError(f"{where}[{j}]: offset {span.offset} + length {span.length} is past the "
                                f"{len(src)} {kind} of sequence {span.sequence_id!r}")
            yield j, span, rec, pos, src[span.offset:span.offset + span.length]
            pos += span.length


def _ids(td, where: str) -> np.ndarray:
    a = tensor_array(td, where)
    if a.ndim != 1:
        raise UserError(f"{where}: stable_reinforce takes one target per position, got shape {list(a.shape)}")
    return a


def _same(got: np.ndarray, want: np.ndarray, first: int, field: str, span: str) -> None:
    bad = np.flatnonzero(got != want)
    if len(bad):
        k = int(bad[0])
        raise UserError(f"{field}[{first + k}] is {got[k]:g} but {span} says it is the recorded token "
                        f"{int(want[k])}: the datum does not match the sample it names")
