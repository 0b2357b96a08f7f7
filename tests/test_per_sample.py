"""Per-sample identities: every image of a mixed batch equals the single-identity run with the same generator."""

from __future__ import annotations

import pytest
import torch
from conftest import random_features

from diffusers_hyperlora.adapters.per_sample import batch_rows
from diffusers_hyperlora.errors import HyperLoRAError, IdentityCountError, InvalidArgumentTypeError, PerSampleFusedError

PROMPTS = ["a photo of fcsks", "a painting of fhyks", "fxhks at the beach"]


def _identity(predictor, seed):
    embeds, clip = random_features(batch=1, seed=seed)
    return predictor.predict(id_embeds=embeds, clip_hidden_states=clip)


def _generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _run(pipe, prompts, seeds, **kwargs):
    return pipe(
        prompts,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=_generators(seeds),
        **kwargs,
    ).images


def _relative_error(got, expected) -> float:
    return float(abs(got - expected).max() / abs(expected).max())


@pytest.mark.parametrize(
    "guidance, per_prompt", [(1.0, 1), (5.0, 1), (5.0, 2)], ids=["no-guidance", "guidance", "guidance-2-images"]
)
def test_each_sample_equals_its_single_identity_run(pipe, predictor, guidance, per_prompt):
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, seed) for seed in range(2)]
    options = dict(guidance_scale=guidance, num_images_per_prompt=per_prompt)
    seeds = list(range(len(people) * per_prompt))
    pipe.set_hyperlora_identities(people)
    batch = _run(pipe, PROMPTS[: len(people)], seeds, **options)
    assert batch.shape[0] == len(people) * per_prompt
    for index, person in enumerate(people):
        pipe.set_hyperlora_identity(person)
        own_seeds = seeds[index * per_prompt : (index + 1) * per_prompt]
        single = _run(pipe, PROMPTS[index], own_seeds, **options)
        got = batch[index * per_prompt : (index + 1) * per_prompt]
        assert _relative_error(got, single) < 1e-5, f"prompt {index}"
    # The identities matter: prompt 0 with identity 1 differs from prompt 0 with identity 0.
    other = _run(pipe, PROMPTS[0], seeds[:per_prompt], **options)  # identity 1 is set now
    assert _relative_error(batch[:per_prompt], other) > 1e-3


def test_adapter_weights_and_other_loras_apply_per_sample(pipe, predictor):
    from test_core_pipeline import _style_lora

    pipe.load_lora_weights(_style_lora(pipe.unet), adapter_name="style")
    pipe.load_hyperlora(predictor)
    pipe.set_adapters(["style", "id", "base"], [0.7, 0.5, 1.0])
    people = [_identity(predictor, seed) for seed in (4, 5)]
    pipe.set_hyperlora_identities(people)
    batch = _run(pipe, PROMPTS[:2], [0, 1], guidance_scale=5.0)
    for index, person in enumerate(people):
        pipe.set_hyperlora_identity(person)
        single = _run(pipe, PROMPTS[index], [index], guidance_scale=5.0)
        assert _relative_error(batch[index : index + 1], single) < 1e-5
    # Weight 0 for "id" turns the per-sample LoRAs off too: the batch is then the style-only batch.
    pipe.set_hyperlora_identities(people)
    pipe.set_adapters(["style", "id", "base"], [0.7, 0.0, 1.0])
    off = _run(pipe, PROMPTS[:2], [0, 1], guidance_scale=5.0)
    pipe.set_adapters(["style"], [0.7])
    style_only = _run(pipe, PROMPTS[:2], [0, 1], guidance_scale=5.0)
    assert _relative_error(off, style_only) < 1e-6


def test_one_identity_for_all_after_per_sample(pipe, predictor):
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, seed) for seed in (6, 7)]
    pipe.set_hyperlora_identity(people[0])
    reference = _run(pipe, PROMPTS[:2], [0, 1])
    pipe.set_hyperlora_identities(people)
    pipe.set_hyperlora_identity(people[0])
    assert _relative_error(_run(pipe, PROMPTS[:2], [0, 1]), reference) < 1e-6
    assert not pipe.hyperlora.per_sample_active


