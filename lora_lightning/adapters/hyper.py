"""HyperAdaLoRA's factor generator (METHODS.md §4, our reading): an attention hypernetwork that generates the
factors of SVD (P, Λ, Q) or LoRA (A, B) adapters, once per optimiser step, independent of the input batch.

::

    base factors of one matrix          tokens (r × d)                     generated factor
    P̄ (d_out × r) ── columns ──► in_proj[d_out] + rank_emb[i] + matrix_emb ─► encoder layer ─► out_proj[d_out] ─► P̄ + ΔP
    Λ̄ (r)          ── scalars ──► in_proj[1]     + …                        ─► (MHA over r  ─► out_proj[1]     ─► Λ̄ + ΔΛ
    Q̄ (r × d_in)   ── rows    ──► in_proj[d_in]  + …                        ─►  tokens, MLP) ─► out_proj[d_in]  ─► Q̄ + ΔQ

* One :class:`FactorGenerator` per factor kind (P, Λ, Q; A, B for LoRA); projections shared among matrices of the
  same dimension, the encoder layer among all matrices. Output projections start at zero: at step 0 the model
  equals AdaLoRA (or LoRA) with the same base factors.
* Modes: ``residual`` (base factors and generators trained), ``recurrent`` (base ← generated after each step),
  ``seeded`` (frozen random base). The mask of an SVD adapter multiplies the *generated* Λ.
* Options (issue 13): ``tokens="triplet"`` (:class:`TripletGenerator`: token i is the whole triplet), ``scaling``
  (``gains``: per-matrix output gains; ``grad_rms``: per-matrix RMS-normalised gradient into the generator), and
  :meth:`AdapterHypernet.fold` (base ← generated, generators out of the step). Diagnostics: hyper_diagnostics.py.
* Generation is batched per factor kind and dimension and cached until a parameter changes (tensor versions) or a
  backward consumed its graph; generated tensors' gradients accumulate over a step's micro-batches for importance.
  Why, and the modes in full: docs/hyperadalora.md. Nothing here imports Lightning.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lora_lightning.adapters.base import AdapterLayer, adapter_layers, low_rank_output
from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.adapters.names import module_position
from lora_lightning.adapters.svd import SVDLinear

MODES = ("residual", "recurrent", "seeded")
TOKENS = ("factor", "triplet")
SCALINGS = ("none", "gains", "grad_rms")


class FactorGenerator(nn.Module):
    """Maps the r rank tokens of each matrix (``(n, r, d)``) to an increment of the same shape.

    Args:
        dims: token sizes it will see (one shared input/output projection per size).
        max_rank: longest token sequence (rank-position embeddings).
        num_layers / num_types: sizes of the matrix-embedding tables.
    """

    def __init__(self, dims: Iterable[int], max_rank: int, num_layers: int, num_types: int,
                 hidden: int = 64, heads: int = 4, ff_mult: int = 2) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hypernet hidden size {hidden} is not divisible by its {heads} heads.")
        dims = sorted(set(dims))
        self.in_proj = nn.ModuleDict({str(d): nn.Linear(d, hidden) for d in dims})
        self.out_proj = nn.ModuleDict({str(d): nn.Linear(hidden, d) for d in dims})
        for proj in self.out_proj.values():  # zero: step 0 equals the base adapter
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.rank_embedding = nn.Parameter(torch.randn(max_rank, hidden) * 0.02)
        self.layer_embedding = nn.Embedding(num_layers, hidden)
        self.type_embedding = nn.Embedding(num_types, hidden)
        nn.init.normal_(self.layer_embedding.weight, std=0.02)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        # Pre-norm self-attention over the r rank tokens, then an MLP; no dropout (generation is deterministic).
        # In eval mode without grad PyTorch runs its fused "fast path" for this layer: the same function, equal to
        # the training path up to float rounding (2e-7 measured), so eval-time factors may differ from train-time
        # ones in the last bits.
        self.block = nn.TransformerEncoderLayer(hidden, heads, ff_mult * hidden, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(hidden)

    def encode(self, tokens: Tensor, layer_ids: Tensor, type_ids: Tensor) -> Tensor:
        """The encoder input ``(n, r, hidden)``: projected tokens plus rank, layer and type embeddings."""
        x = self.in_proj[str(tokens.shape[-1])](tokens) + self.rank_embedding[:tokens.shape[1]]
        return x + (self.layer_embedding(layer_ids) + self.type_embedding(type_ids)).unsqueeze(1)

    def features(self, x: Tensor) -> Tensor:
        """What the output projection reads: the encoder layer's output, normalised."""
        return self.norm(self.block(x))

    def forward(self, tokens: Tensor, layer_ids: Tensor, type_ids: Tensor) -> Tensor:
        return self.out_proj[str(tokens.shape[-1])](self.features(self.encode(tokens, layer_ids, type_ids)))


