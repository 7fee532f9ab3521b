"""Generator diagnostics (issue 13): energies and projections against hand-computed values on constructed cases."""
from __future__ import annotations

import pytest
import torch

from lora_lightning.adapters.base import adapter_layers
from lora_lightning.adapters.hyper_diagnostics import deviation_energy, generator_diagnostics, projected_share
from tests.adapters.test_hyper import build


def test_deviation_energy_and_projected_share_by_hand():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert deviation_energy(x, (0,)) == (4.0, 20.0)  # mean (2, 2): four deviations of ±1; 1 + 1 + 9 + 9
    basis = torch.tensor([[2.0], [0.0], [0.0]])  # span of e1
    assert projected_share(torch.tensor([[3.0], [4.0], [0.0]]), basis) == pytest.approx(9 / 25)
    grad = torch.tensor([[3.0, 0.0], [4.0, 1.0], [0.0, 1.0]])
    # span {(a, b, b)}: (3, 4, 0) → (3, 2, 2), energy 17 of 25; (0, 1, 1) lies in it, 2 of 2
    assert projected_share(grad, torch.cat([basis, torch.ones(3, 1)], 1)) == pytest.approx((17 + 2) / 27)


def backward_once(model, hyper) -> None:
    model(torch.randn(5, 8, generator=torch.Generator().manual_seed(2))).pow(2).mean().backward()
    assert hyper.generated_grads[0]  # ∂L/∂(generated factors) recorded


def test_token_shares_of_the_lambda_generator_by_hand():
    """No bias, no embeddings: a Λ token is w·λ̄ᵢ, so the shares are those of the λ̄ values themselves."""
    model, hyper, _ = build("svd")
    generator = hyper.generators["lora_lambda"]
    with torch.no_grad():
        generator.in_proj["1"].bias.zero_()
        for emb in (generator.rank_embedding, generator.layer_embedding.weight, generator.type_embedding.weight):
            emb.zero_()
    backward_once(model, hyper)
    lam = torch.stack([layer.lora_lambda.detach() for layer in adapter_layers(model).values()]).double()
    expected_between = float((lam - lam.mean()).pow(2).sum() / lam.pow(2).sum())
    expected_within = float((lam - lam.mean(1, keepdim=True)).pow(2).sum() / lam.pow(2).sum())
    shares = generator_diagnostics(hyper)["lora_lambda"]
    assert shares["token_share"] == pytest.approx(expected_between, rel=1e-6)
    assert shares["within_matrix_share"] == pytest.approx(expected_within, rel=1e-6)


def test_default_lambda_tokens_are_nearly_equal_triplet_tokens_are_not():
    """AdaLoRA's Λ̄ = 0: the factor-token Λ generator sees its bias plus small embeddings, the triplet one sees P̄, Q̄."""
    shares = {}
    for tokens in ("factor", "triplet"):
        model, hyper, _ = build("svd", tokens=tokens)
        for layer in adapter_layers(model).values():
            layer.lora_lambda.data.zero_()
        backward_once(model, hyper)
        shares[tokens] = generator_diagnostics(hyper)["lora_lambda"]["within_matrix_share"]
    assert shares["factor"] < 0.05 < 0.3 < shares["triplet"]


def test_span_share_is_one_when_the_features_span_every_token():
    """6 matrices × rank 4 = 24 Λ tokens; with hidden 32 the basis [F 1] has 33 columns: every gradient is in it,
    as in any random subspace of that dimension."""
    model, hyper, _ = build("svd")
    hyper = type(hyper)(adapter_layers(model), hidden=32, heads=2)
    backward_once(model, hyper)
    shares = generator_diagnostics(hyper)["lora_lambda"]
    assert shares["span_share"] == pytest.approx(1.0) and shares["random_share"] == pytest.approx(1.0)


def test_span_share_equals_the_projection_onto_the_generator_features():
    model, hyper, _ = build("svd")
    hyper = type(hyper)(adapter_layers(model), hidden=4, heads=2)  # 5 basis columns for 24 Λ tokens
    backward_once(model, hyper)
    [(members, _, features)] = hyper.encoder_inputs()["lora_lambda"]  # one token size: one group
    grad = torch.stack([hyper.generated_grads[i]["lora_lambda"] for i in members]).reshape(-1, 1)
    basis = torch.cat([features.reshape(-1, 4), torch.ones(24, 1)], 1)
    q, _ = torch.linalg.qr(basis.double())
    expected = float((q.T @ grad.double()).pow(2).sum() / grad.double().pow(2).sum())
    shares = generator_diagnostics(hyper)["lora_lambda"]
    assert shares["span_share"] == pytest.approx(expected, rel=1e-9)
    assert 0 < shares["span_share"] < 1 and shares["random_share"] == pytest.approx(5 / 24)


def test_zero_gradient_has_no_span_share():
    """AdaLoRA's init (Λ̄ = 0): ∂L/∂P = ∂L/∂Q = 0, so there is no share to report."""
    model, hyper, _ = build("svd")
    for layer in adapter_layers(model).values():
        layer.lora_lambda.data.zero_()
    backward_once(model, hyper)
    shares = generator_diagnostics(hyper)
    assert shares["lora_P"]["span_share"] is None and shares["lora_Q"]["random_share"] is None
    assert shares["lora_lambda"]["span_share"] > 0
