"""Random-weight Llama-architecture backbones built from configs (no download), and the two contenders trained on
them: our ``LoRAModule`` and PEFT's LoRA with transformers' gradient checkpointing and the same bitsandbytes
quantisation. Used by ``memory_scaling.py`` (CPU host memory) and ``gpu_check.py`` (CUDA memory, tokens/s).

A backbone is saved once with ``save_pretrained`` (plus the packaged SmolLM2 tokenizer, whose 49,152-token
vocabulary every size uses) and both contenders load it with ``from_pretrained``, the path users take.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# name -> (hidden, layers, attention heads, key/value heads, MLP width, tied embeddings)
SHAPES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "tiny": (64, 2, 4, 2, 128, True),
    "135M": (576, 30, 9, 3, 1536, True),      # SmolLM2-135M
    "360M": (960, 32, 15, 5, 2560, True),     # SmolLM2-360M
    "0.5B": (1024, 28, 16, 4, 4352, True),
    "1.5B": (1536, 28, 12, 2, 9728, True),
    "7B": (4096, 32, 32, 32, 11008, False),   # Llama-2-7B
}
VOCAB = 49152
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
CHUNK_TOKENS = 512  # loss_chunk_tokens of the shipped 7B/8B chat configs


@dataclass(frozen=True)
class Setup:
    """One row's backbone options: the frozen base's dtype, activation checkpointing, bitsandbytes quantisation, and
    (ours only: PEFT has no such option) the chunked loss's tokens per chunk."""

    name: str
    dtype: str
    checkpointing: bool
    quantization: str = "none"
    loss_chunk_tokens: int = 0


def llama_config(size: str):
    """The ``LlamaConfig`` of a named size (``SHAPES``)."""
    from transformers import LlamaConfig

    if size not in SHAPES:
        raise ValueError(f"Unknown size '{size}'; choose one of {list(SHAPES)}.")
    hidden, layers, heads, kv_heads, mlp, tied = SHAPES[size]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=mlp, tie_word_embeddings=tied,
                       max_position_embeddings=4096, pad_token_id=2)


def parameter_count(size: str) -> int:
    """Parameters of the base model of ``size``, counted on the meta device (nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    return sum(p.numel() for p in model.parameters())


def save_random_backbone(size: str, folder: Path, dtype: torch.dtype, device: str = "cpu") -> Path:
    """Build a randomly initialised Llama of ``size`` in ``dtype`` and save it (with the SmolLM2 tokenizer) to
    ``folder``, unless a complete copy is already there."""
    from transformers import LlamaForCausalLM

    from lora_lightning.backbone import load_tokenizer

    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(size)).to(dtype)
    model.save_pretrained(folder)
    load_tokenizer("smollm2").save_pretrained(folder)
    return folder


def build_ours(folder: Path, setup: Setup) -> nn.Module:
    """Our ``LoRAModule`` on the saved backbone with ``setup``'s options."""
    from lora_lightning.modules import LoRAModule

    return LoRAModule(backbone=str(folder), task="causal-lm", target_modules=TARGETS, rank=RANK, alpha=ALPHA,
                      dropout=0.0, backbone_dtype=setup.dtype, gradient_checkpointing=setup.checkpointing,
                      quantization=setup.quantization, loss_chunk_tokens=setup.loss_chunk_tokens)


def build_peft(folder: Path, setup: Setup) -> nn.Module:
    """PEFT's equivalent: ``from_pretrained`` in the same dtype with our bitsandbytes config, transformers'
    non-reentrant gradient checkpointing, ``get_peft_model`` with the same LoRA (adapters fp32, PEFT's default
    ``autocast_adapter_dtype``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_lightning.adapters.quant import quantization_config

    if setup.loss_chunk_tokens:
        raise ValueError(f"Setup '{setup.name}' chunks the loss, which PEFT's model has no option for; count it for "
                         "our side only.")
    dtype = getattr(torch, setup.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=quantization_config(setup.quantization, dtype, ["lm_head"]))
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def training_step(side: str, model: nn.Module, lr: float = 1e-4) -> Callable[[dict[str, torch.Tensor]], float]:
    """A closure: forward + next-token loss + backward + AdamW step + zero_grad on one batch; returns the loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model.task.loss(model(batch), batch) if side == "ours" else model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def random_batch(batch: int, block: int, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (the same for both contenders), every token a target."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, block), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
