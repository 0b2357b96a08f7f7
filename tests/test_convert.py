"""Release -> library format conversion (streamed), the library format itself, model cards, push_to_hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from conftest import random_features
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_hyperlora import HyperLoRAPredictor, InvalidArgumentError, load_predictor
from diffusers_hyperlora.io import checkpoint as checkpoint_io
from diffusers_hyperlora.io.convert import convert_checkpoint, parse_dtype
from diffusers_hyperlora.io.release import save_release_checkpoint
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor


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
        for (key, a), b in zip(loaded.state_dict().items(), reference.state_dict().values(), strict=True):
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
    pairs = zip(loaded.state_dict().values(), reference.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


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


class FakeApi:  # stands in for the Hub server only; save_pretrained / the card are the real code
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id, {"private": private, "token": self.token}))
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in folder_path.iterdir()}
        FakeApi.calls.append(("upload_folder", repo_id, {"files": files, **kwargs}))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(checkpoint_io, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_to_hub_uploads_the_library_format(fake_hub):
    predictor = tiny_hyperlora_predictor(seed=2)
    url = predictor.push_to_hub("me/my-hyperlora", private=True, token="t", branch="dev", commit_message="hi")
    assert url == "https://huggingface.co/me/my-hyperlora/commit/0"
    (_, _, created), (_, repo, upload) = fake_hub
    assert created == {"private": True, "token": "t"} and repo == "me/my-hyperlora"
    assert upload["revision"] == "dev" and upload["commit_message"] == "hi" and upload["repo_type"] == "model"
    uploaded = upload["files"]
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert 'pipe.load_hyperlora("me/my-hyperlora"' in uploaded["README.md"].decode()
    assert json.loads(uploaded["config.json"])["num_basis"] == 8
    assert not isinstance(predictor, huggingface_hub.ModelHubMixin)  # one implementation: io's, not the mixin's


def test_save_pretrained_with_push_writes_the_folder_then_uploads(tmp_path, fake_hub):
    predictor = tiny_hyperlora_predictor(seed=2)
    url = predictor.save_pretrained(tmp_path / "mine", push_to_hub=True, private=True)
    assert url == "https://huggingface.co/mine/commit/0"  # the repo id defaults to the folder's name
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [call[0] for call in fake_hub] == ["create_repo", "upload_folder"] and fake_hub[0][2]["private"] is True


def test_save_pretrained_refuses_what_it_would_ignore(tmp_path, fake_hub):
    predictor = tiny_hyperlora_predictor(seed=2)
    with pytest.raises(InvalidArgumentError, match="own config") as caught:
        predictor.save_pretrained(tmp_path / "a", config={"num_basis": 3})
    assert caught.value.argument == "config"
    with pytest.raises(InvalidArgumentError, match="without push_to_hub=True") as caught:
        predictor.save_pretrained(tmp_path / "b", private=True)
    assert caught.value.argument == "private"
    with pytest.raises(InvalidArgumentError, match="without push_to_hub=True"):
        predictor.save_pretrained(tmp_path / "c", repo_id="me/x")
    assert not any((tmp_path / name).exists() for name in "abc") and fake_hub == []


# ---------------------------------------------------------------------------------------------------- shards
def test_sharded_save_loads_and_a_later_save_replaces_the_shards(tmp_path, monkeypatch):
    from test_hub import COMMIT_MAIN, add_snapshot, folder_files

    predictor = tiny_hyperlora_predictor(seed=4)
    predictor.save_pretrained(tmp_path / "ckpt", max_shard_size="1MB")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(predictor.state_dict()) and set(index["weight_map"].values()) == set(shards)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    add_snapshot(tmp_path / "cache", "org/sharded", COMMIT_MAIN, folder_files(tmp_path / "ckpt"))
    for loaded in (load_predictor(tmp_path / "ckpt"), load_predictor("org/sharded", cache_dir=tmp_path / "cache")):
        assert torch.equal(_identity(loaded).id_mean, _identity(predictor).id_mean)
    # convert writes the same sharded layout
    out = convert_checkpoint(tmp_path / "ckpt", tmp_path / "fp16", dtype="fp16", max_shard_size="1MB", progress=False)
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    bank = load_predictor(out).state_dict()["id_bank.down.0"]
    assert torch.equal(bank, predictor.state_dict()["id_bank.down.0"].half())
    # an unsharded save over a sharded one leaves no stale shard or index behind
    other = tiny_hyperlora_predictor(seed=5)
    other.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(_identity(load_predictor(tmp_path / "ckpt")).id_mean, _identity(other).id_mean)


# ---------------------------------------------------------------------------------------------------- atomic writes
_FAILING_WRITES = """
import json, resource, signal, sys, torch
from diffusers_hyperlora.io.convert import convert_checkpoint
from diffusers_hyperlora.io.release import save_release_checkpoint
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

root = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the JSON files fit, the weights do not
new = tiny_hyperlora_predictor(seed=11)
calls = {
    "save_pretrained": lambda: new.save_pretrained(root + "/own"),
    "save_release_checkpoint": lambda: save_release_checkpoint(new, root + "/release"),
    "convert_checkpoint": lambda: convert_checkpoint(root + "/release", root + "/converted", progress=False),
}
results = {}
for name, call in calls.items():
    try:
        call()
        results[name] = "no error"
    except Exception as error:
        results[name] = [type(error).__name__, isinstance(error, OSError), str(error)]
print(json.dumps(results))
"""


def _tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_writes_leave_the_old_files_intact(tmp_path):
    """A real full-file failure (RLIMIT_FSIZE) midway through each writer: every old file is as it was."""
    old = tiny_hyperlora_predictor(seed=10)
    old.save_pretrained(tmp_path / "own")
    save_release_checkpoint(old, tmp_path / "release")
    convert_checkpoint(tmp_path / "release", tmp_path / "converted", progress=False)
    before = {name: _tree(tmp_path / name) for name in ("own", "release", "converted")}
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITES, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (kind, is_os_error, message) in results.items():
        assert kind == "HyperLoRAWriteError" and is_os_error, (name, message)
        assert "Nothing was changed there" in message, message
    for name, files in before.items():
        assert _tree(tmp_path / name) == files, name  # same names (no temporary files left), same bytes
    assert torch.equal(_identity(load_predictor(tmp_path / "own")).id_mean, _identity(old).id_mean)
