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
    vals["tenants"] = _fake_tenants(suite)
    for k, v in vals.items():
        res.values[k] = "failed: RuntimeError: boom" if k.split(".")[0] in fail else v
    return res


def _fake_tenants(suite) -> dict:
    """The shape of benchmarks.tenants_bench.measure_tenants' result (the child's JSON, samples as Stats)."""
    s = lambda *xs: Stat(list(xs))  # noqa: E731
    doors = ("rest", "in_process") if suite.tenants_frontdoor == "rest" else ("in_process",)
    counters = {"rounds": 12, "scheduler_rounds": 12, "micro_batches": 4, "rows": 64, "requests_batched": 16,
                "optim_steps": 16, "sampler.decode_calls": 8, "sampler.prefill_calls": 2,
                "sampler.tokens_generated": 256, "sampler.adapter_loads": 8, "sampler.rows_started": 16,
                "sampler.rows_joined_running_batch": 4}
    per_kind = {f"{p}{d}.{k}": dict(counters) for p in ("", "sample.") for d in doors for k in ("concurrent", "turns")}
    configs = []
    for i, n in enumerate(suite.tenants_counts):
        c = {"n": n, "rows": suite.tenants_rows, "length": suite.tenants_length, "steps": suite.tenants_steps,
             "work_tokens_per_phase": 1024, "create_s": 1.0,
             "memory": {"peak_bytes_in_use": (2 + i) * 2**30, "bytes_in_use": 2**30}}
        for d in doors:
            c[f"{d}.concurrent.samples"] = s(3000.0, 3100.0)
            c[f"{d}.turns.samples"] = s(1000.0, 1100.0)
            c[f"{d}.turns.step_latency_ms"] = {"n": 8, "median": 20.0 if d == "rest" else 10.0, "p90": 30.0,
                                               "max": 40.0}
        configs.append(c)
    if len(configs) > 1:  # one configuration that failed: its rows say why
        configs[-1] = {"n": configs[-1]["n"], "error": "failed: RuntimeError: out of memory"}
    out = {"frontdoor": suite.tenants_frontdoor, "device": "cpu:0", "configs": configs,
           "engine_stats": {"per_phase_kind": per_kind, "max_requests_per_batch": 8, "attention": "einsum"},
           "child_wall_s": 60.0}
    if suite.tenants_ref:
        out["ref"] = {"rows": suite.tenants_ref.rows, "length": suite.tenants_ref.length, "samples": s(4000.0),
                      "memory": "unavailable: jax.devices()[0].memory_stats() is None on cpu",
                      "frontdoor": doors[0]}
    if suite.tenants_samplers:
        out["sampling"] = {**{f"{d}.{k}.samples": s(500.0, 600.0) for d in doors for k in ("concurrent", "turns")},
                           "samplers": suite.tenants_samplers}
    return out


@pytest.mark.parametrize("suite_name", ["cpu", "gpu"])
@pytest.mark.parametrize("fail", [set(), {"train", "frontdoor", "coldstart", "handoff", "tenants"}])
def test_every_row_kind_fits_the_schema(fail, suite_name):
    suite = get_suite(suite_name)
    meta = {"suite": "cpu", "date": "2026-01-01T00:00:00+00:00", "machine": {"cpu_count": 2},
            "versions": {"jax": "0"}, "caveats": []}
    shape = {"n_params": 29_000_000, "n_layers": 8, "attn_dim": 512, "vocab_size": 8192}
    out = rows.assemble(suite, SECTIONS, _fake_results(suite, fail), {"shape": shape}, meta)
    report.validate_rows(out)
    json.dumps(out)
    metrics = [r["metric"] for r in out]
    assert len(metrics) == len(set(metrics))
    assert sum(m.startswith("decode batch") for m in metrics) == len(suite.sample_batches)
    assert sum(m.startswith("MFU train") for m in metrics) == len(suite.train)
    over = next(r for r in out if r["metric"].startswith("front-door overhead"))
    assert over["unit"] == "ms" and not over["higher_is_better"]
    if "frontdoor" in fail:
        assert over["ours"].startswith("failed:")
    else:
        assert over["ours"] == pytest.approx(9.5)  # median of the paired differences 8, 9.5, 27
    assert report.table(out) and report.markdown_table(out)
    _check_tenant_rows(suite, [r for r in out if r["metric"].startswith("tenants:")], "tenants" in fail)


