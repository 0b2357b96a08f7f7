"""Hostile and odd inputs to the loading / saving layer (io/): each is refused with a HyperLoRAError that names the
input, or handled as the user meant; nothing is loaded wrong silently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_hyperlora import CheckpointFormatError, load_predictor, save_release_checkpoint
from diffusers_hyperlora.errors import (
    HyperLoRAWriteError,
    IdentityFormatError,
    IdentityNotFoundError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from diffusers_hyperlora.identities.identity import HyperLoRAIdentity
from diffusers_hyperlora.io import HubOptions
from diffusers_hyperlora.io.convert import convert_checkpoint
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

INDEX = "model.safetensors.index.json"
ATTN2 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny predictor and its library-format checkpoint, single-file and sharded."""
    predictor = tiny_hyperlora_predictor(seed=0)
    root = tmp_path_factory.mktemp("saved")
    predictor.save_pretrained(root / "single")
    predictor.save_pretrained(root / "sharded", max_shard_size=200_000)
    return predictor, root


def _copy(saved, tmp_path, which="single"):
    return shutil.copytree(saved[1] / which, tmp_path / which)


def _same(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k].float(), t.float()) for k, t in b.state_dict().items())


def _edit_index(folder, edit):
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


# ---------------------------------------------------------------------------------------------- two formats, one folder
def test_save_pretrained_over_a_release_folder_loads_the_new_save(tmp_path):
    old, new = tiny_hyperlora_predictor(seed=0), tiny_hyperlora_predictor(seed=1)
    save_release_checkpoint(old, tmp_path)
    new.save_pretrained(tmp_path)
    assert _same(load_predictor(tmp_path), new)


def test_save_release_over_a_library_checkpoint_is_refused_and_changes_nothing(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InvalidArgumentError, match=r"config\.json.*would be\s+loaded instead"):
        save_release_checkpoint(tiny_hyperlora_predictor(seed=1), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_save_release_next_to_a_foreign_config_json_still_works(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    predictor = tiny_hyperlora_predictor(seed=1)
    save_release_checkpoint(predictor, tmp_path)
    assert _same(load_predictor(tmp_path), predictor)


# ---------------------------------------------------------------------------------------------- shard indexes
@pytest.mark.parametrize("name", ["../outside.safetensors", "{root}/outside.safetensors", "sub/model.safetensors"])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(saved, tmp_path, name):
    folder = _copy(saved, tmp_path, "sharded")
    shutil.copy(folder / "model-00001-of-00017.safetensors", tmp_path / "outside.safetensors")
    name = name.format(root=tmp_path)
    _edit_index(folder, lambda weight_map: weight_map.update(dict.fromkeys(weight_map, name)))
    with pytest.raises(CheckpointFormatError, match=r"file name in the folder"):
        load_predictor(folder)


@pytest.mark.parametrize("weight_map", [[], {"resampler.latents": 1}, "model.safetensors"])
def test_malformed_weight_map_is_a_format_error(saved, tmp_path, weight_map):
    folder = _copy(saved, tmp_path, "sharded")
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointFormatError, match=INDEX):
        load_predictor(folder)


def test_a_tensor_stored_in_two_shards_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path, "sharded")
    first = load_file(folder / "model-00001-of-00017.safetensors")
    second = load_file(folder / "model-00002-of-00017.safetensors")
    key = next(iter(first))
    second[key] = torch.zeros_like(first[key])
    save_file(second, folder / "model-00002-of-00017.safetensors")
    with pytest.raises(CheckpointFormatError, match=rf"{key}.*both"):
        load_predictor(folder)


# ---------------------------------------------------------------------------------------------- tensor dtypes
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
@pytest.mark.parametrize("torch_dtype", [None, torch.float32])
def test_non_float_weights_are_refused(saved, tmp_path, dtype, torch_dtype):
    folder = _copy(saved, tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in state.items()}, folder / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors.*(I32|BOOL)"):
        load_predictor(folder, torch_dtype=torch_dtype)


