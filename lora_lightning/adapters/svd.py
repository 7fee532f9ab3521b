"""AdaLoRA's SVD-form adapter (Zhang et al., ICLR 2023, Eq. 1): ΔW = P diag(Λ ⊙ m) Q · α / r_init.

P is ``(d_out × r)``, Λ is ``(r,)``, Q is ``(r × d_in)`` and m is a 0/1 rank mask kept as a buffer.
Ranks change only through m during training (shapes stay, so DDP sees every parameter used); a pruned
triplet contributes zero through the multiplication. The scale stays α / r_init for the whole run
(METHODS.md §2: rescaling by the remaining rank hurts).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lora_lightning.adapters.base import AdapterLayer, check_alpha, low_rank_output


class SVDLinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        if rank < 1:
            raise ValueError(f"SVD adapter rank must be >= 1, got {rank}.")
        factory = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self.alpha = check_alpha(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Init as PEFT's AdaLoRA: Λ = 0 so ΔW = 0; P, Q ~ N(0, 0.02²).
        self.lora_P = nn.Parameter(torch.randn(self.out_features, rank, **factory) * 0.02)
        self.lora_lambda = nn.Parameter(torch.zeros(rank, **factory))
        self.lora_Q = nn.Parameter(torch.randn(rank, self.in_features, **factory) * 0.02)
        self.register_buffer("rank_mask", torch.ones(rank, **factory))

    @property
    def max_rank(self) -> int:
        return self.rank_mask.numel()

    @property
    def kept_rank(self) -> int:
        return int(self.rank_mask.sum().item())

    @property
    def scaling(self) -> float:
        return self.alpha / self.max_rank

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, Λ ⊙ m, Q)``: the factors this layer applies. Subclasses may generate them."""
        return self.lora_P, self.lora_lambda * self.rank_mask, self.lora_Q

    def delta_weight(self) -> Tensor:
        p, singular_values, q = self.factors()
        return (p * singular_values) @ q * self.scaling

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """Kept triplets only: A = diag(Λ_kept) Q_kept, B = P_kept."""
        p, singular_values, q = self.factors()
        kept = self.rank_mask.nonzero().squeeze(1)
        return q[kept] * singular_values[kept].unsqueeze(1), p[:, kept], self.scaling

    def unscaled_output(self, x: Tensor) -> Tensor:
        p, singular_values, q = self.factors()
        return low_rank_output(self.dropout(x), q * singular_values.unsqueeze(1), p)

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}, alpha={self.alpha}"
