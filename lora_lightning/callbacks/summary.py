"""Tell the user, at the end of a fit, what was reached and where everything was written."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from lora_lightning.callbacks.final_checkpoint import saved_step


class RunSummary(Callback):
    """Prints, after ``fit``, the step training ended at, the last validation metrics and the step they were measured
    at, each checkpoint with the step it holds (read from the file), and the log folder."""

    def __init__(self) -> None:
        self.validated_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = trainer.global_step
        lines = ["", f"=== lora-lightning: fit finished at step {end} ==="]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            lines.append(f"validation at step {self.validated_step}:")
        for name, value in sorted(metrics.items()):
            lines.append(f"  {name:<18} {value:.4f}")
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback.best_model_path:
                score = f", {callback.monitor} {float(callback.best_model_score):.4f}" if callback.monitor else ""
                lines.append(self._file_line("best checkpoint", callback.best_model_path, end, score))
            if callback.last_model_path:
                lines.append(self._file_line("last checkpoint", callback.last_model_path, end))
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(f"TensorBoard logs     {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.log_dir})")
        print("\n".join(lines), flush=True)

    @staticmethod
    def _file_line(label: str, path: str, end: int, extra: str = "") -> str:
        step = saved_step(path)
        held = "step unknown" if step is None else f"step {step}"
        if step is not None and step != end and label.startswith("last"):
            held += f", NOT the final step {end}"
        return f"{label:<20} {path}  ({held}{extra})"
