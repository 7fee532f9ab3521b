"""Tasks: what the loss is and which metrics are reported. A task is an argument; a method is a class.

To add a task, subclass :class:`Task` and return it from ``AdapterModule.build_task``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef


class Task:
    """Loss from a ``transformers`` output and the validation metrics for it."""

    name: str = ""
    default_metrics: tuple[str, ...] = ()
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def loss(self, outputs, batch: dict[str, Tensor]) -> Tensor:
        """``transformers`` computes the loss from ``labels`` (shifted for causal LM, -100 ignored)."""
        return outputs.loss

    def build_metrics(self, metric_names: list[str] | None) -> MetricCollection:
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs, batch: dict[str, Tensor]) -> None:
        raise NotImplementedError


class SequenceClassification(Task):
    name = "sequence-classification"

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.regression = num_labels == 1
        self.default_metrics = ("pearson", "spearman") if self.regression else ("accuracy", "f1")
        self.monitor = f"val/{self.default_metrics[0]}"
        self.monitor_mode = "max"

    def _metric(self, name: str) -> Metric:
        if self.regression:
            factories = {"pearson": PearsonCorrCoef, "spearman": SpearmanCorrCoef}
        else:
            kind = "binary" if self.num_labels == 2 else "multiclass"
            average = {} if kind == "binary" else {"average": "macro"}
            factories = {
                "accuracy": lambda: Accuracy(task=kind, num_classes=self.num_labels),
                "f1": lambda: F1Score(task=kind, num_classes=self.num_labels, **average),
                "matthews": lambda: MatthewsCorrCoef(task=kind, num_classes=self.num_labels),
            }
        if name not in factories:
            kind = "regression" if self.regression else "classification"
            raise ValueError(f"Metric '{name}' is not available for {kind}; choose from {sorted(factories)}.")
        return factories[name]()

    def build_metrics(self, metric_names: list[str] | None) -> MetricCollection:
        names = list(metric_names or self.default_metrics)
        self.monitor = f"val/{names[0]}"
        return MetricCollection({name: self._metric(name) for name in names}, prefix="val/")

    def update_metrics(self, metrics: MetricCollection, outputs, batch: dict[str, Tensor]) -> None:
        logits = outputs.logits.float()
        predictions = logits.squeeze(-1) if self.regression else logits.argmax(-1)
        metrics.update(predictions, batch["labels"])


class TokenPerplexity(Metric):
    """exp of the mean next-token loss over all target tokens (summed across batches and ranks)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: Tensor, labels: Tensor) -> None:
        tokens = (labels[:, 1:] != -100).sum()
        self.loss_sum += mean_loss.detach().double() * tokens
        self.tokens += tokens

    def compute(self) -> Tensor:
        return torch.exp(self.loss_sum / self.tokens.clamp(min=1))


class CausalLM(Task):
    name = "causal-lm"
    default_metrics = ("perplexity",)
    monitor = "val/perplexity"

    def build_metrics(self, metric_names: list[str] | None) -> MetricCollection:
        unknown = set(metric_names or ()) - {"perplexity"}
        if unknown:
            raise ValueError(f"Metrics {sorted(unknown)} are not available for causal-lm; it reports perplexity.")
        return MetricCollection({"perplexity": TokenPerplexity()}, prefix="val/")

    def update_metrics(self, metrics: MetricCollection, outputs, batch: dict[str, Tensor]) -> None:
        metrics["perplexity"].update(outputs.loss, batch["labels"])


def build_task(task: str, num_labels: int) -> Task:
    if task == "causal-lm":
        return CausalLM()
    if task == "sequence-classification":
        return SequenceClassification(num_labels)
    raise ValueError(f"Unknown task '{task}'; choose 'sequence-classification' or 'causal-lm'.")
