"""One engine over two processes (issue 12): jax.distributed over loopback, gloo collectives, 4 simulated CPU devices
per process forming one fsdp=2 x tensor=4 mesh, started by scripts/local_cluster.py.

- The in-process API: the same script (examples/multihost_sft.py) on both processes; its losses, logprobs and
  gradient norm equal those of one process with all 8 devices (fp32), and both processes get identical results.
  Its checkpoint (each process writes its own shards) reloads there, and on one device and on a 2 x 2 mesh of
  one process with the same weights; its samples over the two processes' mesh are those of one process, and so
  is an RL (importance sampling) step on them.
- The REST server: `tinker-jax serve` on both processes (process 0 serves HTTP); the official SDK trains, saves,
  loads, samples and exports (save_weights_external) through it with the losses, tokens, logprobs and PEFT files
  of a one-process engine, and SIGTERM to the job stops both processes cleanly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import jax
import models_util
import numpy as np
import pytest
import tinker
import tinker.types as tt
import yaml

import tinker_jax
from tinker_jax.config import EngineConfig
from tinker_jax.models.sharding import MeshConfig

from tinker_jax import distributed
from tinker_jax.engine.replicas import Mirrors

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multihost_sft.py"


def _example_batch(step: int) -> list[tt.Datum]:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import multihost_sft
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return multihost_sft.batch(step)


def _results(out: str) -> list[dict]:
    rows = []
    for line in out.splitlines():
        line = line.split("] ", 1)[1] if line.startswith("[") else line
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def _env(devices: int) -> dict:
    # Without the caller's TINKER_JAX_ settings and the test runner's shared XLA cache (scripts/run_tests.py): these
    # processes of one jax.distributed job compile their own programs.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_JAX_", "JAX_COMPILATION_CACHE",
                                                                    "JAX_PERSISTENT_CACHE"))}
    # XLA's CPU optimisation off (models_util.FAST_XLA as flags): these processes compile far more than they run
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                         "--xla_cpu_use_fusion_emitters=false", JAX_PLATFORMS="cpu")
    return env


def test_two_processes_train_like_one(tmp_path):
    model = models_util.tiny_model_dir("tiny-qwen3")
    single = subprocess.run([sys.executable, str(EXAMPLE), str(model), str(tmp_path / "one")], env=_env(8),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    (ref,) = _results(single.stdout)
    two = subprocess.run([sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "-n", "2", "--devices", "4",
                          "--timeout", "400", "--", sys.executable, str(EXAMPLE), str(model), str(tmp_path / "two")],
                         env=_env(4), capture_output=True, text=True, timeout=450)
    assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-2000:]
    got = sorted(_results(two.stdout), key=lambda r: r["process"])
    assert [r["process"] for r in got] == [0, 1] and all(r["processes"] == 2 for r in got), got
    a, b = got
    # Every process computed the same results (the same programs over one mesh), under the same run id.
    assert {k: v for k, v in a.items() if k != "process"} == {k: v for k, v in b.items() if k != "process"}
    assert ref["processes"] == 1
    np.testing.assert_allclose(a["losses"], ref["losses"], rtol=1e-5)
    for x, y in zip(a["logprobs"], ref["logprobs"]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(a["forward_loss"], ref["forward_loss"], rtol=1e-5)
    # The checkpoint written by both processes (each its own shards) loads back into the run and into a new run.
    assert a["reloaded_loss"] == a["forward_loss"]
    np.testing.assert_allclose(a["resumed_grad_norm"], ref["resumed_grad_norm"], rtol=1e-5)
    # Sampling over the mesh of both processes: the tokens of one process (greedy, seeded, and a conversation's two
    # turns), logprobs within fp32
    assert [x["tokens"] for x in a["samples"]] == [x["tokens"] for x in ref["samples"]]
    for x, y in zip(a["samples"], ref["samples"]):
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["rl"], ref["rl"], rtol=1e-5)  # an importance-sampling step on those samples
    # The seeded request's prompt came from the prefix cache on both processes alike, as on one process.
    assert a["prompt_cache_hits"] == ref["prompt_cache_hits"] == 1, (a["prompt_cache_hits"], ref)
    # A next turn found turn 1's prompt and answer pages (2 of 16 tokens) cached, and prefilled only the rest.
    assert a["next_turn_cached_tokens"] == ref["next_turn_cached_tokens"] == 32
    shards = tmp_path / "two" / "checkpoints" / a["model_id"] / "weights" / "final" / "state"
    assert {p.name for p in shards.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}

    # Saved on the 2 x 4 mesh of two processes, loaded on one device and on one process with 4 devices: the same
    # weights, bit for bit, and the forward loss of the two-process run.
    loaded = []
    for mesh in (MeshConfig(), MeshConfig(fsdp=2, tensor=2)):
        cfg = EngineConfig(data_dir=tmp_path / "two", models={"tiny": str(model)}, mesh=mesh, max_seq_len=64,
                           compile_cache=False)
        with tinker_jax.ServiceClient(config=cfg) as svc:
            tc = svc.create_training_client_from_state(a["checkpoint"])
            loaded.append(tc.engine.run_state(tc.model_id)["weights"])
            if mesh.size == 1:
                one_device_loss = tc.forward(_example_batch(99), "cross_entropy").result().metrics["loss:sum"]
    for x, y in zip(*(jax.tree.leaves(w) for w in loaded)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(one_device_loss, a["forward_loss"], rtol=1e-5)


def test_mirrors_match_calls_and_replays_in_either_order():
    m = Mirrors(keep=2)
    first, second = Future(), Future()
    m.claim(first)  # this process's call arrives before the leader's request is replayed
    m.executed(1).set_result("one")
    assert first.result(timeout=1) == "one"
    replayed = m.executed(2)  # replayed before this process made the call
    replayed.set_exception(ValueError("two"))
    m.claim(second)
    with pytest.raises(ValueError, match="two"):
        second.result(timeout=1)
    cancelled = Future()
    m.claim(cancelled)
    cancelled.cancel()  # a caller's cancel does not stop the replay (every process must run what the leader ran)
    m.executed(3).set_result("three")
    for seq in (4, 5, 6):  # never claimed (a follower behind a REST leader): only `keep` are kept
        m.executed(seq).set_result(seq)
    assert len(m._done) == 2


def test_distributed_config(monkeypatch):
    assert not distributed.DistributedConfig().enabled
    with pytest.raises(ValueError, match="go together"):
        distributed.DistributedConfig(coordinator="h:1")
    with pytest.raises(ValueError, match="not in"):
        distributed.DistributedConfig(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="unknown keys"):
        distributed.DistributedConfig.from_dict({"coordinatr": "h:1"})
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    cfg = distributed.DistributedConfig().resolved()
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.enabled) == ("10.0.0.1:1234", 4, 3, True)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID)
    with pytest.raises(ValueError, match="TINKER_JAX_PROCESS_ID"):
        distributed.DistributedConfig().resolved()


def _sft_batch() -> list[tt.Datum]:
    rng = np.random.default_rng(0)
    out = []
    for n in (9, 12):
        toks = rng.integers(0, 512, n)
        out.append(tt.Datum(model_input=tt.ModelInput.from_ints(toks[:-1].tolist()),
                            loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(toks[1:].astype(np.int64))}))
    return out


def _train(tc) -> list[float]:
    losses = []
    for _ in range(2):
        fb = tc.forward_backward(_sft_batch(), "cross_entropy").result()
        tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
        losses.append(fb.metrics["loss:sum"])
    saved = tc.save_state("s").result().path  # every process writes its shards; process 0 commits
    tc.forward_backward(_sft_batch(), "cross_entropy").result()
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    tc.load_state(saved).result()  # back to the checkpoint's weights
    losses.append(tc.forward(_sft_batch(), "cross_entropy").result().metrics["loss:sum"])
    sampler = tc.save_weights_and_get_sampling_client("s")
    out = sampler.sample(tt.ModelInput.from_ints([3, 1, 4, 1, 5]), 2,
                         tt.SamplingParams(max_tokens=5, temperature=0.0)).result()
    exported = tc.save_weights_external("hf").result().path  # the PEFT files of the checkpoint's weights
    assert exported.endswith("/external_weights/hf"), exported
    return losses, [q.tokens for q in out.sequences], [q.logprobs for q in out.sequences], saved


def _exported(data_dir: Path, model_id: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = data_dir / "checkpoints" / model_id / "external_weights" / "hf"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    return load_file(out / "adapter_model.safetensors")


class _Job:
    """`tinker-jax serve` on two local processes (scripts/local_cluster.py), its output in a file (a pipe nobody
    reads until the end would fill up)."""

    def __init__(self, tmp_path: Path, cfg: Path, name: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url, self.path = f"http://127.0.0.1:{port}", tmp_path / f"{name}.log"
        self._log = open(self.path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "-n", "2", "--devices", "4", "--keep-going",
             "--timeout", "600", "--", sys.executable, "-m", "tinker_jax.cli", "serve", "--config", str(cfg),
             "--data-dir", str(tmp_path / "data"), "--port", str(port)],
            env=_env(4), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.out()[-4000:]
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def out(self) -> str:
        return self.path.read_text()

    def pid(self, process: int) -> int:
        return int(re.search(rf"\[launcher\] process {process}: pid (\d+)", self.out())[1])

    def stop(self) -> int:
        """SIGTERM, as a supervisor stops the job; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
        return self.proc.returncode


