"""The predictor on its own: resampler layout, averaging math, bank mixing, feature validation, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import OFFICIAL_TINY, random_features
from safetensors import safe_open

from diffusers_hyperlora import FeatureShapeError, HyperLoRAConfig, HyperLoRAIdentity, HyperLoRAPredictor
from diffusers_hyperlora.errors import InvalidArgumentError, InvalidArgumentTypeError
from diffusers_hyperlora.identities.identity import normalize_coefficients
from diffusers_hyperlora.model.bank import group_linears, mix_bases
from diffusers_hyperlora.model.targets import TargetModule, module_path_from_kohya
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config, tiny_hyperlora_predictor


def test_module_path_from_kohya_round_trips_unet_names():
    assert (
        module_path_from_kohya("lora_unet_mid_block_attentions_0_transformer_blocks_9_attn2")
        == "mid_block.attentions.0.transformer_blocks.9.attn2"
    )
    assert module_path_from_kohya("lora_unet_up_blocks_0_attentions_2_transformer_blocks_1_attn1") == (
        "up_blocks.0.attentions.2.transformer_blocks.1.attn1"
    )


def test_target_linears_widths_follow_cross_attention():
    target = TargetModule("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2", 640, 2048)
    widths = [
        (
            lin.module_path.rsplit(".", 1)[-1] if "to_out" not in lin.module_path else "to_out.0",
            lin.in_features,
            lin.out_features,
        )
        for lin in target.linears()
    ]
    assert widths == [("to_q", 640, 640), ("to_k", 2048, 640), ("to_v", 2048, 640), ("to_out.0", 640, 640)]
    assert [lin.kohya_name.rsplit("_attn2_", 1)[1] for lin in target.linears()] == ["to_q", "to_k", "to_v", "to_out_0"]


def test_config_json_round_trip():
    config = tiny_hyperlora_config(base_rank=4)
    data = json.loads(json.dumps(config.to_dict()))
    again = HyperLoRAConfig.from_dict(data)
    assert again == config
    assert again.architecture_hash() == config.architecture_hash()
    assert again.num_tokens == 8 * 24 and again.has_base


def test_state_dict_keys_match_the_release_files():
    predictor = tiny_hyperlora_predictor()
    ours = predictor.state_dict()
    for file, prefix in (("resampler", "resampler."), ("id_projector", "id_projector.")):
        with safe_open(OFFICIAL_TINY / f"{file}.safetensors", "pt") as handle:
            for key in handle.keys():
                assert list(ours[prefix + key].shape) == handle.get_slice(key).get_shape(), key
            assert {k[len(prefix) :] for k in ours if k.startswith(prefix)} == set(handle.keys())


def test_multi_image_prediction_is_mean_then_normalize(predictor):
    embeds, clip = random_features(batch=3)
    identity = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    per_image = torch.stack([predictor(embeds[i : i + 1], clip[i : i + 1])[0] for i in range(3)])
    mean = per_image.mean(0)
    expected = mean / torch.sqrt((mean**2).sum(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(identity.id_coefficients, expected, rtol=1e-5, atol=1e-6)
    assert identity.num_images == 3
    torch.testing.assert_close(identity.id_mean, mean, rtol=1e-5, atol=1e-6)
    # The order matters: normalizing each image first gives a different (wrong) result.
    wrong = normalize_coefficients(normalize_coefficients(per_image).mean(0))
    assert not torch.allclose(wrong, expected, atol=1e-4)


def test_id_embeds_accept_both_documented_shapes(predictor):
    embeds, clip = random_features(batch=2)
    a = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    b = predictor.predict(id_embeds=embeds[:, None], clip_hidden_states=clip)
    torch.testing.assert_close(a.id_mean, b.id_mean)


@pytest.mark.parametrize(
    "id_shape, clip_shape, match, argument",
    [
        ((2, 511), (2, 17, 48), r"id_embeds.*\[B, 512\]", "id_embeds"),
        ((2, 2, 512), (2, 17, 48), r"id_embeds", "id_embeds"),
        ((2, 512), (2, 17, 32), r"clip_hidden_states.*\[B, T, 48\]", "clip_hidden_states"),
        ((2, 512), (17, 48), r"clip_hidden_states", "clip_hidden_states"),
        ((3, 512), (2, 17, 48), r"same batch size", None),  # neither argument alone is at fault
    ],
)
def test_wrong_feature_shapes_raise(predictor, id_shape, clip_shape, match, argument):
    with pytest.raises(FeatureShapeError, match=match) as caught:
        predictor.predict(id_embeds=torch.randn(id_shape), clip_hidden_states=torch.randn(clip_shape))
    assert caught.value.argument == argument


def test_missing_features_raise(predictor):
    with pytest.raises(FeatureShapeError, match="id_embeds") as caught:
        predictor.predict(clip_hidden_states=torch.randn(1, 17, 48))
    assert caught.value.argument == "id_embeds"
    with pytest.raises(FeatureShapeError, match="clip_hidden_states") as caught:
        predictor.predict(id_embeds=torch.randn(1, 512))
    assert caught.value.argument == "clip_hidden_states"
    with pytest.raises(FeatureShapeError, match="base_clip_hidden_states") as caught:
        tiny_hyperlora_predictor(base_rank=4).forward_base(torch.randn(1, 48))
    assert caught.value.argument == "base_clip_hidden_states"
    with pytest.raises(ValueError):  # also a plain ValueError for generic handlers
        predictor.predict(id_embeds=torch.randn(1, 3))


def test_bank_matches_per_layer_einsum(predictor):
    embeds, clip = random_features(batch=1)
    identity = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    weights = predictor.lora_weights(identity)
    tokens = identity.id_coefficients
    bank = predictor.id_bank
    for index in (0, 5, len(weights) - 1):
        g, p = bank.locations[index]
        down = torch.einsum("k,kir->ri", tokens[2 * index], bank.down[g][p].detach())
        up = torch.einsum("k,kro->or", tokens[2 * index + 1], bank.up[g][p].detach())
        torch.testing.assert_close(weights[index][0], down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights[index][1], up, rtol=1e-5, atol=1e-6)


def test_sixteen_bit_banks_accumulate_in_float32():
    torch.manual_seed(0)
    coefficients = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    bases = torch.randn(3, 64, 40, 4).to(torch.bfloat16)
    exact = torch.einsum("gk,gkir->gir", coefficients.double(), bases.double())
    mixed = mix_bases(coefficients, bases)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), exact, rtol=1e-5, atol=1e-6)
    # A bf16 product (what a naive implementation computes) is much further off.
    naive = torch.einsum("gk,gkir->gir", coefficients.to(torch.bfloat16), bases).double()
    assert (naive - exact).abs().max() > 10 * (mixed.double() - exact).abs().max()


def test_groups_follow_shapes_not_module_order():
    config = tiny_hyperlora_config()
    groups = group_linears(config.linears)
    assert sum(len(g.members) for g in groups) == len(config.linears) == 96
    for group in groups:
        assert all(
            (config.linears[i].in_features, config.linears[i].out_features) == (group.in_features, group.out_features)
            for i in group.members
        )


def test_save_pretrained_round_trip(tmp_path, predictor):
    predictor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = HyperLoRAPredictor.from_pretrained(tmp_path)
    assert loaded.config == predictor.config
    ours, theirs = predictor.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    embeds, clip = random_features()
    a = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    b = loaded.predict(id_embeds=embeds, clip_hidden_states=clip)
    assert torch.equal(a.id_mean, b.id_mean) and a.checkpoint == b.checkpoint


def test_base_branch_predicts_its_own_coefficients():
    predictor = tiny_hyperlora_predictor(base_rank=4)
    embeds, clip = random_features()
    identity = predictor.predict(id_embeds=embeds, clip_hidden_states=clip, base_clip_hidden_states=clip * 0.5)
    assert identity.base_mean is not None and identity.base_mean.shape == identity.id_mean.shape
    downs_ups = predictor.lora_weights(identity, "base")
    assert downs_ups[0][0].shape == (4, 64)
    no_base = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    assert no_base.base_mean is None


@pytest.mark.parametrize("base_rank", [0, 4])
def test_predict_photos_runs_the_extractor_on_the_predictor_and_predicts(base_rank):
    """The one photos -> identity step (controller and CLI): the extractor gets the predictor's device, dtype and
    Base need and the options; its features give the same identity as `predict`."""
    from diffusers_hyperlora import HyperLoRAFeatures

    predictor = tiny_hyperlora_predictor(base_rank=base_rank)
    embeds, clip = random_features(batch=2)
    calls = []

    def extractor(images, *, device, dtype, with_base, **options):
        calls.append((images, device, dtype, with_base, options))
        return HyperLoRAFeatures(embeds, clip, clip * 0.5 if with_base else None, [f"{i}.jpg" for i in images])

    identity = predictor.predict_photos(("a", "b"), extractor, detector_threshold=0.3)
    assert calls == [(["a", "b"], predictor.device, predictor.dtype, base_rank > 0, {"detector_threshold": 0.3})]
    expected = predictor.predict(embeds, clip, clip * 0.5 if base_rank else None)
    torch.testing.assert_close(identity.id_mean, expected.id_mean, rtol=0, atol=0)
    assert (identity.base_mean is None) is (base_rank == 0) and identity.sources == ["a.jpg", "b.jpg"]
    if base_rank:
        torch.testing.assert_close(identity.base_mean, expected.base_mean, rtol=0, atol=0)


def test_merge_equals_predicting_from_all_images(predictor):
    embeds, clip = random_features(batch=5)
    together = predictor.predict(id_embeds=embeds, clip_hidden_states=clip)
    a = predictor.predict(id_embeds=embeds[:2], clip_hidden_states=clip[:2])
    b = predictor.predict(id_embeds=embeds[2:], clip_hidden_states=clip[2:])
    merged = HyperLoRAIdentity.merge([a, b])
    assert merged.num_images == 5
    torch.testing.assert_close(merged.id_coefficients, together.id_coefficients, rtol=1e-5, atol=1e-6)


def test_features_may_be_lists_or_arrays_and_other_types_are_refused_by_name(predictor):
    embeds, clip = random_features(batch=2)
    expected = predictor.predict(embeds, clip)
    for given in ((embeds.tolist(), clip), (embeds, clip.tolist()), (embeds.numpy(), clip.numpy())):
        torch.testing.assert_close(predictor.predict(*given).id_mean, expected.id_mean, rtol=0, atol=0)
    assert predictor.predict(embeds.tolist(), clip).num_images == 2
    for given, argument in (
        ((list(embeds), clip), "id_embeds"),  # a list of per-image tensors: torch.stack it
        (("me.jpg", clip), "id_embeds"),
        ((embeds, [c for c in clip]), "clip_hidden_states"),
        ((embeds, {"clip": clip}), "clip_hidden_states"),
    ):
        with pytest.raises(InvalidArgumentTypeError, match=rf"`{argument}` must be a torch tensor") as caught:
            predictor.predict(*given)
        assert caught.value.argument == argument and isinstance(caught.value, TypeError)


@pytest.mark.parametrize("empty", ["id_embeds", "clip_hidden_states", "base_clip_hidden_states"])
def test_features_of_no_image_are_refused_by_name(empty):
    predictor = tiny_hyperlora_predictor(base_rank=4)
    features = dict(zip(("id_embeds", "clip_hidden_states"), random_features(batch=1)))
    features["base_clip_hidden_states"] = features["clip_hidden_states"]
    features[empty] = features[empty][:0]
    if empty != "base_clip_hidden_states":  # both ID inputs empty: the batch sizes agree, the batch is empty
        features = {
            **features,
            "id_embeds": features["id_embeds"][:0],
            "clip_hidden_states": features["clip_hidden_states"][:0],
        }
    with pytest.raises(FeatureShapeError, match="batch size 0") as caught:
        predictor.predict(**features)
    assert caught.value.argument in ("id_embeds", empty)


def test_base_features_for_a_checkpoint_without_base_branch_are_refused_not_dropped(predictor):
    embeds, clip = random_features(batch=1)
    with pytest.raises(InvalidArgumentError, match="no Base branch") as caught:
        predictor.predict(embeds, clip, base_clip_hidden_states=clip)
    assert caught.value.argument == "base_clip_hidden_states"


def test_predict_photos_drops_base_features_an_extractor_gives_a_checkpoint_without_base(predictor):
    from diffusers_hyperlora import HyperLoRAFeatures

    embeds, clip = random_features(batch=1)
    always_base = lambda images, **options: HyperLoRAFeatures(embeds, clip, clip, list(images))  # noqa: E731
    identity = predictor.predict_photos(["a.jpg"], always_base)
    assert identity.base_mean is None and torch.equal(identity.id_mean, predictor.predict(embeds, clip).id_mean)


@pytest.mark.parametrize(
    ("overrides", "unread"),
    [(dict(use_id_embeds=False), "id_embeds"), (dict(use_image_embeds=False), "clip_hidden_states")],
)
def test_a_feature_the_checkpoint_does_not_read_is_refused_not_ignored(overrides, unread):
    """`predict` refuses it by name; `predict_photos` leaves out what an extractor gives anyway."""
    from diffusers_hyperlora import HyperLoRAFeatures

    predictor = tiny_hyperlora_predictor(**overrides)
    embeds, clip = random_features(batch=2)
    given = {"id_embeds": embeds, "clip_hidden_states": clip}
    with pytest.raises(InvalidArgumentError, match=f"`{unread}` was given, but this checkpoint does not read") as e:
        predictor.predict(**given)
    assert e.value.argument == unread
    read = {name: value for name, value in given.items() if name != unread}
    every_feature = lambda images, **options: HyperLoRAFeatures(embeds, clip, None, list(images))  # noqa: E731
    identity = predictor.predict_photos(["a.jpg", "b.jpg"], every_feature)
    assert torch.equal(identity.id_mean, predictor.predict(**read).id_mean)


@pytest.mark.parametrize("spherical", ["no", 1, None])
def test_mix_and_interpolate_take_spherical_as_a_bool_only(predictor, spherical):
    a, b = (predictor.predict(*random_features(batch=1, seed=seed)) for seed in (1, 2))
    for call in (lambda: HyperLoRAIdentity.mix([a, b], [1, 1], spherical=spherical),
                 lambda: HyperLoRAIdentity.interpolate(a, b, 0.5, spherical=spherical)):  # fmt: skip
        with pytest.raises(InvalidArgumentTypeError, match="needs spherical=True or False") as caught:
            call()
        assert caught.value.argument == "spherical"


@pytest.mark.parametrize(
    ("photos", "extractor", "argument"),
    [(["a.jpg"], None, "feature_extractor"), (["a.jpg"], "face", "feature_extractor"), ("a.jpg", print, "photos")],
)
def test_predict_photos_refuses_a_wrong_extractor_or_a_single_photo(predictor, photos, extractor, argument):
    with pytest.raises(InvalidArgumentTypeError, match=f"`{argument}` must be") as caught:
        predictor.predict_photos(photos, extractor)
    assert caught.value.argument == argument


def test_sources_must_be_a_list_of_names(predictor):
    with pytest.raises(InvalidArgumentTypeError, match=r"pass \['me.jpg'\]") as caught:
        predictor.predict(*random_features(batch=1), sources="me.jpg")
    assert caught.value.argument == "sources"


@pytest.mark.parametrize("device", ["gpu9", "cuda:x", 2.5])
def test_a_bad_device_is_refused_by_name_and_moves_nothing(predictor, device):
    identity = predictor.predict(*random_features(batch=1))
    with pytest.raises(InvalidArgumentError, match=r"device must be a torch device") as caught:
        predictor.lora_weights(identity, device=device)
    assert caught.value.argument == "device"
    for move in (lambda: predictor.to(device), lambda: predictor.to(device=device, dtype=torch.float16)):
        with pytest.raises(InvalidArgumentError, match=r"device must be a torch device") as caught:
            move()
        assert caught.value.argument == "device"
    assert predictor.device.type == "cpu" and predictor.dtype == torch.float32
    assert predictor.lora_weights(identity, device="cpu")[0][0].device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"config": None}, InvalidArgumentTypeError, "config"),
        ({"config": "org/hyperlora"}, InvalidArgumentTypeError, "config"),
        ({"device": "gpu9"}, InvalidArgumentError, "device"),
        ({"dtype": "float8"}, InvalidArgumentError, "dtype"),
    ],
)
def test_building_a_predictor_checks_config_device_and_dtype(kwargs, error, argument):
    with pytest.raises(error) as caught:
        HyperLoRAPredictor(**{"config": tiny_hyperlora_config(), **kwargs})
    assert caught.value.argument == argument


def test_a_predictor_dtype_may_be_a_name():
    assert HyperLoRAPredictor(tiny_hyperlora_config(), dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda p, tmp: p.save_pretrained(None), "save_directory"),
        (lambda p, tmp: p.save_pretrained(tmp / "out", model_card_kwargs="mit"), "model_card_kwargs"),
        (lambda p, tmp: p.export_lora(p.predict(*random_features(batch=1)), 5), "path"),
    ],
    ids=["no-folder", "card-kwargs", "export-path"],
)
def test_file_arguments_of_the_wrong_type_are_refused_by_name(predictor, tmp_path, call, argument):
    with pytest.raises(InvalidArgumentTypeError) as caught:
        call(predictor, tmp_path)
    assert caught.value.argument == argument and not (tmp_path / "out").exists()
