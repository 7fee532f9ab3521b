"""The eight GLUE tasks this library trains on: which columns hold the text, the label space, the metrics."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as the data and model sides need it.

    ``label_names`` is ``None`` for regression (STS-B), where ``num_labels`` is 1.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    validation_split: str = "validation"

    @property
    def num_labels(self) -> int:
        """Number of classes, or 1 for a regression task."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        """True when the label is a real-valued score."""
        return self.label_names is None


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews",)),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        GlueTask("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman")),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            validation_split="validation_matched",
        ),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    )
}


def get_glue_task(name: str) -> GlueTask:
    """Look a task up by name, with an error listing the known tasks."""
    if name not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task '{name}'. Known tasks: {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[name]
