"""Step-0 diagnostics of an :class:`~lora_lightning.adapters.hyper.AdapterHypernet`'s generators (issue 13).

* **Token-specific share**: of the energy of a generator's encoder input (its rank tokens after projection and
  embeddings), the share that differs between tokens: ``Σ‖x − x̄‖² / Σ‖x‖²`` with ``x̄`` the mean token of the
  generator (``token_share``) or of each matrix (``within_matrix_share``). Near 0, the generator sees one token
  repeated and can only move its outputs together.
* **Gradient span share**: a first step on a generator's output projection changes the generated tokens by
  ``[F 1] Wᵀ`` (``F``: the features it reads, one row per token; one projection per token size), so it can follow
  only the part of ∂L/∂(generated factor) inside the span of ``[F 1]``. ``span_share`` is that part's share of the
  gradient's energy; ``random_share`` its expectation for a random subspace of the same dimension (rank / tokens
  per token size, pooled by gradient energy). Both are ``None`` where the gradient is 0 (P and Q at AdaLoRA's
  init, Λ = 0).

Plain torch; call :func:`generator_diagnostics` after one or more backward passes and before an optimiser step
(``hypernet.generated_grads`` then holds ∂L/∂(generated factors) summed over those passes).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lora_lightning.adapters.hyper import AdapterHypernet


def deviation_energy(x: Tensor, dims: tuple[int, ...]) -> tuple[float, float]:
    """``(Σ‖x − mean over dims‖², Σ‖x‖²)`` in float64."""
    x = x.double()
    return float((x - x.mean(dim=dims, keepdim=True)).pow(2).sum()), float(x.pow(2).sum())


def projected_share(grad: Tensor, basis: Tensor) -> float:
    """``‖Π grad‖² / ‖grad‖²``, Π the orthogonal projection onto the column span of ``basis`` (rows: tokens)."""
    q, _ = torch.linalg.qr(basis.double())
    rank = int(torch.linalg.matrix_rank(basis.double()))
    q = q[:, :rank]
    grad = grad.double()
    total = float(grad.pow(2).sum())
    return float((q.T @ grad).pow(2).sum()) / total if total > 0 else 0.0


def generator_diagnostics(hypernet: AdapterHypernet) -> dict[str, dict[str, float | None]]:
    """Per factor kind: ``token_share``, ``within_matrix_share``, ``span_share``, ``random_share`` (module
    docstring); the share numbers pool every group of matrices by energy."""
    result = {}
    for fname, groups in hypernet.encoder_inputs().items():
        tokens = torch.cat([x.reshape(-1, x.shape[-1]) for _, x, _ in groups])
        between, total = deviation_energy(tokens, (0,))
        within = [deviation_energy(x, (1,)) for _, x, _ in groups]
        by_size: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # one output projection per token size
        for members, _, features in groups:
            grads = [hypernet.layers[i].to_tokens(fname, hypernet.generated_grads[i][fname]) for i in members]
            grads = torch.stack(grads).reshape(-1, grads[0].shape[-1])
            ones = torch.ones(*features.shape[:2], 1, dtype=features.dtype, device=features.device)
            bases, gs = by_size.setdefault(grads.shape[-1], ([], []))
            bases.append(torch.cat([features, ones], dim=-1).reshape(-1, features.shape[-1] + 1))
            gs.append(grads)
        captured = random = energy = 0.0
        for bases, gs in by_size.values():
            basis, grad = torch.cat(bases).cpu(), torch.cat(gs).cpu()
            e = float(grad.double().pow(2).sum())
            captured += e * projected_share(grad, basis)
            random += e * min(1.0, int(torch.linalg.matrix_rank(basis.double())) / basis.shape[0])
            energy += e
        result[fname] = {
            "token_share": between / total,
            "within_matrix_share": sum(w for w, _ in within) / sum(t for _, t in within),
            "span_share": captured / energy if energy else None,
            "random_share": random / energy if energy else None,
        }
    return result
