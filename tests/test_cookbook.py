"""tinker-cookbook 0.6.x recipes, unmodified, against `tinker-jax serve` with a model made by `tinker-jax init-model`.

One real server process (`tinker-jax serve --model DIR --config ... --port P --api-key tml-...`) over a fresh
`tiny-qwen3` (vocab 512, ChatML specials, Qwen-style chat template) serves three cookbook training loops, each run
in-process through the recipe's own entry point:

- `recipes.chat_sl.train` (CLI parsed by chz from `key=value` argv, then `cli_main` -> `supervised.train.main`) on a
  local JSONL of conversations (`tests/cookbook_data/conversations.jsonl`, the recipe's `dataset=*.jsonl` branch),
  killed before its final checkpoint and run again on the same log_path: the cookbook finds its periodic checkpoint
  in `checkpoints.jsonl` and resumes through `create_training_client_from_state_with_optimizer`;
- `recipes.math_rl.train` on the arithmetic environment with its default loss, `stable_reinforce` (sampling with
  `record_stability_info` from a fresh sampler each step, then training on the rollouts, which name their
  sampled sequences through provenance spans);
- DPO: `preference.train_dpo.main` (what `recipes/preference/dpo/train.py` calls; that CLI only names hub data
  sets, so the config it would build is built here around the cookbook's `ComparisonBuilderFromJsonl` over
  `tests/cookbook_data/comparisons.jsonl`).

The renderer is the cookbook's `qwen3_instruct`: `<|im_start|>role\\n...<|im_end|>` without `<think>`, the layout
of the init-model chat template (the renderer ends a training example at the last `<|im_end|>`, as for Qwen). The
model name the cookbook sees is the model directory, served by the server under that exact path, so
`AutoTokenizer.from_pretrained` loads it locally.

Nothing is downloaded: HF hub and datasets are offline, and the cookbook's one outbound request (the price list
it fetches once per process to estimate cost) is disabled by marking it already fetched.

Needs the `tinker_cookbook` package. tinker-cookbook 0.6.1 declares `tml-renderers>=0.4.1`, which the package
index does not carry; the cookbook imports tml_renderers only for Inkling/Kimi K3 models, so it is installed with
`--no-deps` next to its other dependencies (listed in the `dev` extra). Without it this module is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

cookbook = pytest.importorskip(
    "tinker_cookbook",
    reason="tinker-cookbook is not installed (make install-dev installs 0.6.1 with --no-deps: its tml-renderers>=0.4.1 "
           "requirement is not on the index)")

import tinker  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "cookbook_data"
API_KEY = "tml-cookbook"
PRESET = "tiny-qwen3"
RENDERER = "qwen3_instruct"
LORA_RANK = 8  # one rank for every recipe, so the server compiles one set of LoRA programs

# Small engine shapes: every sequence here is < 128 tokens; one server serves all three recipes.
ENGINE_YAML = """\
max_seq_len: 128
max_tokens_per_batch: 2048
sampler:
  max_batch: 16
  max_seq_len: 128
  max_num_samples: 16
"""


def _tinker_jax_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("tinker-jax")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tinker-jax")
    return [found] if found else [sys.executable, "-m", "tinker_jax.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    # One device (the suite's 8 simulated ones are for the mesh tests), and XLA's CPU optimisation off
    # (models_util.FAST_XLA as flags): the server compiles far more than it runs for these tiny recipes.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, model: str):
        self.proc, self.port, self.log, self.model = proc, port, log, model

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no server log)"

    @contextlib.contextmanager
    def rest(self):
        """A RestClient; its ServiceClient is closed afterwards, so no heartbeat thread outlives the server."""
        service = tinker.ServiceClient(base_url=self.base_url, api_key=API_KEY)
        try:
            yield service.create_rest_client()
        finally:
            service.close("success").result(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """`tinker-jax init-model DIR --preset tiny-qwen3`, as a user would run it."""
    out = tmp_path_factory.mktemp("cookbook_models") / PRESET
    r = subprocess.run([*_tinker_jax_cmd(), "init-model", str(out), "--preset", PRESET], env=_server_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    return out


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[Server]:
    """`tinker-jax serve --model DIR` in its own process on a free loopback port."""
    work = tmp_path_factory.mktemp("cookbook_server")
    cfg = work / "engine.yaml"
    cfg.write_text(ENGINE_YAML)
    port = _free_port()
    log = work / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*_tinker_jax_cmd(), "serve", "--model", str(model_dir), "--config", str(cfg), "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(work / "data"), "--api-key", API_KEY],
            stdout=fh, stderr=subprocess.STDOUT, env=_server_env(), cwd=str(work))
    srv = Server(proc, port, log, str(model_dir))
    try:
        deadline = time.monotonic() + 180
        while True:  # uvicorn binds only after the engine is built and the app has started
            assert proc.poll() is None, f"tinker-jax serve exited with {proc.returncode}:\n{srv.log_tail()}"
            assert time.monotonic() < deadline, f"tinker-jax serve did not start:\n{srv.log_tail()}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def _isolated_root_logging() -> Iterator[None]:
    """The cookbook replaces the root logger's handlers (console + `logs.log`); put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                try:
                    h.close()
                except Exception:
                    pass
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


