"""The benchmark harness (benchmarks/): a tiny real run through `tinker-jax bench --quick` and the JSON schema.

No timing assertions: figures from a shared test machine mean nothing; only that each figure is a number with a
spread, or a string saying why it is missing.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import report, rows
from benchmarks.run import Results
from benchmarks.suites import SECTIONS, get_suite
from benchmarks.timing import Stat


def test_quick_bench_cli_writes_schema_valid_json(tmp_path):
    from tinker_jax.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--only", "peak,train", "--work-dir", str(tmp_path / "work"), "--out", str(out),
               "--no-compile-cache"])
    assert rc == 0
    data = json.loads(out.read_text())
    report.validate_rows(data)
    by_metric = {r["metric"]: r for r in data}
    train = by_metric["train LoRA r4 (attn+MLP) 2x32"]
    assert train["unit"] == "tokens/s" and train["higher_is_better"]
    assert isinstance(train["ours"], float), train["ours"]
    assert set(train["peers"]) == {"transformers+peft", "skyrl-tx"}
    assert isinstance(train["peers"]["transformers+peft"], float), train["peers"]
    assert train["peers"]["skyrl-tx"].startswith(("not installed:", "not run:"))
    assert train["spread"]["ours"]["n"] == 1 and set(train["ratio"]) == {"transformers+peft"}
    assert "MFU train LoRA r4 (attn+MLP) 2x32" in by_metric
    for r in data:
        assert r["suite"] == "quick" and r["versions"]["jax"] and r["machine"]["cpu_count"]


def _fake_results(suite, fail: set[str]) -> Results:
    res = Results(60, log=lambda s: None)
    s = lambda *xs: Stat(list(xs))  # noqa: E731
    vals = {"peak.jax": s(1e10, 1.1e10), "peak.torch": s(9e9, 1e10),
            "frontdoor": {"rest": s(10.0, 12.0, 30.0), "in_process": s(2.0, 2.5, 3.0)},
            "handoff.ours": {"in_memory": s(0.01, 0.02), "via_path": s(0.3, 0.4)}, "handoff.torch": s(1.0, 1.2),
            "coldstart": {"no_cache": s(30.0), "warm_cache": s(12.0), "breakdown": {"no_cache": {"total_s": 30.0}}}}
    for t in suite.train:
        vals[f"train.{t.label}.ours"] = s(0.5, 0.6)
        vals[f"train.{t.label}.torch"] = s(0.9, 1.0)
    for b in suite.sample_batches:
        vals[f"sample.{b}.ours"] = (s(100.0, 110.0), [64.0, 64.0])
        vals[f"sample.{b}.torch"] = s(1.0, 1.1)
    for k, v in vals.items():
        res.values[k] = "failed: RuntimeError: boom" if k.split(".")[0] in fail else v
    return res


@pytest.mark.parametrize("fail", [set(), {"train", "frontdoor", "coldstart", "handoff"}])
def test_every_row_kind_fits_the_schema(fail):
    suite = get_suite("cpu")
    meta = {"suite": "cpu", "date": "2026-01-01T00:00:00+00:00", "machine": {"cpu_count": 2},
            "versions": {"jax": "0"}, "caveats": []}
    shape = {"n_params": 29_000_000, "n_layers": 8, "attn_dim": 512, "vocab_size": 8192}
    out = rows.assemble(suite, SECTIONS, _fake_results(suite, fail), {"shape": shape}, meta)
    report.validate_rows(out)
    json.dumps(out)
    metrics = [r["metric"] for r in out]
    assert len(metrics) == len(set(metrics))
    assert sum(m.startswith("decode batch") for m in metrics) == 3
    assert sum(m.startswith("MFU train") for m in metrics) == 2
    over = next(r for r in out if r["metric"].startswith("front-door overhead"))
    assert over["unit"] == "ms" and not over["higher_is_better"]
    if "frontdoor" in fail:
        assert over["ours"].startswith("failed:")
    else:
        assert over["ours"] == pytest.approx(9.5)  # median of the paired differences 8, 9.5, 27
    assert report.table(out) and report.markdown_table(out)


@pytest.mark.parametrize("bad", [
    lambda r: r.update(ours=float("nan")),
    lambda r: r.update(ours="it broke"),
    lambda r: r["spread"].update(ours=None),
    lambda r: r.pop("machine"),
    lambda r: r["peers"].update(extra=1.0),
])
def test_validate_rows_rejects(bad):
    row = report.make_row("m", "s", Stat([1.0, 2.0]), {"p": Stat([3.0])}, meta={
        "suite": "x", "date": "d", "machine": {}, "versions": {}, "caveats": []})
    report.validate_rows([row])
    bad(row)
    with pytest.raises(ValueError):
        report.validate_rows([row])
