"""Lightning callbacks: the rank machinery, the predictions file, and what makes a fit's results trustworthy
(final-step checkpoint, non-finite guard, a checkpoint monitor that follows the task)."""
from lora_lightning.callbacks.final_checkpoint import FinalCheckpoint
from lora_lightning.callbacks.hypernet_warmup import HypernetWarmup
from lora_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from lora_lightning.callbacks.predictions import PredictionWriter
from lora_lightning.callbacks.rank_pruning import RankPruningScheduler
from lora_lightning.callbacks.sensitivity import HessianSensitivityEstimator
from lora_lightning.callbacks.task_checkpoint import TaskCheckpoint, UnknownMonitorError

__all__ = [
    "FinalCheckpoint", "HessianSensitivityEstimator", "HypernetWarmup", "NonFiniteGuard", "NonFiniteTrainingError",
    "PredictionWriter", "RankPruningScheduler", "TaskCheckpoint", "UnknownMonitorError",
]
