"""benchmarks/gpu.sh --dry-run: the GPU suite's code paths (Qwen3 family preset written from a config dict, fp32
toy size, two-phase peer-then-ours order, MFU rows) on this machine's CPU. No timing assertions."""

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
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "TINKER_JAX_BENCH_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out),
                           "--only", "peak,train"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    report.validate_rows(rows)
    metrics = {r["metric"] for r in rows}
    assert {"train LoRA r32 (attn+MLP) 2x64", "train LoRA r32 (attn+MLP) 4x32", "train full fine-tune 2x64",
            "MFU train full fine-tune 2x64"} <= metrics
    assert all(r["suite"] == "gpu-dryrun" for r in rows)
    assert "MFU train" in proc.stdout  # the final table is printed
