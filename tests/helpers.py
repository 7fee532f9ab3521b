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


def batch_loader(n: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """``n`` ready-made random batches (see :func:`random_batch`), one per step."""
    return torch.utils.data.DataLoader([random_batch(seed=seed + i) for i in range(n)], batch_size=None)


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or summary, unless ``kwargs`` says otherwise."""
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_model_summary=False,
                    enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})
