"""The `tinker-jax` command line.

Subcommands are rows of `SUBCOMMANDS`: name -> `Subcommand(help, add_arguments, run)`. To add one
(e.g. `serve`, `bench`), write `_add_<name>_args(parser)` and `_run_<name>(args) -> int` and register a row;
`main` does the rest. Heavy imports belong inside the `_run_*` functions so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- init-model ---------------------------------------------------------------------------------------------

def _add_init_model_args(p: argparse.ArgumentParser) -> None:
    from tinker_jax.presets import PRESETS

    p.add_argument("out", metavar="OUT", help="directory to create (must not exist or be empty)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), metavar="NAME",
                   help=f"model preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")


def _run_init_model(args: argparse.Namespace) -> int:
    from tinker_jax.init_model import init_model
    from tinker_jax.models.config import load_config

    out = init_model(args.out, args.preset, seed=args.seed, force=args.force)
    cfg = load_config(out)
    print(f"wrote {args.preset} ({cfg.architecture}, {cfg.n_params:,} params, vocab {cfg.vocab_size}, "
          f"seed {args.seed}) to {out}")
    return 0


# ---- serve --------------------------------------------------------------------------------------------------

def _add_serve_args(p: argparse.ArgumentParser) -> None:
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


def _run_serve(args: argparse.Namespace) -> int:
    from tinker_jax.serve import serve

    serve(args.model, args.config, args.host, args.port, args.data_dir, args.api_key)
    return 0


# ---- bench --------------------------------------------------------------------------------------------------

def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from benchmarks.run import add_arguments

    add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    from benchmarks.run import run_from_args

    return run_from_args(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "init-model": Subcommand("write a freshly initialised Hugging Face model directory from a preset",
                             _add_init_model_args, _run_init_model),
    "serve": Subcommand("serve the Tinker REST API (the official tinker SDK connects to it unchanged)",
                        _add_serve_args, _run_serve),
    "bench": Subcommand("benchmark ours against peers (transformers+peft, ...) in one invocation; table + JSON",
                        _add_bench_args, _run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinker-jax", description="Self-hosted Tinker post-training API on JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sc in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=sc.help, description=sc.help)
        sc.add_arguments(p)
        p.set_defaults(_run=sc.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileExistsError) as e:
        print(f"tinker-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
