"""Sliders: one rank-2r PEFT adapter whose update is exactly LoRA(edited) - LoRA(neutral)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_features, unet_output

from diffusers_hyperlora import (
    AdapterNameConflictError,
    HyperLoRAFeatures,
    HyperLoRANotLoadedError,
    IdentityMismatchError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from diffusers_hyperlora.adapters.sliders import DEFAULT_SLIDER_NAME, HyperLoRASlider, difference_factors
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


class NamedFeatures:
    """A `FeatureExtractor` that maps image names to fixed random features (stands in for the face pipeline)."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, *, device, dtype, with_base):
        self.calls.append(list(images))
        embeds, clip = zip(*(random_features(batch=1, seed=sum(map(ord, name))) for name in images))
        return HyperLoRAFeatures(torch.cat(embeds).to(device, dtype), torch.cat(clip).to(device, dtype), None, images)


@pytest.fixture(scope="module")
def predictor():
    return tiny_hyperlora_predictor(seed=0)


@pytest.fixture(scope="module")
def people(predictor):
    return [predictor.predict(*random_features(batch=b, seed=s)) for b, s in ((2, 1), (1, 2), (3, 3))]


@pytest.fixture
def loaded(predictor):
    pipe = tiny_sdxl_pipeline()
    pipe.load_hyperlora(predictor, feature_extractor=NamedFeatures())
    return pipe


def _delta(layer, name: str) -> torch.Tensor:
    return layer.get_delta_weight(name)


