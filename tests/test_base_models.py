"""HyperLoRA on base models other than SDXL: SD 1.5 (UNet), SD3 and FLUX (transformers), tiny pipelines built in code.

Each family runs the same end-to-end checks as SDXL: an identity changes the pipeline's output, the exported LoRA
(kohya names for the UNet, the diffusers layout for transformers) reloads with `load_lora_weights` to the same
output, and unloading restores the denoiser bitwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_features
from safetensors import safe_open

from diffusers_hyperlora import (
    HyperLoRAConfig,
    HyperLoRAPredictor,
    InvalidArgumentError,
    TargetMismatchError,
    load_hyperlora,
    set_hyperlora_identity,
    unload_hyperlora,
)
from diffusers_hyperlora.model.targets import DEFAULT_LINEARS, JOINT_ATTENTION_LINEARS, TargetModule
from diffusers_hyperlora.testing import (
    tiny_flux_components,
    tiny_flux_pipeline,
    tiny_hyperlora_predictor,
    tiny_sd3_components,
    tiny_sd3_pipeline,
    tiny_sd15_components,
    tiny_sd15_pipeline,
)

FAMILIES = {
    "sd15": (tiny_sd15_pipeline, {}),
    "sd3": (tiny_sd3_pipeline, {}),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 32}),
}


def denoiser_of(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def generate(pipe, family: str, **kwargs) -> np.ndarray:
    extra = {**FAMILIES[family][1], **kwargs}
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np", **extra
    ).images


def identity_for(predictor, seed: int = 0):
    embeds, clip = random_features(batch=2, seed=seed)
    return predictor.predict(id_embeds=embeds, clip_hidden_states=clip)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------- targets as data
def test_unet_targets_are_q_k_v_out_of_every_attention():
    config = HyperLoRAConfig.from_denoiser(tiny_sd15_components()["unet"], num_basis=8)
    assert config.denoiser == "unet" and config.lora_formats == ("kohya", "diffusers")
    assert len(config.targets) == 8 and all(t.linear_names == DEFAULT_LINEARS for t in config.targets)
    assert config.targets[0].name == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1"
    cross = [t for t in config.targets if t.module_path.endswith("attn2")]
    assert cross and all(t.cross_attention_dim == 32 for t in cross)  # SD 1.5's text width
    assert config.num_tokens == 2 * 4 * 8  # (down, up) x (q, k, v, out) x 8 modules


def test_sd3_targets_include_the_joint_attention_context_projections():
    config = HyperLoRAConfig.from_denoiser(tiny_sd3_components()["transformer"], num_basis=8)
    assert config.denoiser == "transformer" and config.lora_formats == ("diffusers",)
    first, last = config.targets
    assert first.module_path == "transformer_blocks.0.attn" and first.linear_names == JOINT_ATTENTION_LINEARS
    # The last SD3 block only reads the context (`context_pre_only`): no `to_add_out`.
    assert last.linear_names == JOINT_ATTENTION_LINEARS[:-1]
    assert [lin.module_path for lin in config.linears][4:8] == [
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.attn.to_add_out",
    ]
    assert config.num_tokens == 2 * 15


def test_flux_single_blocks_target_only_their_q_k_v():
    config = HyperLoRAConfig.from_denoiser(tiny_flux_components()["transformer"])
    joint, single = config.targets
    assert joint.linear_names == JOINT_ATTENTION_LINEARS
    assert single.module_path == "single_transformer_blocks.0.attn"
    assert single.linear_names == ("to_q", "to_k", "to_v")


def test_chosen_linears_are_config_data_and_round_trip_through_config_json(tmp_path):
    transformer = tiny_flux_components()["transformer"]
    predictor = tiny_hyperlora_predictor(transformer, linears=("to_q", "add_k_proj"))
    assert [t.linear_names for t in predictor.config.targets] == [("to_q", "add_k_proj"), ("to_q",)]
    predictor.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["denoiser"] == "transformer"
    assert [t["linear_names"] for t in saved["targets"]] == [["to_q", "add_k_proj"], ["to_q"]]
    reloaded = HyperLoRAPredictor.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config == predictor.config
    assert reloaded.config.architecture_hash() == predictor.config.architecture_hash()


def test_configs_without_linear_names_keep_the_default_linears_and_their_hash():
    config = tiny_hyperlora_predictor().config  # the tiny SDXL UNet
    data = config.to_json_dict()
    assert all("linear_names" not in target for target in data["targets"])  # older readers see the same file
    assert "denoiser" in data
    del data["denoiser"]
    old = HyperLoRAConfig.from_json_dict(data)
    assert old.denoiser == "unet" and all(t.linear_names == DEFAULT_LINEARS for t in old.targets)
    # The hash of a default-linears config is the one it had before `linear_names` existed.
    assert old.architecture_hash() == "3032a70676f2c057"


def test_unknown_linear_names_are_refused():
    with pytest.raises(InvalidArgumentError, match="linear_names"):
        TargetModule("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1", 8, linear_names=("to_x",))
    with pytest.raises(TargetMismatchError, match="linears") as caught:
        HyperLoRAConfig.from_denoiser(tiny_sd3_components()["transformer"], linears=("to_qq",))
    assert caught.value.argument == "linears"


def test_an_unsupported_denoiser_is_refused_by_name():
    with pytest.raises(TargetMismatchError, match="Linear is not a denoiser") as caught:
        HyperLoRAConfig.from_denoiser(torch.nn.Linear(2, 2))
    assert caught.value.argument == "denoiser"


def test_a_linear_whose_widths_do_not_follow_its_module_is_refused():
    transformer = tiny_sd3_components()["transformer"]
    transformer.transformer_blocks[0].attn.add_k_proj = torch.nn.Linear(16, 32)  # context width 16, not 32
    with pytest.raises(TargetMismatchError, match=r"add_k_proj is a \[16 -> 32\] linear"):
        HyperLoRAConfig.from_denoiser(transformer)


def test_kohya_export_is_refused_for_transformer_checkpoints(tmp_path):
    predictor = tiny_hyperlora_predictor(tiny_sd3_components()["transformer"])
    identity = identity_for(predictor)
    with pytest.raises(InvalidArgumentError, match="format='diffusers'") as caught:
        predictor.export_lora(identity, tmp_path / "me.safetensors", format="kohya")
    assert caught.value.argument == "format"
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- end to end
def test_identity_changes_output_export_reloads_and_unload_is_bitwise(family, tmp_path):
    make, _ = FAMILIES[family]
    pipe = make()
    denoiser = denoiser_of(pipe)
    before_weights = {k: v.clone() for k, v in denoiser.state_dict().items()}
    before = generate(pipe, family)
    predictor = tiny_hyperlora_predictor(denoiser)
    load_hyperlora(pipe, predictor)
    identity = identity_for(predictor)
    set_hyperlora_identity(pipe, identity)
    with_identity = generate(pipe, family)
    assert np.abs(with_identity - before).max() > 1e-4

    path = tmp_path / "me.safetensors"
    state_dict = predictor.export_lora(identity, path)  # kohya for the UNet, diffusers for transformers
    prefix = "lora_unet_" if family == "sd15" else "transformer."
    assert all(key.startswith(prefix) for key in state_dict)
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    assert metadata["hyperlora_format"] == ("kohya" if family == "sd15" else "diffusers")

    unload_hyperlora(pipe)
    assert denoiser.state_dict().keys() == before_weights.keys()
    assert all(torch.equal(value, before_weights[key]) for key, value in denoiser.state_dict().items())
    np.testing.assert_array_equal(generate(pipe, family), before)

    pipe.load_lora_weights(str(tmp_path), weight_name="me.safetensors", adapter_name="me")
    pipe.set_adapters(["me"], [predictor.config.default_id_weight])
    np.testing.assert_allclose(generate(pipe, family), with_identity, atol=1e-5)


@pytest.mark.parametrize("name", ["sd15", "sd3", "flux"])
def test_img2img_variants_take_an_identity(name):
    make, _ = FAMILIES[name]
    pipe = make(img2img=True)
    image = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    kwargs = {"image": image, "strength": 0.75}
    if name != "sd15":
        kwargs.update(height=32, width=32)
    generator = torch.Generator().manual_seed(0)
    extra = FAMILIES[name][1]

    def run():
        return pipe("a photo", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs, **extra).images

    del generator
    before = run()
    predictor = tiny_hyperlora_predictor(denoiser_of(pipe))
    load_hyperlora(pipe, predictor)
    set_hyperlora_identity(pipe, identity_for(predictor))
    assert np.abs(run() - before).max() > 1e-4
    unload_hyperlora(pipe)
    np.testing.assert_array_equal(run(), before)
