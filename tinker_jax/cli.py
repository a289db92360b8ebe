"""The `tinker-jax` command line.

Subcommands are `Subcommand(help, add_arguments, run)` values. `init-model` is the core's own; the others belong to
the packages that use the core (`serve` to `server`, `bench` to `benchmarks`) and are registered as entry points
in the group `tinker_jax.commands` (pyproject.toml), so this module never imports its users. To add one, write
`_add_<name>_args(parser)` and `_run_<name>(args) -> int` beside its code, export a `COMMAND = Subcommand(...)`
and name it in pyproject.toml. Heavy imports belong inside the `run` functions so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Sequence

ENTRY_POINT_GROUP = "tinker_jax.commands"


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- init-model ---------------------------------------------------------------------------------------------

def _add_init_model_args(p: argparse.ArgumentParser) -> None:
    from tinker_jax.hf.presets import PRESETS

    p.add_argument("out", metavar="OUT", help="directory to create (must not exist or be empty)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), metavar="NAME",
                   help=f"model preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")


def _run_init_model(args: argparse.Namespace) -> int:
    from tinker_jax.hf.init_model import init_model
    from tinker_jax.models.config import load_config

    out = init_model(args.out, args.preset, seed=args.seed, force=args.force)
    cfg = load_config(out)
    print(f"wrote {args.preset} ({cfg.architecture}, {cfg.n_params:,} params, vocab {cfg.vocab_size}, "
          f"seed {args.seed}) to {out}")
    return 0


BUILTIN: dict[str, Subcommand] = {
    "init-model": Subcommand("write a freshly initialised Hugging Face model directory from a preset",
                             _add_init_model_args, _run_init_model),
}


def subcommands() -> dict[str, Subcommand]:
    """The built-in subcommands, then every installed `tinker_jax.commands` entry point (name -> Subcommand)."""
    out = dict(BUILTIN)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        command = ep.load()
        if not isinstance(command, Subcommand):
            raise TypeError(f"entry point {ep.name} = {ep.value} is a {type(command).__name__}, not a Subcommand")
        out.setdefault(ep.name, command)
    return out


def build_parser(commands: dict[str, Subcommand] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinker-jax", description="Self-hosted Tinker post-training API on JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sc in (commands or subcommands()).items():
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


if __name__ == "__main__":  # `python -m tinker_jax.cli`: use the imported module, whose Subcommand the entry points use
    from tinker_jax.cli import main as _main

    sys.exit(_main())
