"""Cold start: wall time from spawning a fresh Python process to its first forward_backward result
(imports, engine, model load, LoRA client, compile or cache load, the step itself), with and without the
persistent compilation cache (EngineConfig.compile_cache, a data_dir with a warm jax_cache).

- no cache: the first run, into an empty data_dir with compile_cache=True (a first start: it compiles everything
  and fills the cache), then `repeats - 1` runs in fresh data_dirs with compile_cache=False.
- warm cache: `repeats` runs over the data_dir that the first run filled; compile_cache=True.
On a CPU the first run also warms the OS file cache (a slightly slow first sample); on a GPU the runs are long
and few, so no run is spent untimed.

The child is `python -m benchmarks.coldstart_bench --child ...`; it prints one JSON line with its timestamps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.timing import Stat

MARK = "COLDSTART "


def _child(args: argparse.Namespace) -> int:
    t_start = float(args.t0)
    import numpy as np

    import tinker_jax
    from benchmarks.data import datums, token_batch
    from tinker_jax.config import EngineConfig
    t_import = time.time()
    cfg = EngineConfig(data_dir=Path(args.data_dir), models={"bench": args.model}, dtype=args.dtype,
                       compile_cache=bool(args.cache), max_tokens_per_batch=max(8192, args.rows * args.length))
    sc = tinker_jax.ServiceClient(config=cfg)
    tc = sc.create_lora_training_client("bench", rank=args.rank, seed=0, train_unembed=False)
    t_client = time.time()
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    out = tc.forward_backward(datums(token_batch(0, args.rows, args.length, vocab)), "cross_entropy").result()
    t_done = time.time()
    assert np.isfinite(out.metrics["loss:sum"])
    print(MARK + json.dumps({"total_s": t_done - t_start, "import_s": t_import - t_start,
                             "client_s": t_client - t_import, "first_fb_s": t_done - t_client}), flush=True)
    os._exit(0)  # skip interpreter teardown: not part of the figure


def _spawn(model: Path, data_dir: Path, cache: bool, *, rows: int, length: int, rank: int, dtype: str,
           timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    cmd = [sys.executable, "-m", "benchmarks.coldstart_bench", "--child", "--model", str(model), "--data-dir",
           str(data_dir), "--cache", str(int(cache)), "--rows", str(rows), "--length", str(length), "--rank",
           str(rank), "--dtype", dtype]
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    proc = subprocess.run(cmd + ["--t0", repr(t0)], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"cold-start child failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}")


def measure_coldstart(model: Path, work_dir: Path, *, rows: int, length: int, rank: int, dtype: str,
                      repeats: int, timeout: float = 600) -> dict[str, object]:
    """-> {"no_cache": Stat, "warm_cache": Stat (seconds), "breakdown": {...} of the last run of each}."""
    work_dir.mkdir(parents=True, exist_ok=True)
    warm = Path(tempfile.mkdtemp(prefix="warm-", dir=work_dir))
    kw = dict(rows=rows, length=length, rank=rank, dtype=dtype, timeout=timeout)
    samples: dict[str, list[float]] = {"no_cache": [], "warm_cache": []}
    last: dict[str, dict] = {}
    try:
        last["no_cache"] = r = _spawn(model, warm, True, **kw)  # empty cache: compiles, fills the cache
        samples["no_cache"].append(r["total_s"])
        for i in range(repeats):
            if i:
                cold = Path(tempfile.mkdtemp(prefix="cold-", dir=work_dir))
                try:
                    last["no_cache"] = r = _spawn(model, cold, False, **kw)
                    samples["no_cache"].append(r["total_s"])
                finally:
                    shutil.rmtree(cold, ignore_errors=True)
            last["warm_cache"] = r = _spawn(model, warm, True, **kw)
            samples["warm_cache"].append(r["total_s"])
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    return {"no_cache": Stat(samples["no_cache"]), "warm_cache": Stat(samples["warm_cache"]), "breakdown": last}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cache", type=int, default=0)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--t0", default=None)
    args = p.parse_args(argv)
    if args.t0 is None:
        args.t0 = repr(time.time())
    return _child(args)


if __name__ == "__main__":
    sys.exit(main())