def test_non_float_release_weights_are_refused(tmp_path):
    save_release_checkpoint(tiny_hyperlora_predictor(), tmp_path)
    state = load_file(tmp_path / "resampler.safetensors")
    save_file({k: v.to(torch.int64) for k, v in state.items()}, tmp_path / "resampler.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"resampler\.safetensors.*I64"):
        load_predictor(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_load_as_stored(saved, tmp_path, dtype):
    folder = _copy(saved, tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in state.items()}, folder / "model.safetensors")
    assert next(load_predictor(folder).parameters()).dtype == dtype


@pytest.mark.parametrize("torch_dtype", ["float16", "bf16", torch.float16])
def test_torch_dtype_may_be_a_name(saved, torch_dtype):
    assert next(load_predictor(saved[1] / "single", torch_dtype=torch_dtype).parameters()).dtype != torch.float32


@pytest.mark.parametrize(
    ("torch_dtype", "error"),
    [(torch.int32, InvalidArgumentError), ("float8", InvalidArgumentError), (16, InvalidArgumentTypeError)],
)
def test_a_bad_torch_dtype_is_an_argument_error(saved, torch_dtype, error):
    with pytest.raises(error, match="dtype"):
        load_predictor(saved[1] / "single", torch_dtype=torch_dtype)


# ---------------------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize(
    "change",
    [
        {"num_basis": 8.5},
        {"num_basis": "8"},
        {"num_basis": None},
        {"resampler_dim_head": 0},
        {"use_id_embeds": "yes"},
        {"targets": [1, 2]},
        {"targets": [{"name": ATTN2, "hidden_size": "64", "cross_attention_dim": 32}]},
        {"targets": [{"name": ATTN2, "hidden_size": 64, "cross_attention_dim": 0}]},
    ],
)
def test_config_json_with_wrong_types_is_a_format_error(saved, tmp_path, change):
    folder = _copy(saved, tmp_path)
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=r"config\.json .* is not a valid HyperLoRAConfig"):
        load_predictor(folder)


# ---------------------------------------------------------------------------------------------- Hub options
@pytest.mark.parametrize(
    "options",
    [
        {"local_files_only": "no"},
        {"force_download": 1},
        {"revision": 3},
        {"subfolder": 3},
        {"token": 5},
        {"cache_dir": 5},
    ],
)
def test_hub_options_of_the_wrong_type_are_refused(options):
    with pytest.raises(InvalidArgumentTypeError, match=next(iter(options))):
        HubOptions.of(options)
    with pytest.raises(InvalidArgumentTypeError, match=next(iter(options))):
        load_predictor("org/name", **options)


@pytest.mark.parametrize("options", [["revision"], "revision=v1"])
def test_hub_options_that_are_not_a_mapping_are_refused(options):
    with pytest.raises(InvalidArgumentTypeError, match="HubOptions"):
        HubOptions.of(options)


def test_unknown_hub_option_is_a_hyperlora_error(saved):
    with pytest.raises(InvalidArgumentTypeError, match="revison"):
        load_predictor(saved[1] / "single", revison="v1")


def test_hub_options_accept_paths_and_token_booleans(saved, tmp_path):
    subfolder = saved[1].joinpath("single").relative_to(saved[1])
    options = HubOptions.of(subfolder=subfolder, token=False, cache_dir=tmp_path)
    assert options.subfolder == "single" and options.token is False
    assert _same(load_predictor(saved[1], options), saved[0])


# ---------------------------------------------------------------------------------------------- argument errors
def test_bad_heads_and_self_conversion_are_hyperlora_errors(saved, tmp_path):
    save_release_checkpoint(saved[0], tmp_path / "release")
    with pytest.raises(InvalidArgumentError, match="heads"):
        load_predictor(tmp_path / "release", heads=0)
    with pytest.raises(InvalidArgumentError, match="heads"):
        load_predictor(tmp_path / "release", heads=True)
    with pytest.raises(InvalidArgumentError, match="heads"):
        load_predictor(saved[1] / "single", heads=12)
    (tmp_path / "link").symlink_to(tmp_path / "release")
    with pytest.raises(InvalidArgumentError, match="overwrite its source"):
        convert_checkpoint(tmp_path / "release", tmp_path / "link", progress=False)


