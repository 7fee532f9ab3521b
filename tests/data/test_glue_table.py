"""The GLUE task table: columns, label spaces, validation splits and metrics of the eight tasks."""
import pytest

from lora_lightning.data import GLUE_TASKS
from lora_lightning.data.glue import get_glue_task


def test_eight_tasks_with_their_columns_and_label_spaces():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert GLUE_TASKS["sst2"].text_fields == ("sentence",)
    assert GLUE_TASKS["qqp"].text_fields == ("question1", "question2")
    assert GLUE_TASKS["mnli"].text_fields == ("premise", "hypothesis")
    assert {name: task.num_labels for name, task in GLUE_TASKS.items()} == {
        "cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "stsb": 1, "mnli": 3, "qnli": 2, "rte": 2,
    }
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].label_names is None


def test_validation_splits_and_metrics():
    assert GLUE_TASKS["mnli"].validation_split == "validation_matched"
    assert {task.validation_split for name, task in GLUE_TASKS.items() if name != "mnli"} == {"validation"}
    assert GLUE_TASKS["cola"].metric_names == ("matthews",)
    assert GLUE_TASKS["mrpc"].metric_names == GLUE_TASKS["qqp"].metric_names == ("accuracy", "f1")
    assert GLUE_TASKS["stsb"].metric_names == ("pearson", "spearman")
    for name in ("sst2", "mnli", "qnli", "rte"):
        assert GLUE_TASKS[name].metric_names == ("accuracy",)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown GLUE task 'wnli'.*cola.*rte"):
        get_glue_task("wnli")
