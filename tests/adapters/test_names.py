"""module_position, the one rule that reads a layer index and a module type from a module name (hypernet matrix
embeddings, rank heat maps and tables), on the real module names of tiny BERT, RoBERTa, Llama and GPT-2 models."""
from __future__ import annotations

import pytest
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

from lora_lightning.adapters.names import module_position

SMALL = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=50)


def linear_positions(model: nn.Module) -> dict[str, tuple[int | None, str]]:
    return {name: tuple(module_position(name)) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D))}


def test_bert_layers_types_pooler_and_classifier():
    positions = linear_positions(BertForSequenceClassification(BertConfig(**SMALL)))
    assert positions["bert.encoder.layer.1.attention.self.query"] == (1, "attention.self.query")
    # three "dense" layers of one block are three different types
    assert positions["bert.encoder.layer.0.attention.output.dense"] == (0, "attention.output.dense")
    assert positions["bert.encoder.layer.0.intermediate.dense"] == (0, "intermediate.dense")
    assert positions["bert.encoder.layer.0.output.dense"] == (0, "output.dense")
    assert positions["bert.pooler.dense"] == (None, "bert.pooler.dense")
    assert positions["classifier"] == (None, "classifier")
    assert {p[0] for p in positions.values()} == {0, 1, None}
    assert len({p[1] for p in positions.values() if p[0] is not None}) == 6  # q, k, v, attn out, intermediate, out


def test_roberta_classification_head():
    positions = linear_positions(RobertaForSequenceClassification(RobertaConfig(**SMALL, max_position_embeddings=20)))
    assert positions["roberta.encoder.layer.1.attention.self.value"] == (1, "attention.self.value")
    assert positions["classifier.dense"] == (None, "classifier.dense")
    assert positions["classifier.out_proj"] == (None, "classifier.out_proj")


def test_llama_projections_and_lm_head():
    config = LlamaConfig(**SMALL, num_key_value_heads=1)
    positions = linear_positions(LlamaForCausalLM(config))
    assert positions["model.layers.1.self_attn.q_proj"] == (1, "self_attn.q_proj")
    assert positions["model.layers.0.mlp.down_proj"] == (0, "mlp.down_proj")
    assert positions["lm_head"] == (None, "lm_head")
    assert module_position("model.layers.1.self_attn.q_proj").leaf == "q_proj"


def test_gpt2_conv1d_names_and_a_numbered_module_itself():
    positions = linear_positions(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=50)))
    assert positions["transformer.h.1.attn.c_attn"] == (1, "attn.c_attn")
    assert positions["transformer.h.0.mlp.c_proj"] == (0, "mlp.c_proj")
    assert positions["transformer.h.0.attn.c_proj"] == (0, "attn.c_proj")
    assert module_position("transformer.h.2") == (2, "h")  # the block itself: its container's name is the type


@pytest.mark.parametrize("name, expected", [
    ("fc", (None, "fc")),
    ("encoder.block.0.layer.1.DenseReluDense.wi", (0, "layer.1.DenseReluDense.wi")),  # first index is the layer
    ("layer10.dense", (None, "layer10.dense")),  # a digit inside a component is not an index
])
def test_rule_edges(name, expected):
    assert module_position(name) == expected


def test_hypernet_and_rank_report_read_names_by_this_rule():
    """Both consumers import the one rule: nothing else in the package parses module names."""
    import lora_lightning.adapters.hyper as hyper
    import lora_lightning.callbacks.rank_report as report

    assert hyper.module_position is module_position and report.module_position is module_position
