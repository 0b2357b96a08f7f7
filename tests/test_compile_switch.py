"""`torch.compile`d UNet: identity switches (unfused and fused) cause no recompilation."""

from __future__ import annotations

import torch
from conftest import unet_inputs
from torch._dynamo.testing import CompileCounter

from diffusers_hyperlora.identities.identity import HyperLoRAIdentity


def _identity(predictor, seed: int) -> HyperLoRAIdentity:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(predictor.config.num_tokens, predictor.config.num_basis, generator=g)
    return HyperLoRAIdentity(mean, 1, None, predictor.checkpoint_hash, predictor.probe)


def test_identity_switch_does_not_recompile(pipe, predictor):
    torch._dynamo.reset()
    pipe.load_hyperlora(predictor)
    unet = pipe.unet
    identities = [_identity(predictor, seed) for seed in range(3)]
    inputs = unet_inputs(0)
    expected = []
    with torch.no_grad():
        for identity in identities:
            pipe.set_hyperlora_identity(identity)
            expected.append(unet(**inputs).sample)

    counter = CompileCounter()
    compiled = torch.compile(unet, backend=counter, fullgraph=False)
    with torch.no_grad():
        pipe.set_hyperlora_identity(identities[0])
        torch.testing.assert_close(compiled(**inputs).sample, expected[0], rtol=1e-5, atol=1e-6)
        frames = counter.frame_count
        assert frames >= 1
        for index in (1, 2, 0, 1):
            pipe.set_hyperlora_identity(identities[index])
            torch.testing.assert_close(compiled(**inputs).sample, expected[index], rtol=1e-5, atol=1e-6)
        assert counter.frame_count == frames, "an unfused identity switch recompiled the UNet"

        # Fused: the first fuse changes the forward path (one recompilation is expected), switches then don't.
        pipe.fuse_lora()
        torch.testing.assert_close(compiled(**inputs).sample, expected[1], rtol=1e-4, atol=1e-5)
        fused_frames = counter.frame_count
        for index in (2, 0):
            pipe.set_hyperlora_identity(identities[index])
            torch.testing.assert_close(compiled(**inputs).sample, expected[index], rtol=1e-4, atol=1e-5)
        assert counter.frame_count == fused_frames, "a fused identity switch recompiled the UNet"
    torch._dynamo.reset()
