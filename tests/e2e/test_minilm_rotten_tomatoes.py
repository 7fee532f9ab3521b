"""End to end on the packaged real model (MiniLM) and real data (Rotten Tomatoes), short."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from lora_lightning.backbone import locate_backbone
from lora_lightning.data import TextClassificationDataModule
from lora_lightning.export import export_peft
from lora_lightning.modules import LoRAModule

pytestmark = pytest.mark.integration


def test_lora_minilm_learns_sentiment_and_exports(tmp_path):
    L.seed_everything(0)
    data = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=64, batch_size=16,
                                        eval_batch_size=64, max_eval_samples=256, num_labels=2)
    module = LoRAModule(backbone="minilm", target_modules=["query", "key", "value", "dense"], rank=8, alpha=16,
                        learning_rate=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=80, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    accuracy = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        module, data, verbose=False)[0]["val/accuracy"]
    assert accuracy >= 0.70, accuracy  # chance is 0.58 (majority class "fresh")
    assert module.label_names == ["rotten", "fresh"]

    export_peft(module.eval(), tmp_path / "peft")
    base = AutoModelForSequenceClassification.from_pretrained(locate_backbone("minilm")[0], num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    batch = next(iter(data.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert (reloaded(**inputs).logits - module(inputs).logits).abs().max() <= 1e-5
