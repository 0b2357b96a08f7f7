"""The CUDA paths, on a real GPU: pinned-memory bank streaming (`offload_bank=True`), switches and generation in
16 bit, the compiled 16-bit kernel on the GPU, per-sample batches, fused switching, model CPU offload.

Every test is marked `cuda` and skipped without a CUDA GPU; `bash scripts/gpu-check.sh` runs them (`pytest -m cuda`)
with the GPU benchmark table. The references are computed on the CPU in float64, so each test checks the GPU result,
not just that it runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_features, unet_inputs

from diffusers_hyperlora.model import bank as bank_module
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash scripts/gpu-check.sh)"),
]
GPU = torch.device("cuda")


def _identity(predictor, seed: int):
    embeds, clip = random_features(batch=2, seed=seed)
    return predictor.predict(id_embeds=embeds.to(predictor.device), clip_hidden_states=clip.to(predictor.device))


def _reference(predictor, identity) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LoRA factors per linear from a float64 CPU copy of the predictor."""
    cpu = tiny_hyperlora_predictor(seed=0)
    cpu.load_state_dict({k: v.detach().cpu() for k, v in predictor.state_dict().items()})
    cpu.to(torch.float64)
    coefficients = cpu.split_coefficients(identity.id_coefficients.cpu().double())
    factors = []
    for index, (g, p) in enumerate(cpu.id_bank.locations):
        down = torch.einsum("k,kir->ri", coefficients[index, 0], cpu.id_bank.down[g][p])
        up = torch.einsum("k,kro->or", coefficients[index, 1], cpu.id_bank.up[g][p])
        factors.append((down, up))
    return factors


def _assert_live_factors(pipe, reference, rtol: float, atol: float) -> None:
    live = list(pipe.hyperlora.adapters.lora_parameters("id"))
    assert len(live) == len(reference)
    for (a, b), (down, up) in zip(live, reference, strict=True):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.double().cpu(), down, rtol=rtol, atol=atol)
        torch.testing.assert_close(b.double().cpu(), up, rtol=rtol, atol=atol)


@pytest.fixture
def gpu_pipe():
    pipe = tiny_sdxl_pipeline().to(GPU)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del pipe
    torch.cuda.empty_cache()


def test_switch_on_gpu_equals_the_float64_reference(gpu_pipe):
    predictor = tiny_hyperlora_predictor(seed=0)
    gpu_pipe.load_hyperlora(predictor)
    identity = _identity(gpu_pipe.hyperlora.prepare_predictor(), seed=1)
    gpu_pipe.set_hyperlora_identity(identity)
    assert gpu_pipe.hyperlora.predictor.device.type == "cuda"
    _assert_live_factors(gpu_pipe, _reference(gpu_pipe.hyperlora.predictor, identity), rtol=1e-4, atol=1e-5)


def test_offload_bank_streams_a_pinned_bank_and_keeps_it_off_the_gpu(gpu_pipe):
    """Low-VRAM mode: the bank stays in page-locked CPU memory in the pipeline's dtype; the switch streams it
    (`non_blocking` copies from pinned memory) and the GPU never holds the whole bank."""
    gpu_pipe.to(torch.float16)
    predictor = tiny_hyperlora_predictor(seed=0)
    bank_bytes = sum(p.numel() * 2 for p in predictor.id_bank.parameters())
    before = torch.cuda.memory_allocated(GPU)
    gpu_pipe.load_hyperlora(predictor, offload_bank=True)
    loaded = gpu_pipe.hyperlora.prepare_predictor()
    bank = loaded.id_bank
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 and p.is_pinned() for p in bank.parameters())
    assert loaded.resampler.latents.device.type == "cuda"
    assert torch.cuda.memory_allocated(GPU) - before < bank_bytes  # adapters + resampler only
    identity = _identity(loaded, seed=2)
    gpu_pipe.set_hyperlora_identity(identity)
    torch.cuda.synchronize(GPU)
    _assert_live_factors(gpu_pipe, _reference(loaded, identity), rtol=1e-2, atol=2e-3)


