"""The `tinker-jax` command line.

Subcommands are `Subcommand(help, add_arguments, run)` values. `init-model` and `plan` are the core's own; the
others belong to the packages that use the core (`serve` to `server`, `bench` to `benchmarks`) and are registered
as entry points in the group `tinker_jax.commands` (pyproject.toml), so this module never imports its users. To add
one, write `_add_<name>_args(parser)` and `_run_<name>(args) -> int` beside its code, export a
`COMMAND = Subcommand(...)` and name it in pyproject.toml. Heavy imports belong inside the `run` functions so
`--help` stays fast.
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


# ---- plan ---------------------------------------------------------------------------------------------------

def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR_OR_CONFIG",
                   help="a Hugging Face model directory or its config.json (only config.json is read, never weights)")
    p.add_argument("--mesh", default="data=1,fsdp=1,tensor=1", metavar="data=D,fsdp=F,tensor=T[,expert=E]",
                   help="device mesh (omitted axes are 1; default: one device)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora-rank", type=int, default=32, metavar="R", help="LoRA rank (default 32)")
    kind.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--adapters", type=int, default=1, metavar="N",
                   help="LoRA runs of this rank trained at once on the base model (default 1)")
    p.add_argument("--batch-tokens", type=int, default=8192, metavar="N",
                   help="tokens per training micro-batch, the engine's max_tokens_per_batch (default 8192)")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="training row length (default: batch tokens / (data x expert x fsdp), a power of two, "
                        "at most 4096)")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute layer activations in the backward pass (engine `remat`; default off)")
    p.add_argument("--param-dtype", "--dtype", dest="dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the engine's `dtype`: base weights are stored and computed in it (default float32; "
                        "trained weights and Adam state are fp32 either way)")
    p.add_argument("--attention", default="einsum", choices=["einsum", "cudnn", "xla"],
                   help="training attention kernel (default einsum; the engine's `attention: auto` picks cudnn on a "
                        "GPU computing in bfloat16, else einsum)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory of one device, e.g. 80GiB (H100), 16GiB (TPU v5e); GB = 10^9, GiB = 2^30")
    p.add_argument("--sampler-batch", type=int, default=16, metavar="B",
                   help="sampler rows, sampler.max_batch (default 16; 0: no sampler)")
    p.add_argument("--sampler-seq-len", type=int, default=1024, metavar="S",
                   help="sampler tokens per row, sampler.max_seq_len (default 1024)")
    p.add_argument("--sampler-adapters", type=int, default=16, metavar="N",
                   help="LoRA adapters resident in the sampler, sampler.max_adapters (default 16)")
    p.add_argument("--sampler-kv-tokens", type=int, default=None, metavar="N",
                   help="sampler KV cache size in tokens, sampler.kv_cache_tokens (default rows x seq len)")
    p.add_argument("--sampler-page-size", type=int, default=16, metavar="N",
                   help="tokens per sampler KV page, sampler.page_size (default 16)")
    p.add_argument("--sampler-dtype", default=None, choices=["float32", "bfloat16"],
                   help="sampler.dtype: the sampler's weights, KV cache and compute (default: --param-dtype; "
                        "another dtype keeps a copy of the base weights in it)")
    p.add_argument("--sampler-quantize", default=None, choices=["int8"],
                   help="sampler.quantize: the sampler's copy of the base weights with int8 block projections "
                        "and MoE experts")
    p.add_argument("--sampler-prefill-chunk", type=int, default=512, metavar="N",
                   help="sampler.prefill_chunk: longer prompts are prefilled N tokens a step (default 512; 0: whole)")
    p.add_argument("--sampler-decode-attention", default="auto", choices=["auto", "einsum", "reduce", "paged"],
                   help="sampler.decode_attention (default auto; paged reads the KV pages in place, the others "
                        "gather each layer's context)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes as integers)")


def _run_plan(args: argparse.Namespace) -> int:
    import json

    from tinker_jax import plan as planning

    cfg = planning.read_config(args.model)
    result = planning.plan(
        cfg, planning.parse_mesh(args.mesh), lora_rank=args.lora_rank, full=args.full, adapters=args.adapters,
        batch_tokens=args.batch_tokens, seq_len=args.seq_len, remat=args.remat, dtype=args.dtype,
        attention=args.attention, device_memory=args.device_memory, sampler_batch=args.sampler_batch,
        sampler_seq_len=args.sampler_seq_len, sampler_adapters=args.sampler_adapters,
        sampler_kv_tokens=args.sampler_kv_tokens, sampler_page_size=args.sampler_page_size,
        sampler_dtype=args.sampler_dtype, sampler_quantize=args.sampler_quantize,
        sampler_prefill_chunk=args.sampler_prefill_chunk, sampler_decode_attention=args.sampler_decode_attention)
    if args.json:
        print(json.dumps({"config": str(args.model), **result.to_dict()}, indent=2))
    else:
        print(_format_plan(result, str(args.model)))
    return 0


def _format_plan(p, source: str, width: int = 118) -> str:
    import textwrap

    from tinker_jax.plan import fmt_bytes

    def wrapped(text: str, first: str, indent: int) -> list[str]:
        for unit in ("GiB", "MiB", "KiB"):  # never split "1.16 GiB" across lines
            text = text.replace(f" {unit}", f"\0{unit}")
        lines = [x.replace("\0", " ") for x in textwrap.wrap(text, width - indent)] or [""]
        return [first + lines[0]] + [" " * indent + x for x in lines[1:]]

    m = p.mesh
    what = (f"full fine-tuning ({p.trainable_params:,} trainable)" if p.mode == "full" else
            f"LoRA rank {p.lora_rank}, {p.adapters} run{'s' * (p.adapters != 1)} in a pool of {p.pool_slots} slots "
            f"({p.trainable_params:,} parameters per adapter)")
    out = [f"{p.model}: {p.n_params:,} parameters ({source})"]
    out += wrapped(f"mesh {m} ({m.devices} devices); {what}; dtype {p.dtype}", "", 2)
    out += [f"micro-batch {p.rows} rows x {p.seq_len} tokens, {p.tokens_per_device} tokens per device; "
            f"{'remat' if p.remat else 'no remat'}; {p.attention} attention",
            "",
            f"{'per device':<17} {'bytes':>11}  {'':9}what"]
    for x in p.lines:
        out += wrapped(x.note, f"{x.name:<17} {fmt_bytes(x.bytes):>11}  {'exact' if x.exact else 'estimate':9}", 40)
    out.append(f"{'total':<17} {fmt_bytes(p.total):>11}")
    if p.device_memory is not None:
        share = 100 * p.free / p.device_memory
        left = f"{fmt_bytes(p.free)} free ({share:.0f}%)" if p.free >= 0 else f"{fmt_bytes(-p.free)} over"
        out.append(f"{'device memory':<17} {fmt_bytes(p.device_memory):>11}  {p.verdict}: {left}")
    else:
        out.append("device memory: not given (--device-memory 80GiB to check the fit)")
    if p.replicated:
        out += ["", "kept whole (the rules would split these dims, but the mesh does not divide them):"]
        out += [line for r in p.replicated for line in wrapped(r, "  - ", 4)]
    if p.notes:
        out += ["", "notes:"] + [line for n in p.notes for line in wrapped(n, "  - ", 4)]
    return "\n".join(out)


BUILTIN: dict[str, Subcommand] = {
    "init-model": Subcommand("write a freshly initialised Hugging Face model directory from a preset",
                             _add_init_model_args, _run_init_model),
    "plan": Subcommand("per-device memory of training and sampling a model on a mesh, from its config.json alone",
                       _add_plan_args, _run_plan),
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
