"""Per-sample identities: every image of a mixed batch equals the single-identity run with the same generator."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import random_features

from diffusers_hyperlora.adapters.per_sample import batch_rows, call_layout
from diffusers_hyperlora.errors import (
    HyperLoRAError,
    IdentityCountError,
    IdentityMismatchError,
    InvalidArgumentTypeError,
    PerSampleFusedError,
)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

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
    with pytest.raises(IdentityCountError, match="at least one") as caught:
        pipe.set_hyperlora_identities([])
    assert caught.value.argument == "identities"
    with pytest.raises(InvalidArgumentTypeError, match="one entry per prompt"):
        pipe.set_hyperlora_identities(_identity(predictor, 0))  # one identity, not a list
    assert pipe.hyperlora.identities is not None  # the failed calls changed nothing
    before = pipe.hyperlora.identities
    with pytest.raises(HyperLoRAError, match=r"entry 1 \(prompt 1\)"):  # was "Input image #0: got a NoneType"
        pipe.set_hyperlora_identities([_identity(predictor, 0), None])
    assert [id(identity) for identity in pipe.hyperlora.identities] == [id(identity) for identity in before]


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


def _image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("first, second", [(1.0, 5.0), (5.0, 1.0)], ids=["then-guided", "then-unguided"])
def test_a_second_pipeline_sharing_the_unet_gives_each_image_its_person(pipe, predictor, first, second):
    """The layout comes from the UNet call, not from the guidance state of the pipeline the identities were set on:
    an img2img pipeline made with `from_pipe` and run with another `guidance_scale` gave image 1 the wrong person."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, seed) for seed in (10, 11)]
    pipe.set_hyperlora_identities(people)
    _run(pipe, PROMPTS[:2], [0, 1], guidance_scale=first)  # leaves `pipe`'s guidance state at `first`
    other = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    options = dict(guidance_scale=second, strength=0.9)
    batch = _run(other, PROMPTS[:2], [0, 1], image=[_image(), _image()], **options)
    for index, person in enumerate(people):
        pipe.set_hyperlora_identity(person)
        single = _run(other, PROMPTS[index], [index], image=_image(), **options)
        assert _relative_error(batch[index : index + 1], single) < 1e-5, f"image {index}"
    # The identities matter: image 0 with person 1 (set now) differs from image 0 of the batch.
    assert _relative_error(batch[:1], _run(other, PROMPTS[0], [0], image=_image(), **options)) > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-guidance", "guidance"])
def test_one_prompt_with_one_image_per_identity(pipe, predictor, guidance):
    """`num_images_per_prompt=N` with one prompt and N identities: image i is identity i (as documented), exactly."""
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, seed) for seed in (12, 13)]
    pipe.set_hyperlora_identities(people)
    batch = _run(pipe, PROMPTS[0], [0, 1], guidance_scale=guidance, num_images_per_prompt=2)
    for index, person in enumerate(people):
        pipe.set_hyperlora_identity(person)
        single = _run(pipe, PROMPTS[0], [index], guidance_scale=guidance)
        assert _relative_error(batch[index : index + 1], single) < 1e-5, f"image {index}"
    assert _relative_error(batch[:1], _run(pipe, PROMPTS[0], [0], guidance_scale=guidance)) > 1e-3
    # 3 images of one prompt cannot be split between 2 identities.
    pipe.set_hyperlora_identities(people)
    with pytest.raises(IdentityCountError, match="one identity per\\s+prompt"):
        _run(pipe, PROMPTS[0], [0, 1, 2], guidance_scale=guidance, num_images_per_prompt=3)


def test_same_prompt_and_seed_for_every_identity_without_guidance(pipe, predictor):
    """Without guidance, the same prompt and seed for each identity's images makes the batch's two halves identical,
    as guidance halves are: the calling pipeline's guidance tells them apart, exactly."""
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, 14), _identity(predictor, 15)]
    pipe.set_hyperlora_identities(people)
    options = dict(guidance_scale=1.0, num_images_per_prompt=2)
    batch = _run(pipe, [PROMPTS[0]] * 2, [0, 1, 0, 1], **options)
    for index, person in enumerate(people):
        pipe.set_hyperlora_identity(person)
        single = _run(pipe, PROMPTS[0], [0, 1], **options)
        assert _relative_error(batch[2 * index : 2 * index + 2], single) < 1e-5, f"identity {index}"
    assert _relative_error(batch[:2], batch[2:]) > 1e-3


def test_call_layout_checks_the_guided_batch():
    noise = torch.randn(2, 4, 8, 8)
    assert call_layout(torch.cat([noise, noise]), 2, guidance=True)
    assert not call_layout(torch.cat([noise, noise]), 2, guidance=False)
    assert not call_layout(torch.cat([noise, noise]), 2, guidance=None)  # a direct call: no guidance halves
    assert call_layout(torch.randn(4, 4, 8, 8), 1, guidance=True)  # one identity: any guided layout
    for sample in (torch.randn(4, 4, 8, 8), torch.cat([noise, noise, noise])):  # not two equal halves
        with pytest.raises(IdentityCountError, match=r"not\s+two equal"):
            call_layout(sample, 2, guidance=True)


def test_a_direct_unet_call_after_a_guided_pipeline_call_has_no_guidance_halves(pipe, predictor):
    from conftest import unet_inputs

    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, 18), _identity(predictor, 19)]
    pipe.set_hyperlora_identities(people)
    _run(pipe, PROMPTS[:2], [0, 1], guidance_scale=5.0)
    inputs = unet_inputs(seed=0, batch=2)
    with torch.no_grad():
        batch = pipe.unet(**inputs).sample
        for index, person in enumerate(people):
            pipe.set_hyperlora_identity(person)
            row = {k: v[index : index + 1] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            row["added_cond_kwargs"] = {k: v[index : index + 1] for k, v in inputs["added_cond_kwargs"].items()}
            single = pipe.unet(**row).sample
            torch.testing.assert_close(batch[index : index + 1], single, rtol=1e-5, atol=1e-5)


def test_using_switches_and_holds_the_lock_for_the_block(pipe, predictor):
    pipe.load_hyperlora(predictor)
    alice, bob = _identity(predictor, 16), _identity(predictor, 17)
    acquired = []

    def other_thread_switch():
        acquired.append(pipe.hyperlora.lock.acquire(timeout=0.2))
        if acquired[-1]:
            pipe.hyperlora.lock.release()

    with pipe.hyperlora.using(alice) as identity:
        assert identity is alice and pipe.hyperlora_identity is alice
        thread = threading.Thread(target=other_thread_switch)
        thread.start()
        thread.join()
        image = _run(pipe, PROMPTS[0], [0])
    assert acquired == [False]  # no other thread could switch during the block
    assert pipe.hyperlora.lock.acquire(timeout=0.2)  # released after it
    pipe.hyperlora.lock.release()
    pipe.set_hyperlora_identity(alice)
    assert _relative_error(image, _run(pipe, PROMPTS[0], [0])) < 1e-6
    with pipe.hyperlora.using_identities([alice, bob]) as identities:
        assert identities == [alice, bob] and pipe.hyperlora.identities == [alice, bob]
    with pytest.raises(IdentityMismatchError):  # a failed switch releases the lock and changes nothing
        with pipe.hyperlora.using(_identity(tiny_hyperlora_predictor(seed=3), 0)):
            pass
    assert pipe.hyperlora.identities == [alice, bob]
    thread = threading.Thread(target=other_thread_switch)
    thread.start()
    thread.join()
    assert acquired[-1] is True
