"""Fused mode: identity switches while the LoRA is merged into the base weights, exact unfusing."""

from __future__ import annotations

import pytest
import torch
from conftest import unet_output
from peft.tuners.tuners_utils import BaseTunerLayer

from diffusers_hyperlora.identities.identity import HyperLoRAIdentity


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of tiny merges: one thread avoids OpenMP wake-ups on a loaded 2-core machine (exactness, not speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _identity(predictor, seed: int) -> HyperLoRAIdentity:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(predictor.config.num_tokens, predictor.config.num_basis, generator=g)
    return HyperLoRAIdentity(mean, 1, None, predictor.checkpoint_hash, predictor.probe)


def _target_base_weights(pipe) -> dict[str, torch.Tensor]:
    adapters = pipe.hyperlora.adapters
    return {
        linear.module_path: layer.get_base_layer().weight.detach().clone()
        for linear, layer in zip(adapters.config.linears, adapters.layers, strict=True)
    }


def _all_unet_weights(unet) -> dict[str, torch.Tensor]:
    """Every parameter of the UNet outside the adapters, keyed without PEFT's `base_layer.` infix."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in unet.named_parameters()
        if "lora_" not in name
    }


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_thousand_fp16_switches_while_fused_unfuse_bitwise(pipe, predictor):
    pipe.unet.to(torch.float16)
    original = _all_unet_weights(pipe.unet)
    pipe.load_hyperlora(predictor)
    identities = [_identity(predictor, seed) for seed in range(3)]
    pipe.set_hyperlora_identity(identities[0])
    pipe.fuse_lora()
    fused_once = _target_base_weights(pipe)
    assert not _bitwise_equal(fused_once, {k: original[k + ".weight"] for k in fused_once})

    adapters = pipe.hyperlora.adapters
    bank = pipe.hyperlora.predictor.id_bank
    mixed = [bank.mix(pipe.hyperlora.predictor.split_coefficients(i.id_coefficients)) for i in identities]
    for step in range(1000):  # the switch body of set_hyperlora_identity, without re-mixing the bank each time
        adapters.write_mixed("id", bank.groups, mixed[(step + 1) % 3])
    # Still fused, with the identity written last: fusing it freshly gives the very same weights.
    assert all(layer.merged for layer in adapters.layers)
    pipe.set_hyperlora_identity(identities[0])
    assert _bitwise_equal(_target_base_weights(pipe), fused_once)

    pipe.unfuse_lora()
    assert not any(layer.merged for layer in adapters.layers)
    assert _bitwise_equal(_all_unet_weights(pipe.unet), original)


def test_peft_subtraction_alone_is_not_bitwise(pipe, predictor):
    """The control: PEFT's own unmerge after a few fp16 fuse/switch cycles does not give the originals back."""
    pipe.unet.to(torch.float16)
    pipe.load_hyperlora(predictor)
    original = _target_base_weights(pipe)
    adapters = pipe.hyperlora.adapters
    for seed in range(5):
        pipe.set_hyperlora_identity(_identity(predictor, seed))
        for layer in adapters.layers:
            type(layer).merge(layer, adapter_names=["id"])
            type(layer).unmerge(layer)
    assert not _bitwise_equal(_target_base_weights(pipe), original)


def test_switch_while_fused_matches_unfused_output(pipe, predictor):
    pipe.load_hyperlora(predictor)
    first, second = _identity(predictor, 1), _identity(predictor, 2)
    pipe.set_hyperlora_identity(second)
    expected = unet_output(pipe.unet)
    pipe.set_hyperlora_identity(first)
    pipe.fuse_lora()
    pipe.set_hyperlora_identity(second)
    fused = unet_output(pipe.unet)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora()
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    # Unfused, the switch writes the adapters only; the base weights are untouched.
    assert not any(layer.merged for layer in pipe.hyperlora.adapters.layers)


def test_other_fused_lora_survives_switch_and_unload(pipe, predictor):
    from peft import LoraConfig

    original = _all_unet_weights(pipe.unet)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False), adapter_name="style"
    )
    pipe.load_hyperlora(predictor)
    pipe.set_adapters(["style", "id", "base"], [0.5, 0.8, 0.0])
    pipe.set_hyperlora_identity(_identity(predictor, 3))
    reference_style_and_id = unet_output(pipe.unet)
    pipe.fuse_lora(adapter_names=["style", "id"])
    pipe.set_hyperlora_identity(_identity(predictor, 4))
    pipe.set_hyperlora_identity(_identity(predictor, 3))
    torch.testing.assert_close(unet_output(pipe.unet), reference_style_and_id, rtol=1e-4, atol=1e-5)
    # Unloading HyperLoRA while fused removes exactly its part: the style LoRA stays fused on its layers.
    pipe.unload_hyperlora()
    style_layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert style_layers and all(m.merged_adapters == ["style"] for m in style_layers if "style" in m.lora_A)
    pipe.unfuse_lora()
    restored = _all_unet_weights(pipe.unet)
    assert _bitwise_equal({k: restored[k] for k in original}, original)


def test_exact_merge_follows_deepcopy(pipe, predictor):
    import copy as copy_module

    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(_identity(predictor, 5))
    twin = copy_module.deepcopy(pipe.unet)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    twin.fuse_lora()
    # Fusing the copy leaves the original untouched (the exact merge is bound to each copy's own layers).
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    twin.unfuse_lora()
    twin_weights = {k: v for k, v in twin.state_dict().items()}
    assert all(torch.equal(before[k], twin_weights[k]) for k in before)
