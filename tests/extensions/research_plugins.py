"""Research code on top of lora-lightning, as a user would write it: one subclass per extension point, each
chosen from the CLI by ``class_path`` (the tests put this folder on ``sys.path``). See docs/extending.md."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import BinaryAccuracy

from lora_lightning.allocation.budget import BudgetSchedule
from lora_lightning.allocation.importance import ImportanceTracker, RankUnit
from lora_lightning.allocation.sensitivity import DiagonalStatistics
from lora_lightning.callbacks import RankPruningScheduler
from lora_lightning.modules import AdaLoRAModule, HyperAdaLoRAModule
from lora_lightning.modules.tasks import Task


# ------------------------------------------------------------------ 1. importance score (AdaLoRA-style pruning)
class MagnitudeImportance(ImportanceTracker):
    """Score a triplet by |Λ_i| alone (no gradients, no EMAs): the simplest magnitude-pruning baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    def update(self, units: dict[str, RankUnit]) -> bool:
        self.updates += 1
        return True

    def triplet_scores(self, units: dict[str, RankUnit]) -> dict[str, Tensor]:
        return {name: unit.lam.detach().abs().float() for name, unit in units.items()}

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]


# ------------------------------------------------------------------ 2. budget schedule
class LinearBudget(BudgetSchedule):
    """Linear instead of cubic decay from the initial to the target budget."""

    def budget(self, step: int) -> int:
        if step <= self.tinit:
            return self.init_budget
        if step >= self.final_step:
            return self.target_budget
        progress = (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int(round(self.init_budget - (self.init_budget - self.target_budget) * progress))


class LinearBudgetPruning(RankPruningScheduler):
    """The AdaLoRA scheduler on :class:`LinearBudget`; records the budget of every masking event."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[int, int]] = []

    def build_schedule(self, units, total_step, target_r) -> BudgetSchedule:
        cubic = super().build_schedule(units, total_step, target_r)
        return LinearBudget(**{f: getattr(cubic, f) for f in cubic.__dataclass_fields__})

    def allocate(self, pl_module, step, trainer=None) -> bool:
        changed = super().allocate(pl_module, step, trainer)
        if changed:
            self.events.append((step, self.budget))
        return changed


# ------------------------------------------------------------------ 3. task (loss and metrics)
class SmoothedBinaryClassification(Task):
    """Binary classification with a label-smoothed cross-entropy and a Brier score next to accuracy."""

    name = "smoothed-binary"
    default_metrics = ("accuracy", "brier")
    monitor, monitor_mode = "val/accuracy", "max"

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing

    def loss(self, outputs, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(outputs.logits.float(), batch["labels"], label_smoothing=self.smoothing)

    def build_metrics(self, metric_names):
        return MetricCollection({"accuracy": BinaryAccuracy(), "brier": MeanSquaredError()}, prefix="val/")

    def update_metrics(self, metrics, outputs, batch) -> None:
        probability = outputs.logits.float().softmax(-1)[:, 1]
        metrics["accuracy"].update(probability, batch["labels"])
        metrics["brier"].update(probability, batch["labels"].float())


class SmoothedAdaLoRA(AdaLoRAModule):
    """AdaLoRA trained with :class:`SmoothedBinaryClassification` (the backbone head stays sequence-classification)."""

    def __init__(self, *args, smoothing: float = 0.1, **kwargs) -> None:
        self.smoothing = smoothing
        super().__init__(*args, **kwargs)

    def build_task(self) -> Task:
        return SmoothedBinaryClassification(self.smoothing)


# ------------------------------------------------------------------ 4. sensitivity estimator
class LayerDepthEstimator:
    """A toy Hessian-diagonal estimator: every input channel of layer ``k`` gets ``1 / (k + 1)``, so earlier layers
    count as more sensitive. Named in YAML by its import path (``estimator: research_plugins.LayerDepthEstimator``);
    ``@register_estimator("depth")`` would register a short name instead."""

    calls = 0

    def __call__(self, model, layers, batches, loss_fn, *, weight_by_dout: bool = False) -> DiagonalStatistics:
        type(self).calls += 1
        stats = DiagonalStatistics()
        for name, layer in layers.items():
            depth = int(name.split("layer.")[1].split(".")[0]) if "layer." in name else 0
            stats.add(name, torch.full((layer.in_features,), 1.0 / (depth + 1), dtype=torch.float64), 1)
        return stats


# ------------------------------------------------------------------ 5. generator for HyperAdaLoRA
class GatedLinearGenerator(nn.Module):
    """A generator replacing the attention encoder: ``Δ = tanh(g) · (tokens @ W)`` per token size, ``g`` starting at
    0 so the generated factors equal the base ones at step 0. Same call as ``FactorGenerator``:
    ``(tokens (n, r, d), layer_ids (n,), type_ids (n,)) -> Δ (n, r, d)``."""

    def __init__(self, dims) -> None:
        super().__init__()
        self.maps = nn.ModuleDict({str(d): nn.Linear(d, d, bias=False) for d in sorted(set(dims))})
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: Tensor, layer_ids: Tensor, type_ids: Tensor) -> Tensor:
        return torch.tanh(self.gate) * self.maps[str(tokens.shape[-1])](tokens)


class GatedHyperAdaLoRA(HyperAdaLoRAModule):
    """HyperAdaLoRA whose generators are :class:`GatedLinearGenerator` (``hypernet.generators[factor]`` is any
    module with the generator call; replace it in ``__init__``, before an optimiser exists)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for fname, old in list(self.hypernet.generators.items()):
            self.hypernet.generators[fname] = GatedLinearGenerator(int(d) for d in old.in_proj)
