"""HyperLoRA inside diffusers pipelines: adapters, in-place identity writes, weights, unload, other pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_features, unet_output
from peft import LoraConfig
from safetensors.torch import load_file

import diffusers_hyperlora  # noqa: F401
from diffusers_hyperlora import (
    AdapterNameConflictError,
    HyperLoRAMixin,
    HyperLoRANotLoadedError,
    IdentityMismatchError,
    TargetMismatchError,
    load_hyperlora,
)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_components, tiny_sdxl_pipeline


def _identity(predictor, seed=0, batch=2):
    embeds, clip = random_features(batch=batch, seed=seed)
    return predictor.predict(id_embeds=embeds, clip_hidden_states=clip)


def _lora_layer(unet):
    return unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k


def test_load_registers_both_adapters_with_defaults(pipe, predictor):
    before = unet_output(pipe.unet)
    returned = pipe.load_hyperlora(predictor)
    assert returned is pipe and pipe.hyperlora.predictor is predictor
    assert pipe.unet.active_adapters() == ["id", "base"]
    layer = _lora_layer(pipe.unet)
    assert layer.r["id"] == 8 and layer.lora_alpha["id"] == 4
    assert layer.scaling["id"] == pytest.approx(0.8 * 4 / 8)  # default ID weight 0.8
    lora_count = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A.id"))
    assert lora_count == 96  # 24 attention modules x q, k, v, out
    # A placeholder "base" (no Base branch) sits on one linear only, with a zero up matrix.
    assert sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A.base")) == 1
    assert torch.equal(unet_output(pipe.unet), before)  # no identity yet: nothing changes


def test_identity_changes_output_and_zero_weights_restore_it(pipe, predictor):
    before = unet_output(pipe.unet)
    pipe.load_hyperlora(predictor)
    identity = pipe.set_hyperlora_identity(_identity(predictor))
    assert pipe.hyperlora_identity is identity
    assert (unet_output(pipe.unet) - before).abs().max() > 1e-3
    pipe.set_adapters(["id", "base"], [0.0, 0.0])
    assert torch.equal(unet_output(pipe.unet), before)
    pipe.set_adapters(["id", "base"], [1.0, 0.0])  # works although the checkpoint has no Base branch
    assert not torch.equal(unet_output(pipe.unet), before)


def test_id_update_is_weight_times_half_up_at_down(pipe, predictor):
    pipe.load_hyperlora(predictor)
    identity = pipe.set_hyperlora_identity(_identity(predictor))
    linears = predictor.config.linears
    index = next(i for i, lin in enumerate(linears) if lin.module_path.endswith("attn2.to_k"))
    # Hand-computed factors straight from the bank parameters and the coefficient tokens.
    g, p = predictor.id_bank.locations[index]
    tokens = identity.id_coefficients
    down = torch.einsum("k,kir->ri", tokens[2 * index], predictor.id_bank.down[g][p].detach())
    up = torch.einsum("k,kro->or", tokens[2 * index + 1], predictor.id_bank.up[g][p].detach())
    layer = pipe.unet.get_submodule(linears[index].module_path)
    x = torch.randn(3, linears[index].in_features)
    for weight in (0.8, 0.3, -0.7):
        pipe.set_adapters(["id", "base"], [weight, 0.0])
        with torch.no_grad():
            delta = layer(x) - layer.get_base_layer()(x)
        expected = weight * (4 / 8) * x @ (up @ down).T
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


def test_switching_identities_writes_in_place_and_equals_direct_load(predictor):
    first = tiny_sdxl_pipeline()
    first.load_hyperlora(predictor)
    a, b = _identity(predictor, seed=1), _identity(predictor, seed=2)
    first.set_hyperlora_identity(a)
    params = {n: p.data_ptr() for n, p in first.unet.named_parameters()}
    first.set_hyperlora_identity(b)
    assert {n: p.data_ptr() for n, p in first.unet.named_parameters()} == params  # no new tensors, no re-injection
    second = tiny_sdxl_pipeline()
    second.load_hyperlora(tiny_hyperlora_predictor(seed=0))
    second.set_hyperlora_identity(b)
    assert torch.equal(unet_output(first.unet), unet_output(second.unet))


def test_unload_restores_the_unet_bitwise(pipe, predictor):
    reference = unet_output(pipe.unet)
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(_identity(predictor))
    pipe.unload_hyperlora()
    assert not pipe.hyperlora.is_loaded
    assert type(_lora_layer(pipe.unet)) is torch.nn.Linear
    assert not hasattr(pipe.unet, "peft_config")
    assert torch.equal(unet_output(pipe.unet), reference)


def _style_lora(unet, seed=3):
    """A diffusers-format LoRA state dict on a few attn1 linears (what `load_lora_weights` reads)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    ):
        width = unet.get_submodule(path).in_features
        state[f"unet.{path}.lora_A.weight"] = torch.randn(4, width, generator=g) * 0.1
        state[f"unet.{path}.lora_B.weight"] = torch.randn(width, 4, generator=g) * 0.1
    return state


