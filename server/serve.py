"""`tinker-jax serve`: the REST server that the unmodified `tinker` SDK talks to.

    tinker-jax serve [--model PATH_OR_ALIAS]... [--config configs/X.yaml] [--host 127.0.0.1] [--port 8000]
                     [--data-dir DIR] [--api-key KEY]
                     [--coordinator HOST:PORT --num-processes N --process-id I]

Several hosts: run the same command on every host with --coordinator (process 0's address), --num-processes and
its own --process-id (or with `distributed: {from_env: true}` in the config on a TPU pod or under SLURM, or with
TINKER_JAX_COORDINATOR / TINKER_JAX_NUM_PROCESSES / TINKER_JAX_PROCESS_ID set, as scripts/local_cluster.py does).
Process 0 serves HTTP and schedules; the others run its decisions on their devices and have no front door.

Models: `--model` names a local Hugging Face directory (served under that exact path string as its base_model
name, and under its alias too if the config maps an alias to the same directory) or an alias from the config's
`models:`. Without `--model`, the config's models are served; with neither, the embedded default: the
`small-qwen3` preset, written by `tinker_jax.hf.init_model` to `{data_dir}/models/small-qwen3` on first start.

Auth: API keys come from `--api-key` and `TINKER_JAX_API_KEYS` (comma separated); they must start with `tml-`
(the SDK refuses to send anything else). Without a key every request is accepted, which is only allowed when
binding to a loopback address.

A corrupt server database (`server.sqlite3`) stops the command before anything starts, with exit code 2 and a
message naming the file and the repair command (`tinker-jax admin reindex`), rather than a traceback from inside
uvicorn's startup or a server that answers 500 to every request.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

from server.settings import ServerSettings, api_keys
from server.store import CorruptDatabase, check_file
from tinker_jax.cli import Subcommand
from tinker_jax.config import EngineConfig
from tinker_jax.distributed import DistributedConfig

log = logging.getLogger("tinker_jax.serve")

DEFAULT_PRESET = "small-qwen3"


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere


def resolve_models(models: Sequence[str], configured: Mapping[str, str]) -> dict[str, str]:
    """--model values -> {base_model name: directory}. A directory is served under its exact path string (and under
    any configured alias of the same directory); an alias must be configured."""
    out: dict[str, str] = {}
    for m in models:
        if (Path(m) / "config.json").is_file():
            out[m] = m
            target = Path(m).resolve()
            out.update({alias: path for alias, path in configured.items() if Path(path).resolve() == target})
        elif m in configured:
            out[m] = configured[m]
        else:
            known = ", ".join(configured) or "none configured"
            raise ValueError(f"--model {m!r}: not a model directory (no config.json) and not a configured alias "
                             f"({known})")
    return out


def default_model(data_dir: Path, write: bool = True) -> dict[str, str]:
    """The embedded default model, generated on first start (a freshly initialised `small-qwen3`). `write=False`:
    only its name and place (a follower process: process 0 writes it before the processes join)."""
    path = data_dir / "models" / DEFAULT_PRESET
    if write and not (path / "config.json").is_file():
        from tinker_jax.hf.init_model import init_model

        log.info("writing the default model (%s preset) to %s", DEFAULT_PRESET, path)
        init_model(path, DEFAULT_PRESET, force=path.exists())
    return {DEFAULT_PRESET: str(path)}


def build_config(models: Sequence[str], config: str | None, data_dir: str | None,
                 write_default: bool = True) -> EngineConfig:
    cfg = EngineConfig.load(config)
    if data_dir is not None:
        cfg = replace(cfg, data_dir=Path(os.path.expanduser(data_dir)))
    if models:
        served = resolve_models(models, cfg.models)
    elif cfg.models:
        served = dict(cfg.models)
    else:
        served = default_model(Path(cfg.data_dir), write=write_default)
    # Remote clients get the served models only, never an arbitrary directory of this machine named by its path.
    return replace(cfg, models=served, local_paths=False)


def check_exposure(host: str, keys: Sequence[str]) -> None:
    if not keys and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without an API key: anyone who can reach it could train, "
                         "sample and delete checkpoints. Pass --api-key tml-... (or set TINKER_JAX_API_KEYS), or "
                         "bind to 127.0.0.1")


def serve(models: Sequence[str] = (), config: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          data_dir: str | None = None, api_key: str | None = None, *, coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> None:
    """Build the engine and serve the REST API until interrupted (on process 0 of several: the others follow)."""
    import uvicorn

    from server.app import build_app
    from tinker_jax.engine import Engine

    keys = api_keys(api_key)
    check_exposure(host, keys)  # before any slow work
    ServerSettings(data_dir=Path("."), api_keys=keys)  # validates the keys (tml- prefix) early
    dist = DistributedConfig(coordinator, num_processes, process_id) if (
        coordinator is not None or num_processes is not None or process_id is not None) else None
    # On several processes only process 0 writes the default model; the others read it once all have joined.
    follower = ((dist or EngineConfig.load(config).distributed).resolved().process_id or 0) > 0
    cfg = build_config(models, config, data_dir, write_default=not follower)
    if dist is not None:
        cfg = replace(cfg, distributed=dist)
    settings = ServerSettings.from_env(data_dir=cfg.data_dir, api_keys=keys)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    engine = None
    if cfg.distributed.resolved().enabled:  # join the others first: only then is it known who leads
        engine = Engine(cfg)
        if not engine.procs.leader:
            log.info("process %d of %d: following process 0 (no front door here)", engine.procs.pid,
                     engine.procs.count)
            _stop_cleanly_on_sigterm()
            try:
                error = engine.follow()
            except KeyboardInterrupt:
                error = None
            finally:
                engine.shutdown()
            if error is not None:
                raise SystemExit(f"tinker-jax serve: process {engine.procs.pid} stopped following: {error}")
            return
    try:
        check_file(settings.db_path)  # CorruptDatabase: before the (slow) engine is built
    except CorruptDatabase:
        if engine is not None:
            engine.shutdown()
        raise
    log.info("serving %s from %s on http://%s:%d (data in %s; %s)", ", ".join(cfg.models), "config" if config
             else "the command line", host, port, cfg.data_dir,
             f"{len(keys)} API key(s)" if keys else "no API key: any X-API-Key accepted")
    log.info("console: http://%s:%d/console", host, port)
    engine = engine or Engine(cfg)
    _stop_cleanly_on_sigterm()
    try:
        uvicorn.run(build_app(engine, settings, stop_engine=True), host=host, port=port, log_level="info")
    except KeyboardInterrupt:  # Ctrl-C or a supervisor's SIGTERM: a normal stop
        pass
    finally:
        engine.shutdown()  # (done already by the app's stop, unless it never started) writes in flight finish
    if engine.procs is not None and engine.procs.gone is not None:
        # A device thread may still be blocked in a collective with the lost process: leave without waiting for it
        # (and with a failure status, for the supervisor).
        log.error("tinker-jax serve: stopped after a lost process (%s)", engine.procs.gone)
        logging.shutdown()
        os._exit(3)


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (systemd, docker, Kubernetes, SLURM stopping the job) ends the server like Ctrl-C. Uvicorn handles it
    while serving, then re-raises it with the handler found at its start: Python's default for SIGTERM would kill
    the process there, before the engine's shutdown could finish the checkpoint writes in flight."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


# ---- the `tinker-jax serve` subcommand (registered in pyproject.toml under tinker_jax.commands) -----------------

def _add_arguments(p) -> None:
    p.add_argument("--model", action="append", default=[], metavar="PATH_OR_ALIAS",
                   help="a local Hugging Face model directory or a configured alias; repeat for several "
                        "(default: the config's models, else the embedded small-qwen3)")
    p.add_argument("--config", metavar="YAML", help="engine config, e.g. configs/default.yaml")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--data-dir", metavar="DIR", help="checkpoints, registry and server state "
                                                     "(default: $TINKER_JAX_DATA_DIR or ~/.local/share/tinker_jax)")
    p.add_argument("--api-key", metavar="KEY", help="accepted X-API-Key (tml-...); also $TINKER_JAX_API_KEYS, "
                                                    "comma separated")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="several hosts: process 0's address (all processes)")
    p.add_argument("--num-processes", type=int, metavar="N", help="several hosts: how many processes in all")
    p.add_argument("--process-id", type=int, metavar="I", help="several hosts: this one's id (0 serves HTTP)")


def _run(args) -> int:
    try:
        serve(args.model, args.config, args.host, args.port, args.data_dir, args.api_key,
              coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    except ValueError as e:  # a bad flag or config: said plainly
        print(f"tinker-jax serve: error: {e}", file=sys.stderr)
        return 2
    except CorruptDatabase as e:  # the operator's to repair: the message says how; a traceback would only hide it
        print(f"tinker-jax serve: error: {e}", file=sys.stderr)
        return 2
    return 0


COMMAND = Subcommand("serve the Tinker REST API (the official tinker SDK connects to it unchanged)",
                     _add_arguments, _run)
