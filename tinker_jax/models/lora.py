"""LoRA as data: which projection roles get adapters, their rank and scale.

Projections are built with a role (`attn`, `mlp`, `unembed`); a LoraSpec turns roles on. Adapter weights are
`nnx.LoRAParam`, so training selects them by type, never by parameter path.
"""

from __future__ import annotations

from dataclasses import dataclass

# The hosted Tinker service uses a fixed lora_alpha of 32 for every rank (tinker-cookbook's
# hyperparam_utils assumes it when scaling learning rates), so the effective scale is 32 / rank.
TINKER_LORA_ALPHA = 32.0

ROLES = ("attn", "mlp", "unembed")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = TINKER_LORA_ALPHA
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int = 0

    def __post_init__(self):
        if int(self.rank) <= 0:
            raise ValueError(f"rank: LoRA rank must be a positive integer, got {self.rank!r}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("train_attn/train_mlp/train_unembed: at least one must be true")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def targets(self, role: str) -> bool:
        return {"attn": self.train_attn, "mlp": self.train_mlp, "unembed": self.train_unembed}[role]
