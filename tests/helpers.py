"""Helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import torch


def random_batch(vocab_size: int = 30522, batch_size: int = 4, seq_len: int = 12, num_labels: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
