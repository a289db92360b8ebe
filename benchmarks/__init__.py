"""Benchmarks for tinker_jax against its peers, measured in one invocation: `tinker-jax bench [--suite cpu|gpu]`.

One module per job:
- `timing.py`: timed runs after warm-up, interleaved contenders (median, spread), machine and version records.
- `models.py`: model directories (tinker_jax presets, and the bench-only Qwen3-0.6B-shaped preset), FLOP counts.
- `data.py`: deterministic token batches and `tinker.types` datums, the same for ours and the peers.
- `suites.py`: the shapes and repeat counts of each suite (cpu, gpu, gpu-dryrun, quick).
- `ours_client.py`: the in-process tinker_jax.ServiceClient behind every "ours" figure.
- `train_bench.py`, `sample_bench.py`, `handoff_bench.py`: ours, as steps; `frontdoor_bench.py`: SDK + REST vs
  in-process; `coldstart_bench.py`: fresh subprocesses with and without the compile cache; `tenants_bench.py`: N
  LoRA clients at once vs one at a time (a child process); `multiprocess_bench.py`: one engine over 2 processes
  (scripts/local_cluster.py, gloo) vs 1 process on the same 8-device CPU mesh (child processes).
- `peers_torch.py`: the transformers (+ peft) peer on the same weights and shapes; `peak.py`: matmul peak;
  `peers.py`: peers recorded but not run (skyrl-tx), with the reason.
- `rows.py`: measurements -> rows (units, ratios, MFU, goals); `report.py`: table + JSON schema;
  `run.py`: the orchestrator (and `python -m benchmarks.run`).
- `gpu.sh`: the prepared script for one H100/H200; `RESULTS.md`: the latest measured figures and gaps.
"""
