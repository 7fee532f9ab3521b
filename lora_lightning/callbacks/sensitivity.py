"""The Sensitivity-LoRA allocation step as a callback: calibrate, reduce across ranks, allocate, reshape.

It runs in ``setup`` (stage ``fit``): after the process group exists and before the strategy wraps the model in
DDP or creates optimisers (docs/architecture.md, "Allocation before wrapping"). Each process runs the estimator on its own
``num_batches`` calibration batches (process ``k`` of ``w`` takes batches ``k, k + w, …``), the sums and counts are
all-reduced, so every process computes the same diagonals and the same rank pattern. A module that already holds
an allocation, or a fit resuming from ``trainer.ckpt_path`` (the CLI sets it; from Python: ``trainer.ckpt_path =
path`` before ``trainer.fit(model)``), is not recalibrated: its shapes come from the checkpoint
(``SensitivityLoRAModule.on_load_checkpoint``). ``trainer.fit(model, ckpt_path=path)`` alone still ends with the
checkpoint's ranks, but Lightning only reveals that path after ``setup``, so it calibrates first (and warns).

Output: a summary table in the log, a heat map (and the table) in TensorBoard, and
``sensitivity_allocation.json`` beside the checkpoints (the ``ModelCheckpoint`` folder, else the log folder).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DistributedSampler

from lora_lightning._compat import fit_train_dataloaders
from lora_lightning.allocation.sensitivity import build_estimator, check_estimator_name
from lora_lightning.callbacks.rank_report import log_rank_heatmap, rank_summary, report_folder, write_rank_pattern

log = logging.getLogger(__name__)
JSON_NAME = "sensitivity_allocation.json"


class HessianSensitivityEstimator(L.Callback):
    """Allocate a :class:`~lora_lightning.modules.SensitivityLoRAModule`'s ranks before training.

    The four estimator options override the module's ``settings``
    (:class:`~lora_lightning.settings.SensitivityLoRASettings`) for this callback; ``None`` takes the module's.

    Args:
        estimator (str | None): the Hessian-diagonal estimator.
        num_batches (int | None): calibration batches per process.
        num_probes (int | None): Rademacher probes per batch (``hutchinson``).
        weight_by_dout (bool | None): weigh each matrix's diagonal by its output size.
        dataloader (Iterable | None): calibration batches (an iterable of dict batches); default: the datamodule's
            ``train_dataloader()`` (or the dataloader given to ``fit``).
        seed (int): base seed of the probes (``hutchinson``); process ``k`` uses ``seed + k``.
    """

    def __init__(
        self,
        estimator: str | None = None,
        num_batches: int | None = None,
        num_probes: int | None = None,
        weight_by_dout: bool | None = None,
        dataloader: Iterable | None = None,
        seed: int = 0,
    ) -> None:
        if estimator is not None:
            check_estimator_name(estimator)
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
        self.estimator, self.num_batches, self.num_probes = estimator, num_batches, num_probes
        self.weight_by_dout, self.dataloader, self.seed = weight_by_dout, dataloader, seed
        self.calibrated = False
        self.allocation_seconds: float | None = None
        self.report: dict[str, Any] | None = None

    # ----------------------------------------------------------------- settings
    def _setting(self, pl_module, name: str):
        own = getattr(self, name)
        return own if own is not None else getattr(pl_module.settings, name)

    def _calibration_source(self, trainer) -> Iterable:
        if self.dataloader is not None:
            return self.dataloader
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            return datamodule.train_dataloader()
        source = fit_train_dataloaders(trainer)
        if source is not None:
            return source
        raise ValueError(
            "HessianSensitivityEstimator found no calibration data: give fit a datamodule or train_dataloaders, "
            "or pass HessianSensitivityEstimator(dataloader=...)."
        )

    def _batches(self, trainer, num_batches: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """This process's share: batches ``rank, rank + world, …`` of the source, at most ``num_batches`` (the first
        ``num_batches`` when the source already holds only this process's shard, e.g. the DataModule's under DDP)."""
        world, rank = max(1, trainer.world_size), trainer.global_rank
        source = self._calibration_source(trainer)
        sampler = getattr(source, "sampler", None)
        if world > 1 and isinstance(sampler, DistributedSampler) and sampler.num_replicas == world:
            world, rank = 1, 0
        batches = []
        for index, batch in enumerate(source):
            if index % world == rank:
                batches.append(move_data_to_device(dict(batch), device))
            if len(batches) >= num_batches:
                break
        return batches

    # ----------------------------------------------------------------- the allocation
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "apply_allocation"):
            raise TypeError(
                f"HessianSensitivityEstimator allocates the ranks of a SensitivityLoRAModule, not a "
                f"{type(pl_module).__name__}."
            )
        if trainer.ckpt_path is not None or pl_module.allocation is not None:
            rank_zero_info("Sensitivity-LoRA: ranks come from the checkpoint / module; no recalibration.")
            return
        self.allocate(trainer, pl_module)

    def allocate(self, trainer: L.Trainer, pl_module) -> None:
        start = time.perf_counter()
        strategy = trainer.strategy
        name = self._setting(pl_module, "estimator")
        options = {"num_probes": self._setting(pl_module, "num_probes"), "seed": self.seed + trainer.global_rank} \
            if name == "hutchinson" else {}
        estimator = build_estimator(name, **options)
        pl_module.to(strategy.root_device)
        batches = self._batches(trainer, self._setting(pl_module, "num_batches"), strategy.root_device)
        total = strategy.reduce(torch.tensor(float(len(batches)), device=strategy.root_device), reduce_op="sum")
        if float(total) == 0:
            raise ValueError(
                "The calibration data is empty: HessianSensitivityEstimator got no batches. Check the training "
                "split (or the dataloader given to the callback)."
            )
        wanted = self._setting(pl_module, "num_batches") * max(1, trainer.world_size)
        if float(total) < wanted:
            rank_zero_warn(f"Sensitivity-LoRA calibrated on {int(float(total))} batches, fewer than num_batches "
                           f"asks for ({wanted} over {max(1, trainer.world_size)} process(es)): the calibration "
                           "data has no more. Lower num_batches, or the ranks rest on less data than intended.")

        layers = {n: layer.base_layer for n, layer in pl_module.lora_layers().items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            stats = estimator(
                pl_module.backbone, layers, batches, pl_module.calibration_loss,
                weight_by_dout=bool(self._setting(pl_module, "weight_by_dout")),
            )
        finally:
            pl_module.train(was_training)
        for n, layer in layers.items():  # a process without data still takes part in the reduction
            if n not in stats.sums:
                d_in = pl_module.lora_layers()[n].in_features
                stats.sums[n] = torch.zeros(d_in, dtype=torch.float64, device=strategy.root_device)
                stats.counts[n] = 0.0
        flat = strategy.reduce(stats.flatten().to(strategy.root_device), reduce_op="sum")
        diagonals = stats.unflatten(flat).diagonals()

        allocation = pl_module.allocate(diagonals)
        self.allocation_seconds = time.perf_counter() - start
        report = {
            "estimator": name, "num_batches_total": int(float(total)), "world_size": trainer.world_size,
            "allocation_seconds": self.allocation_seconds, "r_total": allocation.r_total,
            "budget": {k: getattr(pl_module.settings, k) for k in ("r_avg", "r_min", "r_max")},
            "scores": allocation.scores,
        }
        pl_module.apply_allocation(allocation.ranks, report)
        self.report = pl_module.allocation_report
        self.calibrated = True
        rank_zero_info(
            f"Sensitivity-LoRA ({name}, {int(float(total))} batches, {self.allocation_seconds:.2f} s): "
            f"{self.report['trainable_lora_parameters']:,} LoRA parameters.\n"
            + rank_summary(allocation.ranks, "Sensitivity-LoRA ranks")
        )

    # ----------------------------------------------------------------- outputs
    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.calibrated or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            log_rank_heatmap(logger, pl_module.allocation, step=0, tag="sensitivity_lora/ranks")
        folder = report_folder(trainer)
        if folder is not None:
            path = write_rank_pattern(Path(folder) / JSON_NAME, pl_module.allocation, self.report)
            log.info("Sensitivity-LoRA allocation written to %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated, "allocation_seconds": self.allocation_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.calibrated:
            rank_zero_warn(
                "HessianSensitivityEstimator calibrated, then the fit restored a checkpoint whose ranks replace that "
                "calibration. To resume without calibrating, set `trainer.ckpt_path = path` before "
                "`trainer.fit(model)` (the lora-lightning CLI does this)."
            )
        self.calibrated = False  # a resumed run does not rewrite the allocation outputs
        self.allocation_seconds = state_dict.get("allocation_seconds")


__all__ = ["HessianSensitivityEstimator"]
