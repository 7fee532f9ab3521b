"""What every tokenised-text DataModule shares: the backbone's tokenizer and the DataLoaders over its splits."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lora_lightning.backbone import load_tokenizer
from lora_lightning.data.collate import EncodedDataset
from lora_lightning._compat import processed_train_batches
from lora_lightning.data.sampling import training_loader


class TokenizedDataModule(L.LightningDataModule):
    """Subclasses fill ``self.datasets`` in ``setup`` and say how to batch (:meth:`collate_fn`).

    Expects hparams ``backbone``, ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``seed``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, EncodedDataset] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The backbone's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.backbone)
        return self._tokenizer

    def collate_fn(self) -> Callable:
        raise NotImplementedError

    def held_out_split(self) -> str:
        """The split that ``test`` and ``predict`` read."""
        return "validation"

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        hp = self.hparams
        common = dict(collate_fn=self.collate_fn(), num_workers=hp.num_workers)
        if not train:
            return DataLoader(self.datasets[split], batch_size=hp.eval_batch_size or hp.batch_size, **common)
        # resumable: a checkpoint taken mid-epoch continues at the next unseen batch (see ResumableSampler)
        return training_loader(self, self.datasets[split], hp.batch_size, hp.seed,
                               processed_batches=self._processed_train_batches, **common)

    def _processed_train_batches(self) -> int | None:
        """Training batches of the current epoch the fit loop has trained on (``None`` without a trainer)."""
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else processed_train_batches(trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.held_out_split())

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.held_out_split())
