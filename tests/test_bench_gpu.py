"""benchmarks/gpu.sh --dry-run: the GPU suite's code paths (Qwen3 family preset written from a config dict, fp32
toy size, two-phase peer-then-ours order, MFU rows, the in-process tenants section) on this machine's CPU. No timing
assertions. Marked gpu_prep: `make test` leaves them out (about 2 of CI's minutes); `make test-gpu-prep` runs them,
as the step before a GPU session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.gpu_prep
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "TINKER_JAX_BENCH_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out),
                           "--only", "peak,train,tenants"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    report.validate_rows(rows)
    metrics = {r["metric"] for r in rows}
    assert {"train LoRA r32 (attn+MLP) 2x64", "train LoRA r32 (attn+MLP) 4x32", "train full fine-tune 2x64",
            "MFU train full fine-tune 2x64"} <= metrics
    assert all(r["suite"] == "gpu-dryrun" for r in rows)
    assert "MFU train" in proc.stdout  # the final table is printed
    # tenants: in process (no uvicorn on the GPU machine), 2 and 4 adapters against one adapter at 2x64
    by_metric = {r["metric"]: r for r in rows}
    for n in (2, 4):
        train = by_metric[f"tenants: {n} LoRA r32 clients training concurrently, 2x32 tokens each "
                          "(in-process tinker_jax client)"]
        assert isinstance(train["ours"], float), train["ours"]
        assert set(train["peers"]) == {"the same clients one at a time", "one adapter, 2x64"}
        assert all(isinstance(v, float) for v in train["peers"].values()), train["peers"]
        mem = by_metric[f"tenants: peak device memory, {n} LoRA r32 adapters training"]
        assert isinstance(mem["ours"], float) or mem["ours"].startswith("unavailable:")
    assert train["goal"] and mem["goal"]  # the largest configuration carries the goals
    smp = by_metric["tenants: 2 samplers of different LoRA r32 adapters sampling concurrently, 2x +8 tokens each "
                    "(in-process tinker_jax client)"]
    assert isinstance(smp["ours"], float), smp["ours"]


@pytest.mark.slow
@pytest.mark.gpu_prep
def test_gpu_diagnosis_scripts_run_at_toy_size(tmp_path):
    """benchmarks/gpu_diagnose.py and gpu_decode_ab.py (run by hand on a lent GPU after gpu.sh) at the dry-run
    size on this CPU: every variant produces a figure or a recorded error, never a crash."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    diag, ab = tmp_path / "diag.json", tmp_path / "ab.json"
    for mod, out in (("benchmarks.gpu_diagnose", diag), ("benchmarks.gpu_decode_ab", ab)):
        proc = subprocess.run([sys.executable, "-m", mod, "--suite", "gpu-dryrun", "--work-dir", str(tmp_path),
                               "--repeats", "1", "--out", str(out)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(diag.read_text())["variants"]
    assert {"fb", "fwd", "optim", "full-fb", "full-optim"} <= set(variants)
    assert all("median_s" in v for k, v in variants.items() if k in ("fb", "fwd", "optim"))
    rows = json.loads(ab.read_text())
    assert len(rows) == 4 and all(r.get("tokens_per_s", 0) > 0 for r in rows), rows


@pytest.mark.slow
@pytest.mark.gpu_prep
def test_gpu_decode_bench_dry_run(tmp_path):
    """`gpu.sh --decode --dry-run` (benchmarks/decode_bench.py at toy size): every batch row has its breakdown and
    floor, the RL row ran with num_samples, a sampler setting passed through --set reached the engine,
    --profile summarised the traced decode calls' ops, and a --variant row ran in its own engine."""
    out = tmp_path / "decode.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "TINKER_JAX_BENCH_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--decode", "--dry-run", "--out", str(out),
                           "--set", "decode_steps=4", "--profile", str(tmp_path / "trace"),
                           "--variant", "decode_attention=paged"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["sampler_settings"] == {"decode_steps": 4} and got["bandwidth_gbs"] > 0
    assert [r["batch"] for r in got["rows"]] == [2, 4]
    for r in got["rows"]:
        assert r["tokens"] == r["batch"] * r["new"] and r["decode_steps"] >= r["new"] - 1
        assert r["decode_calls"] >= (r["new"] - 1) / 4  # at most decode_steps 4 per call
        assert r["floor"]["ms"] > 0 and r["floor"]["bytes"] > 0
    assert got["rl"]["tokens"] > 0 and got["rl"]["samples"] == 4
    ops = got["profile"]["top_ops"]  # the traced decode calls' ops, most total time first
    assert ops and all(o["count"] > 0 for o in ops) and ops[0]["ms"] >= ops[-1]["ms"]
    (v,) = got["variants"]  # the A/B row: the goal's batch again with the paged kernel (interpreted on a CPU)
    assert "error" not in v, v
    assert v["settings"] == {"decode_attention": "paged"} and v["batch"] == 4 and v["tokens"] == 4 * v["new"]
