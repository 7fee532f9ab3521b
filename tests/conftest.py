"""Shared fixtures: tiny randomly initialised backbones saved to a temporary folder, so tests go through the
same ``from_pretrained`` path as users, in seconds. Their tokenizers are the packaged real ones."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from lora_lightning.backbone import load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _save_tiny(model, tokenizer_alias: str, folder) -> str:
    model.save_pretrained(folder)
    load_tokenizer(tokenizer_alias).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32) with the packaged MiniLM tokenizer, as a local folder."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _save_tiny(BertForSequenceClassification(config), "minilm", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer Llama (hidden 32) with the packaged SmolLM2 tokenizer, as a local folder."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_tiny(LlamaForCausalLM(config), "smollm2", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def fresh_rendezvous_environment():
    """Every test starts without MASTER_ADDR/MASTER_PORT and leaves os.environ as it found it. Lightning's spawn
    launcher writes the rendezvous port into the test process's environment; a later distributed run would reuse
    that port while a socket of the earlier run may still hold it (EADDRINUSE), instead of picking a free one."""
    saved = dict(os.environ)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)
