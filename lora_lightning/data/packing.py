"""Packing short examples into rows of at most ``block_size`` tokens, each example attending only to itself.

A packed row carries ``position_ids`` that restart at 0 for every example. ``transformers`` (5.x) reads such rows as
packed sequences when the batch has no 2D ``attention_mask`` and no cache: eager and sdpa attention get a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so packing changes neither logits nor
loss. The first token of every example gets label -100, so no example is trained to predict another's first token.
Limitation: flash_attention_2 detects packed rows from ``position_ids`` only for a batch of one row, so use
``batch_size: 1`` with it (see docs/data.md).
"""
from __future__ import annotations

import bisect

from lora_lightning.data.collate import IGNORE_INDEX


def pack_examples(examples: list[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Rows of ``input_ids``/``labels``/``position_ids``, filled best-fit in decreasing length (deterministic).

    Every example must already fit in ``block_size``; examples are never split across rows.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the best fit is the first with enough space
    for index in order:
        length = len(examples[index]["input_ids"])
        if length > block_size:
            raise ValueError(f"An example of {length} tokens does not fit block_size={block_size}; truncate it first.")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([])
            space, row = block_size, len(rows) - 1
        else:
            space, row = free.pop(slot)
        rows[row].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, row))
    return [_concatenate([examples[i] for i in row]) for row in rows]


def _concatenate(examples: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    packed: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        n = len(example["input_ids"])
        packed["input_ids"] += example["input_ids"]
        packed["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        packed["position_ids"] += list(range(n))
    return packed
