"""LoRA with a uniform rank, or per-module ranks and alphas through ``rank_pattern`` / ``alpha_pattern``."""
from __future__ import annotations

from typing import Any

from torch import nn

from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.modules.base import AdapterModule
from lora_lightning.settings import LoRASettings


class LoRABase(AdapterModule):
    """What LoRA-factor methods share: one ``adapter_class`` layer per targeted linear layer, with the rank and alpha
    its ``settings`` give that name (``rank_for`` / ``alpha_for``). A subclass sets ``self.settings`` before
    ``super().__init__`` (the adapters are built there)."""

    adapter_class: type[LoRALinear] = LoRALinear

    def make_adapter(self, name: str, layer: nn.Module) -> LoRALinear:
        settings = self.settings
        return self.adapter_class(layer, rank=settings.rank_for(name), alpha=settings.alpha_for(name),
                                  dropout=settings.dropout)

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {name: layer for name, layer in self.adapters.items() if isinstance(layer, LoRALinear)}

    def kept_ranks(self) -> dict[str, int]:
        """Rank per adapted matrix."""
        return {name: layer.rank for name, layer in self.lora_layers().items()}


class LoRAModule(LoRABase):
    """Plain LoRA: ΔW = (α / r) B A on every targeted linear layer (METHODS.md §1).

    Args:
        rank (int): the rank of every adapted layer without a ``rank_pattern`` entry.
        alpha (float): the scale numerator (ΔW scaled by ``alpha / rank``); > 0.
        dropout (float): dropout on the adapter input, in [0, 1).
        rank_pattern (dict[str, int] | None): per-module ranks keyed by name suffix or regex, as in PEFT.
        alpha_pattern (dict[str, float] | None): per-module alphas, keyed the same way.
        (everything else: see :class:`~lora_lightning.modules.base.AdapterModule`)

    The validated values are ``self.settings`` (:class:`~lora_lightning.settings.LoRASettings`).
    """

    def __init__(
        self,
        *args: Any,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = LoRASettings(rank=rank, alpha=alpha, dropout=dropout, rank_pattern=rank_pattern,
                                     alpha_pattern=alpha_pattern)
        super().__init__(*args, **kwargs)
