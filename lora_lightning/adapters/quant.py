"""A quantised frozen base (QLoRA): which layers stay in full precision, the ``transformers`` config that
quantises the rest while loading, and how to recognise a quantised base layer.

The library is bitsandbytes (``pip install 'lora-lightning[quant]'``): ``nf4`` is QLoRA's 4-bit NormalFloat with
double quantisation, ``int8`` is LLM.int8(). Both quantise inside ``from_pretrained`` (no full-precision copy is
kept), run on CPU (bitsandbytes >= 0.48) and CUDA, and are what PEFT's QLoRA uses, so our memory figures compare
like with like. Adapters on top stay fp32; merging into a quantised weight is refused (:func:`check_mergeable`).
Nothing here imports Lightning.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "int8")
QUANT_INSTALL = "pip install 'lora-lightning[quant]'   (or: pip install bitsandbytes)"


def check_quantization(quantization: str) -> None:
    """Known name and installed library, before anything is loaded."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization '{quantization}'; choose one of {list(QUANTIZATIONS)}.")
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization: {quantization} needs bitsandbytes, which is not installed: {QUANT_INSTALL}")


def quantization_config(quantization: str, compute_dtype: torch.dtype, keep: list[str]):
    """The ``quantization_config`` for ``from_pretrained`` (``None`` for ``none``); ``keep``: names of the modules
    left unquantised (heads, the output embedding: matched as ``transformers`` does, by prefix or suffix)."""
    check_quantization(quantization)
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = sorted(set(keep))
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep every 4-bit base layer in bitsandbytes' trainable weight layout.

    On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight in place the first time it runs in
    eval mode without grad (a validation pass) into a layout for inference only: from then on its matmul records
    no autograd graph, so every step after the first validation loses the gradient through the frozen base
    (adapter gradients off by 45-78 % on a 64-wide Llama), and a layer narrower than one quantisation block fails
    outright. Training alternates eval and train, so the repacking is switched off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is stored quantised (bitsandbytes 4-bit / 8-bit, or any integer-typed weight)."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return False
    return type(weight).__module__.startswith("bitsandbytes") or not weight.dtype.is_floating_point


def check_mergeable(layer: nn.Module, name: str = "") -> None:
    """A clear error instead of adding ΔW into packed integers."""
    if is_quantized(layer):
        raise ValueError(
            f"Cannot merge an adapter into the quantised base layer {name or type(layer).__name__} "
            f"({type(layer).__name__}): export the adapter in PEFT format instead (it loads on the unquantised "
            f"base), or build the module with quantization: none to merge."
        )
