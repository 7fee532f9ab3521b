"""Checkpoints that watch a metric the run really logs: :class:`TaskCheckpoint` monitors the task's metric by default,
and :func:`check_monitors` refuses, before any work, a ``ModelCheckpoint``/``EarlyStopping`` that watches a name the
module never logs (it would otherwise fail at the first checkpoint, after training)."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

TASK_MONITOR = "task"
ALWAYS_MONITORABLE = ("epoch", "step")  # ModelCheckpoint adds these to every set of candidates


class UnknownMonitorError(ValueError):
    """A ``ModelCheckpoint`` or ``EarlyStopping`` that watches a metric the module never logs."""


def metric_mode(pl_module: L.LightningModule, name: str) -> str:
    """``"max"`` for a validation metric where higher is better (accuracy, f1, pearson, ...), else ``"min"``."""
    metrics = getattr(pl_module, "val_metrics", None)
    metric = dict(metrics.items()).get(name) if metrics is not None else None
    return "max" if metric is not None and metric.higher_is_better else "min"


def check_monitors(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Raise :class:`UnknownMonitorError` naming the metrics that exist when a ``ModelCheckpoint`` or
    ``EarlyStopping`` of ``trainer`` monitors a name outside ``pl_module.monitorable_metrics()``."""
    known = list(pl_module.monitorable_metrics())
    for callback in trainer.callbacks:
        if not isinstance(callback, (ModelCheckpoint, EarlyStopping)):
            continue
        monitor = callback.monitor
        if monitor is None or monitor == TASK_MONITOR or monitor in known or monitor in ALWAYS_MONITORABLE:
            continue
        raise UnknownMonitorError(
            f"{type(callback).__name__}(monitor={monitor!r}) watches a metric that {type(pl_module).__name__} never "
            f"logs in this run (task {pl_module.hparams.task}, num_labels {pl_module.hparams.num_labels}); it logs "
            f"{', '.join(known)}. Set monitor to one of these, or use lora_lightning.callbacks.TaskCheckpoint "
            f"without a monitor to follow the task (a module that logs more names lists them in monitorable_metrics())."
        )


class TaskCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose monitored metric follows the module's task.

    Args:
        monitor: ``"task"`` (default): the module's ``task.monitor``, the first of its validation metrics
            (``val/accuracy`` for classification, ``val/pearson`` for regression, ``val/perplexity`` for causal LM);
            or a logged name such as ``val/loss``; or ``None`` to keep the newest checkpoint.
        mode: ``None`` (default): the direction of the monitored metric (``max`` where higher is better, ``min``
            for losses and perplexity); ``"min"``/``"max"`` to force one.
        (everything else: see ``lightning.pytorch.callbacks.ModelCheckpoint``)
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = TASK_MONITOR,
                 mode: str | None = None, **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode or "min", **kwargs)
        self.requested_mode = mode
        self._resolved = monitor is None or (monitor != TASK_MONITOR and mode is not None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._resolved:  # once: a second fit with this callback keeps its best-so-far bookkeeping
            if self.monitor == TASK_MONITOR:
                task = getattr(pl_module, "task", None)
                if task is None:
                    raise ValueError(
                        f"TaskCheckpoint(monitor='task') follows the task of a lora-lightning module; "
                        f"{type(pl_module).__name__} has none: give monitor explicitly."
                    )
                self.monitor = task.monitor
                self._set_mode(self.requested_mode or task.monitor_mode)
            else:
                self._set_mode(metric_mode(pl_module, self.monitor))
            self._resolved = True
        super().setup(trainer, pl_module, stage)

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)  # what ModelCheckpoint starts from
