"""LightningModules, one per method, sharing :class:`AdapterModule`."""
from lora_lightning.modules.adalora import AdaLoRAModule
from lora_lightning.modules.base import AdapterModule, CheckpointMismatchError
from lora_lightning.modules.hyperadalora import HyperAdaLoRAModule, HyperLoRAModule
from lora_lightning.modules.lora import LoRABase, LoRAModule
from lora_lightning.modules.sensitivity_lora import SensitivityLoRAModule

__all__ = [
    "AdaLoRAModule", "AdapterModule", "CheckpointMismatchError", "HyperAdaLoRAModule", "HyperLoRAModule", "LoRABase",
    "LoRAModule", "SensitivityLoRAModule",
]