def test_user_loras_keep_working_beside_hyperlora(pipe, predictor):
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(_style_lora(pipe.unet), adapter_name="style")
    with_style = unet_output(pipe.unet)
    assert not torch.equal(with_style, base)
    pipe.load_hyperlora(predictor)
    assert pipe.unet.active_adapters() == ["style", "id", "base"]
    assert torch.equal(unet_output(pipe.unet), with_style)  # style still active, same weight
    pipe.set_hyperlora_identity(_identity(predictor))
    pipe.set_adapters(["style", "id", "base"], [1.0, 0.0, 0.0])
    assert torch.equal(unet_output(pipe.unet), with_style)
    pipe.unload_hyperlora()
    assert list(pipe.unet.peft_config) == ["style"]
    assert torch.equal(unet_output(pipe.unet), with_style)


def test_adapter_name_clash_is_a_clear_error(pipe, predictor):
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="id")
    with pytest.raises(AdapterNameConflictError, match="already has an adapter named 'id'") as caught:
        pipe.load_hyperlora(predictor)
    assert caught.value.argument == "id_adapter_name"
    with pytest.raises(AdapterNameConflictError, match="different names") as caught:
        pipe.load_hyperlora(predictor, id_adapter_name="same", base_adapter_name="same")
    assert caught.value.argument == "base_adapter_name"
    pipe.load_hyperlora(predictor, id_adapter_name="hyper_id", base_adapter_name="hyper_base")
    pipe.set_adapters(["hyper_id", "hyper_base"], [0.8, 0.0])


def test_identity_methods_before_load_raise(pipe, predictor):
    assert not pipe.hyperlora.is_loaded
    with pytest.raises(HyperLoRANotLoadedError, match="load_hyperlora"):
        pipe.set_hyperlora_identity(_identity(predictor))
    with pytest.raises(HyperLoRANotLoadedError, match=r"pipe\.hyperlora\.predict"):
        pipe.hyperlora.predict(*random_features())
    pipe.unload_hyperlora()  # a no-op, like diffusers' unload_lora_weights
    pipe.unload_hyperlora()


def test_identity_from_another_checkpoint_is_refused(pipe, predictor):
    pipe.load_hyperlora(predictor)
    other = tiny_hyperlora_predictor(seed=7)
    with pytest.raises(IdentityMismatchError, match="another HyperLoRA checkpoint"):
        pipe.set_hyperlora_identity(_identity(other))
    different_arch = tiny_hyperlora_predictor(num_basis=4)
    with pytest.raises(IdentityMismatchError):
        pipe.set_hyperlora_identity(_identity(different_arch))


def test_unet_without_the_targets_names_the_first_mismatch(predictor):
    from diffusers_hyperlora.testing.tiny_base_models import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    # SD 1.5-style UNets read 32/768-wide text states: the first cross-attention key projection differs.
    with pytest.raises(
        TargetMismatchError, match=r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k' is 32 -> 64"
    ):
        pipe.load_hyperlora(predictor)
    assert not hasattr(pipe.unet, "peft_config")  # nothing was injected
    assert not pipe.hyperlora.is_loaded


def test_width_mismatch_is_reported(predictor):
    pipe = tiny_sdxl_pipeline()
    config = predictor.config
    first = config.targets[0]
    object.__setattr__(first, "hidden_size", 96)  # pretend the checkpoint wants a wider layer
    try:
        with pytest.raises(TargetMismatchError, match="expects 96 -> 96"):
            load_hyperlora(pipe, predictor)
    finally:
        object.__setattr__(first, "hidden_size", 64)


