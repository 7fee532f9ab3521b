"""LoRA (Hu et al., 2021): ΔW = (α / r) · B A.

::

    x ──► base_layer (frozen W) ─────────────┐
    │                                        (+) ──► y
    └─► dropout ─► A (r × d_in) ─► B (d_out × r) ─► · α/r

A starts Kaiming-uniform and B at zero, so the wrapped layer equals the base layer at initialisation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lora_lightning.adapters.base import AdapterLayer, check_alpha, low_rank_output


class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        self.alpha = check_alpha(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(0))
        self.lora_B = nn.Parameter(torch.empty(0))
        self.reset_rank(rank)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_rank(self, rank: int) -> None:
        """(Re)create A and B at ``rank``, freshly initialised; only before an optimiser holds them."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        # Adapter factors stay fp32 whatever the backbone's dtype (as PEFT's autocast_adapter_dtype).
        factory = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B, self.scaling

    def unscaled_output(self, x: Tensor) -> Tensor:
        return low_rank_output(self.dropout(x), self.lora_A, self.lora_B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
