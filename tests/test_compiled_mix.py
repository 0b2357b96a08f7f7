"""The compiled fused bank kernel (`BasisBank.compile_mix`) gives the spec's numbers for 16-bit banks."""

from __future__ import annotations

import pytest
import torch

from diffusers_hyperlora.model import bank as bank_module


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_mix_equals_per_linear_reference(predictor, monkeypatch, dtype):
    predictor.to(dtype).requires_grad_(False)  # as in a switch (training keeps the differentiable path)
    bank = predictor.id_bank
    g = torch.Generator().manual_seed(0)
    coefficients = torch.randn(bank.num_linears, 2, bank.num_basis, generator=g)
    eager = bank.lora_weights(coefficients)

    def no_eager(*args, **kwargs):
        raise AssertionError("the compiled kernel was not used")

    bank.compile_mix()
    monkeypatch.setattr(bank_module, "mix_bases", no_eager)
    compiled = bank.lora_weights(coefficients)
    for index, (g_, p) in enumerate(bank.locations):
        reference_down = torch.einsum("k,kir->ri", coefficients[index, 0].double(), bank.down[g_][p].double())
        reference_up = torch.einsum("k,kro->or", coefficients[index, 1].double(), bank.up[g_][p].double())
        down, up = compiled[index]
        assert down.dtype == torch.float32 and down.shape == reference_down.shape
        torch.testing.assert_close(down.double(), reference_down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(up.double(), reference_up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down, eager[index][0], rtol=1e-5, atol=1e-6)


def test_compiled_mix_falls_back_when_compilation_fails(predictor, monkeypatch):
    predictor.to(torch.float16).requires_grad_(False)
    bank = predictor.id_bank
    bank.compile_mix()

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(bank_module._COMPILED_MIX, "kernel", broken)
    coefficients = torch.randn(bank.num_linears, 2, bank.num_basis)
    expected = [(d.clone(), u.clone()) for d, u in bank.lora_weights(coefficients)]
    bank.compile_mix(False)
    plain = bank.lora_weights(coefficients)
    assert len(plain) == bank.num_linears > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, plain, strict=True))
    assert bank_module._COMPILED_MIX["kernel"] is False  # not retried on every switch
