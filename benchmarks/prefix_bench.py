"""Ours, the sampler's prefix cache, with and without it, in two workloads:

- `--mode turn` (default): a conversation's next turn. Turn 1 is a P-token prompt (+A greedy tokens, `--answer`,
  default N); turn 2 is turn 1's prompt, its answer and M new tokens (+N). Each round sends each engine a fresh
  turn 1 (a new random prompt, so nothing is cached across rounds), untimed, then times its turn 2 (prefill + N
  decode steps, until the result is back).
- `--mode system`: a shared system prompt (or few-shot prefix) of P tokens, the same for the whole run, before
  each of B questions of M tokens, sent as B separate requests at once (+N greedy tokens each), as an RL loop's
  batch of problems. Each round times a fresh set of questions until all B results are back; the system prompt's
  pages are cached from the rounds before (two warm-up rounds: the first fills them). With `--fresh`, each round
  has a new system prompt too (nothing cached across rounds: the requests share it only with each other).
- `--mode score`: `compute_logprobs` of B sequences at once, each a P-token prompt shared by all B and new each
  round, then each its own M tokens (`--extra`), as an RL loop's KL penalty (or a teacher) scores a GRPO group's
  rollouts. Each round times one group until all B results are back.

Two engines in this process, alike but for `sampler.prefix_cache`, take turns (alternating which goes first).

    python -m benchmarks.prefix_bench [--mode turn|system|score] [--model small-qwen3] [--prompt 1536] [--extra 64]
                                      [--new 16] [--answer A] [--questions 8] [--fresh] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("turn", "system", "score"), default="turn")
    p.add_argument("--model", default="small-qwen3")
    p.add_argument("--prompt", type=int, default=1536, help="turn 1's prompt tokens (system mode: the system prompt's)")
    p.add_argument("--extra", type=int, default=64,
                   help="turn 2's new tokens after turn 1's answer (system mode: each question's tokens)")
    p.add_argument("--questions", type=int, default=8, help="system and score modes: requests per round")
    p.add_argument("--fresh", action="store_true", help="system mode: a new system prompt every round")
    p.add_argument("--answer", type=int, default=None, help="turn mode: turn 1's greedy tokens (default: --new)")
    p.add_argument("--new", type=int, default=16, help="greedy tokens sampled per turn")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import tinker.types as tt

    import tinker_jax
    from benchmarks.models import ensure_model
    from benchmarks.timing import Stat, machine_info, versions
    from tinker_jax.config import EngineConfig, SamplerConfig

    root = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    model = ensure_model(root / "models", args.model)
    answer_len = args.new if args.answer is None else args.answer
    seq = args.prompt + answer_len + args.extra + 2 * args.new
    clients = {}
    for name, cache in (("cached", True), ("uncached", False)):
        cfg = EngineConfig(data_dir=root / name, models={"m": str(model)},
                           sampler=SamplerConfig(max_batch=max(4, args.questions), max_seq_len=seq,
                                                 prefix_cache=cache))
        clients[name] = tinker_jax.ServiceClient(config=cfg)
    samplers = {k: c.create_sampling_client(base_model="m") for k, c in clients.items()}
    vocab = clients["cached"].engine._worker("m").cfg.vocab_size
    rng = np.random.default_rng(0)
    params = tt.SamplingParams(max_tokens=args.new, temperature=0.0, stop=[])
    hits: dict[str, list[int]] = {k: [] for k in samplers}
    calls: dict[str, list[int]] = {k: [] for k in samplers}  # prefill calls per round (how the requests were batched)

    def prefill_calls(name: str) -> int:
        return int(clients[name].engine.stats()["models"]["m"]["sampler"].get("prefill_calls", 0))

    def turn(name: str) -> float:
        """Turn 1 (untimed), then turn 2: its seconds."""
        s = samplers[name]
        first = rng.integers(3, vocab, args.prompt).tolist()
        answer = s.sample(tt.ModelInput.from_ints(first), 1, tt.SamplingParams(
            max_tokens=answer_len, temperature=0.0, stop=[])).result().sequences[0].tokens
        second = first + list(answer) + rng.integers(3, vocab, args.extra).tolist()
        t0 = time.perf_counter()
        resp = s.sample(tt.ModelInput.from_ints(second), 1, params).result()
        took = time.perf_counter() - t0
        hits[name].append(int(resp.prompt_cache_hit_tokens))
        return took

    system = rng.integers(3, vocab, args.prompt).tolist()

    def questions(name: str) -> float:
        """B requests of the system prompt and a fresh question each, at once: seconds until all are back."""
        s = samplers[name]
        shared = rng.integers(3, vocab, args.prompt).tolist() if args.fresh else system
        prompts = [shared + rng.integers(3, vocab, args.extra).tolist() for _ in range(args.questions)]
        t0 = time.perf_counter()
        futs = [s.sample(tt.ModelInput.from_ints(x), 1, params) for x in prompts]
        resps = [f.result() for f in futs]
        took = time.perf_counter() - t0
        hits[name].append(sum(int(r.prompt_cache_hit_tokens) for r in resps))
        return took

    def score(name: str) -> float:
        """compute_logprobs of B sequences sharing a fresh prompt, at once: seconds until all are back."""
        s, i = samplers[name], len(scored[name])
        if i == len(groups):  # round i's group, the same for both engines
            shared = rng.integers(3, vocab, args.prompt).tolist()
            groups.append([shared + rng.integers(3, vocab, args.extra).tolist() for _ in range(args.questions)])
        seqs = groups[i]
        t0 = time.perf_counter()
        futs = [s.sample(tt.ModelInput.from_ints(x), 1, tt.SamplingParams(max_tokens=1), include_prompt_logprobs=True)
                for x in seqs]
        resps = [f.result() for f in futs]
        took = time.perf_counter() - t0
        hits[name].append(sum(int(r.prompt_cache_hit_tokens) for r in resps))
        scored[name].append([r.prompt_logprobs[1:] for r in resps])
        return took

    scored: dict[str, list] = {k: [] for k in samplers}
    groups: list[list[list[int]]] = []
    run = {"turn": turn, "system": questions, "score": score}[args.mode]
    results: dict[str, list[float]] = {k: [] for k in samplers}
    # Warm-up rounds compile (system mode: the first fills the cache, the second compiles the prefill of the rests);
    # engines alternate who goes first.
    warm = 1 if args.mode in ("turn", "score") else 2
    for i in range(warm + args.repeats):
        for name in (list(samplers) if i % 2 else list(samplers)[::-1]):
            before = prefill_calls(name)
            took = run(name)
            calls[name].append(prefill_calls(name) - before)
            if i >= warm:
                results[name].append(took)
    for c in clients.values():
        c.close()
    what = {
        "score": f"compute_logprobs of {args.questions} sequences at once, each a {args.prompt}-token prompt shared by "
                 f"all (new each round) + its own {args.extra} tokens, {args.model}; seconds until all are back",
        "turn": f"turn 2 of a conversation: {args.prompt}-token turn 1 + {answer_len} answer + {args.extra} new "
                f"tokens, {args.new} greedy tokens, {args.model}; seconds until the result",
        "system": f"{args.questions} requests at once, each a {args.prompt}-token system prompt "
                  f"({'new each round' if args.fresh else 'the same all run'}) + a fresh {args.extra}-token question, "
                  f"{args.new} greedy tokens each, {args.model}; seconds until all are back",
    }[args.mode]
    out = {
        "what": what, "mode": args.mode, "fresh": args.fresh,
        "machine": machine_info(), "versions": versions(),
        "seconds": {k: {**Stat(v).spread(), "runs": v} for k, v in results.items()},
        "prompt_cache_hit_tokens": {k: v[warm:] for k, v in hits.items()},  # per timed round (summed over requests)
        "prefill_calls": {k: v[warm:] for k, v in calls.items()},  # per timed round
    }
    out["speedup"] = out["seconds"]["uncached"]["median"] / out["seconds"]["cached"]["median"]
    if args.mode == "score":  # the two engines scored the same sequences (same draws in the same order)
        a, b = (np.concatenate([np.asarray(x, np.float64) for r in scored[k] for x in r]) for k in samplers)
        out["max_abs_logprob_difference"] = float(np.max(np.abs(a - b)))
    print(json.dumps({k: out[k] for k in ("what", "seconds", "prompt_cache_hit_tokens", "prefill_calls", "speedup",
                                          "max_abs_logprob_difference") if k in out}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
