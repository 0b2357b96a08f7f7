"""Release -> library format conversion (streamed), the library format itself, model cards, push_to_hub."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.hub_mixin
import pytest
import torch
from conftest import random_features
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_hyperlora import HyperLoRAPredictor, load_predictor
from diffusers_hyperlora.io.convert import convert_checkpoint, parse_dtype
from diffusers_hyperlora.io.release import save_release_checkpoint
from diffusers_hyperlora.tiny import tiny_hyperlora_predictor


def _identity(predictor, seed=0):
    embeds, states = random_features(2, seed, 5, predictor.config.image_embed_dim)
    return predictor.predict(embeds if predictor.config.use_id_embeds else None, states)


@pytest.mark.parametrize("dtype", [None, "fp16", torch.bfloat16])
def test_convert_release_gives_identical_predictions(official_tiny, tmp_path, dtype):
    out = convert_checkpoint(official_tiny, tmp_path / "out", dtype=dtype, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    want = parse_dtype(dtype) or torch.float32
    reference = load_predictor(official_tiny, torch_dtype=want)
    for loaded in (load_predictor(out), HyperLoRAPredictor.from_pretrained(out)):
        assert loaded.dtype == want
        assert loaded.config == reference.config
        for (key, a), b in zip(loaded.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), key
        assert torch.equal(_identity(loaded).id_mean, _identity(reference).id_mean)
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert handle.metadata()["format"] == "pt"
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {want}


def test_convert_writes_config_and_card(official_tiny, tmp_path):
    out = convert_checkpoint(
        official_tiny, tmp_path / "out", image_encoder="./image_encoder", face_models="antelopev2", progress=False
    )
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "HyperLoRAPredictor" and config["_format_version"] == 1
    assert config["image_encoder"] == "./image_encoder" and config["face_models"] == "antelopev2"
    assert [t["name"] for t in config["targets"]] == list(
        json.loads((official_tiny / "hyper_lora_modules.json").read_text())
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers-hyperlora"
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"lora", "text-to-image", "hyperlora"} <= set(card.data.tags)
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.instance_prompt == "fcsks fxhks fhyks"
    assert card.data.to_dict()["recommended_lora_scale"] == 0.8
    assert "pipe.load_hyperlora(" in card.text and "fcsks fxhks fhyks, " in card.text
    assert str(official_tiny) in card.text


def test_convert_other_architecture_and_heads(tmp_path):
    original = tiny_hyperlora_predictor(seed=9, num_basis=3, id_rank=2, resampler_heads=2, resampler_dim_head=20,
                                        use_id_embeds=False)  # fmt: skip
    save_release_checkpoint(original, tmp_path / "release", dtype=torch.float16)
    out = convert_checkpoint(tmp_path / "release", tmp_path / "out", heads=2, dim_head=20, progress=False)
    loaded = load_predictor(out, torch_dtype=torch.float32)
    assert (loaded.config.resampler_heads, loaded.config.resampler_dim_head) == (2, 20)
    reference = load_predictor(tmp_path / "release", heads=2, torch_dtype=torch.float32)
    assert torch.equal(_identity(loaded).id_mean, _identity(reference).id_mean)


def test_convert_library_format_to_fp16(tmp_path):
    original = tiny_hyperlora_predictor(seed=3)
    original.save_pretrained(tmp_path / "fp32")
    out = convert_checkpoint(tmp_path / "fp32", tmp_path / "fp16", dtype="fp16", progress=False)
    loaded = load_predictor(out)
    assert loaded.dtype == torch.float16
    reference = original.to(torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


def test_convert_from_hub_cache(official_tiny, tmp_path, monkeypatch):
    from test_hub import COMMIT_MAIN, add_snapshot, folder_files

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    add_snapshot(tmp_path / "cache", "org/rel", COMMIT_MAIN, folder_files(official_tiny, "v1/"))
    out = convert_checkpoint("org/rel", tmp_path / "out", subfolder="v1", revision="main", progress=False)
    assert torch.equal(_identity(load_predictor(out)).id_mean, _identity(load_predictor(official_tiny)).id_mean)
    assert "org/rel/v1" in (out / "README.md").read_text()


def test_convert_errors(official_tiny, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_checkpoint(official_tiny, tmp_path / "x", dtype="int8", progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(official_tiny, copy)
    with pytest.raises(ValueError, match="overwrite its source"):
        convert_checkpoint(copy, copy, progress=False)


def test_save_pretrained_writes_library_format_and_card(tmp_path):
    predictor = tiny_hyperlora_predictor(seed=1, license="apache-2.0")
    predictor.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers-hyperlora" and card.data.license == "apache-2.0"
    state = load_file(tmp_path / "model.safetensors")
    assert state.keys() == predictor.state_dict().keys()
    loaded = HyperLoRAPredictor.from_pretrained(tmp_path)
    assert torch.equal(_identity(loaded).id_mean, _identity(predictor).id_mean)


def test_push_to_hub_uploads_the_library_format(tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:  # stands in for the Hub server only; save_pretrained / the card are the real code
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in folder_path.iterdir()})
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    predictor = tiny_hyperlora_predictor(seed=2)
    predictor.push_to_hub("me/my-hyperlora")
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert 'pipe.load_hyperlora("me/my-hyperlora"' in uploaded["README.md"].decode()
    assert json.loads(uploaded["config.json"])["num_basis"] == 8
