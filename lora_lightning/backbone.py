"""Loading a Hugging Face backbone and its tokenizer from a hub id, a local folder or a packaged alias."""
from __future__ import annotations

import os
from functools import lru_cache

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lora_lightning.assets import resolve_backbone

TASKS = ("sequence-classification", "causal-lm")


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a slash or a leading ``.``/``~`` is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def locate_backbone(name: str) -> tuple[str, dict]:
    """Resolve an alias, check that a local path exists, and return ``(source, from_pretrained kwargs)``."""
    source, kwargs = resolve_backbone(name)
    expanded = os.path.expanduser(source)
    if os.path.exists(expanded):
        return expanded, kwargs
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"Backbone path '{source}' does not exist. Give an existing folder with config.json, a hub id "
            f"such as 'FacebookAI/roberta-base', or a packaged alias ('minilm', 'smollm2')."
        )
    return source, kwargs


def _from_pretrained(loader, name: str, **extra):
    source, kwargs = locate_backbone(name)
    try:
        return loader(source, **kwargs, **extra)
    except OSError as error:
        raise OSError(
            f"Could not load '{name}' ({error}). Without network access use a local folder or a packaged alias "
            f"('minilm', 'smollm2'); with network access check the hub id."
        ) from error


@lru_cache(maxsize=8)
def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer of a backbone; a missing pad token falls back to EOS (decoder-only models)."""
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(
    name: str, task: str, num_labels: int = 2, trust_remote_code: bool = False, **model_kwargs
) -> nn.Module:
    """A pretrained ``transformers`` model with the head the task needs (regression when ``num_labels == 1``)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}'; choose one of {TASKS}.")
    if task == "causal-lm":
        model = _from_pretrained(
            AutoModelForCausalLM.from_pretrained, name, trust_remote_code=trust_remote_code, **model_kwargs
        )
    else:
        model = _from_pretrained(
            AutoModelForSequenceClassification.from_pretrained,
            name,
            num_labels=num_labels,
            trust_remote_code=trust_remote_code,
            **model_kwargs,
        )
        if num_labels == 1:
            model.config.problem_type = "regression"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(name, trust_remote_code).pad_token_id
    return model
