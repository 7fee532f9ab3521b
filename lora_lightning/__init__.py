"""lora-lightning: LoRA, AdaLoRA, HyperAdaLoRA and Sensitivity-LoRA as Lightning modules over ``transformers``.

The public API, importable from here (loaded on first use, so ``import lora_lightning`` stays cheap):

* modules: :class:`LoRAModule`, :class:`AdaLoRAModule`, :class:`HyperAdaLoRAModule`, :class:`HyperLoRAModule`,
  :class:`SensitivityLoRAModule` (base: :class:`AdapterModule`);
* data: :class:`TextClassificationDataModule`, :class:`CausalLMDataModule`;
* settings: :class:`LoRASettings`, :class:`AdaLoRASettings`, :class:`SensitivityLoRASettings`,
  :class:`HypernetSettings` (``module.settings``);
* exports: :func:`export_peft`, :func:`export_merged`, :func:`export_checkpoint`, :func:`read_peft_export`.

Callbacks live in :mod:`lora_lightning.callbacks`, the maths in :mod:`lora_lightning.allocation`.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "lora_lightning.modules": ("AdapterModule", "LoRAModule", "AdaLoRAModule", "HyperAdaLoRAModule", "HyperLoRAModule",
                               "SensitivityLoRAModule"),
    "lora_lightning.data": ("TextClassificationDataModule", "CausalLMDataModule"),
    "lora_lightning.settings": ("LoRASettings", "AdaLoRASettings", "SensitivityLoRASettings", "HypernetSettings"),
    "lora_lightning.export": ("export_peft", "export_merged", "export_checkpoint", "read_peft_export"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lora_lightning' has no attribute '{name}'")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
