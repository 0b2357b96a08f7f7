"""The fast identity-switch paths compute exactly what the spec's per-linear formula gives."""

from __future__ import annotations

import pytest
import torch

from diffusers_hyperlora.errors import InvalidArgumentError
from diffusers_hyperlora.identities.identity import HyperLoRAIdentity
from diffusers_hyperlora.model.bank import BasisBank, mix_bases


def _identity(predictor, seed: int) -> HyperLoRAIdentity:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(predictor.config.num_tokens, predictor.config.num_basis, generator=g)
    return HyperLoRAIdentity(mean, 1, None, predictor.checkpoint_hash, predictor.probe)


def _reference(predictor, identity) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Spec 3.3 step 5, one einsum per linear, in float64."""
    coefficients = predictor.split_coefficients(identity.id_coefficients).double()
    bank = predictor.id_bank
    out = []
    for index, (g, p) in enumerate(bank.locations):
        down = torch.einsum("k,kir->ri", coefficients[index, 0], bank.down[g][p].double())
        up = torch.einsum("k,kro->or", coefficients[index, 1], bank.up[g][p].double())
        out.append((down, up))
    return out


@pytest.mark.parametrize("chunk", [None, 8, 100, 4096, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mix_bases_streamed_equals_reference(chunk, dtype):
    g = torch.Generator().manual_seed(0)
    bases = torch.randn(5, 16, 12, 3, generator=g).to(dtype)
    coefficients = torch.randn(5, 16, generator=g)
    expected = torch.einsum("gk,gkio->gio", coefficients.double(), bases.double())
    got = mix_bases(coefficients, bases, chunk)
    assert got.dtype == torch.float32 and got.shape == (5, 12, 3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_bank_mix_order_matches_per_linear_einsum(predictor):
    identity = _identity(predictor, 0)
    got = predictor.lora_weights(identity)
    reference = _reference(predictor, identity)
    assert len(reference) == len(predictor.config.linears) > 0
    for (down, up), (ref_down, ref_up) in zip(got, reference, strict=True):
        torch.testing.assert_close(down.double(), ref_down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(up.double(), ref_up, rtol=1e-5, atol=1e-6)
    # Streaming the bank in small chunks gives the same numbers.
    coefficients = predictor.split_coefficients(identity.id_coefficients)
    streamed = predictor.id_bank.lora_weights(coefficients, chunk_elements=64)
    for (down, up), (s_down, s_up) in zip(got, streamed, strict=True):
        torch.testing.assert_close(s_down, down, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s_up, up, rtol=1e-6, atol=1e-7)


def test_bank_rejects_wrong_coefficient_shape(predictor):
    bank: BasisBank = predictor.id_bank
    with pytest.raises(InvalidArgumentError, match="coefficients of shape") as caught:
        bank.mix(torch.zeros(bank.num_linears, 3, bank.num_basis))
    assert caught.value.argument == "coefficients"


def test_switch_writes_reference_factors_into_live_adapters(pipe, predictor):
    pipe.load_hyperlora(predictor)
    for seed in (1, 2):
        identity = _identity(predictor, seed)
        pipe.set_hyperlora_identity(identity)
        live = pipe.hyperlora.adapters.lora_parameters("id")
        assert len(live) == len(predictor.config.linears) > 0
        for (a, b), (ref_down, ref_up) in zip(live, _reference(predictor, identity), strict=True):
            torch.testing.assert_close(a.double(), ref_down, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.double(), ref_up, rtol=1e-5, atol=1e-6)


def test_grouped_write_equals_list_write(pipe, predictor):
    pipe.load_hyperlora(predictor)
    adapters = pipe.hyperlora.adapters
    identity = _identity(predictor, 3)
    adapters.write("id", predictor.lora_weights(identity))
    by_list = [(a.clone(), b.clone()) for a, b in adapters.lora_parameters("id")]
    assert len(by_list) == len(predictor.config.linears) > 0
    adapters.clear("id")
    assert all(not b.any() for _, b in adapters.lora_parameters("id"))
    bank = predictor.id_bank
    adapters.write_mixed("id", bank.groups, bank.mix(predictor.split_coefficients(identity.id_coefficients)))
    for (a, b), (ra, rb) in zip(adapters.lora_parameters("id"), by_list, strict=True):
        assert torch.equal(a, ra) and torch.equal(b, rb)


def test_offload_bank_keeps_bank_in_cpu_memory(pipe, predictor):
    """`offload_bank=True`: the bank stays on the CPU in the denoiser's dtype; the switch streams it."""
    pipe.unet.to(torch.bfloat16)
    pipe.load_hyperlora(predictor, offload_bank=True)
    identity = _identity(predictor, 4)
    pipe.set_hyperlora_identity(identity)
    bank = pipe.hyperlora.predictor.id_bank
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in bank.parameters())
    reference = [(d.double(), u.double()) for d, u in predictor.lora_weights(identity)]
    assert len(reference) == len(predictor.config.linears) > 0
    for (a, b), (ref_down, ref_up) in zip(pipe.hyperlora.adapters.lora_parameters("id"), reference, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), ref_down, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(b.double(), ref_up, rtol=1e-2, atol=1e-3)
