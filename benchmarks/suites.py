"""What each suite measures: model, dtype, shapes, warm-up and repeat counts, time budget.

- cpu: small-qwen3 (~29M params, vocab 8192), fp32, shapes small enough for 2 cores in < 10 minutes.
- gpu: the Qwen3-0.6B shape with random weights, bf16, the shapes of shared/reference/peer-baselines.md
  (LoRA r32 alpha 32 on q/k/v/o/gate/up/down at 8x2048 and 16x1024, full FT 8x2048, sampling prompt 128 +256).
- gpu-dryrun: the gpu suite's code paths at toy size (qwen3-dryrun), on whatever device is there (a CPU in tests).
- quick: tiny-qwen3, one repeat: a smoke run for tests.
Section "tenants" (N LoRA clients on one base model, concurrent vs one at a time): cpu tiny-qwen3, 8 clients x
rank 8 x 2x32 tokens (small batches: the per-call overhead batching removes) through the SDK + REST server (and
in process); gpu 8 and 32 clients x rank 32 x 8x256 tokens
in process, against one adapter at 8x2048.
Section "multiprocess" (benchmarks/multiprocess_bench.py, child processes; CPU only): the same LoRA step (rank of the
suite) on the same fsdp=2 x tensor=4 mesh, in one process with 8 simulated CPU devices vs two processes of 4 (jax.
distributed over loopback, gloo, scripts/local_cluster.py). cpu: small-qwen3 8x128 (the train row's shape) and
tiny-qwen3 8x64 (a step with almost no compute: the fixed cost per step); not in quick (two engines' start and
compile take ~35 s even at toy size).
Section "moe" (a Qwen3-MoE model in its own engine, after the other sections): LoRA training tokens/s (rank of the
suite on attention, every expert's gate/up/down and the unembedding: tinker_jax's default targets; peft adapts the
same projections, its conversion putting gate+up on the fused experts.gate_up_proj) and decode tokens/s, ours vs
transformers(+peft) in the same run; MFU rows (peak section run too) count the ACTIVE parameters (k of E experts).
cpu: small-qwen3-moe (115M params, 27M active; 32 experts, top-4) LoRA 4x64 (ours takes ~10 s a step on 2 cores:
its experts' jax.lax.ragged_dot lowers to a dense product over all E experts) and decode batch 1 and 8, prompt 32
+32, 2-3 minutes for the section. gpu: Qwen3-30B-A3B's layer shape with 4 layers (qwen3-30b-a3b-4l-shape, 3.1B
params, 0.85B active), bf16, LoRA r32 at 4x512 (the dense ragged_dot's [E, rows, D] temporaries rule out 8x2048),
decode batch 64, prompt 128 +128; not in the gpu suite's default sections (its own invocation:
`bash benchmarks/gpu.sh --only peak,moe`). quick: tiny-qwen3-moe, only with `--only moe` (~40 s of engine start
and compiles: too slow for the quick test).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SECTIONS = ("peak", "train", "sample", "frontdoor", "handoff", "coldstart", "attention", "tenants", "multiprocess",
            "moe")


@dataclass(frozen=True)
class TrainShape:
    mode: str  # "lora" or "full"
    rows: int
    length: int

    @property
    def label(self) -> str:
        return f"{self.mode}-{self.rows}x{self.length}"

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class Suite:
    name: str
    model: str  # a tinker_jax preset or a benchmarks.models.BENCH_PRESETS name
    dtype: str  # compute dtype, ours and peers
    train: tuple[TrainShape, ...]
    lora_rank: int = 32
    lora_alpha: float = 32.0
    train_warmup: int = 1
    train_repeats: int = 5
    sample_batches: tuple[int, ...] = (1, 16, 64)
    prompt_len: int = 32
    max_new: int = 32
    sample_warmup: int = 1
    sample_repeats: int = 3
    frontdoor_rows: int = 1  # small compute, so the contention noise it suffers stays small next to the overhead
    frontdoor_length: int = 16
    frontdoor_warmup: int = 3
    frontdoor_repeats: int = 40
    handoff_warmup: int = 2  # the 2nd in-memory handoff still compiled a program (6 s) in a trial run
    handoff_repeats: int = 3
    coldstart_rows: int = 1
    coldstart_length: int = 128
    coldstart_repeats: int = 2
    remat: bool = False  # ours: EngineConfig.remat (per-layer rematerialisation in the backward pass)
    attention: str = "auto"  # ours: EngineConfig.attention (auto: cuDNN flash attention on a GPU in bf16)
    ablation_repeats: int = 3  # "attention": ours again on suite.train[0] with the other attention kernel
    # "tenants" (benchmarks/tenants_bench.py, in a child process): N clients with an adapter each, training and
    # sampling concurrently vs the same clients one at a time.
    tenants_model: str | None = None  # None: the suite's model
    tenants_frontdoor: str = "rest"  # "rest": tinker SDK -> uvicorn on loopback; "in_process": tinker_jax client
    tenants_counts: tuple[int, ...] = (8,)  # client counts, ascending (peak memory is a high-water mark)
    tenants_rank: int | None = None  # None: lora_rank
    tenants_rows: int = 4  # datums per forward_backward, per client
    tenants_length: int = 64  # tokens per datum
    tenants_steps: int = 2  # forward_backward + optim_step per client per timed phase
    tenants_ref: TrainShape | None = None  # one adapter on a large batch, measured first (the GPU goal's baseline)
    tenants_samplers: int = 8  # concurrent samplers, each of its own adapter (0: no sampling)
    tenants_num_samples: int = 2  # rows per sample() call
    tenants_prompt_len: int = 32
    tenants_max_new: int = 32
    tenants_warmup: int = 1  # untimed phases of each kind (compiles the batched shapes)
    tenants_repeats: int = 3  # timed phases of each kind, alternating
    # "multiprocess" (benchmarks/multiprocess_bench.py): (model or None for the suite's, rows, length) per shape,
    # each timed in one process with all fsdp*tensor devices and in mp_processes processes (local_cluster.py).
    mp_runs: tuple[tuple[str | None, int, int], ...] = ((None, 8, 128),)
    mp_fsdp: int = 2
    mp_tensor: int = 4
    mp_processes: int = 2
    mp_warmup: int = 2  # untimed steps; fixed counts, never adapted (every process must make the same calls)
    mp_repeats: int = 5
    mp_timeout_s: float = 420.0  # the whole section (both variants); each variant gets half of it
    # "moe": a mixture-of-experts model (a tinker_jax preset or a BENCH_PRESETS name) in an engine of its own.
    moe_model: str = "tiny-qwen3-moe"
    moe_train: tuple[TrainShape, ...] = (TrainShape("lora", 2, 32),)  # LoRA only
    moe_rank: int | None = None  # None: lora_rank
    moe_train_warmup: int = 1
    moe_train_repeats: int = 3
    moe_sample_batches: tuple[int, ...] = (1, 8)
    moe_prompt_len: int = 32
    moe_max_new: int = 32
    moe_sample_warmup: int = 2  # a sampler's 2nd request still compiled a program in trial runs (tiny-qwen3-moe)
    moe_sample_repeats: int = 3
    peak_n: int = 2048
    peak_dtype: str = "float32"
    time_budget_s: float = 600.0
    # True: ours and the peer alternate step by step (paired; right for a CPU shared with other work).
    # False: the peer runs first and frees its memory, then ours (needed on one GPU: JAX keeps what it allocates).
    interleave: bool = True
    sections: tuple[str, ...] = SECTIONS
    caveats: tuple[str, ...] = field(default_factory=tuple)

    @property
    def max_tokens_per_batch(self) -> int:  # one micro-batch per step: no split that the peers do not do
        return max(8192, *(s.tokens for s in self.train), self.frontdoor_rows * self.frontdoor_length)

    @property
    def tenants_lora_rank(self) -> int:
        return self.tenants_rank or self.lora_rank

    @property
    def sampler_seq_len(self) -> int:
        return self.prompt_len + self.max_new + 16

    @property
    def moe_lora_rank(self) -> int:
        return self.moe_rank or self.lora_rank


SUITES: dict[str, Suite] = {
    "cpu": Suite(
        name="cpu", model="small-qwen3", dtype="float32",
        train=(TrainShape("lora", 8, 128), TrainShape("full", 8, 128)),
        train_warmup=1, train_repeats=4, time_budget_s=570.0,
        # tenants on tiny-qwen3: small-qwen3 took 4 minutes for this section on 2 cores (its steps are all compute)
        tenants_model="tiny-qwen3", tenants_rank=8, tenants_counts=(8,), tenants_rows=2, tenants_length=32,
        tenants_steps=4, tenants_ref=TrainShape("lora", 16, 32), tenants_samplers=8, tenants_num_samples=2,
        tenants_prompt_len=32, tenants_max_new=32, tenants_warmup=2, tenants_repeats=5,
        # multiprocess: the suite's model at the train row's shape (~80 s for both variants on 2 cores), and
        # tiny-qwen3 (~no compute: what distribution costs per step whatever the model), in the same engines.
        mp_runs=((None, 8, 128), ("tiny-qwen3", 8, 64)), mp_warmup=2, mp_repeats=5,
        # moe: small-qwen3-moe at 4x64 (at the train row's 8x128 ours took ~35 s a step on 2 cores, the peer 3.6 s)
        moe_model="small-qwen3-moe", moe_train=(TrainShape("lora", 4, 64),), moe_train_warmup=1,
        moe_train_repeats=3, moe_sample_batches=(1, 8), moe_prompt_len=32, moe_max_new=32, moe_sample_warmup=2,
        moe_sample_repeats=3,
        caveats=("CPU suite: small-qwen3 (~29M params) in fp32 on a CPU; relative figures only, not GPU evidence.",)),
    "gpu": Suite(
        name="gpu", model="qwen3-0.6b-shape", dtype="bfloat16",
        train=(TrainShape("lora", 8, 2048), TrainShape("lora", 16, 1024), TrainShape("full", 8, 2048)),
        # batch 16 is left out here: each `generate` run of +256 tokens costs the peer ~7 s whatever the batch.
        train_warmup=1, train_repeats=6, sample_batches=(64, 1), prompt_len=128, max_new=256,
        sample_warmup=1, sample_repeats=3, handoff_repeats=3, coldstart_rows=1, coldstart_length=512,
        coldstart_repeats=1, peak_n=8192, peak_dtype="bfloat16", time_budget_s=420.0, interleave=False,
        remat=True, sections=("peak", "train", "sample", "handoff", "coldstart", "attention", "tenants"),
        # The goal: 32 rank-32 adapters at 8x256 tokens each reach >= 80% of one adapter's tokens/s at
        # 8x2048, with peak device memory within 10% of one adapter's. In process: no uvicorn on the GPU machine.
        tenants_frontdoor="in_process", tenants_counts=(8, 32), tenants_rank=32, tenants_rows=8,
        tenants_length=256, tenants_steps=2, tenants_ref=TrainShape("lora", 8, 2048), tenants_samplers=8,
        tenants_num_samples=4, tenants_prompt_len=128, tenants_max_new=128, tenants_repeats=3,
        # moe (run on its own: `gpu.sh --only peak,moe`): Qwen3-30B-A3B's layer shape, 4 layers, bf16
        moe_model="qwen3-30b-a3b-4l-shape", moe_train=(TrainShape("lora", 4, 512),), moe_rank=32,
        moe_train_warmup=1, moe_train_repeats=5, moe_sample_batches=(64,), moe_prompt_len=128, moe_max_new=128,
        moe_sample_warmup=2, moe_sample_repeats=3,
        caveats=("GPU suite: random weights in the Qwen3-0.6B shape, bf16 compute (ours keeps fp32 master weights "
                 "and Adam state; the torch peer trains its bf16 weights directly).",
                 "The REST front door is not measured on the GPU machine (no fastapi/uvicorn there); the tenants "
                 "section drives the engine through the in-process tinker_jax.ServiceClient.")),
}
SUITES["gpu-dryrun"] = replace(
    SUITES["gpu"], name="gpu-dryrun", model="qwen3-dryrun", dtype="float32",
    train=(TrainShape("lora", 2, 64), TrainShape("lora", 4, 32), TrainShape("full", 2, 64)),
    train_warmup=1, train_repeats=1, sample_batches=(4, 1), prompt_len=16, max_new=8, sample_repeats=1,
    handoff_warmup=1, handoff_repeats=1, coldstart_length=64, coldstart_repeats=1, peak_n=256, ablation_repeats=1,
    peak_dtype="float32", time_budget_s=300.0, tenants_counts=(2, 4), tenants_rows=2, tenants_length=32,
    tenants_steps=1, tenants_ref=TrainShape("lora", 2, 64), tenants_samplers=2, tenants_num_samples=2,
    tenants_prompt_len=16, tenants_max_new=8, tenants_repeats=1,
    moe_model="qwen3-moe-dryrun", moe_train=(TrainShape("lora", 2, 64),), moe_train_repeats=1,
    moe_sample_batches=(4,), moe_prompt_len=16, moe_max_new=8, moe_sample_repeats=1,
    caveats=("gpu-dryrun: the GPU suite's code paths at toy size; its figures mean nothing.",))
SUITES["quick"] = Suite(
    name="quick", model="tiny-qwen3", dtype="float32", train=(TrainShape("lora", 2, 32),), lora_rank=4,
    train_warmup=1, train_repeats=1, sample_batches=(2,), prompt_len=8, max_new=4, sample_repeats=1,
    frontdoor_rows=1, frontdoor_length=16, frontdoor_warmup=1, frontdoor_repeats=2, handoff_repeats=1,
    coldstart_length=16, coldstart_repeats=1, peak_n=128, time_budget_s=120.0, tenants_counts=(2,),
    tenants_rows=2, tenants_length=16, tenants_steps=1, tenants_samplers=2, tenants_num_samples=1,
    tenants_prompt_len=8, tenants_max_new=4, tenants_repeats=1,
    moe_model="tiny-qwen3-moe", moe_train=(TrainShape("lora", 2, 32),), moe_train_repeats=1, moe_sample_batches=(2,),
    moe_prompt_len=8, moe_max_new=4, moe_sample_repeats=1,
    # ~35 s of engine starts and compiles each (moe: ~39 s at this size): `--quick --only moe` runs it
    sections=tuple(x for x in SECTIONS if x not in ("multiprocess", "moe")),
    caveats=("quick: a smoke run on tiny-qwen3 with one repeat; its figures mean nothing.",))


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]
