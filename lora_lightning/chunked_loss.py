"""The causal-LM loss computed over chunks of tokens, so the (tokens × vocabulary) logits never exist whole.

A causal LM's plain loss holds, per token and vocabulary word, the logits in the base dtype, their fp32 upcast and
the gradient of both: 12 bytes in bf16 (``benchmarks/results/memory_accounting.md``; 5.9 GiB of Llama-3.1-8B's step
at 2 × 2048 tokens). With ``loss_chunk_tokens = c`` the output layer and the cross-entropy run on ``c`` tokens at a
time, each chunk checkpointed (its logits are recomputed in the backward), so at most one chunk's logits are alive:
the same loss and gradients for one more pass of the output layer.

The chunks run inside the backbone's own ``forward``: its output layer is made to pass the hidden states through, and
its ``loss_function`` (``transformers``' hook for the loss) applies the real output layer chunk by chunk. Under FSDP2
the output layer belongs to the root unit, whose parameters are gathered for exactly that ``forward`` and its
backward, so sharding needs nothing more. Only models whose ``forward`` feeds the output layer's logits straight to
the loss are supported (``CHUNKABLE_MODEL_TYPES``): softcapped or scaled logits (Gemma 2/3, Granite, Cohere) would
be computed wrong, so they are refused.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# transformers' causal-LM classes whose forward is ``logits = self.lm_head(hidden); loss_function(logits, labels)``.
CHUNKABLE_MODEL_TYPES = frozenset({
    "deepseek_v3", "gemma", "llama", "mistral", "mixtral", "olmo", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "smollm3", "starcoder2",
})


def check_loss_chunking(chunk_tokens: int, task: str, config) -> None:
    """Refuse ``loss_chunk_tokens`` where it cannot apply, before the backbone's weights are loaded."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"loss_chunk_tokens must be an int >= 0 (0: the plain loss), got {chunk_tokens!r}.")
    if task != "causal-lm":
        raise ValueError(f"loss_chunk_tokens applies to task causal-lm only (the {task} loss has no vocabulary-sized "
                         "logits); remove it or set it to 0.")
    model_type = getattr(config, "model_type", None)
    custom_code = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type not in CHUNKABLE_MODEL_TYPES or custom_code:
        raise ValueError(
            f"loss_chunk_tokens is not supported for model type '{model_type}'"
            f"{' with its own modelling code' if custom_code else ''}: its forward may transform the logits before the "
            f"loss (softcapping, scaling), which chunking would skip. Supported: {sorted(CHUNKABLE_MODEL_TYPES)}. "
            "Set loss_chunk_tokens: 0."
        )


_UNSET = object()


def _passthrough(hidden_states: Tensor) -> Tensor:
    """The output layer's stand-in. A copy, not the view of the model's hidden states it is given: the backbone
    returns it as ``logits``, and FSDP2 warns about a root output that is a view (its size is tokens × hidden)."""
    return hidden_states.clone()


def _chunk_loss_sum(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], ignore_index: int) -> Tensor:
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: Tensor | None = None,
                           ignore_index: int = -100, shift_labels: Tensor | None = None, *,
                           head: Callable[[Tensor], Tensor], chunk_tokens: int, **_: object) -> Tensor:
    """``transformers``' ``ForCausalLMLoss`` (mean next-token cross-entropy over targets that are not
    ``ignore_index``, or the sum over ``num_items_in_batch``) where ``logits`` are the hidden states that the output
    layer ``head`` has not yet been applied to; ``head`` runs on ``chunk_tokens`` tokens at a time."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = logits.reshape(-1, logits.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        part = (hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens], head, ignore_index)
        total = total + (checkpoint(_chunk_loss_sum, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_loss_sum(*part))
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


@contextmanager
def chunked_loss(backbone: nn.Module, chunk_tokens: int) -> Iterator[None]:
    """Within the block, ``backbone(..., labels=...)`` computes its loss with :func:`chunked_causal_lm_loss`; its
    output's ``logits`` are then the final hidden states (the caller drops them)."""
    head = backbone.get_output_embeddings()
    head_forward = type(head).forward.__get__(head)  # the layer's own forward, whatever its class (adapted, quantised)
    previous = backbone.__dict__.get("_loss_function", _UNSET)  # where transformers' loss_function setter stores it
    head.forward = _passthrough
    backbone.loss_function = partial(chunked_causal_lm_loss, head=head_forward, chunk_tokens=chunk_tokens)
    try:
        yield
    finally:
        del head.forward
        if previous is _UNSET:
            del backbone._loss_function
        else:
            backbone._loss_function = previous
