import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning.adapters.base import (
    adapter_state_keys,
    find_classifier_head,
    find_targets,
    inject_adapters,
    set_trainable,
)
from lora_lightning.adapters.lora import LoRALinear


@pytest.fixture
def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertForSequenceClassification(config)


def test_suffix_targets_select_exact_layers(bert):
    names = find_targets(bert, ["query", "value"])
    assert names == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
    ]


def test_regex_targets_match_full_names(bert):
    assert find_targets(bert, r".*layer\.1\..*query") == ["bert.encoder.layer.1.attention.self.query"]


def test_all_linear_leaves_the_classifier_alone(bert):
    names = find_targets(bert, "all-linear")
    assert "classifier" not in names
    assert len(names) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler


def test_unknown_target_lists_what_exists(bert):
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer.*'query'"):
        find_targets(bert, ["query", "q_proj"])
    with pytest.raises(ValueError, match="matches no linear layer"):
        find_targets(bert, r"nothing.*")


def test_only_adapters_and_head_train_and_are_saved(bert):
    inject_adapters(bert, ["query"], lambda name, layer: LoRALinear(layer, rank=2, alpha=4))
    head = find_classifier_head(bert)
    assert head == ["classifier"]
    set_trainable(bert, head)
    trainable = sorted(n for n, p in bert.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [f"bert.encoder.layer.{i}.attention.self.query.lora_{f}" for i in range(2) for f in "AB"]
        + ["classifier.weight", "classifier.bias"]
    )
    assert sorted(adapter_state_keys(bert, head)) == trainable
