"""Saved identity files are accepted wherever photos are: `pipe.set_hyperlora_identity(["me.safetensors"])`."""

from __future__ import annotations

import pytest
import torch
from conftest import random_features
from PIL import Image

from diffusers_hyperlora import HyperLoRAFeatures, HyperLoRAIdentity, IdentityMismatchError
from diffusers_hyperlora.errors import InvalidArgumentTypeError
from diffusers_hyperlora.identities.inputs import resolve_identity, split_identity_inputs
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor


class _ColourFeatures:
    """A stand-in face pipeline: each photo's features are a fixed function of its mean colour."""

    def __call__(self, images, *, device, dtype, with_base, **options):
        colours = torch.stack([torch.tensor(Image.open(i).convert("RGB").getpixel((0, 0))) for i in images]) / 255
        embeds = torch.nn.functional.normalize(colours.float().repeat(1, 171)[:, :512], dim=-1)
        clip = colours.float().repeat(1, 16)[:, None, :48].expand(-1, 17, -1).contiguous()
        return HyperLoRAFeatures(embeds, clip, None, [str(i) for i in images])


@pytest.fixture
def loaded(pipe, tmp_path):
    predictor = tiny_hyperlora_predictor(seed=0)
    pipe.load_hyperlora(predictor, feature_extractor=_ColourFeatures())
    saved = predictor.predict(*random_features(batch=3, seed=1), sources=["a.jpg", "b.jpg", "c.jpg"])
    saved.save(tmp_path / "me.safetensors")
    Image.new("RGB", (8, 8), (200, 40, 90)).save(tmp_path / "new.png")
    return pipe, predictor, saved, tmp_path


def test_split_keeps_order_and_recognises_identities():
    identity = tiny_hyperlora_predictor().predict(*random_features(batch=1))
    photos, identities = split_identity_inputs(["a.jpg", identity, "x.SAFETENSORS", "b.png"])
    assert photos == ["a.jpg", "b.png"] and identities == [identity, "x.SAFETENSORS"]


def test_an_identity_file_stands_for_its_photos(loaded):
    pipe, _, saved, root = loaded
    written = pipe.set_hyperlora_identity([str(root / "me.safetensors")])
    assert written.num_images == 3
    torch.testing.assert_close(written.id_mean, saved.id_mean)
    assert pipe.hyperlora_identity is written
    single = pipe.predict_hyperlora_identity(root / "me.safetensors")  # one path, not a list
    torch.testing.assert_close(single.id_mean, saved.id_mean)


def test_files_and_photos_are_pooled_exactly(loaded):
    pipe, predictor, saved, root = loaded
    mixed = pipe.set_hyperlora_identity([str(root / "me.safetensors"), str(root / "new.png")])
    photo_only = pipe.predict_hyperlora_identity([str(root / "new.png")])
    expected = HyperLoRAIdentity.merge([saved, photo_only])
    assert mixed.num_images == 4
    torch.testing.assert_close(mixed.id_mean, expected.id_mean)
    assert not torch.allclose(mixed.id_mean, saved.id_mean)  # the photo counted


def test_a_file_of_another_checkpoint_changes_nothing(loaded):
    pipe, _, saved, root = loaded
    pipe.set_hyperlora_identity(saved)
    other = tiny_hyperlora_predictor(seed=5).predict(*random_features(batch=1))
    other.save(root / "other.safetensors")
    before = {k: v.detach().clone() for k, v in pipe.unet.named_parameters() if "lora_" in k}  # adapters too
    with pytest.raises(IdentityMismatchError):
        pipe.set_hyperlora_identity([str(root / "new.png"), str(root / "other.safetensors")])
    assert pipe.hyperlora_identity is saved
    after = dict(pipe.unet.named_parameters())
    assert before and all(torch.equal(before[k], after[k]) for k in before)


def test_resolve_identity_needs_something():
    with pytest.raises(ValueError, match="No photos and no identities"):
        resolve_identity([], lambda photos: None)


@pytest.mark.parametrize("inputs", ["me.safetensors", None, "identity"])
def test_resolve_identity_wants_a_list(inputs):
    predictor = tiny_hyperlora_predictor()
    identity = predictor.predict(*random_features(batch=1))
    calls = []
    with pytest.raises(InvalidArgumentTypeError, match=r"takes a list of photos.*`\[value\]`") as caught:
        resolve_identity(identity if inputs == "identity" else inputs, calls.append)
    assert caught.value.argument == "inputs" and calls == []