def test_difference_factors_are_exact():
    g = torch.Generator().manual_seed(0)
    edited = [(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(2)]
    neutral = [(torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(2)]
    for (a, b), (de, ue), (dn, un) in zip(difference_factors(edited, neutral), edited, neutral, strict=True):
        assert a.shape == (6, 6) and b.shape == (5, 6)
        torch.testing.assert_close(b @ a, ue @ de - un @ dn)
    with pytest.raises(ValueError, match="must match"):
        difference_factors(edited, neutral[:1])


def test_slider_update_per_layer_is_the_difference_of_id_loras(loaded, predictor, people):
    neutral, edited = people[0], people[1]
    slider = loaded.add_hyperlora_slider(neutral, edited, adapter_name="age", weight=0.6)
    assert isinstance(slider, HyperLoRASlider)
    assert loaded.unet.peft_config["age"].r == 16 and loaded.unet.peft_config["age"].lora_alpha == 8.0
    assert "age" in loaded.unet.active_adapters() and "id" in loaded.unet.active_adapters()
    modules = dict(loaded.unet.named_modules())
    for linear, (dn, un), (de, ue) in zip(
        predictor.config.linears, predictor.lora_weights(neutral), predictor.lora_weights(edited), strict=True
    ):
        expected = 0.6 * 0.5 * (ue @ de - un @ dn)
        torch.testing.assert_close(_delta(modules[linear.module_path], "age"), expected, **TOLERANCE)


def test_neutral_identity_plus_slider_equals_edited_identity(loaded, people):
    """Linearity: id(neutral) at w + slider at w == id(edited) at w, on the whole UNet."""
    neutral, edited = people[0], people[1]
    loaded.add_hyperlora_slider(neutral, edited)
    loaded.set_hyperlora_identity(neutral)
    loaded.set_adapters(["id", "slider"], [0.8, 0.8])
    moved = unet_output(loaded.unet)
    loaded.set_hyperlora_identity(edited)
    loaded.set_adapters(["id", "slider"], [0.8, 0.0])
    target = unet_output(loaded.unet)
    loaded.set_adapters(["id", "slider"], [0.0, 0.0])
    nothing = unet_output(loaded.unet)
    assert (target - nothing).abs().max() > 1e-3
    torch.testing.assert_close(moved, target, **TOLERANCE)


def test_same_photos_on_both_sides_change_nothing(loaded, people):
    loaded.set_adapters(["id", "base"], [0.8, 0.0])
    before = unet_output(loaded.unet)
    loaded.add_hyperlora_slider(people[0], people[0], weight=1.0)
    torch.testing.assert_close(unet_output(loaded.unet), before, atol=1e-6, rtol=0)


def test_several_sliders_add_up_and_follow_set_adapters(loaded, predictor, people):
    loaded.add_hyperlora_slider(people[0], people[1], adapter_name="age")
    loaded.add_hyperlora_slider(people[0], people[2], adapter_name="smile")
    loaded.set_adapters(["id", "age", "smile"], [0.0, 0.7, -0.3])
    layer = dict(loaded.unet.named_modules())[predictor.config.linears[5].module_path]
    (dn, un), (de, ue), (ds, us) = (predictor.lora_weights(p)[5] for p in people)
    expected = 0.5 * (0.7 * (ue @ de - un @ dn) - 0.3 * (us @ ds - un @ dn))
    total = sum(_delta(layer, name) for name in ("age", "smile"))
    torch.testing.assert_close(total, expected, **TOLERANCE)
    # the whole UNet: both sliders at once differ from either alone
    both = unet_output(loaded.unet)
    loaded.set_adapters(["age"], [0.7])
    assert (both - unet_output(loaded.unet)).abs().max() > 1e-4


def test_sliders_from_images_use_the_feature_extractor(loaded, predictor):
    slider = loaded.add_hyperlora_slider(["me.jpg", "me2.jpg"], ["me_old.jpg"], adapter_name="age")
    extractor = loaded.hyperlora.feature_extractor
    assert extractor.calls == [["me.jpg", "me2.jpg"], ["me_old.jpg"]]
    assert slider.neutral.num_images == 2 and slider.edited.sources == ["me_old.jpg"]
    expected = predictor.predict(*random_features(batch=1, seed=sum(map(ord, "me_old.jpg"))))
    torch.testing.assert_close(slider.edited.id_mean, expected.id_mean, **TOLERANCE)


def test_rewriting_a_slider_updates_it_in_place(loaded, predictor, people):
    loaded.add_hyperlora_slider(people[0], people[1])
    loaded.set_adapters(["slider"], [0.7])
    first = unet_output(loaded.unet)
    parameters = dict(loaded.unet.named_parameters())
    loaded.add_hyperlora_slider(people[0], people[2])
    assert dict(loaded.unet.named_parameters()).keys() == parameters.keys()
    second = unet_output(loaded.unet)
    assert (first - second).abs().max() > 1e-4
    fresh = tiny_sdxl_pipeline()
    fresh.load_hyperlora(predictor)
    fresh.add_hyperlora_slider(people[0], people[2])
    fresh.set_adapters(["slider"], [0.7])
    torch.testing.assert_close(unet_output(fresh.unet), second, **TOLERANCE)


def test_unload_removes_sliders_and_restores_the_unet(predictor, people):
    pipe = tiny_sdxl_pipeline()
    original = unet_output(pipe.unet)
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(people[0])
    pipe.add_hyperlora_slider(people[0], people[1], adapter_name="age")
    pipe.add_hyperlora_slider(people[0], people[2], adapter_name="smile")
    pipe.remove_hyperlora_slider("smile")
    assert "smile" not in pipe.unet.peft_config and "age" in pipe.unet.peft_config
    with pytest.raises(ValueError, match="no HyperLoRA slider named 'smile'") as caught:
        pipe.remove_hyperlora_slider("smile")
    assert caught.value.argument == "adapter_name"
    pipe.unload_hyperlora()
    assert not getattr(pipe.unet, "peft_config", None)
    torch.testing.assert_close(unet_output(pipe.unet), original, atol=0, rtol=0)


def test_slider_name_conflicts_and_bad_inputs(loaded, people, predictor):
    with pytest.raises(AdapterNameConflictError, match="HyperLoRA's own adapters") as caught:
        loaded.add_hyperlora_slider(people[0], people[1], adapter_name="id")
    assert caught.value.argument == "adapter_name"
    loaded.add_hyperlora_slider(people[0], people[1], adapter_name="mine")
    loaded.remove_hyperlora_slider("mine")
    from peft import LoraConfig

    loaded.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="users_lora")
    with pytest.raises(AdapterNameConflictError, match="already has an adapter named 'users_lora'") as caught:
        loaded.add_hyperlora_slider(people[0], people[1], adapter_name="users_lora")
    assert caught.value.argument == "adapter_name"
    with pytest.raises(TypeError, match="HyperLoRASlider.edited must be a HyperLoRAIdentity") as caught:
        HyperLoRASlider(people[0], "me.jpg")
    assert caught.value.argument == "edited"
    for weight, error in (("strong", TypeError), (float("nan"), ValueError)):
        with pytest.raises(error, match="`weight` must be a") as caught:
            loaded.add_hyperlora_slider(people[0], people[1], adapter_name="mine", weight=weight)
        assert caught.value.argument == "weight"
    other = tiny_hyperlora_predictor(seed=4).predict(*random_features(batch=1, seed=0))
    with pytest.raises(IdentityMismatchError, match="another HyperLoRA checkpoint"):
        loaded.add_hyperlora_slider(people[0], other)
    with pytest.raises(HyperLoRANotLoadedError):
        tiny_sdxl_pipeline().add_hyperlora_slider(people[0], people[1])


@pytest.mark.parametrize(
    "name, error",
    [
        (5, InvalidArgumentTypeError),
        (None, InvalidArgumentTypeError),
        ("", InvalidArgumentError),
        ("a.b", InvalidArgumentError),
    ],
)
def test_a_bad_slider_name_is_refused_before_anything_changes(loaded, people, name, error):
    loaded.add_hyperlora_slider(people[0], people[1])  # the default name
    before = {key: value.clone() for key, value in loaded.unet.state_dict().items()}
    active = loaded.get_active_adapters()
    with pytest.raises(error, match="adapter_name") as caught:
        loaded.add_hyperlora_slider(people[0], people[2], adapter_name=name)
    assert caught.value.argument == "adapter_name"
    after = loaded.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    assert loaded.get_active_adapters() == active and list(loaded.hyperlora.sliders) == [DEFAULT_SLIDER_NAME]
    loaded.add_hyperlora_slider(people[0], people[2], adapter_name="age")  # the next good call works


def test_sliders_stay_out_of_the_saved_unet(predictor, people, tmp_path):
    from safetensors.torch import load_file

    pipe = tiny_sdxl_pipeline()
    original = pipe.unet.state_dict()
    pipe.load_hyperlora(predictor)
    pipe.add_hyperlora_slider(people[0], people[1], adapter_name="age")
    assert any("lora_A.age" in key for key in pipe.unet.state_dict())  # PEFT's usual state dict (accelerate needs it)
    pipe.unet.save_pretrained(tmp_path / "with")
    saved = load_file(tmp_path / "with" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    pipe.remove_hyperlora_slider("age")
    pipe.unload_hyperlora()
    assert "save_pretrained" not in pipe.unet.__dict__  # nothing of HyperLoRA is left on the UNet


def test_rewriting_a_fused_slider_keeps_the_other_fused_adapters(loaded, people):
    original = {n: p.clone() for n, p in loaded.unet.named_parameters() if "lora" not in n}
    loaded.set_hyperlora_identity(people[0])
    loaded.add_hyperlora_slider(people[0], people[1])
    loaded.set_adapters(["id", "base", "slider"], [0.8, 0.0, 0.7])
    loaded.fuse_lora(adapter_names=["id", "slider"])
    loaded.add_hyperlora_slider(people[0], people[2])  # rewritten while fused together with "id"
    fused = unet_output(loaded.unet)
    layer = loaded.unet.get_submodule(loaded.hyperlora.config.linears[0].module_path)
    assert sorted(layer.merged_adapters) == ["id", "slider"]
    loaded.unfuse_lora()
    torch.testing.assert_close(unet_output(loaded.unet), fused, **TOLERANCE)  # same LoRAs, now unfused
    restored = {n: p for n, p in loaded.unet.named_parameters() if n in original}
    assert all(torch.equal(restored[n], original[n]) for n in original)
