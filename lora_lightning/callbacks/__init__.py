"""Lightning callbacks that run the rank machinery."""
from lora_lightning.callbacks.hypernet_warmup import HypernetWarmup  # noqa: F401
from lora_lightning.callbacks.rank_pruning import RankPruningScheduler
from lora_lightning.callbacks.sensitivity import HessianSensitivityEstimator

__all__ = ["HessianSensitivityEstimator", "RankPruningScheduler"]