# ---------------------------------------------------------------------------------------------- identity files
@pytest.mark.parametrize("key", ["id_mean", "probe"])
def test_identity_file_with_non_float_tensors_is_refused(saved, tmp_path, key):
    predictor = saved[0]
    identity = predictor.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
    identity.save(tmp_path / "me.safetensors")
    with safe_open(tmp_path / "me.safetensors", framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[key] = (tensors[key] * 100).to(torch.int32)
    save_file(tensors, tmp_path / "me.safetensors", metadata=metadata)
    with pytest.raises(IdentityFormatError, match=rf"{key}.*floating point"):
        HyperLoRAIdentity.load(tmp_path / "me.safetensors")


def test_a_missing_identity_file_is_a_hyperlora_error(tmp_path):
    with pytest.raises(IdentityNotFoundError, match="No identity file") as caught:
        HyperLoRAIdentity.load(tmp_path)  # a folder is not a file either
    assert isinstance(caught.value, FileNotFoundError)


@pytest.mark.parametrize("name", [None, 3, ["org/name"]], ids=["none", "int", "list"])
def test_a_checkpoint_named_by_something_else_than_a_path_is_refused(name, tmp_path):
    with pytest.raises(InvalidArgumentTypeError, match=r"Hub repo id .* or a local folder \(str or Path\)"):
        load_predictor(name)
    with pytest.raises(InvalidArgumentTypeError, match=r"Hub repo id .* or a local folder"):
        convert_checkpoint(name, tmp_path / "out")


@pytest.mark.parametrize("device", ["gpu-please", 3.5], ids=["unknown-name", "float"])
def test_a_bad_device_is_an_argument_error(saved, device):
    with pytest.raises(InvalidArgumentError, match=r"device must be a torch device or a name like 'cpu'"):
        load_predictor(saved[1] / "single", device=device)


@pytest.mark.parametrize("depth", [10**9, 3], ids=["huge", "one-more"])
def test_a_config_deeper_than_its_weights_is_refused_before_building_it(saved, tmp_path, depth):
    """A huge depth in config.json used to build (for the shape check) that many layers: a hang, not an error.
    The small depth fails fast when the check is dropped (the shape check's message is another)."""
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["resampler_depth"] = depth
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=rf"resampler_depth={depth}, but the weights hold 2 resampler"):
        load_predictor(folder)


def test_a_file_where_the_destination_folder_should_be_is_named(saved, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OSError, match=r"a file stands where a folder is needed") as error:
        saved[0].save_pretrained(tmp_path / "taken")
    assert isinstance(error.value, HyperLoRAWriteError)
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_a_checkpoint_file_instead_of_its_folder_is_named(saved):
    """A diffusers habit (`load_lora_weights("x.safetensors")`): the file is named, not looked up as a Hub repo."""
    from diffusers_hyperlora import CheckpointNotFoundError

    _, root = saved
    with pytest.raises(CheckpointNotFoundError, match="is a file; a folder or a Hub repo id") as error:
        load_predictor(root / "single" / "model.safetensors")
    assert str(root / "single") in str(error.value) and "Hub repo '" not in str(error.value)


@pytest.mark.parametrize("size", ["lots", "1GiB", "0MB", 0, -1, 1.5, True], ids=repr)
def test_a_bad_max_shard_size_is_refused_before_anything_is_written(tmp_path, size):
    predictor = tiny_hyperlora_predictor()
    with pytest.raises(InvalidArgumentError, match=r"max_shard_size must be .* like '500MB'") as caught:
        predictor.save_pretrained(tmp_path / "out", max_shard_size=size)
    assert caught.value.argument == "max_shard_size" and not (tmp_path / "out").exists()
    with pytest.raises(InvalidArgumentError, match="max_shard_size") as caught:
        convert_checkpoint(tmp_path / "no-such-source", tmp_path / "converted", max_shard_size=size)
    assert caught.value.argument == "max_shard_size"


@pytest.mark.parametrize("size", ["500KB", " 0.2 mb ", 100_000])
def test_max_shard_size_takes_bytes_and_hub_size_strings(tmp_path, size):
    predictor = tiny_hyperlora_predictor()
    folder = predictor.save_pretrained(tmp_path / "out", max_shard_size=size)
    assert (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    assert torch.equal(load_predictor(folder).probe, predictor.probe)


def test_a_device_this_machine_lacks_is_an_argument_error(saved):
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(InvalidArgumentError, match=r"cuda:7") as caught:
        load_predictor(saved[1] / "single", device="cuda:7")
    assert caught.value.argument == "device"
