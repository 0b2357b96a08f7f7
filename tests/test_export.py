"""Exported LoRA files (identities and sliders) reproduce the live adapters in diffusers' own loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_features, unet_output
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_hyperlora import IdentityMismatchError, load_predictor
from diffusers_hyperlora.adapters.sliders import HyperLoRASlider
from diffusers_hyperlora.errors import InvalidArgumentError, InvalidArgumentTypeError
from diffusers_hyperlora.io.lora_files import LORA_ADAPTER_METADATA_KEY, export_lora, lora_state_dict
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def live():
    """A tiny pipeline with an identity in "id" and a slider, and the predictor / identity / slider."""
    pipe = tiny_sdxl_pipeline()
    predictor = tiny_hyperlora_predictor(seed=0)
    pipe.load_hyperlora(predictor)
    features = [random_features(batch=b, seed=s) for b, s in ((2, 1), (1, 2))]
    neutral, edited = (predictor.predict(id_embeds=e, clip_hidden_states=c) for e, c in features)
    pipe.set_hyperlora_identity(neutral)
    slider = pipe.add_hyperlora_slider(neutral, edited, adapter_name="slider")
    return pipe, predictor, neutral, slider


def _live_output(pipe, adapter: str, weight: float) -> torch.Tensor:
    others = [name for name in ("id", "base", "slider") if name != adapter]
    pipe.set_adapters([adapter, *others], [weight] + [0.0] * len(others))
    return unet_output(pipe.unet)


def _loaded_output(path, weight: float) -> torch.Tensor:
    fresh = tiny_sdxl_pipeline()
    # weight_name: diffusers 0.35 refuses to guess a file name under HF_HUB_OFFLINE=1, even for a local file
    fresh.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="exported")
    fresh.set_adapters(["exported"], [weight])
    return unet_output(fresh.unet)


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
@pytest.mark.parametrize(("what", "weight"), [("identity", 0.8), ("slider", -0.7)])
def test_exported_file_in_diffusers_equals_live_adapter(live, tmp_path, format, what, weight):
    pipe, predictor, identity, slider = live
    exported = identity if what == "identity" else slider
    path = tmp_path / f"{what}.safetensors"
    pipe.hyperlora.export_lora(exported, path, format=format)

    expected = _live_output(pipe, "id" if what == "identity" else "slider", weight)
    without = _live_output(pipe, "id", 0.0)
    assert (expected - without).abs().max() > 1e-3  # the LoRA does something measurable
    torch.testing.assert_close(_loaded_output(path, weight), expected, **TOLERANCE)


def test_diffusers_format_stores_real_alpha_not_a_folded_scale(live, tmp_path):
    pipe, predictor, identity, slider = live
    path = tmp_path / "id.safetensors"
    state_dict = predictor.export_lora(identity, path, format="diffusers")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    adapter = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 4.0
    assert len(adapter["unet.target_modules"]) == len(predictor.config.linears)

    live_b = dict(pipe.unet.named_modules())[predictor.config.linears[0].module_path].lora_B["id"].weight
    stored_b = state_dict[f"unet.{predictor.config.linears[0].module_path}.lora_B.weight"]
    torch.testing.assert_close(stored_b, live_b.detach(), atol=0, rtol=0)

    # Without the adapter metadata diffusers assumes alpha = r: twice the update. The metadata is what keeps alpha.
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(path)), str(stripped))
    expected = _live_output(pipe, "id", 1.0)
    assert (_loaded_output(stripped, 1.0) - expected).abs().max() > 1e-3
    torch.testing.assert_close(_loaded_output(path, 1.0), expected, **TOLERANCE)


def test_kohya_layout_alpha_and_slider_rank(live):
    pipe, predictor, identity, slider = live
    linears = predictor.config.linears
    state_dict = predictor.export_lora(identity)
    assert len(state_dict) == 3 * len(linears)
    first = linears[0].kohya_name
    assert first == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state_dict[f"{first}.lora_down.weight"].shape == (8, linears[0].in_features)
    assert state_dict[f"{first}.lora_up.weight"].shape == (linears[0].out_features, 8)
    assert state_dict[f"{first}.alpha"].ndim == 0 and state_dict[f"{first}.alpha"].item() == 4.0

    slider_dict = predictor.export_lora(slider)
    assert slider_dict[f"{first}.lora_down.weight"].shape == (16, linears[0].in_features)
    assert slider_dict[f"{first}.alpha"].item() == 8.0  # scale alpha / r stays 0.5
    for linear in linears[:8]:
        down = slider_dict[f"{linear.kohya_name}.lora_down.weight"]
        up = slider_dict[f"{linear.kohya_name}.lora_up.weight"]
        index = linears.index(linear)
        (dn, un), (de, ue) = (predictor.lora_weights(i)[index] for i in (slider.neutral, slider.edited))
        torch.testing.assert_close(up @ down, ue @ de - un @ dn, atol=1e-6, rtol=1e-5)


def test_kohya_export_matches_the_reference_generator(official_tiny):
    predictor = load_predictor(official_tiny, torch_dtype=torch.float32)
    inputs = load_file(str(official_tiny / "inputs.safetensors"))
    identity = predictor.predict(
        id_embeds=inputs["arcface_normed_embedding"], clip_hidden_states=inputs["clip_hidden_states"]
    )
    exported = predictor.export_lora(identity, format="kohya")
    expected = load_file(str(official_tiny / "expected_lora_kohya.safetensors"))
    assert sorted(exported) == sorted(expected)
    for key, tensor in expected.items():
        assert exported[key].dtype == torch.float32 and exported[key].shape == tensor.shape, key
        torch.testing.assert_close(exported[key], tensor, atol=1e-5, rtol=1e-4)


def test_file_metadata_and_half_precision(live, tmp_path):
    pipe, predictor, identity, slider = live
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    predictor.export_lora(identity, full)
    predictor.export_lora(slider, half, dtype=torch.float16)
    with safe_open(str(half), framework="pt") as handle:
        metadata = handle.metadata()
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    assert metadata["hyperlora_kind"] == "slider"
    assert metadata["ss_network_dim"] == "16" and float(metadata["ss_network_alpha"]) == 8.0
    assert metadata["hyperlora_checkpoint"] == predictor.checkpoint_hash
    assert metadata["trigger_words"] == "fcsks fxhks fhyks"
    assert half.stat().st_size < 0.6 * 2 * full.stat().st_size  # rank 2r at half the bytes


def test_base_branch_export():
    predictor = tiny_hyperlora_predictor(base_rank=4)
    embeds, clip = random_features(batch=1, seed=4)
    identity = predictor.predict(id_embeds=embeds, clip_hidden_states=clip, base_clip_hidden_states=clip)
    state_dict = predictor.export_lora(identity, format="kohya", branch="base")
    key = predictor.config.linears[0].kohya_name
    assert state_dict[f"{key}.lora_down.weight"].shape[0] == 4 and state_dict[f"{key}.alpha"].item() == 2.0
    down, up = predictor.lora_weights(identity, "base")[0]
    torch.testing.assert_close(state_dict[f"{key}.lora_up.weight"], up)


def test_export_lives_in_io_and_the_predictor_method_is_the_same_call(live, tmp_path):
    pipe, predictor, identity, slider = live
    for what in (identity, slider):
        direct = export_lora(predictor, what, tmp_path / "direct.safetensors", dtype="fp16")
        via_method = predictor.export_lora(what, tmp_path / "method.safetensors", dtype="fp16")
        via_pipe = pipe.hyperlora.export_lora(what, tmp_path / "pipe.safetensors", dtype="fp16")
        assert direct.keys() == via_method.keys() == via_pipe.keys()
        assert all(torch.equal(direct[k], via_method[k]) and torch.equal(direct[k], via_pipe[k]) for k in direct)
        files = [load_file(tmp_path / f"{name}.safetensors") for name in ("direct", "method", "pipe")]
        assert files[0].keys() == direct.keys()
        assert all(torch.equal(files[0][k], f[k]) for f in files[1:] for k in direct)
        metadata = []
        for name in ("direct", "method", "pipe"):
            with safe_open(tmp_path / f"{name}.safetensors", "pt") as file:
                metadata.append(file.metadata())
        assert metadata[0] == metadata[1] == metadata[2] and metadata[0]["hyperlora_kind"] in ("identity", "slider")


def test_export_errors(live):
    pipe, predictor, identity, slider = live
    for call, kind, match, argument in (
        (lambda: predictor.export_lora(identity, format="comfy"), InvalidArgumentError, "format 'comfy'", "format"),
        (lambda: predictor.export_lora(identity, branch="base"), InvalidArgumentError, "no Base branch", "branch"),
        (lambda: predictor.export_lora(slider, branch="base"), InvalidArgumentError, "branch='id'", "branch"),
        (lambda: predictor.export_lora(identity, dtype=None), InvalidArgumentTypeError, "dtype", "dtype"),
        (lambda: predictor.export_lora("me.safetensors"), InvalidArgumentTypeError, "or a HyperLoRASlider", "identity"),
    ):
        with pytest.raises(kind, match=match) as caught:
            call()
        assert caught.value.argument == argument
    other = tiny_hyperlora_predictor(seed=9)
    with pytest.raises(IdentityMismatchError):
        other.export_lora(identity)
    with pytest.raises(IdentityMismatchError):
        other.export_lora(HyperLoRASlider(identity, identity))
    with pytest.raises(ValueError, match="down \\[r, 64\\]"):
        lora_state_dict(predictor.config.linears[:1], [(torch.zeros(8, 31), torch.zeros(64, 8))], alpha=4.0)
