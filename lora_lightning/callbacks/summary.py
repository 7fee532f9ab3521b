"""Tell the user, at the end of a fit, what was reached and where everything was written."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only


class RunSummary(Callback):
    """Prints the final validation metrics, the checkpoint paths and the log folder after ``fit``."""

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = ["", "=== lora-lightning: fit finished ==="]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for name, value in sorted(metrics.items()):
            lines.append(f"{name:<20} {value:.4f}")
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                if callback.best_model_path:
                    lines.append(f"best checkpoint      {callback.best_model_path}")
                if callback.last_model_path:
                    lines.append(f"last checkpoint      {callback.last_model_path}")
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(f"TensorBoard logs     {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.log_dir})")
        print("\n".join(lines), flush=True)
