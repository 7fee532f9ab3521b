"""Peak tensor memory of a piece of PyTorch code, counted op by op, on real tensors or on the meta device.

:class:`PeakTensorMemory` is a dispatch mode that keeps the byte count of every tensor storage alive: the tensors
registered when it starts (weights, optimiser state, the batch) plus every storage an op returns while it is active,
each released when Python frees it. Its ``peak`` is the most bytes alive at once: the quantity a CUDA caching
allocator reports as ``max_memory_allocated``, less its 512-byte rounding, and with no allocator cache, kernel
workspace, CUDA context or Python process on top.

On the meta device tensors have shapes and no data, so nothing is computed and a 70B step is counted in seconds. Two
things differ from a CPU run there, and :func:`meta_device` makes both match what the CPU (and a GPU) does:

- CPU and GPU ``scaled_dot_product_attention`` run a fused kernel that saves one log-sum-exp per query for the
  backward; on meta the dispatcher falls back to the unfused maths, which saves the whole attention matrix. The
  meta run calls the fused CPU kernel's meta function instead.
- Code that reads a tensor's value (transformers checks whether the attention mask is all ones) gets 1 (``True``):
  the value an all-ones mask gives. Use all-ones masks in counted batches.

``tests/test_tensor_memory.py`` checks that a meta run's peak equals the real run's to the byte.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of tensor storage alive: ``current`` now, ``peak`` the most since the mode was built. Storages are
    counted once however many tensors view them; ``tensors`` are those alive before the counted code runs."""

    def __init__(self, tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._alive: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        for tensor in tensors:
            self._count(tensor)

    def _count(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._alive.get(key)
        if known is not None and known() is storage:
            return
        nbytes = storage.nbytes()
        self._alive[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._release(key, nbytes))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _release(self, key: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1  # no value on meta: what an all-ones mask gives
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self._count(tensor)
        return out


_attention = F.scaled_dot_product_attention


def _fused_attention_on_meta(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                             enable_gqa=False):
    """``scaled_dot_product_attention`` that runs meta tensors through the fused CPU kernel's meta function (saves
    the log-sum-exp, not the attention matrix), as on CPU and GPU; grouped-query key/value heads pass as they are."""
    if not query.is_meta:
        return _attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build and run on the meta device: ``from_pretrained`` of a folder with only ``config.json`` (and a
    tokenizer) builds the model from its config with no weights read, and attention counts as on CPU/GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def from_config(name, *args, dtype=None, torch_dtype=None, quantization_config=None, **kwargs):
        if quantization_config is not None:
            raise ValueError("A quantised base cannot be counted on the meta device (quantising needs the weights); "
                             "count it on real tensors.")
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=dtype or torch_dtype)

    # patched in the module, not by a torch-function mode: checkpointing recomputes in autograd's thread
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", from_config), \
            mock.patch.object(F, "scaled_dot_product_attention", _fused_attention_on_meta), torch.device("meta"):
        yield
