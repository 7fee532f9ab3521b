"""Batch assembly: dynamic padding to the longest sequence in the batch, labels with the dtype the loss expects."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

IGNORE_INDEX = -100


class EncodedDataset(Dataset):
    """Pre-tokenised examples: token lists per field (``input_ids``, ``attention_mask``, ...) and optional labels."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[Any] | None = None) -> None:
        lengths = {len(values) for values in encodings.values()}
        if labels is not None:
            lengths.add(len(labels))
        if len(lengths) > 1:
            raise ValueError(f"Encodings and labels differ in length: {sorted(lengths)}.")
        self.encodings = encodings
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(next(iter(self.encodings.values()), []))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: values[index] for key, values in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class ClassificationCollator:
    """Pads with the tokenizer (``DataCollatorWithPadding``); labels become long (classes) or float (regression)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, regression: bool = False) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self.label_dtype = torch.float32 if regression else torch.long

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [feature["labels"] for feature in features if "labels" in feature]
        batch = dict(self.pad([{k: v for k, v in feature.items() if k != "labels"} for feature in features]))
        if labels:
            batch["labels"] = torch.tensor(labels, dtype=self.label_dtype)
        return batch


class CausalLMCollator:
    """Right-pads ``input_ids`` with the pad id and ``labels`` with -100; ``attention_mask`` is 0 on padding.

    Packed rows (features with ``position_ids``, see :mod:`lora_lightning.data.packing`) get no ``attention_mask``:
    their ``position_ids`` tell ``transformers`` where examples start, the padding tail is one more segment that
    restarts at position 0, and ``use_cache=False`` because a cache would switch the packed-sequence mask off.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        packed = "position_ids" in features[0]
        length = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        position_ids = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention_mask[row, :n] = 1
            if packed:
                position_ids[row, :n] = torch.tensor(feature["position_ids"])
                position_ids[row, n:] = torch.arange(length - n)
        if packed:
            return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "use_cache": False}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