def test_save_pretrained_writes_the_same_files(tmp_path, pipe, predictor):
    pipe.save_pretrained(tmp_path / "before")
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(_identity(predictor))
    pipe.save_pretrained(tmp_path / "after")
    before = sorted(p.relative_to(tmp_path / "before") for p in (tmp_path / "before").rglob("*") if p.is_file())
    after = sorted(p.relative_to(tmp_path / "after") for p in (tmp_path / "after").rglob("*") if p.is_file())
    assert before == after
    assert (tmp_path / "before/model_index.json").read_text() == (tmp_path / "after/model_index.json").read_text()
    a = load_file(tmp_path / "before/unet/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "after/unet/diffusion_pytorch_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_predictor_follows_pipeline_dtype(pipe, predictor):
    pipe.load_hyperlora(predictor)
    pipe.to(torch.bfloat16)
    pipe.set_hyperlora_identity(_identity(predictor))
    assert pipe.hyperlora.dtype == torch.bfloat16
    assert _lora_layer(pipe.unet).lora_B["id"].weight.dtype == torch.bfloat16
    assert _lora_layer(pipe.unet).lora_B["id"].weight.abs().sum() > 0


def test_custom_pipeline_class_with_the_mixin(predictor):
    from diffusers import StableDiffusionXLPipeline

    class MyPipeline(HyperLoRAMixin, StableDiffusionXLPipeline):
        pass

    pipe = MyPipeline(**tiny_sdxl_components())
    pipe.load_hyperlora(predictor)
    assert pipe.hyperlora.predictor is predictor


def _run(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "fcsks fxhks fhyks, a photo",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=generator,
        **kwargs,
    ).images


def _pipeline_cases():
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLAdapterPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        T2IAdapter,
    )
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, "uint8"), 16))

    def controlnet(components):
        torch.manual_seed(0)
        return {
            "controlnet": ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32))
        }

    def t2i_adapter(components):
        torch.manual_seed(0)
        adapter = T2IAdapter(
            in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter_xl"
        )
        return {"adapter": adapter}

    return [
        ("t2i-adapter", StableDiffusionXLAdapterPipeline, t2i_adapter, {"image": image}),
        ("img2img", StableDiffusionXLImg2ImgPipeline, lambda c: {}, {"image": image, "strength": 0.9}),
        ("inpaint", StableDiffusionXLInpaintPipeline, lambda c: {}, {"image": image, "mask_image": mask}),
        ("controlnet", StableDiffusionXLControlNetPipeline, controlnet, {"image": image}),
    ]


@pytest.mark.parametrize("case", _pipeline_cases(), ids=lambda c: c[0])
def test_works_in_other_sdxl_pipelines(case):
    _, pipeline_class, extra, call_kwargs = case
    components = tiny_sdxl_components()
    components.update(extra(components))
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe, **call_kwargs)
    predictor = tiny_hyperlora_predictor()
    pipe.load_hyperlora(predictor)
    bases = {n: p.clone() for n, p in pipe.unet.named_parameters() if "lora" not in n}
    pipe.set_hyperlora_identity(_identity(predictor))
    pipe.set_adapters(["id", "base"], [1.0, 0.0])
    personalized = _run(pipe, **call_kwargs)
    assert np.abs(personalized - plain).max() > 1e-4
    pipe.set_adapters(["id", "base"], [0.0, 0.0])
    np.testing.assert_array_equal(_run(pipe, **call_kwargs), plain)
    assert all(torch.equal(p, bases[n]) for n, p in pipe.unet.named_parameters() if n in bases)


def test_model_cpu_offload_keeps_working(predictor):
    reference = tiny_sdxl_pipeline()
    reference.set_progress_bar_config(disable=True)
    reference.load_hyperlora(predictor)
    identity = reference.set_hyperlora_identity(_identity(predictor))
    expected = _run(reference)

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_hyperlora(tiny_hyperlora_predictor(seed=0))
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate hooks; the predictor must still find its device
    pipe.set_hyperlora_identity(identity)
    np.testing.assert_allclose(_run(pipe), expected, atol=1e-6)


class _RecordingExtractor:
    """A FeatureExtractor stand-in: one fixed feature row per image, records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, *, device, dtype, with_base, **options):
        from diffusers_hyperlora import HyperLoRAFeatures

        self.calls.append((list(images), device, dtype, with_base, options))
        embeds, clip = random_features(batch=len(images), seed=11)
        return HyperLoRAFeatures(embeds, clip, sources=[f"image{i}" for i in range(len(images))])


def test_images_go_through_the_injected_feature_extractor(pipe, predictor):
    extractor = _RecordingExtractor()
    pipe.load_hyperlora(predictor, feature_extractor=extractor)
    single = np.zeros((8, 8, 3), "uint8")
    identity = pipe.set_hyperlora_identity(single)  # one image, not in a list
    assert len(extractor.calls[0][0]) == 1 and extractor.calls[0][0][0] is single
    assert extractor.calls[0][2] == torch.float32 and extractor.calls[0][3] is False
    identity = pipe.set_hyperlora_identity(["a.jpg", "b.jpg"], face_index=1)
    assert extractor.calls[1][0] == ["a.jpg", "b.jpg"] and extractor.calls[1][4] == {"face_index": 1}
    embeds, clip = random_features(batch=2, seed=11)
    expected = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    assert torch.equal(identity.id_mean, expected.id_mean) and identity.sources == ["image0", "image1"]
    with pytest.raises(ValueError, match="empty list") as caught:
        pipe.set_hyperlora_identity([])
    assert caught.value.argument == "images"
    with pytest.raises(TypeError, match="cannot show its inputs") as caught:  # a plug-in has no prepare_inputs
        pipe.preview_hyperlora_inputs(single)
    assert caught.value.argument == "feature_extractor"


def test_features_path_never_loads_the_encoders(pipe, predictor):
    # Encoders that cannot exist: any attempt to load them would fail the test.
    pipe.load_hyperlora(predictor, image_encoder="no-such-org/no-such-clip", face_analyzer="/no/such/folder")
    identity = pipe.set_hyperlora_identity(_identity(predictor))
    assert identity.num_images == 2
