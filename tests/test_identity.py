"""HyperLoRAIdentity: files, exact merging, blends of people."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from conftest import random_features
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_hyperlora import HyperLoRAIdentity, HyperLoRAPredictor, IdentityMismatchError
from diffusers_hyperlora.errors import (
    HyperLoRAError,
    IdentityFormatError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from diffusers_hyperlora.identities.identity import (
    IDENTITY_FORMAT_VERSION,
    normalize_coefficients,
    normalize_mix_weights,
)
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config

_CONFIG = tiny_hyperlora_config()


def tiny_hyperlora_predictor(seed: int = 0, **overrides) -> HyperLoRAPredictor:
    """Like `diffusers_hyperlora.testing.tiny_hyperlora_predictor`, reusing one config (building it takes a while)."""
    torch.manual_seed(seed)
    return HyperLoRAPredictor(dataclasses.replace(_CONFIG, **overrides)).eval()


@pytest.fixture(scope="module")
def predictor():
    return tiny_hyperlora_predictor(seed=0)


def _predict(predictor, batch, seed, names=None):
    embeds, clip = random_features(batch=batch, seed=seed)
    return predictor.predict(id_embeds=embeds, clip_hidden_states=clip, sources=names)


@pytest.fixture(scope="module")
def two_people(predictor):
    return _predict(predictor, 2, seed=1, names=["a1.jpg", "a2.jpg"]), _predict(predictor, 3, seed=2)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_is_exact_and_small(predictor, two_people, tmp_path):
    identity = two_people[0]
    path = tmp_path / "alice.safetensors"
    identity.save(path)
    loaded = HyperLoRAIdentity.load(path)

    assert torch.equal(loaded.id_mean, identity.id_mean)
    assert torch.equal(loaded.probe, identity.probe)
    assert loaded.num_images == 2
    assert loaded.sources == ["a1.jpg", "a2.jpg"]
    assert loaded.checkpoint == predictor.checkpoint_hash
    assert loaded.kind == "photos"
    assert loaded.base_mean is None
    # Only the float32 coefficients plus a header: the release (1120 x 128) gives ~0.6 MB.
    payload = identity.id_mean.numel() * 4
    assert payload < path.stat().st_size < payload + 4096
    for (d0, u0), (d1, u1) in zip(predictor.lora_weights(identity), predictor.lora_weights(loaded), strict=True):
        assert torch.equal(d0, d1) and torch.equal(u0, u1)


def test_file_metadata_names_version_checkpoint_and_images(two_people, tmp_path):
    path = tmp_path / "alice.safetensors"
    two_people[0].save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["hyperlora_identity_version"] == str(IDENTITY_FORMAT_VERSION)
    assert metadata["checkpoint"] == two_people[0].checkpoint
    assert metadata["num_images"] == "2"
    assert json.loads(metadata["sources"]) == ["a1.jpg", "a2.jpg"]


def test_base_branch_round_trip(tmp_path):
    predictor = tiny_hyperlora_predictor(base_rank=4)
    embeds, clip = random_features(batch=2, seed=3)
    identity = predictor.predict(id_embeds=embeds, clip_hidden_states=clip, base_clip_hidden_states=clip + 1)
    identity.save(tmp_path / "b.safetensors")
    loaded = HyperLoRAIdentity.load(tmp_path / "b.safetensors", predictor=predictor)
    assert torch.equal(loaded.base_mean, identity.base_mean)
    assert torch.allclose(loaded.base_coefficients.norm(dim=-1), torch.ones(loaded.base_mean.shape[0]), atol=1e-5)


def test_loading_into_another_checkpoint_fails_clearly(two_people, tmp_path):
    path = tmp_path / "alice.safetensors"
    two_people[0].save(path)
    same_architecture_other_weights = tiny_hyperlora_predictor(seed=1)
    other_architecture = tiny_hyperlora_predictor(num_basis=4)

    with pytest.raises(IdentityMismatchError, match="another HyperLoRA checkpoint"):
        HyperLoRAIdentity.load(path, predictor=same_architecture_other_weights)
    loaded = HyperLoRAIdentity.load(path)  # lazily checked on use
    for predictor in (same_architecture_other_weights, other_architecture):
        with pytest.raises(IdentityMismatchError, match="Predict it again"):
            predictor.lora_weights(loaded)


def test_bad_identity_files(predictor, two_people, tmp_path):
    with pytest.raises(FileNotFoundError, match="No identity file"):
        HyperLoRAIdentity.load(tmp_path / "missing.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(IdentityFormatError, match="not a readable .safetensors"):
        HyperLoRAIdentity.load(garbage)

    lora = tmp_path / "lora.safetensors"
    predictor.export_lora(two_people[0], lora)
    with pytest.raises(IdentityFormatError, match="looks like a LoRA file"):
        HyperLoRAIdentity.load(lora)

    newer = tmp_path / "newer.safetensors"
    save_file({"id_mean": torch.zeros(8, 4)}, str(newer), metadata={"hyperlora_identity_version": "99"})
    with pytest.raises(IdentityFormatError, match="newer diffusers-hyperlora"):
        HyperLoRAIdentity.load(newer)

    no_mean = tmp_path / "no_mean.safetensors"
    save_file({"probe": torch.zeros(8)}, str(no_mean), metadata={"hyperlora_identity_version": "1"})
    with pytest.raises(IdentityFormatError, match="'id_mean'"):
        HyperLoRAIdentity.load(no_mean)

    zero_images = tmp_path / "zero.safetensors"
    meta = {"hyperlora_identity_version": "1", "num_images": "0"}
    save_file({"id_mean": torch.zeros(8, 4)}, str(zero_images), metadata=meta)
    with pytest.raises(HyperLoRAError, match="num_images=0"):
        HyperLoRAIdentity.load(zero_images)


# ------------------------------------------------------------------------------------------------ merging photos
def test_merging_saved_identities_equals_predicting_from_all_photos(predictor, tmp_path):
    embeds_a, clip_a = random_features(batch=2, seed=10)
    embeds_b, clip_b = random_features(batch=3, seed=11)
    a = predictor.predict(id_embeds=embeds_a, clip_hidden_states=clip_a, sources=["a1", "a2"])
    b = predictor.predict(id_embeds=embeds_b, clip_hidden_states=clip_b, sources=["b1", "b2", "b3"])
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    merged = HyperLoRAIdentity.merge(
        [HyperLoRAIdentity.load(tmp_path / "a.safetensors"), HyperLoRAIdentity.load(tmp_path / "b.safetensors")]
    )
    together = predictor.predict(
        id_embeds=torch.cat([embeds_a, embeds_b]), clip_hidden_states=torch.cat([clip_a, clip_b])
    )

    assert merged.num_images == 5
    assert merged.sources == ["a1", "a2", "b1", "b2", "b3"]
    assert torch.allclose(merged.id_mean, together.id_mean, atol=1e-6)
    assert torch.allclose(merged.id_coefficients, together.id_coefficients, atol=1e-5)
    # A plain average of the two normalized identities is *not* the same thing (the counts 2 and 3 matter).
    naive = normalize_coefficients(a.id_coefficients + b.id_coefficients)
    assert (naive - together.id_coefficients).abs().max() > 1e-3
    for (d0, u0), (d1, u1) in zip(predictor.lora_weights(merged), predictor.lora_weights(together), strict=True):
        assert torch.allclose(d0, d1, atol=1e-5) and torch.allclose(u0, u1, atol=1e-5)


def test_merge_refuses_identities_of_different_checkpoints(two_people):
    other = _predict(tiny_hyperlora_predictor(seed=5), 1, seed=1)
    with pytest.raises(IdentityMismatchError):
        HyperLoRAIdentity.merge([two_people[0], other])
    with pytest.raises(ValueError, match="at least one"):
        HyperLoRAIdentity.merge([])


# ------------------------------------------------------------------------------------------------ blending people
def test_interpolate_endpoints_and_midpoint(two_people):
    a, b = two_people
    start = HyperLoRAIdentity.interpolate(a, b, 0.0)
    end = HyperLoRAIdentity.interpolate(a, b, 1.0)
    middle = HyperLoRAIdentity.interpolate(a, b, 0.5)

    assert torch.allclose(start.id_coefficients, a.id_coefficients, atol=1e-6)
    assert torch.allclose(end.id_coefficients, b.id_coefficients, atol=1e-6)
    expected = normalize_coefficients(a.id_coefficients + b.id_coefficients)
    assert torch.allclose(middle.id_coefficients, expected, atol=1e-6)
    assert middle.kind == "mix" and middle.num_images == 5
    # The midpoint is equally far (in angle) from both people, token by token.
    cos_a = (middle.id_coefficients * a.id_coefficients).sum(-1)
    cos_b = (middle.id_coefficients * b.id_coefficients).sum(-1)
    assert torch.allclose(cos_a, cos_b, atol=1e-5)


def test_mix_weights_people_not_photo_counts_or_raw_norms(two_people):
    a, b = two_people
    # Same person directions, but `a`'s raw mean is 10x longer (as with fewer, more similar photos).
    loud_a = HyperLoRAIdentity(a.id_mean * 10, 40, None, a.checkpoint, a.probe)
    mixed = HyperLoRAIdentity.mix([a, b], [0.3, 0.7])
    mixed_loud = HyperLoRAIdentity.mix([loud_a, b], [0.3, 0.7])
    assert torch.allclose(mixed.id_coefficients, mixed_loud.id_coefficients, atol=1e-6)
    # merge, on the other hand, is a photo pool and follows counts and raw means.
    merged, merged_loud = HyperLoRAIdentity.merge([a, b]), HyperLoRAIdentity.merge([loud_a, b])
    assert (merged.id_coefficients - merged_loud.id_coefficients).abs().max() > 1e-2


def test_mix_of_three_matches_the_formula_and_only_ratios_matter(predictor, two_people):
    a, b = two_people
    c = _predict(predictor, 1, seed=7)
    mixed = HyperLoRAIdentity.mix([a, b, c], [2.0, 1.0, 1.0])
    scaled = HyperLoRAIdentity.mix([a, b, c], [0.5, 0.25, 0.25])
    expected = normalize_coefficients(0.5 * a.id_coefficients + 0.25 * b.id_coefficients + 0.25 * c.id_coefficients)
    assert torch.allclose(mixed.id_coefficients, expected, atol=1e-6)
    assert torch.allclose(scaled.id_coefficients, expected, atol=1e-6)
    # Every coefficient vector the bank sees stays unit length.
    assert torch.allclose(mixed.id_coefficients.norm(dim=-1), torch.ones(expected.shape[0]), atol=1e-5)


def test_spherical_interpolation_moves_at_constant_angle(two_people):
    a, b = two_people
    ua, ub = a.id_coefficients, b.id_coefficients
    omega = torch.arccos((ua * ub).sum(-1).clamp(-1, 1))
    for t in (0.0, 0.25, 0.5, 0.8, 1.0):
        point = HyperLoRAIdentity.interpolate(a, b, t, spherical=True).id_coefficients
        angle = torch.arccos((point * ua).sum(-1).clamp(-1, 1))
        assert torch.allclose(angle, t * omega, atol=2e-3), t
    linear_mid = HyperLoRAIdentity.interpolate(a, b, 0.5).id_coefficients
    spherical_mid = HyperLoRAIdentity.interpolate(a, b, 0.5, spherical=True).id_coefficients
    assert torch.allclose(linear_mid, spherical_mid, atol=1e-5)
    quarter = HyperLoRAIdentity.interpolate(a, b, 0.25).id_coefficients
    assert not torch.allclose(quarter, HyperLoRAIdentity.interpolate(a, b, 0.25, spherical=True).id_coefficients)


def test_blends_save_and_load(two_people, tmp_path):
    blend = HyperLoRAIdentity.interpolate(*two_people, 0.3)
    blend.save(tmp_path / "blend.safetensors")
    loaded = HyperLoRAIdentity.load(tmp_path / "blend.safetensors")
    assert loaded.kind == "mix"
    assert torch.equal(loaded.id_coefficients, blend.id_coefficients)


def test_mix_input_errors(two_people):
    a, b = two_people
    with pytest.raises(ValueError, match="one weight per identity"):
        HyperLoRAIdentity.mix([a, b], [1.0])
    with pytest.raises(ValueError, match="positive sum"):
        HyperLoRAIdentity.mix([a, b], [0.5, -0.5])
    with pytest.raises(ValueError, match="positive sum"):
        HyperLoRAIdentity.mix([a, b], [math.nan, 1.0])
    with pytest.raises(ValueError, match="finite t"):
        HyperLoRAIdentity.interpolate(a, b, math.inf)
    with pytest.raises(TypeError, match="item 1 is a str"):
        HyperLoRAIdentity.mix([a, "bob.safetensors"], [1.0, 1.0])
    other = _predict(tiny_hyperlora_predictor(seed=3), 1, seed=0)
    with pytest.raises(IdentityMismatchError):
        HyperLoRAIdentity.interpolate(a, other, 0.5, spherical=True)


@pytest.mark.parametrize("spherical", [False, True])
def test_mix_weights_are_checked_and_scaled_the_same_way_plain_or_spherical(two_people, spherical):
    a, b = two_people
    midpoint = HyperLoRAIdentity.interpolate(a, b, 0.5, spherical=spherical).id_coefficients
    # huge weights: only the ratio matters, so 1e308 : 1e308 is the midpoint (its sum overflows to inf)
    for weights in ([1e308, 1e308], [1.0, 1.0], [5e-324, 5e-324]):
        blend = HyperLoRAIdentity.mix([a, b], weights, spherical=spherical).id_coefficients
        assert torch.allclose(blend, midpoint, atol=1e-5), weights
        assert torch.isfinite(blend).all()
    quarter = HyperLoRAIdentity.mix([a, b], [3e307, 1e307], spherical=spherical).id_coefficients
    expected = HyperLoRAIdentity.interpolate(a, b, 0.25, spherical=spherical).id_coefficients
    assert torch.allclose(quarter, expected, atol=1e-5)
    for weights in ([math.inf, 1.0], [1.0, -math.inf], [math.nan, 1.0], [0.0, 0.0], [1e308, -1e308], [-1.0, 0.5]):
        with pytest.raises(InvalidArgumentError, match="finite numbers with a positive sum") as caught:
            HyperLoRAIdentity.mix([a, b], weights, spherical=spherical)
        assert caught.value.argument == "weights"
    with pytest.raises(InvalidArgumentError, match="one weight per identity"):
        HyperLoRAIdentity.mix([a, b], [1.0, 1.0, 1.0], spherical=spherical)
    with pytest.raises(InvalidArgumentTypeError, match="must be numbers") as caught:
        HyperLoRAIdentity.mix([a, b], [1.0, "x"], spherical=spherical)
    assert caught.value.argument == "weights"


def test_spherical_mix_is_interpolate_at_the_weight_ratio_and_takes_two(two_people, predictor):
    a, b = two_people
    blend = HyperLoRAIdentity.mix([a, b], [0.2, 0.6], spherical=True)
    assert torch.equal(blend.id_mean, HyperLoRAIdentity.interpolate(a, b, 0.75, spherical=True).id_mean)
    with pytest.raises(InvalidArgumentError, match="exactly two identities") as caught:
        HyperLoRAIdentity.mix([a, b, _predict(predictor, 1, seed=7)], [1, 1, 1], spherical=True)
    assert caught.value.argument == "spherical"  # the fix: drop spherical=True


@pytest.mark.parametrize("other", [{"seed": 3}, {"seed": 0, "num_basis": 4}])  # other weights, other shape
def test_mix_says_which_identity_is_of_another_checkpoint(two_people, other):
    """`IdentityMismatchError.index` is the foreign one, so front ends can name their own input (the CLI's file)."""
    a, b = two_people
    foreign = _predict(tiny_hyperlora_predictor(**other), 1, seed=0)
    with pytest.raises(
        IdentityMismatchError, match=r"mix\(\): identities\[2\] does not go with identities\[0\]"
    ) as caught:
        HyperLoRAIdentity.mix([a, b, foreign], [1, 1, 1])
    assert caught.value.index == 2 and caught.value.argument == "identities"
    assert isinstance(caught.value.__cause__, IdentityMismatchError)  # the reason alone


def test_normalize_mix_weights():
    assert normalize_mix_weights([2, 1, 1], 3) == pytest.approx([0.5, 0.25, 0.25])
    assert normalize_mix_weights([1e308, 1e308], 2) == pytest.approx([0.5, 0.5])
    assert normalize_mix_weights([3.0, -1.0], 2) == pytest.approx([1.5, -0.5])
    assert normalize_mix_weights([-1e308, 1e308, 1e308], 3) == pytest.approx([-1.0, 1.0, 1.0])


def test_combining_identities_with_and_without_base_says_the_base_part_is_dropped(caplog):
    predictor = tiny_hyperlora_predictor(base_rank=4)
    embeds, clip = random_features(batch=2, seed=3)
    with_base = predictor.predict(id_embeds=embeds, clip_hidden_states=clip, base_clip_hidden_states=clip + 1)
    without_base = dataclasses.replace(with_base, base_mean=None)
    caplog.set_level(logging.WARNING, logger="diffusers_hyperlora")
    for combine in (
        lambda: HyperLoRAIdentity.merge([with_base, without_base]),
        lambda: HyperLoRAIdentity.mix([with_base, without_base], [0.5, 0.5]),
        lambda: HyperLoRAIdentity.interpolate(with_base, without_base, 0.5, spherical=True),
    ):
        caplog.clear()
        assert combine().base_mean is None
        assert "with and without Base coefficients" in caplog.text
    caplog.clear()
    assert HyperLoRAIdentity.mix([with_base, with_base], [0.5, 0.5]).base_mean is not None
    assert "Base coefficients" not in caplog.text


def test_load_checks_against_a_pipelines_hyperlora(pipe, two_people, tmp_path):
    """docs/identities.md: `HyperLoRAIdentity.load(path, predictor=pipe.hyperlora)` (the controller works too)."""
    from diffusers_hyperlora.errors import InvalidArgumentTypeError

    path = tmp_path / "alice.safetensors"
    two_people[0].save(path)
    pipe.load_hyperlora(tiny_hyperlora_predictor(seed=0))
    assert HyperLoRAIdentity.load(path, predictor=pipe.hyperlora).num_images == 2
    pipe.load_hyperlora(tiny_hyperlora_predictor(seed=1))
    with pytest.raises(IdentityMismatchError, match="another HyperLoRA checkpoint"):
        HyperLoRAIdentity.load(path, predictor=pipe.hyperlora)
    with pytest.raises(InvalidArgumentTypeError, match="HyperLoRAPredictor or `pipe.hyperlora`"):
        HyperLoRAIdentity.load(path, predictor="org/hyperlora")


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("t", ["x", "0.5", None, [0.5], torch.tensor([0.1, 0.2])], ids=repr)
def test_interpolate_refuses_a_t_that_is_not_one_number(two_people, spherical, t):
    with pytest.raises(InvalidArgumentTypeError, match="needs t as one number") as caught:
        HyperLoRAIdentity.interpolate(*two_people, t, spherical=spherical)
    assert caught.value.argument == "t" and isinstance(caught.value, TypeError)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("t", [math.nan, -math.inf, math.inf])
def test_interpolate_refuses_a_t_that_is_not_finite(two_people, spherical, t):
    with pytest.raises(InvalidArgumentError, match="needs a finite t") as caught:
        HyperLoRAIdentity.interpolate(*two_people, t, spherical=spherical)
    assert caught.value.argument == "t"


def test_interpolate_takes_numpy_and_tensor_scalars(two_people):
    import numpy as np

    expected = HyperLoRAIdentity.interpolate(*two_people, 0.25).id_mean
    for t in (np.float32(0.25), torch.tensor(0.25), 1 / 4):
        assert torch.equal(HyperLoRAIdentity.interpolate(*two_people, t).id_mean, expected)


@pytest.mark.parametrize("combine", ["merge", "mix"])
@pytest.mark.parametrize("given", [None, 3, "a.safetensors", "identity"])
def test_merge_and_mix_want_a_list_of_identities(two_people, combine, given):
    identities = two_people[0] if given == "identity" else given
    args = (identities,) if combine == "merge" else (identities, [1.0, 1.0])
    with pytest.raises(
        InvalidArgumentTypeError, match=rf"takes a list of HyperLoRAIdentity .*\.{combine}\(\[a, b\]"
    ) as c:
        getattr(HyperLoRAIdentity, combine)(*args)
    assert c.value.argument == "identities"
    assert getattr(HyperLoRAIdentity, combine)(*((tuple(two_people),) + args[1:])).num_images == 5  # a tuple is fine


@pytest.mark.parametrize("path", [None, 3, ["me.safetensors"]], ids=["none", "int", "list"])
def test_save_and_load_want_a_path(two_people, path):
    for call, what in ((lambda: two_people[0].save(path), "save"), (lambda: HyperLoRAIdentity.load(path), "load")):
        with pytest.raises(InvalidArgumentTypeError, match=rf"{what}\(\) takes the path of a .safetensors") as caught:
            call()
        assert caught.value.argument == "path"


@pytest.mark.parametrize("device", ["gpu9", "cuda:x", 2.5, None])
def test_identity_to_a_bad_device_is_refused_by_name(two_people, device):
    with pytest.raises(InvalidArgumentError, match="device must be a torch device") as caught:
        two_people[0].to(device)
    assert caught.value.argument == "device"
    moved = two_people[0].to(torch.device("cpu"))
    assert moved.id_mean.device.type == "cpu" and torch.equal(moved.id_mean, two_people[0].id_mean)