def test_compiled_16bit_kernel_on_gpu(monkeypatch):
    """`compile_mix()` on a GPU (inductor's GPU backend): the fused kernel is used and matches float64."""
    predictor = tiny_hyperlora_predictor(seed=0).to(GPU, torch.float16).requires_grad_(False)
    bank = predictor.id_bank
    coefficients = torch.randn(bank.num_linears, 2, bank.num_basis, generator=torch.Generator().manual_seed(0))
    bank.compile_mix()

    def no_eager(*args, **kwargs):
        raise AssertionError("the compiled kernel was not used")

    monkeypatch.setattr(bank_module, "mix_bases", no_eager)
    try:
        mixed = bank.lora_weights(coefficients.to(GPU))
        torch.cuda.synchronize(GPU)
    finally:
        bank.compile_mix(False)
    assert bank_module._COMPILED_MIX.get("kernel") is not False, "compilation failed on the GPU"
    for index, (g, p) in enumerate(bank.locations):
        down, up = mixed[index]
        assert down.device.type == "cuda" and down.dtype == torch.float32
        reference = torch.einsum("k,kir->ri", coefficients[index, 0].double(), bank.down[g][p].double().cpu())
        torch.testing.assert_close(down.double().cpu(), reference, rtol=1e-4, atol=1e-5)
        reference = torch.einsum("k,kro->or", coefficients[index, 1].double(), bank.up[g][p].double().cpu())
        torch.testing.assert_close(up.double().cpu(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_generation_in_16bit_and_fused_switch_round_trip(gpu_pipe, dtype):
    """A 16-bit pipeline on the GPU: the identity changes the image, fusing gives the unfused output, switching
    while fused works, and unfusing restores the UNet's weights bit for bit."""
    gpu_pipe.to(dtype)
    original = {k: v.clone() for k, v in gpu_pipe.unet.state_dict().items()}
    gpu_pipe.load_hyperlora(tiny_hyperlora_predictor(seed=0))
    predictor = gpu_pipe.hyperlora.prepare_predictor()
    alice, bob = _identity(predictor, 3), _identity(predictor, 4)
    inputs = {k: v for k, v in unet_inputs(seed=0).items()}
    inputs = _to(inputs, dtype)
    with torch.no_grad():
        gpu_pipe.set_adapters(["id", "base"], [0.0, 0.0])
        plain = gpu_pipe.unet(**inputs).sample
        gpu_pipe.set_adapters(["id", "base"], [1.0, 0.0])
        gpu_pipe.set_hyperlora_identity(alice)
        unfused = gpu_pipe.unet(**inputs).sample
        assert torch.isfinite(unfused).all() and (unfused - plain).abs().max() > 1e-3
        gpu_pipe.fuse_lora()
        fused = gpu_pipe.unet(**inputs).sample
        torch.testing.assert_close(fused, unfused, rtol=5e-2, atol=5e-2)
        gpu_pipe.set_hyperlora_identity(bob)  # a switch while fused
        gpu_pipe.unfuse_lora()
    images = gpu_pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert torch.isfinite(images).all()
    gpu_pipe.unload_hyperlora()
    for key, value in gpu_pipe.unet.state_dict().items():
        assert torch.equal(value, original[key]), key


def _to(inputs: dict, dtype: torch.dtype) -> dict:
    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value.to(GPU, dtype) if value.is_floating_point() else value.to(GPU)

    return {k: move(v) for k, v in inputs.items()}


def test_per_sample_batch_on_gpu_equals_single_identity_runs(gpu_pipe):
    gpu_pipe.load_hyperlora(tiny_hyperlora_predictor(seed=0))
    predictor = gpu_pipe.hyperlora.prepare_predictor()
    people = [_identity(predictor, seed) for seed in (5, 6)]
    inputs = _to(unet_inputs(seed=1, batch=2), torch.float32)
    with torch.no_grad():
        gpu_pipe.set_hyperlora_identities(people)
        batch = gpu_pipe.unet(**inputs).sample
        for index, person in enumerate(people):
            gpu_pipe.set_hyperlora_identity(person)
            single = gpu_pipe.unet(**{k: _row(v, index) for k, v in inputs.items()}).sample
            torch.testing.assert_close(batch[index : index + 1], single, rtol=1e-4, atol=1e-4)
        assert (batch[0] - batch[1]).abs().max() > 1e-3


def _row(value, index: int):
    if isinstance(value, dict):
        return {k: _row(v, index) for k, v in value.items()}
    return value[index : index + 1]


def test_model_cpu_offload_predicts_on_the_gpu_and_rests_on_the_cpu():
    pytest.importorskip("accelerate")
    pipe = tiny_sdxl_pipeline()
    pipe.enable_model_cpu_offload(device=GPU)
    pipe.load_hyperlora(tiny_hyperlora_predictor(seed=0))
    predictor = pipe.hyperlora.predictor
    embeds, clip = random_features(batch=1, seed=7)
    identity = pipe.hyperlora.predict(id_embeds=embeds, clip_hidden_states=clip)
    pipe.set_hyperlora_identity(identity)
    images = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert torch.isfinite(images).all()
    assert predictor.device.type == "cpu"