class TripletGenerator(FactorGenerator):
    """A generator whose rank token i holds the whole triplet of a matrix: P̄'s column i, λ̄ᵢ and Q̄'s row i (A's row
    and B's column for LoRA), concatenated and projected *without a bias* (a shared bias makes the tokens of a
    matrix equal while Λ̄ = 0); its rank-position embedding starts with the energy of the layer and type
    embeddings together. It is called with the tuple of every factor's tokens ``((n, r, d_k), ...)`` and
    returns the increment of factor ``output`` (its index in that tuple).

    Args:
        layouts: the token sizes ``(d_1, ..., d_k)`` of the matrices it will see (one input projection each).
        output: which factor of the tuple it generates.
        (the rest: :class:`FactorGenerator`)
    """

    def __init__(self, layouts: Iterable[tuple[int, ...]], output: int, max_rank: int, num_layers: int,
                 num_types: int, hidden: int = 64, heads: int = 4, ff_mult: int = 2) -> None:
        layouts = sorted(set(layouts))
        super().__init__({dims[output] for dims in layouts}, max_rank, num_layers, num_types, hidden, heads, ff_mult)
        self.output = output
        self.in_proj = nn.ModuleDict({self.layout_key(d): nn.Linear(sum(d), hidden, bias=False) for d in layouts})
        with torch.no_grad():  # rank-position energy = layer + type energy: a matrix's tokens differ as matrices do
            self.rank_embedding.mul_(2 ** 0.5)

    @staticmethod
    def layout_key(dims: tuple[int, ...]) -> str:
        return "x".join(map(str, dims))

    def encode(self, tokens: tuple[Tensor, ...], layer_ids: Tensor, type_ids: Tensor) -> Tensor:
        key = self.layout_key(tuple(t.shape[-1] for t in tokens))
        x = self.in_proj[key](torch.cat(tokens, dim=-1)) + self.rank_embedding[:tokens[0].shape[1]]
        return x + (self.layer_embedding(layer_ids) + self.type_embedding(type_ids)).unsqueeze(1)

    def forward(self, tokens: tuple[Tensor, ...], layer_ids: Tensor, type_ids: Tensor) -> Tensor:
        out = self.out_proj[str(tokens[self.output].shape[-1])]
        return out(self.features(self.encode(tokens, layer_ids, type_ids)))


class _NormalizeGradPerMatrix(torch.autograd.Function):
    """Identity forward; backward divides each matrix's gradient ``(r, d)`` by its RMS, so every matrix reaches
    the shared generator with the same gradient scale."""

    @staticmethod
    def forward(ctx, delta: Tensor) -> Tensor:
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        rms = grad.pow(2).mean(dim=tuple(range(1, grad.dim())), keepdim=True).sqrt()
        return grad / rms.clamp_min(torch.finfo(grad.dtype).tiny)


