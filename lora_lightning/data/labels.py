"""Label spaces for text classification: parse raw label values, infer the classes, map names to ids."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Label = int | float | str


MISSING_TEXT = ("", "nan")


def is_missing(value: Any) -> bool:
    """One rule for every file format: a cell is missing when it is null/None, a float NaN, empty or blank, or the
    text ``NaN`` (what pandas and spreadsheets write for a missing value)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_TEXT


def parse_label(value: Any) -> Label:
    """A label as read from a file: ``"1"`` -> 1, ``"0.5"`` -> 0.5, other text stays text; missing is an error."""
    if is_missing(value):
        raise ValueError(f"the label is missing ({value!r}).")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class LabelSpace:
    """What the labels are: class names (``None`` when the ids are the labels), class count, regression or not."""

    num_labels: int
    names: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        """True for a single real-valued output."""
        return self.num_labels == 1

    def encode(self, values: Iterable[Label]) -> list[int] | list[float]:
        """Map parsed labels to what the loss takes: float scores, or class ids."""
        if self.is_regression:
            return [float(value) for value in values]
        index = {name: i for i, name in enumerate(self.names or ())}
        encoded = []
        for value in values:
            if not isinstance(value, str):  # numbers are already class ids
                encoded.append(int(value))
            elif value in index:
                encoded.append(index[value])
            else:
                raise ValueError(f"Label '{value}' is not one of the known labels {list(self.names or ())}.")
        return encoded


def infer_label_space(
    values: Sequence[Label], num_labels: int | None = None, names: Sequence[str] | None = None
) -> LabelSpace:
    """Check the labels against ``num_labels`` (or infer it) and fix a deterministic name -> id mapping.

    Integer labels are class ids ``0 .. num_labels-1``. Text labels are sorted to give ids, unless ``names``
    (a mapping restored from a checkpoint) is given. Non-integer numbers, or ``num_labels == 1``, mean regression.
    """
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
    distinct = set(values)
    text = sorted(str(v) for v in distinct if isinstance(v, str))
    if text:
        if len(text) != len(distinct):
            numbers = sorted(str(v) for v in distinct if not isinstance(v, str))
            raise ValueError(
                f"The labels mix numbers {numbers[:5]} and text {text[:5]}; use one kind in the label column."
            )
        if num_labels == 1:
            raise ValueError(
                f"num_labels=1 means regression, but the labels are text ({text[:5]}). "
                "Use numeric scores, or set num_labels to the number of classes."
            )
        all_names = text
        if names is not None:
            unknown = [name for name in all_names if name not in names]
            if unknown:
                raise ValueError(f"Labels {unknown} are not in the restored label names {list(names)}.")
            all_names = list(names)
        if num_labels is not None and len(all_names) > num_labels:
            raise ValueError(
                f"Found {len(all_names)} distinct labels {all_names} but num_labels={num_labels}. "
                f"Set num_labels={len(all_names)} (or leave it unset to infer it), or fix the label column."
            )
        return LabelSpace(num_labels or len(all_names), tuple(all_names))
    if num_labels == 1 or (num_labels is None and any(isinstance(v, float) for v in distinct)):
        return LabelSpace(1)
    fractional = [v for v in distinct if isinstance(v, float) and not v.is_integer()]
    if fractional:
        raise ValueError(
            f"The labels are real-valued scores (e.g. {fractional[0]}) but num_labels={num_labels}. "
            "Set num_labels=1 for regression, or use integer class ids."
        )
    distinct = {int(v) for v in distinct}
    if not distinct:
        raise ValueError("No labels found: the data is empty.")
    low, high = min(distinct), max(distinct)
    if low < 0:
        raise ValueError(f"Label {low} is negative; class ids must be 0 .. num_labels-1.")
    if num_labels is not None and high >= num_labels:
        raise ValueError(
            f"Label {high} does not fit num_labels={num_labels} (class ids must be 0 .. {num_labels - 1}). "
            f"Set num_labels={high + 1} (or leave it unset to infer it), or fix the label column."
        )
    return LabelSpace(num_labels or high + 1, tuple(names) if names is not None else None)


def check_labels_seen_in_training(labels: Mapping[str, Sequence[Label] | None], origins: Mapping[str, str]) -> None:
    """Raise when a class label of an evaluation split never occurs in ``labels["train"]``: a model cannot learn a
    class it never sees, so raising ``num_labels`` would not help. ``origins`` describes each split for the message.
    Real-valued (regression) labels are not checked."""
    if any(isinstance(v, float) for values in labels.values() for v in values or ()):
        return
    seen = set(labels.get("train") or ())
    for split, values in labels.items():
        unseen = sorted({str(v) for v in values or () if v not in seen})
        if split != "train" and unseen:
            raise ValueError(
                f"Label(s) {unseen} occur in the {split} split ({origins.get(split, split)}) but never in the train "
                f"split ({origins.get('train', 'train')}): the model cannot learn a class it never sees. Add "
                f"training examples of it, or remove those rows from the {split} data."
            )
