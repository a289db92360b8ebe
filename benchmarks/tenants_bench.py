"""N tenants: N clients, each with its own LoRA adapter on one shared base model, training (forward_backward +
optim_step on small batches) and sampling at the same time, against the same work done by the same clients one at
a time, in the same engine and the same run.

- front door "rest": every tenant is its own `tinker.ServiceClient` (the official SDK, one session each) talking to
  `server.app.build_app(engine)` under uvicorn on 127.0.0.1 (benchmarks.frontdoor_bench.serve), clients in threads
  of one process, server and engine in threads of the same process (one GIL: a conservative setting). The same runs
  are then also driven through tinker_jax.ServiceClient in process (no HTTP, no SDK), so the rows split the time
  between the front door and the engine.
- front door "in_process": tinker_jax.ServiceClient only (the GPU machine has no fastapi/uvicorn).

Training, per client count N: N LoRA training clients (rank r, attention + MLP, seeds 0..N-1), each with its own
data (rows x length tokens). One phase = every client does `steps` steps of forward_backward(cross_entropy) and
optim_step (submitted back to back, as a Tinker script does, and both awaited):
  concurrent: all N clients at once, each from its own thread (started behind a barrier);
  one at a time: the clients take turns, each client's step done before the next client's starts.
Aggregate tokens/s = N * steps * rows * length / the phase's wall time. The two kinds alternate (paired, as the
rest of the harness); a reference phase (optional: one adapter on a large batch, the GPU goal's baseline) runs
first. Sampling (after all training, with the last configuration's clients): `samplers` of their trained adapters
(save_weights_and_get_sampling_client), each sample() of one prompt with num_samples rows, greedy, +max_new
tokens, concurrent vs one at a time likewise; tokens/s counts the tokens returned.

Evidence of batching: deltas of Engine.stats() over each kind of phase (requests_batched / micro_batches,
max_requests_per_batch, decode_calls vs tokens_generated). Peak device memory: jax.devices()[0].memory_stats()
after each configuration (a process-wide high-water mark, so the configurations run in order of size and the
whole measurement runs in a child process of its own, which also gives it a fresh engine and fresh counters).
The child is `python -m benchmarks.tenants_bench --child SPEC.json`; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

MARK = "TENANTS "
WARMUP_EXTRA = 4  # untimed rounds beyond spec.warmup while a round still compiles new programs
API_KEY = "tml-bench-tenants"
TRAIN_COUNTERS = ("rounds", "scheduler_rounds", "micro_batches", "rows", "requests_batched", "optim_steps")
SAMPLER_COUNTERS = ("decode_calls", "prefill_calls", "tokens_generated", "adapter_loads", "rows_started",
                    "rows_joined_running_batch")


@dataclass
class TenantsSpec:
    model_name: str
    model_dir: str
    dtype: str
    frontdoor: str  # "rest" or "in_process"
    counts: tuple[int, ...]  # client counts, measured in this order (memory high-water marks)
    rows: int
    length: int
    steps: int  # steps per client per phase
    rank: int
    samplers: int  # concurrent samplers (0: no sampling)
    num_samples: int
    prompt_len: int
    max_new: int
    warmup: int
    repeats: int
    max_tokens_per_batch: int
    ref_rows: int = 0  # > 0: a reference phase, one adapter on ref_rows x ref_length
    ref_length: int = 0
    remat: bool = False
    attention: str = "auto"
    compile_cache_dir: str | None = None
    data_dir: str = ""  # set by measure_tenants: a fresh directory per run


# ------------------------------------------------------------------------------------------------ parent side


def unavailable_reason(frontdoor: str) -> str | None:
    if frontdoor == "rest":
        from benchmarks.frontdoor_bench import unavailable_reason as rest_reason

        return rest_reason()
    if frontdoor != "in_process":
        return f"unavailable: unknown front door {frontdoor!r}"
    return None


def measure_tenants(spec: TenantsSpec, work_dir: Path, *, timeout: float, log=None) -> dict:
    """Run the child; -> its result with every list of samples turned into a Stat (see `_child_main`)."""
    import tempfile

    work_dir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="tenants-", dir=work_dir))
    spec = TenantsSpec(**{**asdict(spec), "data_dir": str(d / "data")})
    (d / "spec.json").write_text(json.dumps(asdict(spec)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.tenants_bench", "--child", str(d / "spec.json")],
                              env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    if log is not None:
        for line in proc.stderr.splitlines():
            if line.startswith("[tenants]"):
                log(line)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return _to_stats(json.loads(line[len(MARK):]))
    raise RuntimeError(f"tenants child failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}")


def _to_stats(x: Any) -> Any:
    """Lists under "samples" keys -> Stat (the rows' figures); everything else as is."""
    from benchmarks.timing import Stat

    if isinstance(x, dict):
        return {k: (Stat(v) if k.endswith("samples") and isinstance(v, list) and v else _to_stats(v))
                for k, v in x.items()}
    if isinstance(x, list):
        return [_to_stats(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------ child side


def _memory() -> dict | str:
    import jax

    try:
        m = jax.devices()[0].memory_stats()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: memory_stats() raised {type(e).__name__}"
    if not m:
        return f"unavailable: jax.devices()[0].memory_stats() is None on {jax.devices()[0].platform}"
    return {k: int(m[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in m}


class _Counters:
    """Deltas of Engine.stats() counters of one base model, accumulated per kind of phase."""

    def __init__(self, engine, model: str):
        self.engine, self.model = engine, model
        self.by_kind: dict[str, dict[str, int]] = {}
        self._pending: list[tuple[str, dict[str, int]]] = []

    def snap(self) -> dict:
        s = self.engine.stats()["models"].get(self.model, {})
        out = {k: int(s.get(k, 0)) for k in TRAIN_COUNTERS}
        sm = s.get("sampler") or {}
        out.update({f"sampler.{k}": int(sm.get(k, 0)) for k in SAMPLER_COUNTERS})
        return out

    @contextlib.contextmanager
    def phase(self, kind: str):
        before = self.snap()
        yield
        after = self.snap()
        self._pending.append((kind, {k: after[k] - before[k] for k in after}))

    def settle(self, keep: bool) -> None:
        """The phases since the last settle count under their kinds (keep) or under "discarded"."""
        for kind, delta in self._pending:
            acc = self.by_kind.setdefault(kind if keep else "discarded", {})
            for k, v in delta.items():
                acc[k] = acc.get(k, 0) + v
        self._pending = []

    def maxima(self) -> dict:
        s = self.engine.stats()["models"].get(self.model, {})
        sm = s.get("sampler") or {}
        return {"max_requests_per_batch": int(s.get("max_requests_per_batch", 0)),
                "sampler.max_live_rows": int(sm.get("max_live_rows", 0))}


class _Compiles:
    """Programs lowered (jit cache misses, whether or not the persistent cache then has them) and the seconds spent
    lowering and compiling them, counted through jax.monitoring."""

    LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
    EVENTS = (LOWER, "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax

        self.n, self.seconds = 0, 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, *args, **kwargs) -> None:
        if event in self.EVENTS:
            with self._lock:
                self.n += event == self.LOWER
                self.seconds += float(duration)


def _together(pool: ThreadPoolExecutor, fns: list[Callable[[], Any]]) -> tuple[float, list]:
    """Run fns at once (one thread each, released together); -> (wall seconds, their results)."""
    barrier = threading.Barrier(len(fns) + 1)

    def wrap(fn):
        barrier.wait()
        return fn()
    futs = [pool.submit(wrap, fn) for fn in fns]
    barrier.wait()
    t0 = time.perf_counter()
    out = [f.result() for f in futs]
    return time.perf_counter() - t0, out


def _child_main(spec: TenantsSpec) -> dict:
    import jax
    import tinker.types as tt

    from benchmarks.data import datums, model_input, prompts, token_batch
    from tinker_jax.client import SamplingClient as LocalSampling, ServiceClient as LocalService, \
        TrainingClient as LocalTraining
    from tinker_jax.config import EngineConfig, LoraConfig, SamplerConfig
    from tinker_jax.engine import Engine

    log = lambda s: print(f"[tenants] {s}", file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    if spec.compile_cache_dir and not jax.config.jax_compilation_cache_dir:
        Path(spec.compile_cache_dir).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", spec.compile_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    rows_per_sampler = max(1, spec.num_samples)
    sampler_rows = max(4, spec.samplers * rows_per_sampler)
    cfg = EngineConfig(
        data_dir=Path(spec.data_dir), models={spec.model_name: spec.model_dir}, dtype=spec.dtype,
        max_tokens_per_batch=spec.max_tokens_per_batch, compile_cache=False, remat=spec.remat,
        attention=spec.attention, lora=LoraConfig(max_slots=max(64, max(spec.counts))),
        sampler=SamplerConfig(max_batch=sampler_rows, max_seq_len=spec.prompt_len + spec.max_new + 16,
                              max_num_samples=max(64, rows_per_sampler), max_adapters=max(16, spec.samplers)))
    engine = Engine(cfg)
    local = LocalService(engine=engine)
    counters = _Counters(engine, spec.model_name)
    compiles = _Compiles()
    adam = tt.AdamParams(learning_rate=1e-5)
    vocab = json.loads((Path(spec.model_dir) / "config.json").read_text())["vocab_size"]
    out: dict[str, Any] = {"frontdoor": spec.frontdoor, "device": str(jax.devices()[0]), "configs": []}
    rest = spec.frontdoor == "rest"
    n_max = max(spec.counts)
    pool = ThreadPoolExecutor(max_workers=max(n_max, spec.samplers, 1))

    def train_steps(tc, data, n: int) -> list[float]:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(adam)
            fb.result()
            opt.result()
            lat.append(time.perf_counter() - t0)
        return lat

    def warm(run_once: Callable[[], object]) -> int:
        """spec.warmup untimed rounds, then more (up to WARMUP_EXTRA) until one compiles nothing: which batch shapes
        a concurrent phase meets depends on how requests happen to meet in rounds. -> rounds run."""
        for i in range(spec.warmup + WARMUP_EXTRA):
            before = compiles.n
            run_once()
            counters.settle(True)
            if i + 1 >= spec.warmup and compiles.n == before:
                return i + 1
        return spec.warmup + WARMUP_EXTRA

    def timed(res: dict, prefix: str, run_once: Callable[[], dict]) -> None:
        """run_once() -> {key: [figures]}, merged into res. A run during which a program was compiled is discarded
        and run again (at most spec.repeats + 2 times per `prefix`), so the figures are steady state; what was
        compiled is recorded either way."""
        c = res.setdefault(f"{prefix}compiles_in_timed_phases", {"programs": 0, "seconds": 0.0, "discarded": 0})
        while True:
            n, sec = compiles.n, compiles.seconds
            got = run_once()
            c["programs"] += compiles.n - n
            c["seconds"] += compiles.seconds - sec
            if compiles.n != n and c["discarded"] < spec.repeats + 2:
                c["discarded"] += 1
                counters.settle(False)
                continue
            counters.settle(True)
            for k, v in got.items():
                res.setdefault(k, []).extend(v)
            return

    def phases(kind: str, clients: list, data: list, work: int, is_timed: bool) -> dict:
        """One one-at-a-time phase and one concurrent phase of `kind` ("rest" / "in_process")."""
        with counters.phase(f"{kind}.turns" if is_timed else "warmup"):
            t0 = time.perf_counter()
            lat = []
            for _ in range(spec.steps):
                for tc, d in zip(clients, data):
                    lat += train_steps(tc, d, 1)
            dt_turns = time.perf_counter() - t0
        with counters.phase(f"{kind}.concurrent" if is_timed else "warmup"):
            dt, lats = _together(pool, [lambda tc=tc, d=d: train_steps(tc, d, spec.steps)
                                        for tc, d in zip(clients, data)])
        return {f"{kind}.turns.samples": [work / dt_turns], f"{kind}.turns.step_latency_s": lat,
                f"{kind}.concurrent.samples": [work / dt],
                f"{kind}.concurrent.step_latency_s": [x for ls in lats for x in ls]}

    def sampling(kind: str, samplers: list, prompt_inputs: list, is_timed: bool) -> dict:
        params = tt.SamplingParams(max_tokens=spec.max_new, temperature=0.0, seed=0)

        def one(s, inp) -> int:
            r = s.sample(inp, spec.num_samples, params).result()
            return sum(len(q.tokens) for q in r.sequences)
        with counters.phase(f"sample.{kind}.turns" if is_timed else "warmup"):
            t0 = time.perf_counter()
            n_turns = sum(one(s, p) for s, p in zip(samplers, prompt_inputs))
            dt_turns = time.perf_counter() - t0
        with counters.phase(f"sample.{kind}.concurrent" if is_timed else "warmup"):
            dt, got = _together(pool, [lambda s=s, p=p: one(s, p) for s, p in zip(samplers, prompt_inputs)])
        return {f"{kind}.turns.samples": [n_turns / dt_turns], f"{kind}.concurrent.samples": [sum(got) / dt],
                f"{kind}.tokens_per_phase": [[n_turns, sum(got)]]}

    services: list = []
    server = contextlib.ExitStack()
    try:
        if rest:
            import tinker

            from benchmarks.frontdoor_bench import serve

            url = server.enter_context(serve(engine, Path(spec.data_dir) / "server"))

            def service():
                s = tinker.ServiceClient(base_url=url, api_key=API_KEY)
                services.append(s)
                return s
        else:
            def service():
                return local
        kinds = ("rest", "in_process") if rest else ("in_process",)

        def create(i: int, rows: int, length: int, seed: int):
            sc = service()
            tc = sc.create_lora_training_client(base_model=spec.model_name, rank=spec.rank, seed=seed,
                                                train_unembed=False).result()
            by_kind = {"rest": tc, "in_process": LocalTraining(local, tc.model_id)} if rest else {"in_process": tc}
            return sc, by_kind, datums(token_batch(1000 + seed, rows, length, vocab))

        log(f"engine and front door up in {time.perf_counter() - t_start:.1f} s")
        # Reference: one adapter on a large batch (runs first: memory high-water marks only grow).
        if spec.ref_rows:
            ref: dict[str, Any] = {"rows": spec.ref_rows, "length": spec.ref_length}
            try:
                _, by_kind, data = create(0, spec.ref_rows, spec.ref_length, 9999)
                kind = kinds[0]
                work = spec.steps * spec.ref_rows * spec.ref_length

                def ref_phase(is_timed: bool) -> dict:
                    with counters.phase(f"ref.{kind}" if is_timed else "warmup"):
                        t0 = time.perf_counter()
                        train_steps(by_kind[kind], data, spec.steps)
                        return {"samples": [work / (time.perf_counter() - t0)]}
                ref["warmup_rounds"] = warm(lambda: ref_phase(False))
                for _ in range(spec.repeats):
                    timed(ref, "", lambda: ref_phase(True))
                ref["memory"] = _memory()
                ref["frontdoor"] = kind
                engine.unload_model(by_kind["in_process"].model_id).result()
            except Exception as e:  # noqa: BLE001 - the per-count figures still run
                ref["error"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                log(traceback.format_exc(limit=6))
            out["ref"] = ref
            log(f"reference: {ref.get('samples') or ref.get('error')}")
        for n in spec.counts:
            res: dict[str, Any] = {"n": n, "rows": spec.rows, "length": spec.length, "steps": spec.steps,
                                   "work_tokens_per_phase": n * spec.steps * spec.rows * spec.length}
            out["configs"].append(res)
            made: list = []
            try:
                t0 = time.perf_counter()
                made = [f.result() for f in [pool.submit(create, i, spec.rows, spec.length, i) for i in range(n)]]
                res["create_s"] = time.perf_counter() - t0
                work = res["work_tokens_per_phase"]
                for kind in kinds:
                    clients, data = [m[1][kind] for m in made], [m[2] for m in made]
                    res[f"{kind}.warmup_rounds"] = warm(
                        lambda k=kind, c=clients, d=data, w=work: phases(k, c, d, w, False))
                for _ in range(spec.repeats):
                    for kind in kinds:  # paired: the front doors and the two orders alternate
                        clients, data = [m[1][kind] for m in made], [m[2] for m in made]
                        timed(res, f"{kind}.", lambda k=kind, c=clients, d=data, w=work: phases(k, c, d, w, True))
                res["memory"] = _memory()
                log(f"{n} clients: " + ", ".join(f"{k}={[round(x) for x in v]}" for k, v in res.items()
                                                 if k.endswith(".samples")))
                if spec.samplers and n == spec.counts[-1] and n >= spec.samplers:  # after all training
                    out["sampling"] = smp = {"samplers": spec.samplers, "num_samples": spec.num_samples,
                                             "prompt_len": spec.prompt_len, "max_new": spec.max_new}
                    try:
                        ps = prompts(77, spec.samplers, spec.prompt_len, vocab)
                        inputs = [model_input(p) for p in ps]
                        for kind in kinds:
                            if kind == "rest":
                                samplers = [m[1]["rest"].save_weights_and_get_sampling_client().result()
                                            for m in made[: spec.samplers]]
                            else:
                                samplers = [m[1]["in_process"].save_weights_and_get_sampling_client()
                                            for m in made[: spec.samplers]]
                            smp[f"{kind}.warmup_rounds"] = warm(
                                lambda k=kind, ss=samplers, ins=inputs: sampling(k, ss, ins, False))
                            smp[f"{kind}.samplers"] = samplers
                        for _ in range(spec.repeats):
                            for kind in kinds:
                                samplers = smp[f"{kind}.samplers"]
                                timed(smp, f"{kind}.",
                                      lambda k=kind, ss=samplers, ins=inputs: sampling(k, ss, ins, True))
                        for kind in kinds:
                            for s in smp.pop(f"{kind}.samplers"):
                                if isinstance(s, LocalSampling):
                                    engine.release_sampler(s.sampler_id)
                        smp["memory"] = _memory()
                    except Exception as e:  # noqa: BLE001
                        smp["error"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                        for kind in kinds:
                            smp.pop(f"{kind}.samplers", None)
                        log(traceback.format_exc(limit=6))
                    log("sampling: " + ", ".join(f"{k}={[round(x) for x in v]}" for k, v in smp.items()
                                                 if k.endswith(".samples")))
            except Exception as e:  # noqa: BLE001 - the next count still runs
                res["error"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                log(traceback.format_exc(limit=6))
            finally:
                for m in made:
                    with contextlib.suppress(Exception):
                        engine.unload_model(m[1]["in_process"].model_id).result(timeout=60)
        for res in out["configs"]:  # per-step latencies -> a summary
            for k in [k for k in res if k.endswith("step_latency_s")]:
                lat = sorted(res.pop(k))
                if lat:
                    res[k[: -len("_s")] + "_ms"] = {"n": len(lat), "median": 1e3 * lat[len(lat) // 2],
                                                    "p90": 1e3 * lat[min(len(lat) - 1, int(0.9 * len(lat)))],
                                                    "max": 1e3 * lat[-1]}
        out["engine_stats"] = {"per_phase_kind": counters.by_kind, **counters.maxima(),
                               "attention": engine.stats()["models"].get(spec.model_name, {}).get("attention")}
    finally:
        for s in services:
            with contextlib.suppress(Exception):
                s.close("success").result(timeout=10)
        server.close()
        pool.shutdown(wait=False, cancel_futures=True)
        engine.shutdown()
    out["child_wall_s"] = time.perf_counter() - t_start
    out["compiles_total"] = {"programs": compiles.n, "seconds": compiles.seconds}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tenants_bench")
    p.add_argument("--child", required=True, metavar="SPEC_JSON")
    args = p.parse_args(argv)
    d = json.loads(Path(args.child).read_text())
    d["counts"] = tuple(d["counts"])
    result = _child_main(TenantsSpec(**d))
    print(MARK + json.dumps(result), flush=True)
    os._exit(0)  # skip interpreter teardown (SDK and server threads)


if __name__ == "__main__":
    sys.exit(main())