# ---------------------------------------------------------------------------------------------- adapter layers
class HyperMixin:
    """What a generated adapter layer shares: the factor names it generates, their token layout, and a link to
    the :class:`AdapterHypernet` that generates them (a plain reference, not a submodule: the hypernet is
    registered once, by its owner, so its weights appear once in state dicts and optimisers)."""

    GENERATED: tuple[str, ...] = ()
    _hypernet: "AdapterHypernet | None" = None

    def to_tokens(self, name: str, factor: Tensor) -> Tensor:
        """``(r, d)``: one token per rank component."""
        raise NotImplementedError

    def from_tokens(self, name: str, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def generated(self) -> dict[str, Tensor]:
        """The generated factors (raw: no mask); the base factors when no hypernet is attached."""
        if self._hypernet is None:
            return {name: getattr(self, name) for name in self.GENERATED}
        return self._hypernet.generated(self)


class HyperSVDLinear(HyperMixin, SVDLinear):
    """An SVD adapter whose P, Λ, Q come from an :class:`AdapterHypernet`; ``lora_P/lora_lambda/lora_Q`` are the
    base factors P̄, Λ̄, Q̄ (parameters in ``residual`` mode, buffers otherwise). The rank mask multiplies the
    generated Λ."""

    GENERATED = ("lora_P", "lora_lambda", "lora_Q")

    def to_tokens(self, name: str, factor: Tensor) -> Tensor:
        return {"lora_P": lambda t: t.T, "lora_lambda": lambda t: t.unsqueeze(1), "lora_Q": lambda t: t}[name](factor)

    def from_tokens(self, name: str, tokens: Tensor) -> Tensor:
        return {"lora_P": lambda t: t.T, "lora_lambda": lambda t: t.squeeze(1), "lora_Q": lambda t: t}[name](tokens)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        g = self.generated()
        return g["lora_P"], g["lora_lambda"] * self.rank_mask, g["lora_Q"]


class HyperLoRALinear(HyperMixin, LoRALinear):
    """A LoRA adapter whose A and B come from an :class:`AdapterHypernet` (B̄ = 0 and zero output projections:
    the layer equals its base layer at step 0, as LoRA)."""

    GENERATED = ("lora_A", "lora_B")

    def to_tokens(self, name: str, factor: Tensor) -> Tensor:
        return factor if name == "lora_A" else factor.T

    def from_tokens(self, name: str, tokens: Tensor) -> Tensor:
        return tokens if name == "lora_A" else tokens.T

    def delta_weight(self) -> Tensor:
        g = self.generated()
        return (g["lora_B"] @ g["lora_A"]) * self.scaling

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        g = self.generated()
        return g["lora_A"], g["lora_B"], self.scaling

    def unscaled_output(self, x: Tensor) -> Tensor:
        g = self.generated()
        return low_rank_output(self.dropout(x), g["lora_A"], g["lora_B"])


# ---------------------------------------------------------------------------------------------- the hypernetwork
class AdapterHypernet(nn.Module):
    """Generators for every factor kind of a set of :class:`HyperMixin` layers, with the generation cache.

    Build it after injection (``AdapterHypernet(adapter_layers(model), mode=...)``) and register it next to the
    model (as the Lightning modules do) so it moves, trains and saves with it. In ``recurrent`` and ``seeded``
    modes the layers' base factors are turned into buffers here, before any optimiser holds them.

    Extension point: ``generators[factor_name]`` may be any ``nn.Module`` called as
    ``generator(tokens (n, r, d), layer_ids (n,), type_ids (n,)) -> increment (n, r, d)`` (``d`` is one of the token
    sizes of that factor; its dtype is that of the module's first parameter). Replace it right after building the
    hypernet, before an optimiser exists (e.g. in a ``HyperAdaLoRAModule`` subclass's ``__init__``); start it at a
    zero output to keep "step 0 equals AdaLoRA". See docs/extending.md.
    """

    def __init__(self, layers: dict[str, HyperMixin], mode: str = "residual", hidden: int = 64, heads: int = 4,
                 ff_mult: int = 2, tokens: str = "factor", scaling: str = "none") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Unknown hypernet mode '{mode}'; choose one of {list(MODES)}.")
        if tokens not in TOKENS:
            raise ValueError(f"Unknown hypernet tokens '{tokens}'; choose one of {list(TOKENS)}.")
        if scaling not in SCALINGS:
            raise ValueError(f"Unknown hypernet scaling '{scaling}'; choose one of {list(SCALINGS)}.")
        layers = {name: layer for name, layer in layers.items() if isinstance(layer, HyperMixin)}
        if not layers:
            raise ValueError("AdapterHypernet needs at least one HyperSVDLinear or HyperLoRALinear layer.")
        kinds = {type(layer).GENERATED for layer in layers.values()}
        if len(kinds) != 1:
            raise ValueError(f"All generated layers must be of one kind, got factor sets {sorted(kinds)}.")
        self.mode = mode
        self.factor_names = kinds.pop()
        self.layer_names = list(layers)
        self._layers = list(layers.values())  # plain list: the layers belong to the backbone, not to us
        positions = [module_position(name) for name in self.layer_names]
        layers_of = [-1 if p.layer is None else p.layer for p in positions]  # -1: outside the numbered layers
        layer_vocab, type_vocab = sorted(set(layers_of)), sorted({p.kind for p in positions})
        self.register_buffer("layer_ids", torch.tensor([layer_vocab.index(i) for i in layers_of]), persistent=False)
        self.register_buffer("type_ids", torch.tensor([type_vocab.index(p.kind) for p in positions]), persistent=False)
        self.tokens, self.scaling = tokens, scaling
        self.generators = nn.ModuleDict()
        sizes = [tuple(layer.to_tokens(f, getattr(layer, f)).shape for f in self.factor_names) for layer in self._layers]
        max_rank, vocab = max(s[0][0] for s in sizes), (len(layer_vocab), len(type_vocab))
        for k, fname in enumerate(self.factor_names):
            if tokens == "triplet":
                layouts = {tuple(shape[1] for shape in s) for s in sizes}
                self.generators[fname] = TripletGenerator(layouts, k, max_rank, *vocab, hidden, heads, ff_mult)
            else:
                self.generators[fname] = FactorGenerator({s[k][1] for s in sizes}, max_rank, *vocab, hidden, heads,
                                                         ff_mult)
        # gains: one learnable output gain per matrix and factor kind (1 at the start)
        self.gains = nn.ParameterDict({f: nn.Parameter(torch.ones(len(self._layers))) for f in self.factor_names}
                                      if scaling == "gains" else {})
        if mode != "residual":
            for layer in self._layers:
                for fname in self.factor_names:
                    value = getattr(layer, fname).detach().clone()
                    delattr(layer, fname)
                    layer.register_buffer(fname, value)
        for i, layer in enumerate(self._layers):  # plain attributes: they survive pickling (ddp_spawn) and deepcopy
            object.__setattr__(layer, "_hypernet", self)
            object.__setattr__(layer, "_hypernet_index", i)
        self.folded = False  # see ``fold``
        self._train_cache: dict | None = None
        self._eval_cache: dict | None = None
        self._grad_key: tuple | None = None
        self.generated_grads: list[dict[str, Tensor]] = [{} for _ in self._layers]

    @property
    def layers(self) -> list[HyperMixin]:
        return list(self._layers)

    def base_factors(self) -> list[dict[str, Tensor]]:
        return [{f: getattr(layer, f) for f in self.factor_names} for layer in self._layers]

    # ------------------------------------------------------------------ generation
    def _state_key(self) -> tuple:
        tensors = list(self.parameters()) + [t for d in self.base_factors() for t in d.values()]
        return tuple((id(t), t._version) for t in tensors)

    def _groups(self, fname: str) -> Iterable[tuple[list[int], Tensor, Tensor | tuple[Tensor, ...]]]:
        """Per group of matrices with equal token shapes: their indices, their ``fname`` tokens (the base factor)
        and the generator's input (those tokens, or the tuple of every factor's tokens in ``triplet`` mode), in the
        generator's dtype."""
        tokens = [{f: layer.to_tokens(f, t) for f, t in base.items()}
                  for layer, base in zip(self._layers, self.base_factors())]
        names = self.factor_names if self.tokens == "triplet" else (fname,)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tokens):
            groups.setdefault(tuple(t[f].shape for f in names), []).append(i)
        first = next(self.generators[fname].parameters(), None)
        for members in groups.values():
            stacked = {f: torch.stack([tokens[i][f] for i in members]) for f in names}
            dtype = stacked[fname].dtype if first is None else first.dtype
            inputs = tuple(stacked[f].to(dtype) for f in names)
            yield members, stacked[fname], inputs if self.tokens == "triplet" else inputs[0]

    def _generate(self) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = [{} for _ in self._layers]
        for fname, generator in self.generators.items():
            for members, own, inputs in self._groups(fname):
                ids = torch.tensor(members, device=self.layer_ids.device)
                delta = generator(inputs, self.layer_ids[ids], self.type_ids[ids])
                if self.scaling == "gains":
                    delta = delta * self.gains[fname][ids].view(-1, *[1] * (delta.dim() - 1))
                elif self.scaling == "grad_rms":
                    delta = _NormalizeGradPerMatrix.apply(delta)
                result = own + delta.to(own.dtype)
                for j, i in enumerate(members):
                    out[i][fname] = self._layers[i].from_tokens(fname, result[j])
        return out

    @torch.no_grad()
    def encoder_inputs(self) -> dict[str, list[tuple[list[int], Tensor, Tensor]]]:
        """Per factor kind, per group of matrices: their indices, the generator's encoder input ``(n, r, hidden)``
        and the features its output projection reads (diagnostics; :class:`FactorGenerator` generators only)."""
        result = {}
        for fname, generator in self.generators.items():
            result[fname] = []
            for members, _, inputs in self._groups(fname):
                ids = torch.tensor(members, device=self.layer_ids.device)
                x = generator.encode(inputs, self.layer_ids[ids], self.type_ids[ids])
                result[fname].append((members, x, generator.features(x)))
        return result

    def _accumulate(self, cache: dict, index: int, fname: str):
        def hook(grad: Tensor) -> None:
            cache["consumed"] = True
            cache["grads_seen"] += 1
            store = self.generated_grads[index]
            store[fname] = grad.detach().clone() if fname not in store else store[fname] + grad.detach()
        return hook

    def generate(self) -> list[dict[str, Tensor]]:
        """Generated factors of every layer (cached, see the module docstring)."""
        key = self._state_key()
        if not torch.is_grad_enabled():
            if self._eval_cache is None or self._eval_cache["key"] != key:
                self._eval_cache = {"key": key, "factors": [{k: v.detach() for k, v in d.items()} for d in self._generate()]}
            return self._eval_cache["factors"]
        cache = self._train_cache
        # pinned: reused until its backward has delivered the gradient of every generated tensor (see ``pin``)
        in_backward = cache is not None and cache["pinned"] and cache["grads_seen"] < cache["hooked"]
        if cache is None or cache["key"] != key or (cache["consumed"] and not in_backward):
            if self._grad_key != key:  # a new optimiser step: its gradients start from zero
                self.zero_generated_grads()
                self._grad_key = key
            cache = {"key": key, "factors": self._generate(), "consumed": False, "pinned": False, "grads_seen": 0}
            hooked = [(i, fname, t) for i, d in enumerate(cache["factors"]) for fname, t in d.items()
                      if t.requires_grad]
            for i, fname, t in hooked:
                t.register_hook(self._accumulate(cache, i, fname))
            cache["hooked"] = len(hooked)
            self._train_cache = cache
        return self._train_cache["factors"]

    def pin(self) -> None:
        """Generate now (grad mode), for one forward and its backward: every read returns these tensors until that
        backward has delivered the gradient of each of them (or the next ``pin``, or a parameter change), even
        after part of it has arrived. Call it outside the backbone (the Lightning modules do, at the start of each
        training forward): activation checkpointing then recomputes a block with the very tensors of the original
        forward, never regenerating them inside the checkpointed region, and their gradients (importance) are
        accumulated once."""
        if self._train_cache is not None:
            self._train_cache["pinned"] = False
        self.generate()
        self._train_cache["pinned"] = True

    def generated(self, layer: HyperMixin) -> dict[str, Tensor]:
        if self.folded:
            return {fname: getattr(layer, fname) for fname in self.factor_names}
        return self.generate()[layer._hypernet_index]

    def zero_generated_grads(self) -> None:
        self.generated_grads = [{} for _ in self._layers]

    def invalidate(self) -> None:
        """Drop the caches (e.g. after replacing tensors outside in-place updates)."""
        self._train_cache = self._eval_cache = None

    # ------------------------------------------------------------------ training-loop hooks
    @torch.no_grad()
    def recurrent_update(self) -> None:
        """``recurrent`` mode, after an optimiser step: base factors ← the factors this step generated (detached).
        A no-op in other modes or before any training forward."""
        if self.mode != "recurrent" or self._train_cache is None:
            return
        for layer, factors in zip(self._layers, self._train_cache["factors"]):
            for fname, value in factors.items():
                getattr(layer, fname).copy_(value.detach())
        self._train_cache = None

    @torch.no_grad()
    def fold(self) -> None:
        """``residual`` mode: base factors ← the current generated factors (P̄ ← P̄ + G(P̄), ...); from then on every
        layer reads its base factors and the generators get no gradient (an optimiser skips them). The layer
        outputs are unchanged. One way; ``folded`` is the module's checkpoint content."""
        if self.mode != "residual":
            raise ValueError(f"fold() writes into trainable base factors: mode='residual' only, not '{self.mode}'.")
        if self.folded:
            return
        with torch.enable_grad():  # the training path (the eval fast path may differ in the last bits)
            factors = self._generate()
        for layer, generated in zip(self._layers, factors):
            for fname, value in generated.items():
                getattr(layer, fname).copy_(value.detach())
        self.folded = True
        self.invalidate()
        self.zero_generated_grads()

    @torch.no_grad()
    def materialize(self, model: nn.Module) -> nn.Module:
        """Replace every generated layer of ``model`` by a plain :class:`SVDLinear` / :class:`LoRALinear` holding
        the current generated factors (and rank mask): export and merge then work as for AdaLoRA / LoRA."""
        for name, layer in adapter_layers(model).items():
            if not isinstance(layer, HyperMixin) or layer._hypernet is not self:
                continue
            factors = self.generated(layer)
            plain = materialized_layer(layer, factors)
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name, plain)
        return model

    def __getstate__(self) -> dict:
        # Caches hold graph tensors, which neither pickle (ddp_spawn) nor deepcopy (merged export) accept.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_train_cache": None, "_eval_cache": None, "_grad_key": None,
                "generated_grads": [{} for _ in self._layers]}

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, tokens={self.tokens}, scaling={self.scaling}, matrices={len(self._layers)}, "
                f"factors={list(self.factor_names)}, folded={self.folded}")


def materialized_layer(layer: HyperMixin, factors: dict[str, Tensor]) -> AdapterLayer:
    """A plain adapter equal to ``layer`` with its factors frozen to ``factors`` (same base layer object)."""
    if isinstance(layer, HyperSVDLinear):
        plain = SVDLinear(layer.base_layer, layer.max_rank, layer.alpha)
        plain.rank_mask.copy_(layer.rank_mask)
    elif isinstance(layer, HyperLoRALinear):
        plain = LoRALinear(layer.base_layer, layer.rank, layer.alpha)
    else:
        raise TypeError(f"Cannot materialise {type(layer).__name__}.")
    plain.dropout = layer.dropout
    for fname, value in factors.items():
        getattr(plain, fname).data.copy_(value.detach())
    plain.merged, plain.disabled = layer.merged, layer.disabled
    return plain
