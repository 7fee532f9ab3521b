"""Lightning callbacks that run the rank machinery."""
from lora_lightning.callbacks.rank_pruning import RankPruningScheduler

__all__ = ["RankPruningScheduler"]
