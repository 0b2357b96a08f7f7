"""Faults of the serving features: per-sample identities, the prepared-identity cache, sliders and exports.

Every test is a failure first seen here: a call that reported success where it failed, left state behind, or
raised a raw error from deep inside torch. Most run the tiny UNet directly (fast); the layout check needs
`encoder_hidden_states` like a pipeline call passes them.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_features, unet_inputs, unet_output
from safetensors.torch import load_file

from diffusers_hyperlora import HyperLoRAError, IdentityCountError, InvalidArgumentError, InvalidArgumentTypeError
from diffusers_hyperlora.identities.cache import PreparedIdentityCache
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def predictor():
    return tiny_hyperlora_predictor(seed=0)


@pytest.fixture(scope="module")
def people(predictor):
    return [predictor.predict(*random_features(batch=1, seed=seed)) for seed in range(2)]


@pytest.fixture
def loaded(predictor):
    pipe = tiny_sdxl_pipeline()
    pipe.load_hyperlora(predictor)
    return pipe


def _copies_of(inputs: dict, copies: int) -> dict:
    """The UNet inputs with every row's conditioning repeated `copies` times, as `num_images_per_prompt` does."""
    repeat = lambda t: t.repeat_interleave(copies, 0)  # noqa: E731
    return dict(
        sample=repeat(inputs["sample"]),
        timestep=repeat(inputs["timestep"]),
        encoder_hidden_states=repeat(inputs["encoder_hidden_states"]),
        added_cond_kwargs={key: repeat(value) for key, value in inputs["added_cond_kwargs"].items()},
    )


# ---------------------------------------------------------------------------------------------- per-sample layout
@torch.no_grad()
def test_more_prompts_than_identities_is_refused_not_shared(loaded, people):
    """4 different prompts for 2 identities has the row count of 2 prompts x 2 images: prompts 1 and 3 silently
    got the identity of prompts 0 and 2."""
    loaded.set_hyperlora_identities(people)
    with pytest.raises(IdentityCountError, match="one identity per prompt") as error:
        loaded.unet(**unet_inputs(seed=0, batch=4))  # 4 different prompts
    assert isinstance(error.value, HyperLoRAError) and isinstance(error.value, ValueError)
    # 2 prompts x 2 images each (consecutive copies of one prompt) is the layout it is meant for, and works.
    out = loaded.unet(**_copies_of(unet_inputs(seed=0, batch=2), 2)).sample
    assert out.shape[0] == 4 and torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])


# ---------------------------------------------------------------------------------------------- living beside diffusers
@pytest.mark.parametrize("removal", ["unload_lora_weights", "delete_adapters"])
@torch.no_grad()
def test_per_sample_mode_ends_when_diffusers_removes_the_adapters(loaded, people, removal):
    """After `unload_lora_weights` the per-sample hooks stayed: `identities` still listed people and a batch of
    another size raised IdentityCountError about adapters that were gone."""
    reference = tiny_sdxl_pipeline()
    loaded.set_hyperlora_identities(people)
    if removal == "unload_lora_weights":
        loaded.unload_lora_weights()
    else:
        loaded.delete_adapters(["id", "base"])
    assert loaded.hyperlora.identities is None and not loaded.hyperlora.per_sample_active
    assert torch.equal(unet_output(loaded.unet), unet_output(reference.unet))  # batch of 1, no identity
    loaded.set_hyperlora_identity(people[0])  # attaches again, one identity for all
    assert loaded.hyperlora.identity is people[0]


# ---------------------------------------------------------------------------------------------- sliders
def test_removing_a_fused_slider_takes_its_update_out_of_the_weights(loaded, people):
    """`remove_hyperlora_slider` on a fused slider deleted the adapter but left its update merged in the UNet."""
    without = unet_output(loaded.unet)
    loaded.add_hyperlora_slider(*people, weight=1.0)
    loaded.fuse_lora(adapter_names=["slider"])
    assert not torch.allclose(unet_output(loaded.unet), without)
    loaded.remove_hyperlora_slider()
    assert torch.equal(unet_output(loaded.unet), without)


def test_unload_with_a_fused_slider_restores_the_unet(predictor, people):
    """`unload_hyperlora` with a fused slider left the slider baked into the plain UNet forever."""
    pipe = tiny_sdxl_pipeline()
    before = unet_output(pipe.unet)
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identity(people[0])
    pipe.add_hyperlora_slider(*people, weight=1.0)
    pipe.fuse_lora(adapter_names=["slider"])  # only the slider: "id" / "base" stay unfused
    pipe.unload_hyperlora()
    assert torch.equal(unet_output(pipe.unet), before)


@pytest.mark.parametrize(
    "weight, error",
    [(math.nan, InvalidArgumentError), (math.inf, InvalidArgumentError), ("big", InvalidArgumentTypeError)],
)
def test_slider_weight_is_checked_before_anything_changes(loaded, people, weight, error):
    """A NaN weight made every image NaN; a string left a half-added adapter on the UNet after a raw TypeError."""
    adapters_before = set(loaded.unet.peft_config)
    output_before = unet_output(loaded.unet)
    with pytest.raises(error, match="weight"):
        loaded.add_hyperlora_slider(*people, adapter_name="age", weight=weight)
    assert set(loaded.unet.peft_config) == adapters_before and loaded.hyperlora.sliders == {}
    assert torch.equal(unet_output(loaded.unet), output_before)


# ---------------------------------------------------------------------------------------------- cache budget
@pytest.mark.parametrize("budget", [-1, math.nan, math.inf, "1"])
def test_cache_budget_is_validated(budget):
    cache = PreparedIdentityCache(max_bytes=100)
    expected = InvalidArgumentTypeError if isinstance(budget, str) else InvalidArgumentError
    with pytest.raises(expected, match="max_bytes"):
        cache.max_bytes = budget
    assert cache.max_bytes == 100
    with pytest.raises(expected, match="max_bytes"):
        PreparedIdentityCache(max_bytes=budget)


def test_shrinking_the_cache_budget_evicts_at_once(loaded, people):
    """`cache.max_bytes = 0` kept every entry (and its memory) until the next new identity."""
    cache = loaded.hyperlora.cache
    for person in people:
        loaded.set_hyperlora_identity(person)
    assert len(cache) == 2
    one = cache.nbytes // 2
    cache.max_bytes = one
    assert len(cache) == 1 and cache.nbytes == one
    cache.max_bytes = 0
    assert len(cache) == 0 and cache.nbytes == 0


# ---------------------------------------------------------------------------------------------- exports
@pytest.mark.parametrize(
    ("dtype", "error"),
    [(object(), InvalidArgumentTypeError), ("float8", InvalidArgumentError), (torch.int8, InvalidArgumentError)],
)
def test_export_dtype_is_checked(loaded, people, tmp_path, dtype, error):
    """A non-dtype raised torch's TypeError; `torch.int8` wrote a LoRA of rounded-away zeros."""
    path = tmp_path / "me.safetensors"
    with pytest.raises(error, match="dtype"):
        loaded.hyperlora.export_lora(people[0], path, dtype=dtype)
    assert not path.exists()


def test_export_dtype_may_be_a_name_like_the_loaders_take(loaded, people, tmp_path):
    state = loaded.hyperlora.export_lora(people[0], tmp_path / "me.safetensors", dtype="fp16")
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    assert {t.dtype for t in load_file(tmp_path / "me.safetensors").values()} == {torch.float16}