def test_two_processes_serve_the_sdk(tmp_path):
    """Training, checkpoints (with publish, TTL and delete) and sampling through the SDK equal one process's; a
    killed follower gives the client a clear error in seconds while process 0 stays up; the checkpoints survive a
    restart of both processes, which then stop cleanly on SIGTERM."""
    model = models_util.tiny_model_dir("tiny-qwen3")
    mesh = {"fsdp": 2, "tensor": 4}
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"tiny": str(model)}, "mesh": mesh, "max_seq_len": 64,
                                   "compile_cache": False, "distributed": {"heartbeat_timeout_s": 8}}))
    job = _Job(tmp_path, cfg, "first")
    try:
        service = tinker.ServiceClient(base_url=job.url, api_key="tml-multiprocess")
        tc = service.create_lora_training_client(base_model="tiny", rank=4, seed=7).result()
        got, got_tokens, got_lps, saved = _train(tc)
        # Checkpoint housekeeping goes through the log too: process 0 changes the files once every process is done
        # with them.
        rest = service.create_rest_client()
        doomed = tc.save_state("doomed").result().path
        rest.publish_checkpoint_from_tinker_path(saved).result()
        rest.set_checkpoint_ttl_from_tinker_path(saved, 3600).result()
        rest.delete_checkpoint_from_tinker_path(doomed).result()
        listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
        assert doomed not in listed and listed[saved].public and listed[saved].expires_at is not None, listed

        os.kill(job.pid(1), signal.SIGKILL)  # a follower dies
        t0 = time.monotonic()
        in_flight = tc.forward_backward(_sft_batch(), "cross_entropy")  # its collectives wait for process 1
        with pytest.raises(Exception, match="process 1 of 2 of the engine stopped"):
            in_flight.result(timeout=60)
        assert time.monotonic() - t0 < 30
        with pytest.raises(Exception, match="process 1 of 2 of the engine stopped"):  # refused from now on
            tc.forward(_sft_batch(), "cross_entropy").result(timeout=30)
        health = httpx.get(f"{job.url}/api/v1/healthz", timeout=10)
        assert health.status_code == 503 and "process 1 of 2" in health.text, health.text
        assert job.proc.poll() is None  # process 0 and its front door stay up until the supervisor restarts it
        service.close("error").result(timeout=60)  # its front door still answers: the session ends cleanly
    finally:
        job.stop()
    assert "process 1 of 2 of the engine stopped" in job.out()
    # Each process read only the shards of the weights its devices hold (fsdp splits the model between them).
    reads = dict(re.findall(r"\[(\d)\] .*read (\d+) of the weights' \d+ bytes", job.out()))
    total = int(re.search(r"read \d+ of the weights' (\d+) bytes", job.out())[1])
    assert set(reads) == {"0", "1"} and all(int(n) < 0.75 * total for n in reads.values()), (reads, total)

    again = _Job(tmp_path, cfg, "second")  # both processes restarted on the same data dir
    try:
        service = tinker.ServiceClient(base_url=again.url, api_key="tml-multiprocess")
        resumed = service.create_training_client_from_state(saved)
        after_restart = resumed.forward(_sft_batch(), "cross_entropy").result().metrics["loss:sum"]
        service.close("success").result(timeout=60)
    finally:
        status = again.stop()
    out = again.out()
    assert status == 0, out[-4000:]
    assert "process 1 of 2: following process 0" in out and out.count("engine: stopped") == 2, out[-4000:]
    np.testing.assert_allclose(after_restart, got[-1], rtol=1e-5)  # the committed checkpoint's weights

    one = EngineConfig(data_dir=tmp_path / "one", models={"tiny": str(model)}, mesh=MeshConfig(**mesh),
                       max_seq_len=64, compile_cache=False)
    with tinker_jax.ServiceClient(config=one) as svc:
        one_tc = svc.create_lora_training_client(base_model="tiny", rank=4, seed=7)
        want, want_tokens, want_lps, _ = _train(one_tc)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got_tokens == want_tokens
    np.testing.assert_allclose(got_lps, want_lps, rtol=1e-5, atol=1e-5)
    # save_weights_external on two processes (each gathers the adapter, process 0 writes it): the PEFT files of one
    # process's export of the same training
    two_files, one_files = _exported(tmp_path / "data", tc.model_id), _exported(tmp_path / "one", one_tc.model_id)
    assert sorted(two_files) == sorted(one_files) and two_files
    for name, x in one_files.items():
        np.testing.assert_allclose(two_files[name], x, rtol=1e-4, atol=1e-6)


def test_round_log_keeps_order_and_prunes_what_everyone_read(tmp_path):
    script = Path(__file__).parent / "multiprocess_roundlog.py"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "-n", "2", "--devices", "1",
                          "--timeout", "200", "--", sys.executable, str(script)],
                         env=_env(1), capture_output=True, text=True, timeout=250)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    got = {r["process"]: r for r in _results(run.stdout)}
    assert got[1]["in_order"] is True
    # the first message and one read long ago are pruned; the newest is still there
    assert got[0]["gone"] == [True, True, False], got[0]