def _check_tenant_rows(suite, rows_, failed: bool):
    doors = 2 if suite.tenants_frontdoor == "rest" else 1
    n_counts = len(suite.tenants_counts)
    assert len(rows_) == n_counts * (doors + 1) + doors * bool(suite.tenants_samplers)
    train = [r for r in rows_ if "training concurrently" in r["metric"]]
    assert len(train) == n_counts * doors
    ref = f"one adapter, {suite.tenants_ref.rows}x{suite.tenants_ref.length}" if suite.tenants_ref else None
    for r in train:
        assert r["unit"] == "tokens/s" and "the same clients one at a time" in r["peers"]
        assert (ref in r["peers"]) == bool(ref and r["settings"]["front_door"] == suite.tenants_frontdoor)
    mem = [r for r in rows_ if "peak device memory" in r["metric"]]
    assert len(mem) == n_counts and all(r["unit"] == "GiB" and not r["higher_is_better"] for r in mem)
    if failed:
        assert all(r["ours"].startswith("failed:") for r in rows_)
        return
    first = train[0]
    assert first["ours"] == pytest.approx(3050.0) and first["ratio"]["the same clients one at a time"] > 2.9
    assert "micro-batches" in first["settings"]["notes"]
    if suite.tenants_frontdoor == "rest":
        assert "front door adds 10.0 ms per step" in first["settings"]["notes"]
    if n_counts > 1:  # the configuration that failed
        assert all(r["ours"].startswith("failed:") for r in rows_ if f" {suite.tenants_counts[-1]} " in r["metric"])
    if suite.name == "gpu":
        assert mem[0]["ours"] == pytest.approx(2.0) and mem[0]["peers"][ref].startswith("unavailable:")
        assert train[-1]["goal"] and mem[-1]["goal"]


@pytest.mark.slow
def test_quick_bench_tenants_section(tmp_path):
    """The "tenants" section end to end at toy size: a child process with its own engine, the tinker SDK against
    the REST server on loopback, 2 clients, concurrent and one at a time, then the same through the in-process
    client; samplers of both adapters. Only the rows' presence and schema are checked, never the figures."""
    from tinker_jax.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--only", "tenants", "--work-dir", str(tmp_path / "work"), "--out", str(out),
               "--no-compile-cache"])
    assert rc == 0
    data = json.loads(out.read_text())
    report.validate_rows(data)
    suite = get_suite("quick")
    by_metric = {r["metric"]: r for r in data}
    assert all(m.startswith("tenants:") for m in by_metric) and len(data) == 5
    for door in ("tinker SDK + REST", "in-process tinker_jax client"):
        train = by_metric[f"tenants: 2 LoRA r4 clients training concurrently, 2x16 tokens each ({door})"]
        assert isinstance(train["ours"], float), train["ours"]
        assert isinstance(train["peers"]["the same clients one at a time"], float), train["peers"]
        assert train["spread"]["ours"]["n"] == suite.tenants_repeats
        assert "micro-batches" in train["settings"]["notes"]
        st = train["settings"]["engine_stats"]
        assert st["concurrent"]["requests_batched"] == st["turns"]["requests_batched"] == 2 * suite.tenants_steps
        smp = by_metric[f"tenants: 2 samplers of different LoRA r4 adapters sampling concurrently, 1x +4 tokens "
                        f"each ({door})"]
        assert isinstance(smp["ours"], float) and isinstance(smp["peers"]["the same samplers one at a time"], float)
        assert "decode calls" in smp["settings"]["notes"]
    mem = by_metric["tenants: peak device memory, 2 LoRA r4 adapters training"]
    assert mem["ours"].startswith("unavailable:")  # CPU: memory_stats() is None


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
