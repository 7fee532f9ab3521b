"""The only places lora-lightning reads Lightning state that has no public API.

Each function here names the internal it reads; ``tests/test_compat.py`` checks every one against the installed
Lightning, so an upgrade that moves one fails that test instead of silently changing behaviour. The versions they
were tested with are the pins in ``constraints.txt`` (``pyproject.toml`` bounds Lightning to that minor series).
"""
from __future__ import annotations

from collections.abc import Iterable

import lightning as L


def processed_train_batches(trainer: L.Trainer) -> int:
    """Training batches of the current epoch the fit loop has finished running ``training_step`` on.

    Read from ``trainer.fit_loop.epoch_loop.batch_progress.current.processed``. Lightning resumes a fit after the
    last *processed* batch, also when the checkpoint was written after the next batch was fetched (the SIGUSR1
    handler, ``on_train_batch_start``), so a resumable sampler must skip this many batches, not the ones fetched.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def fit_train_dataloaders(trainer: L.Trainer) -> Iterable | None:
    """The ``train_dataloaders`` given to ``trainer.fit``, already during the ``setup`` hooks (``None``: none given).

    ``trainer.train_dataloader`` is only set once the fit loop has loaded its data, after ``setup``; until then the
    loader lives in ``trainer.fit_loop._data_source``.
    """
    source = trainer.fit_loop._data_source
    return source.dataloader() if source.is_defined() else None


__all__ = ["fit_train_dataloaders", "processed_train_batches"]