@pytest.fixture
def cookbook_env(server, monkeypatch) -> Server:
    """What a cookbook user sets: an API key for the server; plus no outbound request for the price list."""
    from tinker_cookbook.utils import cost_estimation

    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    monkeypatch.setattr(cost_estimation, "_pricing_fetched", True)  # "already fetched, none found"
    monkeypatch.setattr(cost_estimation, "_pricing_entries", None)
    assert server.proc.poll() is None, server.log_tail()
    return server


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_id(tinker_path: str) -> str:
    assert tinker_path.startswith("tinker://"), tinker_path
    return tinker_path[len("tinker://"):].split("/")[0]


def _server_checkpoints(server: Server, tinker_path: str) -> set[str]:
    with server.rest() as rest:
        return {c.tinker_path for c in rest.list_checkpoints(_run_id(tinker_path)).result().checkpoints}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_cookbook_version() -> None:
    assert cookbook.__version__.startswith("0.6."), cookbook.__version__


# --- supervised: chat_sl on a local JSONL, interrupted and resumed -------------------------------------------------


class _SimulatedKill(Exception):
    """Stands for the process dying after its periodic checkpoint and before the final one."""


def test_chat_sl_local_jsonl_with_resume(cookbook_env, model_dir, tmp_path, monkeypatch) -> None:
    import chz
    from tinker_cookbook import checkpoint_utils
    from tinker_cookbook.recipes.chat_sl import train as chat_sl

    server = cookbook_env
    log_path = tmp_path / "chat_sl"
    conversations = DATA / "conversations.jsonl"
    n_convs = len(_jsonl(conversations))
    batch_size = 4
    n_steps = n_convs // batch_size  # 4 steps, one epoch
    argv = [f"log_path={log_path}", f"model_name={model_dir}", f"dataset={conversations}",
            f"renderer_name={RENDERER}", f"base_url={server.base_url}", f"batch_size={batch_size}", "max_length=64",
            "learning_rate=1e-3", f"lora_rank={LORA_RANK}", "save_every=2", "eval_every=0",
            "behavior_if_log_dir_exists=resume"]

    # Run 1: the whole epoch, then "killed" just before the final checkpoint.
    async def killed(self, loop_state):
        raise _SimulatedKill(loop_state)

    t0 = time.monotonic()
    with monkeypatch.context() as m, _isolated_root_logging():
        m.setattr(checkpoint_utils.CheckpointManager, "save_final_async", killed)
        with pytest.raises(_SimulatedKill):
            chat_sl.cli_main(chz.entrypoint(chat_sl.CLIConfig, argv=argv))
    t1 = time.monotonic()

    records = _jsonl(log_path / "checkpoints.jsonl")
    assert [r["name"] for r in records] == ["000002"], records  # save_every=2: step 2 only (never step 0)
    periodic = records[0]
    assert periodic["epoch"] == 0 and periodic["batch"] == 2
    metrics1 = _jsonl(log_path / "metrics.jsonl")
    assert [r["step"] for r in metrics1] == list(range(n_steps))
    assert all(_finite(r["train_mean_nll"]) and r["train_mean_nll"] > 0 for r in metrics1), metrics1
    assert periodic["state_path"] in _server_checkpoints(server, periodic["state_path"])
    assert periodic["sampler_path"] in _server_checkpoints(server, periodic["state_path"])

    # Run 2: the same command on the same log_path resumes from the periodic checkpoint, with its optimizer.
    with _isolated_root_logging():
        chat_sl.cli_main(chz.entrypoint(chat_sl.CLIConfig, argv=argv))
    t2 = time.monotonic()

    log_text = (log_path / "logs.log").read_text(errors="replace")
    assert f"Resumed training from {periodic['state_path']}" in log_text
    assert "Resuming at step 2: dropped 2 metrics rows" in log_text  # run 1's steps 2 and 3 are redone
    records = _jsonl(log_path / "checkpoints.jsonl")
    # The resumed run redoes step 2, so it saves its own step-2 checkpoint again, then the final one.
    assert [r["name"] for r in records] == ["000002", "000002", "final"], records
    final = records[-1]
    assert final["epoch"] == 1 and final["batch"] == 0
    # The resumed run is a new training run on the server (created from the state), holding both its checkpoints.
    assert _run_id(final["state_path"]) != _run_id(periodic["state_path"])
    assert _run_id(records[1]["state_path"]) == _run_id(final["state_path"])
    assert {final["state_path"], final["sampler_path"]} <= _server_checkpoints(server, final["state_path"])
    with server.rest() as rest:
        run = rest.get_training_run_by_tinker_path(final["state_path"]).result()
    assert run.base_model == str(model_dir)
    assert (run.user_metadata or {}).get("renderer_name") == RENDERER
    metrics = _jsonl(log_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(n_steps))  # 0, 1 from run 1; 2, 3 from run 2
    assert all(_finite(r["train_mean_nll"]) and r["num_loss_tokens"] > 0 for r in metrics), metrics
    assert final["elapsed_tokens"] > periodic["elapsed_tokens"] > 0  # the token count carried over the resume
    print(f"chat_sl: run 1 {t1 - t0:.1f}s, resumed run {t2 - t1:.1f}s")


