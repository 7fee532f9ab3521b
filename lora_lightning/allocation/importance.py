"""AdaLoRA's importance: sensitivity × uncertainty, smoothed per entry, summed into triplet scores (METHODS.md §2).

For every entry w of P, Λ and Q, after each optimiser step (post-step values, that step's gradient):

    I = |w · ∂L/∂w|,   Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   s = Ī · Ū

and the score of triplet i of a matrix is ``S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.

The unit of allocation is a :class:`RankUnit`: the ``(P, Λ, Q)`` tensors of one adapted matrix plus the 0/1 mask
buffer that decides which of its triplets are kept. Anything that can report rank units can be pruned by
:class:`~lora_lightning.callbacks.RankPruningScheduler` (SVD adapters give their leaf parameters; a hypernetwork
gives the tensors it generated, with retained gradients). Nothing here imports Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FACTOR_NAMES = ("P", "lam", "Q")



def check_betas(beta1: float, beta2: float) -> None:
    """The importance EMA factors must lie in [0, 1)."""
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}.")

@dataclass
class RankUnit:
    """One adapted matrix, as the rank allocator sees it.

    Attributes:
        P: ``(d_out, r)`` left singular vectors.
        lam: ``(r,)`` singular values (unmasked: the raw values, not ``Λ ⊙ m``).
        Q: ``(r, d_in)`` right singular vectors.
        mask: ``(r,)`` float 0/1 buffer; the allocator writes the kept triplets into it in place.
        stored_lam: the stored tensor behind Λ (a parameter or buffer with ``r`` entries) in which pruning acts as
            the paper's truncation (:func:`~lora_lightning.allocation.budget.truncate`): AdaLoRA's Λ itself,
            HyperAdaLoRA's base Λ̄. ``None``: the triplets are only masked.

    ``P``, ``lam`` and ``Q`` must hold, when the allocator runs (right after an optimiser step), the values the
    importance is measured on and, in ``.grad``, the gradient of the step just taken. Leaf parameters do this by
    themselves; generated (non-leaf) tensors must call ``retain_grad()`` in the forward pass and be cached until
    the allocator has run. A ``None`` gradient means "not used in this step": that tensor's state is left as is.
    """

    P: Tensor
    lam: Tensor
    Q: Tensor
    mask: Tensor
    stored_lam: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.mask.numel()

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.P, self.lam, self.Q


class ImportanceTracker:
    """The Ī and Ū exponential moving averages of every entry of every rank unit, in fp32.

    ``update`` takes one optimiser step; a step whose gradients are not all finite is skipped whole (returns
    ``False``), so one overflow never poisons the averages; a ``None`` gradient skips only that tensor.

    This is the extension point for another importance score (``RankPruningScheduler(importance=...)``):
    a subclass overrides ``update(units) -> bool`` (called after every optimiser step outside the final phase;
    ``False`` counts the step as skipped) and/or ``triplet_scores(units) -> {name: (r,) tensor}`` (higher is kept;
    must give the same numbers on every DDP rank, e.g. computed from all-reduced gradients). Keep every state the
    scores depend on in ``state_dict`` / ``load_state_dict`` so that a resumed run scores as an uninterrupted one.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        check_betas(beta1, beta2)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.exp_avg_ipt: dict[str, Tensor] = {}  # Ī, keyed "<unit>.<P|lam|Q>"
        self.exp_avg_unc: dict[str, Tensor] = {}  # Ū

    @torch.no_grad()
    def update(self, units: dict[str, RankUnit]) -> bool:
        keys, values, grads = [], [], []
        for name, unit in units.items():
            for factor, tensor in zip(FACTOR_NAMES, unit.factors()):
                if tensor.grad is not None:
                    keys.append(f"{name}.{factor}")
                    values.append(tensor.detach().float())
                    grads.append(tensor.grad.detach().float())
        if not keys:
            return False
        ipt = torch._foreach_mul(values, grads)
        torch._foreach_abs_(ipt)
        # One reduction for the whole step: skip it entirely if any entry is inf/nan (max propagates both).
        if hasattr(torch, "_foreach_max"):
            peaks = torch.stack(torch._foreach_max(ipt))
        else:  # older torch
            peaks = torch.stack([t.max() for t in ipt])
        if not bool(torch.isfinite(peaks).all()):
            return False
        for key, t in zip(keys, ipt):
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(t)
                self.exp_avg_unc[key] = torch.zeros_like(t)
            elif self.exp_avg_ipt[key].device != t.device:
                self.exp_avg_ipt[key] = self.exp_avg_ipt[key].to(t.device)
                self.exp_avg_unc[key] = self.exp_avg_unc[key].to(t.device)
        ibar = [self.exp_avg_ipt[k] for k in keys]
        ubar = [self.exp_avg_unc[k] for k in keys]
        # Ī ← β1 Ī + (1 − β1) I   (written as PEFT writes it, so scores match it to the last bit)
        torch._foreach_mul_(ibar, self.beta1)
        torch._foreach_add_(ibar, torch._foreach_mul(ipt, 1.0 - self.beta1))
        # Ū ← β2 Ū + (1 − β2) |I − Ī|
        diff = torch._foreach_sub(ipt, ibar)
        torch._foreach_abs_(diff)
        torch._foreach_mul_(diff, 1.0 - self.beta2)
        torch._foreach_mul_(ubar, self.beta2)
        torch._foreach_add_(ubar, diff)
        return True

    def element_score(self, key: str) -> Tensor | None:
        if key not in self.exp_avg_ipt:
            return None
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self, units: dict[str, RankUnit]) -> dict[str, Tensor]:
        """``S_i`` per unit, shape ``(r,)``; tensors never seen with a gradient score 0."""
        scores = {}
        for name, unit in units.items():
            s_lam = self.element_score(f"{name}.lam")
            s_p = self.element_score(f"{name}.P")
            s_q = self.element_score(f"{name}.Q")
            zeros = torch.zeros(unit.rank, device=unit.mask.device)
            s_lam = zeros if s_lam is None else s_lam.view(-1)
            mean_q = zeros if s_q is None else s_q.mean(dim=1)
            mean_p = zeros if s_p is None else s_p.mean(dim=0)
            scores[name] = s_lam + (mean_q + mean_p)
        return scores

    def state_dict(self) -> dict:
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            "exp_avg_ipt": {k: v.detach().cpu().clone() for k, v in self.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.detach().cpu().clone() for k, v in self.exp_avg_unc.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg_ipt = {k: v.float().clone() for k, v in state["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: v.float().clone() for k, v in state["exp_avg_unc"].items()}


def orthogonal_regularizer(units: dict[str, RankUnit] | list[tuple[Tensor, Tensor]]) -> Tensor:
    """``Σ_k (‖P_kᵀP_k − I‖_F + ‖Q_k Q_kᵀ − I‖_F) / (2n)`` with the unsquared norm, as PEFT and the authors' code."""
    pairs = [(u.P, u.Q) for u in units.values()] if isinstance(units, dict) else list(units)
    pairs = [(full_tensor(p), full_tensor(q)) for p, q in pairs]
    # Matrices of one shape are stacked and done in one batched product (a handful of kernels, not 2n).
    groups: dict[tuple, list[Tensor]] = {}
    for p, q in pairs:
        groups.setdefault(("P", tuple(p.shape), p.dtype, p.device), []).append(p)
        groups.setdefault(("Q", tuple(q.shape), q.dtype, q.device), []).append(q.T)
    total = 0.0
    for (_, shape, dtype, device), mats in groups.items():
        stacked = torch.stack(mats)  # (k, d, r): PᵀP and (Qᵀ)ᵀQᵀ = QQᵀ are both Mᵀ M
        gram = stacked.transpose(1, 2) @ stacked
        eye = torch.eye(gram.shape[-1], device=device, dtype=dtype)
        total = total + torch.linalg.matrix_norm(gram - eye).sum()
    return total / (2 * len(pairs))


def full_tensor(tensor: Tensor) -> Tensor:
    """A sharded (FSDP2 DTensor) factor gathered whole, differentiably: each process computes the same regulariser
    and its gradient flows back to its own shard. Any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
