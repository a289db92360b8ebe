"""Multi-process: what distributing one engine over several processes costs. The same LoRA training step on the
same mesh (fsdp x tensor over 8 CPU devices), measured

  (a) in one process with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), and
  (b) as two processes with 4 simulated CPU devices each, started by scripts/local_cluster.py: jax.distributed over
      loopback, gloo collectives, process 0 publishing each round on the round log (tinker_jax.distributed) and
      process 1 replaying it.

Both are child processes (`python -m benchmarks.multiprocess_bench --child SPEC.json`) running the same script: a
fresh engine through the in-process `tinker_jax.ServiceClient` serving the models of `runs`; per run (model, rows x
length, in order) one LoRA training client (seed 0, rank r, attention and MLP) and one fixed token batch
(benchmarks/data.py); `warmup` untimed steps, then `repeats` timed steps. A step is
forward_backward(cross_entropy) and optim_step submitted back to back and both awaited (benchmarks/train_bench.py).
In (b) every process makes the same calls (the in-process API runs the same script on every process); process 0's
step times are the figures, process 1's are recorded beside them. Step counts are fixed (never adapted to what a
step compiled): both processes must make the same calls. Each process prints one JSON line on stdout (MARK); the
parent reads it from a file (not a pipe: a pipe nobody reads until the end fills up and stalls the children).

After the steps, each process also times all-reduces alone (`_psum_probe`: a program of 50 dependent psums of a
small array over one mesh axis), so the rows can say what one collective costs in each variant.

On a CPU the cross-process collectives go through gloo over loopback and dominate: the figures are the overhead of
the round log + cross-process collectives on this machine, not a claim about GPUs or TPUs (their collectives run
over NVLink / ICI, not loopback TCP).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MARK = "MULTIPROCESS "
ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "scripts" / "local_cluster.py"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


@dataclass
class MultiprocessSpec:
    runs: list  # [{"model_name", "model_dir", "rows", "length"}]: measured in this order, in one engine per variant
    dtype: str
    rank: int
    warmup: int
    repeats: int
    fsdp: int = 2
    tensor: int = 4
    processes: int = 2  # variant "multi": this many processes, fsdp * tensor / processes devices each
    max_tokens_per_batch: int = 8192
    data_seed: int = 1
    data_dir: str = ""  # set per variant by measure_multiprocess


def run_label(run: dict) -> str:
    return f"{run['model_name']}-{run['rows']}x{run['length']}"


# ------------------------------------------------------------------------------------------------ parent side


def unavailable_reason() -> str | None:
    """Why this section cannot run here (None: it can)."""
    if not CLUSTER.is_file():
        return f"unavailable: {CLUSTER} is missing (an installed package without the repository's scripts/)"
    try:
        import jax

        backend = jax.default_backend()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: jax does not start ({type(e).__name__}: {e})"
    if backend != "cpu":
        return (f"unavailable: the backend is {backend}; this section measures simulated CPU devices over gloo "
                f"(loopback), which says nothing about {backend} collectives")
    return None


def _env(devices: int | None) -> dict:
    """This environment without anything that would make a child join another job or use another device count."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TINKER_JAX_COORDINATOR", "TINKER_JAX_NUM_PROCESSES", "TINKER_JAX_PROCESS_ID",
                                "JAX_COMPILATION_CACHE", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    if devices:
        flags.append(f"{_DEVICE_FLAG}={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], env: dict, out: Path, timeout: float) -> tuple[int, str]:
    """Run cmd with stdout + stderr into the file `out`; on timeout its whole process group is stopped (it is started
    in a session of its own, so that group is only what this call started). -> (exit status, the output)."""
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:  # a timeout, or the bench itself interrupted: leave no children behind
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise
    return rc, out.read_text(errors="replace")


def _results(text: str) -> list[dict]:
    """The MARK lines of a child (or of local_cluster.py's "[pid] " prefixed output) -> their JSON."""
    got = []
    for line in text.splitlines():
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        if line.startswith(MARK):
            got.append(json.loads(line[len(MARK):]))
    return got


def measure_multiprocess(spec: MultiprocessSpec, work_dir: Path, *, timeout: float, log=None) -> dict:
    """Variant "single" (one process, all devices), then "multi" (spec.processes processes via local_cluster.py);
    -> {"single": result, "multi": result of process 0 (+ "followers")}; step samples become Stats. A variant that
    fails is recorded as "failed: ..." under its name; the other still runs."""
    import shutil
    import tempfile

    from benchmarks.timing import Stat

    devices = spec.fsdp * spec.tensor
    if devices % spec.processes:
        raise ValueError(f"multiprocess: {devices} devices do not split over {spec.processes} processes")
    work_dir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="multiprocess-", dir=work_dir))
    module = [sys.executable, "-m", "benchmarks.multiprocess_bench", "--child"]
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {}
    try:
        variants = {
            "single": (module, _env(devices)),
            "multi": ([sys.executable, str(CLUSTER), "-n", str(spec.processes), "--devices",
                       str(devices // spec.processes), "--timeout", str(int(max(60.0, timeout / 2))), "--"] + module,
                      _env(None)),
        }
        for name, (cmd, env) in variants.items():
            vspec = MultiprocessSpec(**{**asdict(spec), "data_dir": str(d / f"data-{name}")})
            spec_file = d / f"spec-{name}.json"
            spec_file.write_text(json.dumps(asdict(vspec)))
            left = deadline - time.monotonic()
            if left < 30:
                out[name] = f"skipped: the section's time limit ({timeout:.0f} s) was spent"
                continue
            t0 = time.monotonic()
            try:
                rc, text = _run(cmd + [str(spec_file)], env, d / f"{name}.log", min(left, timeout / 2 + 30))
            except subprocess.TimeoutExpired:
                out[name] = f"failed: timed out after {time.monotonic() - t0:.0f} s"
                continue
            got = sorted(_results(text), key=lambda r: r.get("process", 0))
            want = spec.processes if name == "multi" else 1
            if rc != 0 or len(got) != want:
                lines = text.strip().splitlines()
                errors = [x for x in lines if "Error" in x or "Exception" in x]
                why = (errors[-1] if errors else "\n".join(lines[-6:])).strip()
                out[name] = f"failed: rc {rc}, {len(got)} of {want} results: {why[-400:]}"
                if log is not None:
                    log(f"[multiprocess] {name} failed (rc {rc}):\n{text[-3000:]}")
                continue
            lead = got[0]
            lead["wall_s"] = round(time.monotonic() - t0, 1)
            for r in got:
                for run in list(r["runs"].values()) + list(r.get("psum_ms", {}).values()):
                    for k in [k for k in run if k.endswith("_samples")]:
                        run[k] = Stat(run[k])
            if name == "multi":
                lead["followers"] = got[1:]
            out[name] = lead
            if log is not None:
                log(f"[multiprocess] {name}: {lead['processes']} process(es), {lead['devices']} devices "
                    f"({lead['local_devices']} local), child wall {lead['wall_s']} s; step medians " + ", ".join(
                        f"{k} {v['step_samples'].median:.4f} s" for k, v in lead["runs"].items()))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------ child side


def _child_main(spec: MultiprocessSpec) -> dict:
    t_start = time.perf_counter()
    import jax  # nothing may start the backend before the engine has joined the other processes
    import tinker.types as tt

    import tinker_jax
    from benchmarks.data import datums, token_batch
    from tinker_jax.config import EngineConfig
    from tinker_jax.models.sharding import MeshConfig

    compiles = {"n": 0}

    def on_event(event: str, duration: float, *args, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # one per program lowered
            compiles["n"] += 1
    jax.monitoring.register_event_duration_secs_listener(on_event)
    cfg = EngineConfig(data_dir=Path(spec.data_dir), models={r["model_name"]: r["model_dir"] for r in spec.runs},
                       dtype=spec.dtype, mesh=MeshConfig(fsdp=spec.fsdp, tensor=spec.tensor),
                       max_tokens_per_batch=spec.max_tokens_per_batch, compile_cache=False)
    adam = tt.AdamParams(learning_rate=1e-5)
    out: dict[str, Any] = {"runs": {}}
    with tinker_jax.ServiceClient(config=cfg) as sc:
        out["engine_start_s"] = round(time.perf_counter() - t_start, 2)
        for run in spec.runs:
            vocab = json.loads((Path(run["model_dir"]) / "config.json").read_text())["vocab_size"]
            data = datums(token_batch(spec.data_seed, run["rows"], run["length"], vocab))
            tc = sc.create_lora_training_client(run["model_name"], rank=spec.rank, seed=0, train_unembed=False)
            fb_s, step_s, warm_s, losses = [], [], [], []
            rounds_before, compiles_before = None, 0
            for i in range(spec.warmup + spec.repeats):
                if i == spec.warmup:
                    rounds_before, compiles_before = _rounds(sc.engine, run["model_name"]), compiles["n"]
                t0 = time.perf_counter()
                fb = tc.forward_backward(data, "cross_entropy")
                opt = tc.optim_step(adam)
                r = fb.result()
                t_fb = time.perf_counter() - t0
                opt.result()
                t_step = time.perf_counter() - t0
                losses.append(float(r.metrics["loss:sum"]))
                if i < spec.warmup:
                    warm_s.append(round(t_step, 4))
                else:
                    fb_s.append(t_fb)
                    step_s.append(t_step)
            rounds_after = _rounds(sc.engine, run["model_name"])
            out["runs"][run_label(run)] = {
                "model_id": tc.model_id, "step_samples": step_s, "fb_samples": fb_s, "warmup_s": warm_s,
                "losses": losses, "compiles_in_timed_steps": compiles["n"] - compiles_before,
                "rounds_per_timed_step": (None if rounds_before is None or rounds_after is None
                                          else (rounds_after - rounds_before) / max(1, spec.repeats)),
                "tokens_per_step": run["rows"] * run["length"]}
        out["psum_ms"] = _psum_probe(MeshConfig(fsdp=spec.fsdp, tensor=spec.tensor))
        out.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
                   local_devices=jax.local_device_count(), platform=jax.devices()[0].platform,
                   cpu_collectives=(str(jax.config.jax_cpu_collectives_implementation)
                                    if jax.process_count() > 1 else None), compiles_total=compiles["n"])
    out["child_wall_s"] = round(time.perf_counter() - t_start, 2)
    return out


PSUMS = 50  # sequential all-reduces per probe program


def _psum_probe(mesh_cfg, repeats: int = 10) -> dict:
    """Milliseconds per all-reduce over each mesh axis: one jitted program of PSUMS dependent psums of a small
    fp32 array (8 x 64 per device), `repeats` timed runs (after one untimed) / PSUMS each. Every process runs it at
    the same point (after the engine's last step), as SPMD requires."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tinker_jax.models.sharding import make_mesh

    mesh = make_mesh(mesh_cfg)
    spec = P("fsdp", "tensor")
    shape = (8 * mesh.shape["fsdp"], 64 * mesh.shape["tensor"])
    host = np.ones(shape, np.float32)
    x = jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda idx: host[idx])
    out = {}
    for axis in ("fsdp", "tensor"):
        if mesh.shape[axis] < 2:
            continue

        def body(a, axis=axis):
            for _ in range(PSUMS):
                a = jax.lax.psum(a, axis) * 0.5
            return a
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
        fn(x).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x).block_until_ready()
            times.append(1e3 * (time.perf_counter() - t0) / PSUMS)
        groups = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
        out[axis] = {"ms_samples": times, "devices": mesh.shape[axis],
                     "across_processes": any(len({d.process_index for d in g}) > 1 for g in groups)}
    return out


def _rounds(engine, model: str) -> int | None:
    try:
        return int(engine.stats()["models"][model]["rounds"])
    except Exception:  # noqa: BLE001 - a record, never a failure (a follower may count differently)
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multiprocess_bench")
    p.add_argument("--child", required=True, metavar="SPEC_JSON")
    args = p.parse_args(argv)
    spec = MultiprocessSpec(**json.loads(Path(args.child).read_text()))
    result = _child_main(spec)
    print(MARK + json.dumps(result), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the engine has shut down (and left the other processes); skip interpreter teardown


if __name__ == "__main__":
    sys.exit(main())