def test_prompt_count_must_match_identity_count(pipe, predictor):
    pipe.load_hyperlora(predictor)
    pipe.set_hyperlora_identities([_identity(predictor, 0), _identity(predictor, 1)])
    with pytest.raises(IdentityCountError, match="one identity per\\s+prompt") as error:
        _run(pipe, PROMPTS[:3], [0, 1, 2])
    assert isinstance(error.value, HyperLoRAError) and isinstance(error.value, ValueError)
    with pytest.raises(IdentityCountError, match="at least one"):
        pipe.set_hyperlora_identities([])
    with pytest.raises(InvalidArgumentTypeError, match="one entry per prompt"):
        pipe.set_hyperlora_identities(_identity(predictor, 0))  # one identity, not a list
    assert pipe.hyperlora.identities is not None  # the failed calls changed nothing


def test_identity_files_are_accepted_per_prompt(pipe, predictor, tmp_path):
    pipe.load_hyperlora(predictor)
    alice, bob = _identity(predictor, 0), _identity(predictor, 1)
    bob.save(tmp_path / "bob.safetensors")
    pipe.set_hyperlora_identities([alice, str(tmp_path / "bob.safetensors")])
    got = pipe.hyperlora.identities
    assert got[0] is alice and torch.equal(got[1].id_coefficients, bob.id_coefficients)
    assert pipe.hyperlora.identity is None and pipe.hyperlora_identity is None


def test_per_sample_refuses_fused_adapters(pipe, predictor):
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, 0), _identity(predictor, 1)]
    pipe.set_hyperlora_identity(people[0])
    pipe.fuse_lora()
    with pytest.raises(PerSampleFusedError, match="unfuse_lora"):
        pipe.set_hyperlora_identities(people)
    pipe.unfuse_lora()
    pipe.set_hyperlora_identities(people)
    pipe.fuse_lora()  # fusing afterwards: the next call says why it cannot run
    with pytest.raises(PerSampleFusedError, match="unfuse_lora"):
        _run(pipe, PROMPTS[:2], [0, 1])


def test_batch_rows_layout():
    assert batch_rows(3, 3, guidance=False).tolist() == [0, 1, 2]
    assert batch_rows(3, 6, guidance=True).tolist() == [0, 1, 2, 0, 1, 2]
    assert batch_rows(2, 8, guidance=True).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    for batch, guidance in ((3, False), (6, True), (5, True)):
        with pytest.raises(IdentityCountError):
            batch_rows(2, batch, guidance)


def _other_pipeline_cases():
    from test_core_pipeline import _pipeline_cases

    return _pipeline_cases()


@pytest.mark.parametrize("case", _other_pipeline_cases(), ids=lambda c: c[0])
def test_per_sample_in_other_sdxl_pipelines(case):
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_components

    _, pipeline_class, extra, call_kwargs = case
    components = tiny_sdxl_components()
    components.update(extra(components))
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    predictor = tiny_hyperlora_predictor()
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, seed) for seed in (8, 9)]
    # One conditioning image per prompt, as diffusers expects for a batch of prompts (a single image is encoded
    # with the first generator only, which would make the batch's noise differ from the single runs').
    per_prompt = {k: [v, v] if k in ("image", "mask_image") else v for k, v in call_kwargs.items()}
    pipe.set_hyperlora_identities(people)
    batch = _run(pipe, PROMPTS[:2], [0, 1], guidance_scale=5.0, **per_prompt)
    for index, person in enumerate(people):
        pipe.set_hyperlora_identity(person)
        single = _run(pipe, PROMPTS[index], [index], guidance_scale=5.0, **call_kwargs)
        assert _relative_error(batch[index : index + 1], single) < 1e-5, f"prompt {index}"
