"""Loading a Hugging Face backbone and its tokenizer from a hub id, a local folder or a packaged alias, in the
dtype, attention kernel and quantisation the user asked for (docs/large_models.md)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import transformers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from lora_lightning.adapters.base import CLASSIFIER_HEAD_NAMES
from lora_lightning.adapters.quant import check_quantization, keep_trainable_layout, quantization_config
from lora_lightning.assets import resolve_backbone

TASKS = ("sequence-classification", "causal-lm")
BACKBONE_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto",
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# transformers 5 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name still works, with a warning).
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


@dataclass(frozen=True)
class BackboneOptions:
    """How the frozen base is loaded, checked on construction (before anything is read from disk).

    Args:
        dtype: ``float32``, ``bfloat16``, ``float16`` (CUDA only) or ``auto`` (the checkpoint's own dtype).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (CUDA and ``flash-attn`` only);
            ``None`` leaves the choice to ``transformers``.
        quantization: ``none``, ``nf4`` or ``int8`` (bitsandbytes, see ``adapters/quant.py``).
    """

    dtype: str = "float32"
    attn_implementation: str | None = None
    quantization: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in BACKBONE_DTYPES:
            raise ValueError(f"Unknown backbone_dtype '{self.dtype}'; choose one of {list(BACKBONE_DTYPES)}.")
        if self.dtype == "float16" and not torch.cuda.is_available():
            raise ValueError(
                "backbone_dtype: float16 needs a CUDA GPU and none is visible (CPU float16 matmuls are slow and "
                "overflow in training); on CPU use backbone_dtype: bfloat16 or float32."
            )
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"Unknown attn_implementation '{self.attn_implementation}'; choose one of {list(ATTN_IMPLEMENTATIONS)}."
            )
        if self.attn_implementation == "flash_attention_2":
            if not torch.cuda.is_available():
                raise ValueError("attn_implementation: flash_attention_2 needs a CUDA GPU and none is visible; "
                                 "use sdpa (or eager) on CPU.")
            if importlib.util.find_spec("flash_attn") is None:
                raise ImportError("attn_implementation: flash_attention_2 needs flash-attn: "
                                  "pip install flash-attn --no-build-isolation (or use sdpa).")
            if self.dtype not in ("bfloat16", "float16"):
                raise ValueError("attn_implementation: flash_attention_2 runs in half precision only; set "
                                 "backbone_dtype: bfloat16 (or float16).")
        check_quantization(self.quantization)

    @property
    def torch_dtype(self) -> torch.dtype | str:
        return BACKBONE_DTYPES[self.dtype]

    def from_pretrained_kwargs(self, full_precision: list[str] = ()) -> dict:
        """Arguments for ``from_pretrained``; ``full_precision``: modules never quantised (trained heads), on top of
        the output embedding and the classification heads. ``low_cpu_mem_usage`` (the default since transformers 5)
        builds the model empty and fills it in the target dtype: no full fp32 copy is made."""
        kwargs: dict = {_DTYPE_KWARG: self.torch_dtype, "low_cpu_mem_usage": True}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        compute_dtype = self.torch_dtype if isinstance(self.torch_dtype, torch.dtype) else torch.float32
        config = quantization_config(
            self.quantization, compute_dtype, ["lm_head", *CLASSIFIER_HEAD_NAMES, *full_precision]
        )
        if config is not None:
            kwargs["quantization_config"] = config
        return kwargs


def _inputs_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def keep_in_float32(model: nn.Module, names: list[str]) -> None:
    """Trained heads stay fp32 over a lower-precision base: cast them, and cast their inputs to their own dtype on
    the way in (which stays right if Lightning's ``bf16-true`` casts the whole module; a module-level hook, so the
    model still pickles for ``ddp_spawn``)."""
    for name in names:
        head = model.get_submodule(name)
        head.float()
        if any(True for _ in head.parameters()):
            head.register_forward_pre_hook(_inputs_to_own_dtype)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """``transformers``' non-reentrant activation checkpointing of the transformer blocks (training mode only).

    Non-reentrant checkpointing differentiates through the recomputed block whether or not its input requires
    grad, so the frozen base needs no ``enable_input_require_grads``."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: true, but the backbone class {type(model).__name__} does not support "
            f"activation checkpointing in transformers; set gradient_checkpointing: false or use another backbone."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is never used in training and conflicts with recomputation


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
    if "gguf_file" in kwargs and "quantization_config" in extra:
        raise ValueError(
            f"Backbone '{name}' is a GGUF file, which transformers dequantises itself and cannot quantise again; "
            f"use quantization: none, or save the model as safetensors (save_pretrained) and quantise that folder."
        )
    try:
        return loader(source, **kwargs, **extra)
    except OSError as error:
        raise OSError(
            f"Could not load '{name}' ({error}). Without network access use a local folder or a packaged alias "
            f"('minilm', 'smollm2'); with network access check the hub id."
        ) from error


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """A backbone's ``transformers`` config alone (no weights): for checks that must come before the load."""
    return _from_pretrained(AutoConfig.from_pretrained, name, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=8)
def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer of a backbone; a missing pad token falls back to EOS (decoder-only models)."""
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(
    name: str,
    task: str,
    num_labels: int = 2,
    trust_remote_code: bool = False,
    options: BackboneOptions | None = None,
    full_precision: list[str] = (),
    empty: bool = False,
    **model_kwargs,
) -> nn.Module:
    """A pretrained ``transformers`` model with the head the task needs (regression when ``num_labels == 1``),
    loaded as ``options`` say (default: fp32, no quantisation); ``full_precision``: modules never quantised.
    ``empty``: the same model on the meta device, its weights not read (a process that receives them from rank 0)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}'; choose one of {TASKS}.")
    if empty:
        model = _empty_backbone(name, task, num_labels, trust_remote_code, options)
        return _with_task_settings(model, name, task, num_labels, trust_remote_code)
    model_kwargs = {**(options or BackboneOptions()).from_pretrained_kwargs(full_precision), **model_kwargs}
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
    if "quantization_config" in model_kwargs:
        keep_trainable_layout(model)
    return _with_task_settings(model, name, task, num_labels, trust_remote_code)


def _with_task_settings(model: nn.Module, name: str, task: str, num_labels: int, trust_remote_code: bool) -> nn.Module:
    if task == "sequence-classification" and num_labels == 1:
        model.config.problem_type = "regression"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(name, trust_remote_code).pad_token_id
    return model


def _empty_backbone(name: str, task: str, num_labels: int, trust_remote_code: bool,
                    options: BackboneOptions | None) -> nn.Module:
    """The backbone's architecture built from its config alone on the meta device: no weight is read or allocated.
    Its tensors get their values later (``sharding.broadcast_from_rank0``); a quantised base cannot be built so."""
    options = options or BackboneOptions()
    if options.quantization != "none":
        raise ValueError(f"An empty (meta-device) backbone cannot be quantised (quantization: {options.quantization}).")
    extra = {"num_labels": num_labels} if task == "sequence-classification" else {}
    config = _from_pretrained(AutoConfig.from_pretrained, name, trust_remote_code=trust_remote_code, **extra)
    dtype = options.torch_dtype
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    kwargs = {_DTYPE_KWARG: dtype, "trust_remote_code": trust_remote_code}
    if options.attn_implementation is not None:
        kwargs["attn_implementation"] = options.attn_implementation
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config, **kwargs)
