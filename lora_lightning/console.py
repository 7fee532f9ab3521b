"""What the ``lora-lightning`` command prints: a one-line model summary, a progress bar without ``v_num``, the learning
rate in the logs (no placeholder ``hp_metric``), and no third-party noise that a user can do nothing about.

Silenced, each by its exact message: transformers' load report when its only entries are the freshly initialised
output head (our modules train that head, and validate/predict/export then load it from the checkpoint),
Lightning's litlogger/litmodels advertisements, transformers' weight-loading progress bar, torch's ``_pytree
LeafSpec`` and torchdata's ``set_vital`` deprecations, Lightning's note that our summary replaces its own, and,
outside ``fit``, ModelCheckpoint's "dirpath has changed" (no best-model tracking is resumed there). Anything else
still prints.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import os

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from transformers.utils import logging as transformers_logging

from lora_lightning.adapters.base import OUTPUT_LAYER_NAMES

_REPORT_ROW = re.compile(r"^([\w.]+)\s*\|\s*([A-Z_]+)\s*\|", re.MULTILINE)


def only_new_output_head(message: str) -> bool:
    """True for a transformers load report whose every entry is a MISSING output-head weight."""
    if "LOAD REPORT" not in message:
        return False
    rows = _REPORT_ROW.findall(message)
    return bool(rows) and all(
        status == "MISSING" and any(part in OUTPUT_LAYER_NAMES for part in key.split("."))
        for key, status in rows
    )


class _DropMessages(logging.Filter):
    def __init__(self, drop) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.drop(record.getMessage())


def quiet_third_party(subcommand: str | None = None) -> None:
    """Install the message filters listed in the module docstring (idempotent)."""
    filters = {
        "transformers.modeling_utils": only_new_output_head,  # the logger from_pretrained gives the report
        "lightning.pytorch.utilities.rank_zero": lambda text: text.startswith("💡 Tip: For seamless cloud")
        or text.startswith(f"Trainer already configured with model summary callbacks: [{AdapterSummary!r}]"),
    }
    for name, drop in filters.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(drop))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")  # torchdata's StatefulDataLoader
    transformers_logging.disable_progress_bar()  # "Loading weights" bars of a sub-second load
    if subcommand not in (None, "fit"):
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


class StepProgressBar(TQDMProgressBar):
    """TQDM bar without the logger's version number (``v_num``); it closes before the run summary prints."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class AdapterSummary(ModelSummary):
    """One line instead of Lightning's table: trainable parameters (the adapter) against the total."""

    @staticmethod
    def summarize(summary_data: list, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        share = 100 * trainable_parameters / max(1, total_parameters)
        rank_zero_info(f"Parameters: {get_human_readable_count(trainable_parameters)} trainable of "
                       f"{get_human_readable_count(total_parameters)} ({share:.2f} %), {model_size:.1f} MB")


def console_callbacks(trainer_config: dict[str, Any]) -> list[Callback]:
    """The CLI's default progress bar, model summary and learning-rate logging, each only where the trainer config
    enables it (Lightning refuses a progress bar callback with ``enable_progress_bar: false``, and the learning-rate
    monitor without a logger) and no callback of that kind is configured already."""
    configured = trainer_config.get("callbacks") or []
    configured = configured if isinstance(configured, list) else [configured]
    defaults = []
    if trainer_config.get("enable_progress_bar") is not False:
        defaults.append(StepProgressBar())
    if trainer_config.get("enable_model_summary") is not False:
        defaults.append(AdapterSummary())
    if trainer_config.get("logger") is not False:
        defaults.append(LearningRateMonitor(logging_interval="step"))
    kinds = (ProgressBar, ModelSummary, LearningRateMonitor)
    return [c for c in defaults if not any(isinstance(c, k) and isinstance(mine, k)
                                           for k in kinds for mine in configured)]


def default_logger(trainer_config: dict[str, Any]) -> TensorBoardLogger | None:
    """Lightning's default logger (``logger`` unset or true) without its placeholder ``hp_metric = -1`` scalar;
    ``None`` when the config names a logger or turns logging off."""
    if trainer_config.get("logger") not in (None, True):
        return None
    root = trainer_config.get("default_root_dir") or os.getcwd()
    return TensorBoardLogger(save_dir=root, version=SLURMEnvironment.job_id(), default_hp_metric=False)