# --- RL: math_rl on the arithmetic environment with its default loss, stable_reinforce ------------------------------


def test_math_rl_arithmetic_stable_reinforce(cookbook_env, model_dir, tmp_path) -> None:
    import chz
    from tinker_cookbook.recipes.math_rl import train as math_rl

    server = cookbook_env
    log_path = tmp_path / "math_rl"
    groups, group_size, steps = 2, 4, 3
    argv = [f"log_path={log_path}", f"model_name={model_dir}", "env=arithmetic", f"renderer_name={RENDERER}",
            f"base_url={server.base_url}", f"group_size={group_size}", f"groups_per_batch={groups}",
            "learning_rate=1e-3", "max_tokens=5", f"lora_rank={LORA_RANK}",
            "save_every=2", "eval_every=0", f"max_steps={steps}", "behavior_if_log_dir_exists=raise"]
    t0 = time.monotonic()
    with _isolated_root_logging():
        asyncio.run(math_rl.cli_main(chz.entrypoint(math_rl.CLIConfig, argv=argv)))
    elapsed = time.monotonic() - t0

    config = json.loads((log_path / "config.json").read_text())
    assert config["loss_fn"] == "stable_reinforce"  # the recipe's default
    metrics = [r for r in _jsonl(log_path / "metrics.jsonl") if "env/all/total_episodes" in r]
    assert [r["step"] for r in metrics] == list(range(steps))
    for r in metrics:
        assert r["env/all/total_episodes"] == groups * group_size
        assert r["env/all/ac_tokens_per_turn"] > 0  # the sampler generated tokens
        for key in ("env/all/reward/total", "optim/entropy", "optim/kl_sample_train_v1", "optim/kl_sample_train_v2"):
            assert _finite(r[key]), (key, r)
        assert r["tokens/trained"] > 0
        # The sampler's logprobs of its own tokens agree with the trainer's forward on the same weights.
        assert abs(r["optim/kl_sample_train_v1"]) < 1e-3, r
    records = _jsonl(log_path / "checkpoints.jsonl")
    assert [r["name"] for r in records] == ["000002", "final"], records
    for rec in records:
        listed = _server_checkpoints(server, rec["state_path"])
        assert {rec["state_path"], rec["sampler_path"]} <= listed, (rec, listed)
    print(f"math_rl: {steps} steps in {elapsed:.1f}s")


# --- DPO from a local comparisons file ------------------------------------------------------------------------------


def test_dpo_local_comparisons(cookbook_env, model_dir, tmp_path) -> None:
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    server = cookbook_env
    log_path = tmp_path / "dpo"
    comparisons = DATA / "comparisons.jsonl"
    n_pairs, batch_size = len(_jsonl(comparisons)), 4
    model = str(model_dir)
    # What recipes/preference/dpo/train.py's cli_main builds, with a local file in place of a hub data set.
    config = train_dpo.Config(
        log_path=str(log_path), model_name=model, recipe_name="recipe_preference_dpo", renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=model, renderer_name=RENDERER,
                                                         max_length=64, batch_size=batch_size),
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(comparisons))),
        evaluator_builders=[], learning_rate=1e-3, dpo_beta=0.1, lora_rank=LORA_RANK, base_url=server.base_url,
        save_every=0, eval_every=0)
    t0 = time.monotonic()
    with _isolated_root_logging():
        train_dpo.main(config)
    elapsed = time.monotonic() - t0

    metrics = _jsonl(log_path / "metrics.jsonl")
    steps = n_pairs // batch_size
    assert [r["step"] for r in metrics] == list(range(steps))
    for r in metrics:
        assert r["num_pairs"] == batch_size
        for key in ("dpo_loss", "margin", "chosen_reward", "rejected_reward", "accuracy"):
            assert _finite(r[key]), (key, r)
    # Step 0: the policy is the reference (its sampler snapshot), so every margin is 0 and the loss is log 2 --
    # the sampler's compute_logprobs and the trainer's forward agree on the same weights.
    assert abs(metrics[0]["dpo_loss"] - math.log(2)) < 1e-3, metrics[0]
    assert abs(metrics[0]["margin"]) < 1e-2, metrics[0]
    # After an update the policy has moved away from the reference.
    assert abs(metrics[-1]["chosen_reward"]) + abs(metrics[-1]["rejected_reward"]) > 0, metrics[-1]
    records = _jsonl(log_path / "checkpoints.jsonl")
    assert [r["name"] for r in records] == ["final"], records
    listed = _server_checkpoints(server, records[0]["state_path"])
    assert {records[0]["state_path"], records[0]["sampler_path"]} <= listed, listed
    print(f"dpo: {steps} steps in {elapsed:.1f}s")
