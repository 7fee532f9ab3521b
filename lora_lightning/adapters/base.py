"""What an adapter layer is, and the pure functions that put adapters into a backbone and take them out.

An adapter layer wraps a frozen linear ``base_layer`` (``nn.Linear`` or transformers' ``Conv1D``) and adds a
low-rank update: ``y = base_layer(x) + ΔW x``. Subclasses say what ΔW is (:meth:`delta_weight`) and how to
apply it to activations without forming it (:meth:`unscaled_output` times :attr:`scaling`). Nothing here imports Lightning.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lora_lightning.adapters.quant import check_mergeable, is_quantized

LINEAR_TYPES = (nn.Linear, Conv1D)
# Heads that ``transformers`` creates fresh for sequence classification; trained in full, like PEFT's
# ``modules_to_save``.
CLASSIFIER_HEAD_NAMES = ("classifier", "score", "pre_classifier")
# Output layers that "all-linear" never adapts.
OUTPUT_LAYER_NAMES = ("lm_head", "classifier", "score", "pre_classifier", "out_proj")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear layer; ``Conv1D`` stores its weight transposed."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_out, d_in
    return layer.out_features, layer.in_features


def check_alpha(alpha: float) -> float:
    """``alpha`` scales the whole update (ΔW ∝ alpha): it must be positive, since 0 switches the adapter off."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the adapter's update is scaled by alpha; {alpha} makes it do nothing "
                         "or flips it). A common choice is alpha = 2 * rank.")
    return alpha


class _UpcastLinear(torch.autograd.Function):
    """``F.linear(x.to(weight.dtype), weight)`` that keeps ``x`` in its own, narrower dtype for the backward.

    The plain path saves the upcast copy: on a bf16 base every fp32 adapter would hold an fp32 copy of its layer's
    input until the backward (twice the bytes of the input, and one copy per adapted layer where q, k and v share a
    single bf16 input). The upcast is exact, so the gradients are the plain path's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight


def low_rank_output(x: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """``second · (first · x)`` in the factors' dtype (fp32), for ``x`` of any dtype; an ``x`` narrower than the
    factors is kept narrow for the backward (:class:`_UpcastLinear`); an ``x`` as wide takes the plain path, and so
    does autocast (it casts the factors down, and saves narrow copies itself)."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if x.element_size() >= first.element_size() or not torch.is_grad_enabled() or autocast:
        return F.linear(F.linear(x.to(first.dtype), first), second)
    return F.linear(_UpcastLinear.apply(x, first), second)


class AdapterLayer(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ΔW of shape ``(d_out, d_in)``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"Adapters wrap nn.Linear or Conv1D layers, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.out_features, self.in_features = linear_shape(base_layer)
        self.merged = False
        self.disabled = False
        self.quantized_base = is_quantized(base_layer)

    def delta_weight(self) -> Tensor:
        """ΔW as a dense ``(d_out, d_in)`` matrix (used by merge and export)."""
        raise NotImplementedError

    @property
    def scaling(self) -> float:
        """The constant factor of ΔW (α / r for LoRA, α / r_init for SVD adapters)."""
        raise NotImplementedError

    def unscaled_output(self, x: Tensor) -> Tensor:
        """ΔW x / scaling, computed through the low-rank factors without forming ΔW."""
        raise NotImplementedError

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """The update as plain LoRA factors ``(A (k × d_in), B (d_out × k), scaling)`` with ΔW = scaling · B A,
        keeping only the ``k`` ranks in use (the form PEFT's LoRA format stores)."""
        raise NotImplementedError

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if not name.startswith("base_layer."))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        delta = self.unscaled_output(x).to(out.dtype)  # the adapter computes in its own dtype (fp32)
        if self.quantized_base:  # bitsandbytes may return a view from its autograd Function: no in-place add
            return torch.add(out, delta, alpha=self.scaling)
        # One in-place scaled add: neither the base layer's backward nor the addition's needs ``out``, so this
        # saves an activation-sized multiply and allocation per adapted layer and step.
        return out.add_(delta, alpha=self.scaling)

    @torch.no_grad()
    def _add_to_base(self, sign: float) -> None:
        check_mergeable(self.base_layer)
        delta = self.delta_weight()
        weight = self.base_layer.weight
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        weight.add_(delta.to(weight.dtype), alpha=sign)

    def merge(self) -> None:
        """Write ΔW into the base weight: forward then costs what the base layer costs."""
        if not self.merged:
            self._add_to_base(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-1.0)
            self.merged = False


def _target_matcher(target_modules: str | list[str]) -> Callable[[str], bool]:
    """A string is a regex matched against the whole module name, a list holds name suffixes (PEFT's rule)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return lambda name: name.rsplit(".", 1)[-1] not in OUTPUT_LAYER_NAMES
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = tuple(target_modules)
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


def _describe_linear_names(names: list[str]) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    return f"linear layers in this backbone end with: {suffixes} (e.g. '{names[0]}')" if names else "none"


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the linear layers selected by ``target_modules``; a clear error for names that match nothing."""
    if not target_modules:
        raise ValueError("target_modules is empty: name the linear layers to adapt, or use 'all-linear'.")
    names = linear_module_names(model)
    matches = _target_matcher(target_modules)
    selected = [name for name in names if matches(name)]
    if not isinstance(target_modules, str):
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ValueError(f"target_modules {unmatched} match no linear layer; {_describe_linear_names(names)}.")
    if not selected:
        raise ValueError(f"target_modules {target_modules!r} matches no linear layer; {_describe_linear_names(names)}.")
    return selected


def inject_adapters(
    model: nn.Module, target_modules: str | list[str], make_adapter: Callable[[str, nn.Module], AdapterLayer]
) -> dict[str, AdapterLayer]:
    """Replace each targeted linear layer by ``make_adapter(name, layer)``; returns the adapters by name."""
    adapters = {}
    for name in find_targets(model, target_modules):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = make_adapter(name, getattr(parent, child_name))
        setattr(parent, child_name, adapter)
        adapters[name] = adapter
    return adapters


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def find_classifier_head(model: nn.Module) -> list[str]:
    """Top-level heads that ``transformers`` initialises fresh for sequence classification."""
    return [name for name, _ in model.named_children() if name in CLASSIFIER_HEAD_NAMES]


def set_trainable(model: nn.Module, modules_to_save: list[str] = ()) -> None:
    """Freeze everything but adapter factors and the (fully trained) ``modules_to_save``."""
    model.requires_grad_(False)
    for adapter in adapter_layers(model).values():
        for parameter in adapter.adapter_parameters():
            parameter.requires_grad_(True)
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)


def adapter_state_keys(model: nn.Module, modules_to_save: list[str] = ()) -> list[str]:
    """State-dict keys that belong to adapters (parameters and buffers such as rank masks) or to saved modules."""
    adapter_prefixes = tuple(f"{name}." for name in adapter_layers(model))
    base_prefixes = tuple(f"{name}.base_layer." for name in adapter_layers(model))
    saved_prefixes = tuple(f"{name}." for name in modules_to_save)
    return [
        key
        for key in model.state_dict()
        if (key.startswith(adapter_prefixes) and not key.startswith(base_prefixes)) or key.startswith(saved_prefixes)
    ]


def adapter_state_dict(model: nn.Module, modules_to_save: list[str] = ()) -> dict[str, Tensor]:
    state = model.state_dict()
    return {key: state[key] for key in adapter_state_keys(model, modules_to_save)}


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the frozen backbone alone inside the block (adapters stay in place, untouched)."""
    layers = list(adapter_layers(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


def merge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def unload_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter by its base layer (merged into it first unless ``merge=False``)."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    return model
