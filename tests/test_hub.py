"""The Hub path: real huggingface_hub resolution against a pre-filled local cache, offline."""

from __future__ import annotations

import dataclasses
import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from conftest import random_features

import diffusers_hyperlora.io.hub
from diffusers_hyperlora import CheckpointFormatError, CheckpointNotFoundError, HyperLoRAPredictor, load_predictor
from diffusers_hyperlora.face.analyzer import ONNX_PATTERNS
from diffusers_hyperlora.io import HubOptions, Location, resolve_location
from diffusers_hyperlora.io.release import save_release_checkpoint
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40
SUBFOLDER = "sdxl_hyper_id_lora_v1_fidelity"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path], ref: str | None = "main") -> Path:
    """Lay out `files` ({path in repo: source file}) as huggingface_hub's cache does (blobs + symlinks)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        blob = repo / "blobs" / f"{commit[:8]}-{name.replace('/', '_')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {f"{prefix}{p.name}": p for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, official_tiny):
    """`org/hyperlora`: main has the release in SUBFOLDER; ref `v2` has another checkpoint in the library format."""
    cache = tmp_path / "cache"
    release = {k: v for k, v in folder_files(official_tiny, SUBFOLDER + "/").items() if "expected" not in k}
    add_snapshot(cache, "org/hyperlora", COMMIT_MAIN, release)
    other = tiny_hyperlora_predictor(seed=7)
    own = tmp_path / "own"
    other.save_pretrained(own)
    add_snapshot(cache, "org/hyperlora", COMMIT_V2, folder_files(own), ref="v2")
    return cache, other


def _identity(predictor):
    embeds, states = random_features(2, 0, 5, predictor.config.image_embed_dim)
    return predictor.predict(embeds, states)


def test_release_from_cache_matches_local(hub_cache, official_tiny):
    cache, _ = hub_cache
    from_hub = load_predictor("org/hyperlora", subfolder=SUBFOLDER, cache_dir=cache)
    local = load_predictor(official_tiny)
    for (key, a), b in zip(from_hub.state_dict().items(), local.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_revision_selects_the_other_commit_and_format(hub_cache):
    cache, other = hub_cache
    loaded = load_predictor("org/hyperlora", revision="v2", cache_dir=cache, torch_dtype=torch.float32)
    assert loaded.config == other.config
    torch.testing.assert_close(_identity(loaded).id_mean, _identity(other).id_mean, atol=0, rtol=0)
    by_commit = HyperLoRAPredictor.from_pretrained("org/hyperlora", revision=COMMIT_V2, cache_dir=cache)
    assert by_commit.config == other.config
    # main has no library-format files at its root, and the release is in a subfolder.
    with pytest.raises(CheckpointFormatError, match=r"not a HyperLoRA checkpoint.*subfolder="):
        load_predictor("org/hyperlora", cache_dir=cache)


def test_pipeline_loads_from_the_hub_cache(pipe, hub_cache, official_tiny):
    cache, _ = hub_cache
    pipe.load_hyperlora("org/hyperlora", subfolder=SUBFOLDER, cache_dir=cache)
    assert len(pipe.hyperlora.config.targets) == 24
    assert pipe.hyperlora.dtype == pipe.unet.dtype


def test_missing_file_in_cached_snapshot(hub_cache, official_tiny):
    cache, _ = hub_cache
    snapshot = cache / "models--org--hyperlora" / "snapshots" / COMMIT_MAIN / SUBFOLDER
    (snapshot / "resampler.safetensors").unlink()
    with pytest.raises(CheckpointFormatError) as error:
        load_predictor("org/hyperlora", subfolder=SUBFOLDER, cache_dir=cache)
    message = str(error.value)
    assert "'resampler.safetensors'" in message and "org/hyperlora" in message and SUBFOLDER in message
    assert "downloads are off" in message and "hyper_lora_modules.json" in message


def test_repo_not_in_cache(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(CheckpointNotFoundError, match=r"org/missing.*downloads are off.*not in the cache folder"):
        load_predictor("org/missing", cache_dir=cache)


def test_revision_not_in_cache(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(CheckpointNotFoundError, match=r"revision 'v3' is not in the cache"):
        load_predictor("org/hyperlora", revision="v3", subfolder=SUBFOLDER, cache_dir=cache)


def test_invalid_repo_id_and_missing_local_subfolder(tmp_path, official_tiny):
    with pytest.raises(CheckpointNotFoundError, match="neither an existing local folder nor a valid Hub repo id"):
        load_predictor(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_predictor(official_tiny, subfolder="nope")


def test_pickle_only_repo_is_refused_never_loaded(tmp_path):
    cache = tmp_path / "cache"
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"not even a pickle: loading it would fail loudly")
    add_snapshot(cache, "org/pickled", COMMIT_MAIN, {"pytorch_model.bin": weights})
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model.bin.*never loaded"):
        load_predictor("org/pickled", cache_dir=cache)
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model.bin.*never loaded"):
        HyperLoRAPredictor.from_pretrained("org/pickled", cache_dir=cache)


def test_own_format_without_weights_names_them(tmp_path):
    folder = tmp_path / "own"
    tiny_hyperlora_predictor().save_pretrained(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=r"no 'model.safetensors'.*pytorch_model.bin.*never loaded"):
        load_predictor(folder)


def test_foreign_config_json_is_not_mistaken(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "in_channels": 4}')
    with pytest.raises(CheckpointFormatError, match="not a HyperLoRA config"):
        load_predictor(tmp_path)


def test_heads_rejected_for_library_format(tmp_path):
    tiny_hyperlora_predictor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only apply to release-layout"):
        load_predictor(tmp_path, heads=4)


def test_release_on_hub_with_heads_override(tmp_path):
    original = tiny_hyperlora_predictor(seed=5, resampler_heads=6, resampler_dim_head=16)
    folder = save_release_checkpoint(original, tmp_path / "release", dtype=torch.float16)
    cache = tmp_path / "cache"
    add_snapshot(cache, "org/fp16", COMMIT_MAIN, folder_files(folder, "ckpt/"))
    loaded = load_predictor("org/fp16", subfolder="ckpt", cache_dir=cache, heads=6, torch_dtype=torch.float32)
    assert loaded.dtype == torch.float32 and loaded.config.resampler_dim_head == 16


def test_one_rule_for_names(tmp_path):
    """`resolve_location`: folders of the checkpoint keep its options; other repos keep all but revision/subfolder."""
    options = HubOptions(subfolder="v1", revision="v2", token="t", cache_dir=str(tmp_path), local_files_only=True)
    hub = Location("org/hyperlora", options)
    encoder = resolve_location("image_encoder", options.for_other_repo(), relative_to=hub)
    assert encoder == Location("org/hyperlora", dataclasses.replace(options, subfolder="v1/image_encoder"))
    models = resolve_location("./models", subfolder="clip", relative_to=hub)
    assert (models.path, models.options.subfolder, models.options.revision) == ("org/hyperlora", "v1/models/clip", "v2")
    other = resolve_location("h94/IP-Adapter/models", options.for_other_repo(), subfolder="enc", relative_to=hub)
    assert (other.path, other.options.subfolder, other.options.revision) == ("h94/IP-Adapter", "models/enc", None)
    assert (other.options.token, other.options.cache_dir, other.options.local_files_only) == ("t", str(tmp_path), True)
    local = Location(str(tmp_path))
    assert resolve_location("image_encoder", relative_to=local).local_dir == tmp_path / "image_encoder"
    assert resolve_location(str(tmp_path), relative_to=hub).local_dir == tmp_path
    assert resolve_location(hub) is hub
    for bad in ("not a name/", ""):
        with pytest.raises(CheckpointNotFoundError, match="neither a local folder, a Hub repo id"):
            resolve_location(bad, options)
    with pytest.raises(TypeError, match=r"Unknown Hub option\(s\) \['revison'\]"):
        HubOptions.of({"revison": "v1"})
    assert HubOptions.of({"revision": "a"}, revision="b").revision == "b"


def test_face_models_from_a_repo_folder(tmp_path):
    """Only the .onnx files of a repo folder are fetched, through the same resolver and options."""
    onnx = tmp_path / "glintr100.onnx"
    onnx.write_bytes(b"onnx")
    other = tmp_path / "notes.txt"
    other.write_text("not fetched")
    cache = tmp_path / "cache"
    add_snapshot(cache, "org/withfaces", COMMIT_MAIN, {"antelopev2/glintr100.onnx": onnx, "antelopev2/x.txt": other})
    checkpoint = Location("org/withfaces", HubOptions(cache_dir=cache, local_files_only=True))
    folder = resolve_location("antelopev2", relative_to=checkpoint).folder(ONNX_PATTERNS)
    assert (folder / "glintr100.onnx").read_bytes() == b"onnx"
    assert resolve_location(str(tmp_path), relative_to=checkpoint).folder(ONNX_PATTERNS) == tmp_path
    with pytest.raises(CheckpointNotFoundError, match=r"org/nofaces.*downloads are off.*not in the cache folder"):
        resolve_location("org/nofaces", checkpoint.options).folder(ONNX_PATTERNS)


def test_cli_hub_flags_reach_the_resolver(hub_cache, tmp_path, capsys):
    from safetensors.torch import load_file

    from diffusers_hyperlora.cli import main

    cache, other = hub_cache
    identity = _identity(other)
    identity.save(tmp_path / "me.safetensors")
    out = tmp_path / "lora.safetensors"
    flags = ["--model", "org/hyperlora", "--revision", "v2", "--cache-dir", str(cache), "--local-files-only"]
    flags += ["--overwrite"]  # the failed calls below write to the same -o
    assert main(["export", str(tmp_path / "me.safetensors"), "-o", str(out), *flags]) == 0
    expected = other.export_lora(identity)
    assert all(torch.allclose(value, expected[key], atol=1e-6) for key, value in load_file(out).items())
    capsys.readouterr()
    # Each flag matters: without --cache-dir the repo is not found; without --revision, main's root has no checkpoint.
    without_cache = [f for f in flags if f != str(cache) and f != "--cache-dir"]
    assert main(["export", str(tmp_path / "me.safetensors"), "-o", str(out), *without_cache]) == 1
    assert "not in the cache folder" in capsys.readouterr().err
    without_revision = [f for f in flags if f not in ("--revision", "v2")]
    assert main(["export", str(tmp_path / "me.safetensors"), "-o", str(out), *without_revision]) == 1
    assert "not a HyperLoRA checkpoint" in capsys.readouterr().err
    converted = tmp_path / "converted"
    argv = ["convert", "org/hyperlora", str(converted), "--subfolder", SUBFOLDER, "--cache-dir", str(cache), "--quiet"]
    assert main(argv) == 0
    assert load_predictor(converted).config.num_basis == 8


def test_encoders_named_by_a_hub_checkpoint_come_from_its_repo_revision_and_subfolder(tmp_path):
    """The CLIP encoder and face models named in config.json are folders of the checkpoint, in the Hub cache."""
    from diffusers_hyperlora import FaceModelsNotFoundError
    from diffusers_hyperlora.face import FaceAnalyzer, build_feature_extractor
    from diffusers_hyperlora.testing.tiny_face import export_tiny_antelopev2, tiny_clip_encoder

    encoder = tiny_clip_encoder(seed=4)
    encoder.model.save_pretrained(tmp_path / "encoder")
    encoder.processor.save_pretrained(tmp_path / "encoder")
    faces = export_tiny_antelopev2(tmp_path / "faces")
    tiny_hyperlora_predictor(seed=3, image_encoder="./image_encoder", face_models="antelopev2").save_pretrained(
        tmp_path / "ckpt"
    )
    files = {
        **folder_files(tmp_path / "ckpt", "v1/"),
        **folder_files(tmp_path / "encoder", "v1/image_encoder/"),
        **folder_files(faces, "v1/antelopev2/"),
    }
    cache = tmp_path / "cache"
    add_snapshot(cache, "org/with-encoders", COMMIT_V2, files, ref="v2")
    options = HubOptions(subfolder="v1", revision="v2", cache_dir=str(cache))
    predictor = load_predictor("org/with-encoders", options)
    extractor = build_feature_extractor(
        predictor.config, source="org/with-encoders", image_encoder=None, face_analyzer=None, hub_options=options
    )
    loaded = extractor.image_encoder.model.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in encoder.model.state_dict().items())
    assert isinstance(extractor.face_analyzer, FaceAnalyzer)
    # The checkpoint's revision is what finds them: at `main` this repo has nothing cached.
    at_main = build_feature_extractor(
        predictor.config, source="org/with-encoders", image_encoder=None, face_analyzer=None,
        hub_options=dataclasses.replace(options, revision=None),
    )  # fmt: skip
    with pytest.raises(FaceModelsNotFoundError, match=r"CLIP image encoder.*revision 'main' is not in the cache"):
        _ = at_main.image_encoder
    with pytest.raises(FaceModelsNotFoundError, match=r"face models.*revision 'main' is not in the cache.*analyzer="):
        _ = at_main.face_analyzer


def test_the_predictor_module_knows_nothing_of_files():
    """io builds predictors: predictor.py imports nothing from io at import time (its two Hub entries are lazy)."""
    import ast

    import diffusers_hyperlora.model.predictor as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.startswith(("io", ".io", "diffusers_hyperlora.io"))]
    methods = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "_from_pretrained" not in methods and "_save_pretrained" not in methods  # one loading path


class FakeHub:
    """Stands in for the Hub online: `snapshot_download` copies the repo files matching `allow_patterns` (the way
    huggingface_hub filters them) into a snapshot folder and records each call; `list_repo_files` lists the repo."""

    def __init__(self, root: Path, repos: dict[str, Path]) -> None:
        self.root, self.repos, self.calls, self.fetched = root, repos, [], set()

    def files(self, repo_id: str) -> list[str]:
        source = self.repos[repo_id]
        return sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())

    def snapshot_download(self, repo_id: str, *, allow_patterns, **kwargs) -> str:
        self.calls.append({"allow_patterns": list(allow_patterns), **kwargs})
        snapshot = self.root / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in self.files(repo_id):
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.repos[repo_id] / name, snapshot / name)
                self.fetched.add(name)
        return str(snapshot)


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub(tmp_path / "snapshots", {})
    monkeypatch.setattr(diffusers_hyperlora.io.hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(diffusers_hyperlora.io.hub, "HfApi", lambda: SimpleNamespace(list_repo_files=lambda repo_id,
                        **kwargs: hub.files(repo_id)))  # fmt: skip
    return hub


def _repo(folder: Path, files: dict[str, Path | bytes]) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    return folder


def test_online_release_fetches_only_its_files_with_every_hub_option(online_hub, tmp_path, official_tiny):
    """Online, only the checkpoint's JSON files and then its format's files are downloaded, with the Hub options."""
    release = {f"ckpt/{p.name}": p for p in official_tiny.iterdir() if p.suffix in (".json", ".safetensors")}
    extra = {"ckpt/pytorch_model.bin": b"pickle", "ckpt/other.safetensors": b"x", "elsewhere/big.safetensors": b"x"}
    online_hub.repos["org/online"] = _repo(tmp_path / "remote", {**release, **extra})
    loaded = load_predictor("org/online", subfolder="ckpt", revision="v1", token="tok", force_download=True)
    torch.testing.assert_close(loaded.state_dict(), load_predictor(official_tiny).state_dict(), atol=0, rtol=0)
    wanted = {"hyper_lora_modules.json", "hyper_lora_modules.safetensors", "resampler.safetensors",
              "id_projector.safetensors"}  # fmt: skip
    assert online_hub.fetched == {f"ckpt/{name}" for name in wanted}
    for call in online_hub.calls:
        assert (call["revision"], call["token"], call["force_download"]) == ("v1", "tok", True)
        assert all(pattern.startswith("ckpt/") for pattern in call["allow_patterns"])


def test_online_library_format_and_missing_file_listing(online_hub, tmp_path, official_tiny):
    own = tmp_path / "own"
    tiny_hyperlora_predictor().save_pretrained(own)
    online_hub.repos["org/own"] = _repo(tmp_path / "own-remote", {p.name: p for p in own.iterdir()})
    _repo(online_hub.repos["org/own"], {"pytorch_model.bin": b"pickle"})
    load_predictor("org/own")
    assert online_hub.fetched == {"config.json", "model.safetensors"}
    # A file missing on the Hub: the message lists what the repo holds (from the Hub, not the partial download).
    files = {p.name: p for p in official_tiny.iterdir() if p.name != "resampler.safetensors"}
    online_hub.repos["org/broken"] = _repo(tmp_path / "broken", {**files, "resampler.bin": b"pickle"})
    with pytest.raises(CheckpointFormatError, match=r"has no 'resampler.safetensors'\. Files found: .*resampler\.bin"):
        load_predictor("org/broken")
