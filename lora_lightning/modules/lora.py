"""LoRA with a uniform rank, or per-module ranks and alphas through ``rank_pattern`` / ``alpha_pattern``."""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.modules.base import AdapterModule


def pattern_value(name: str, pattern: dict[str, Any], default: Any) -> Any:
    """The value of the first key of ``pattern`` that is a suffix of ``name`` or a regex matching it whole."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


class LoRAModule(AdapterModule):
    """Plain LoRA: ΔW = (α / r) B A on every targeted linear layer (METHODS.md §1).

    Args:
        rank / alpha / dropout: the defaults for every adapted layer.
        rank_pattern / alpha_pattern: per-module overrides keyed by name suffix or regex, as in PEFT.
        (everything else: see :class:`~lora_lightning.modules.base.AdapterModule`)
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
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        super().__init__(*args, **kwargs)

    def make_adapter(self, name: str, layer: nn.Module) -> LoRALinear:
        return LoRALinear(
            layer,
            rank=pattern_value(name, self.rank_pattern, self.rank),
            alpha=pattern_value(name, self.alpha_pattern, self.alpha),
            dropout=self.dropout,
        )
