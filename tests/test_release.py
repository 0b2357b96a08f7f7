"""The public release's folder layout: parity with the reference, round trips through the writer, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import random_features
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from diffusers_hyperlora import CheckpointFormatError, load_predictor
from diffusers_hyperlora.identities.identity import normalize_coefficients
from diffusers_hyperlora.io.release import config_from_release, read_safetensors_shapes, save_release_checkpoint
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor


def _predict(predictor, seed=0, batch=2, tokens=5):
    config = predictor.config
    embeds, states = random_features(batch, seed, tokens, config.image_embed_dim)
    return predictor.predict(
        id_embeds=embeds if config.use_id_embeds else None,
        clip_hidden_states=states if config.use_image_embeds else None,
    )


def _assert_same_lora(a, b, identity_a, identity_b, atol=0.0):
    lora_a = a.export_lora(identity_a, format="kohya")
    lora_b = b.export_lora(identity_b, format="kohya")
    assert lora_a.keys() == lora_b.keys()
    for key in lora_a:
        torch.testing.assert_close(lora_a[key], lora_b[key], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------- parity
def test_official_tiny_parity_through_pipeline(pipe, official_tiny):
    pipe.load_hyperlora(str(official_tiny), torch_dtype=torch.float32)
    predictor = pipe.hyperlora.predictor
    assert (predictor.config.num_basis, predictor.config.resampler_dim, predictor.config.image_embed_dim) == (8, 32, 48)
    inputs = load_file(official_tiny / "inputs.safetensors")
    identity = predictor.predict(inputs["arcface_normed_embedding"], inputs["clip_hidden_states"])
    lora = predictor.export_lora(identity, format="kohya")
    expected = load_file(official_tiny / "expected_lora_kohya.safetensors")
    assert lora.keys() == expected.keys() and len(expected) == 288
    for key, value in expected.items():
        assert lora[key].shape == value.shape, key
        assert (lora[key] - value).abs().max().item() < 1e-5, key
    assert float(lora[next(k for k in lora if k.endswith(".alpha"))]) == 4.0


def test_official_tiny_through_writer_is_unchanged(official_tiny, tmp_path):
    original = load_predictor(official_tiny)
    save_release_checkpoint(original, tmp_path / "copy")
    for name in ("hyper_lora_modules.safetensors", "resampler.safetensors", "id_projector.safetensors"):
        a, b = load_file(official_tiny / name), load_file(tmp_path / "copy" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "copy" / "hyper_lora_modules.json").read_text()) == json.loads(
        (official_tiny / "hyper_lora_modules.json").read_text()
    )


# ---------------------------------------------------------------------------------------------------- round trips
ARCHITECTURES = {
    "other-sizes": dict(num_basis=5, id_rank=4, resampler_dim=40, image_embed_dim=24, resampler_depth=3,
                        resampler_ff_mult=2, num_id_tokens=3, resampler_heads=12, resampler_dim_head=64),
    "clip-only": dict(use_id_embeds=False, num_basis=6, id_rank=2, resampler_depth=1),
    "arcface-only": dict(use_image_embeds=False, num_basis=4, resampler_depth=1, num_id_tokens=2),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_round_trip_other_architectures(name, tmp_path):
    overrides = ARCHITECTURES[name]
    original = tiny_hyperlora_predictor(seed=3, **overrides)
    save_release_checkpoint(original, tmp_path)
    if not original.config.use_id_embeds:
        assert not (tmp_path / "id_projector.safetensors").exists()
    loaded = load_predictor(tmp_path)
    for field in ("num_basis", "id_rank", "resampler_dim", "image_embed_dim", "resampler_depth", "resampler_ff_mult",
                  "use_id_embeds", "use_image_embeds", "targets"):  # fmt: skip
        assert getattr(loaded.config, field) == getattr(original.config, field), field
    if original.config.use_id_embeds:
        assert loaded.config.num_id_tokens == original.config.num_id_tokens
    _assert_same_lora(original, loaded, _predict(original), _predict(loaded))


def test_heads_override_round_trip_and_error(tmp_path):
    # width 96 = 4 x 24 (not 12 x 64): the layout cannot be read off shapes, so it is passed by keyword.
    original = tiny_hyperlora_predictor(seed=1, resampler_heads=4, resampler_dim_head=24)
    save_release_checkpoint(original, tmp_path)
    with pytest.raises(CheckpointFormatError, match=r"96 wide.*12 x 64"):
        load_predictor(tmp_path)
    for kwargs in (dict(heads=4, dim_head=24), dict(heads=4), dict(dim_head=24)):
        loaded = load_predictor(tmp_path, **kwargs)
        assert (loaded.config.resampler_heads, loaded.config.resampler_dim_head) == (4, 24)
        _assert_same_lora(original, loaded, _predict(original), _predict(loaded), atol=1e-6)
    # A different split of the same width loads, but attends differently: the numbers must change.
    wrong = load_predictor(tmp_path, heads=2)
    assert not torch.allclose(_predict(wrong).id_mean, _predict(original).id_mean, atol=1e-4)
    with pytest.raises(CheckpointFormatError, match=r"5 x 19"):
        load_predictor(tmp_path, heads=5)
    with pytest.raises(ValueError, match="positive"):
        load_predictor(tmp_path, heads=0)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("load_dtype", [None, torch.float32, torch.float16])
def test_16bit_files_load_in_requested_dtype(file_dtype, load_dtype, tmp_path):
    original = tiny_hyperlora_predictor(seed=2)
    save_release_checkpoint(original, tmp_path, dtype=file_dtype)
    bank = load_file(tmp_path / "hyper_lora_modules.safetensors")
    assert all(t.dtype == file_dtype for t in bank.values())
    loaded = load_predictor(tmp_path, torch_dtype=load_dtype)
    want = load_dtype or file_dtype
    assert {p.dtype for p in loaded.parameters()} == {want}
    # Every value is the file's 16-bit value cast once to the requested dtype (no detour through another dtype).
    reference = original.to(file_dtype).state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key].to(want)), key


def test_shuffled_json_order_follows_the_file(tmp_path):
    """Entry i of the JSON owns tokens [8i, 8i+8): check against LoRAs mixed by hand from the bank."""
    original = tiny_hyperlora_predictor(seed=4)
    save_release_checkpoint(original, tmp_path)
    modules = json.loads((tmp_path / "hyper_lora_modules.json").read_text())
    names = list(modules)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(0)).tolist()
    assert order != sorted(order)
    # Rewrite the folder as if the JSON were in `order`: entry j is module names[order[j]]; its bank keys move.
    # Copies: load_file may return views of the file's memory map, and safetensors 0.4's save_file rewrites the file
    # in place, which would change the reference tensors below (the loaded predictor owns its weights: see above).
    bank = {k: v.clone() for k, v in load_file(tmp_path / "hyper_lora_modules.safetensors").items()}
    new_bank = {}
    for j, old in enumerate(order):
        for key, value in bank.items():
            index, rest = key.split(".", 1)
            if int(index) == old:
                new_bank[f"{j}.{rest}"] = value
    save_file(new_bank, tmp_path / "hyper_lora_modules.safetensors")
    (tmp_path / "hyper_lora_modules.json").write_text(json.dumps({names[o]: modules[names[o]] for o in order}))

    loaded = load_predictor(tmp_path)
    assert [t.name for t in loaded.config.targets] == [names[o] for o in order]
    identity = _predict(loaded)
    lora = loaded.export_lora(identity, format="kohya")
    coefficients = normalize_coefficients(identity.id_mean)  # [8M, K], token 8j+2l is down, +1 up of linear l
    linears = ("to_q", "to_k", "to_v", "to_out")
    kohya = ("to_q", "to_k", "to_v", "to_out_0")
    for j, old in enumerate(order):
        for l, (release_name, suffix) in enumerate(zip(linears, kohya)):
            down_basis = new_bank[f"{j}.{release_name}.id_down_basis"].double()  # [K, in, r]
            up_basis = new_bank[f"{j}.{release_name}.id_up_basis"].double()  # [K, r, out]
            t_down, t_up = coefficients[8 * j + 2 * l].double(), coefficients[8 * j + 2 * l + 1].double()
            down = torch.einsum("k,kir->ri", t_down, down_basis)
            up = torch.einsum("k,kro->or", t_up, up_basis)
            name = f"{names[old]}_{suffix}"
            torch.testing.assert_close(lora[f"{name}.lora_down.weight"].double(), down, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lora[f"{name}.lora_up.weight"].double(), up, atol=1e-5, rtol=1e-5)
    # Same resampler output, same bases: only the token slice of each module moved, so its LoRA changed.
    torch.testing.assert_close(identity.id_mean, _predict(original).id_mean)
    before = original.export_lora(_predict(original), format="kohya")
    moved = next(names[old] for j, old in enumerate(order) if j != old)
    key = f"{moved}_to_q.lora_down.weight"
    assert not torch.allclose(lora[key], before[key], atol=1e-3)


@pytest.mark.parametrize("layout", ["release", "library"])
def test_loaded_weights_do_not_follow_a_file_rewritten_in_place(tmp_path, layout):
    """safetensors 0.4 returns views of the file's memory map (the format promises no copy, and no view): a loaded
    predictor must own its weights, so rewriting the checkpoint's files in place (`cp`, a re-download) changes
    nothing, instead of silently changing (or, for a shorter file, crashing with SIGBUS) the loaded model."""
    original = tiny_hyperlora_predictor(seed=5)
    if layout == "release":
        save_release_checkpoint(original, tmp_path)
    else:
        original.save_pretrained(tmp_path)
    loaded = load_predictor(tmp_path)
    before = {key: value.clone() for key, value in loaded.state_dict().items()}
    files = sorted(tmp_path.glob("*.safetensors"))
    for path in files:  # same keys, shapes and dtypes (so the same layout), other values, written into the same inode
        tensors = load_file(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        data = save({key: torch.randn_like(value.clone()) for key, value in tensors.items()}, metadata=metadata)
        del tensors
        assert len(data) == path.stat().st_size
        with open(path, "r+b") as handle:
            handle.write(data)
    rewritten = load_predictor(tmp_path).state_dict()
    assert files and all(not torch.equal(rewritten[key], value) for key, value in before.items() if value.numel() > 1)
    after = loaded.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def release_copy(official_tiny, tmp_path):
    folder = tmp_path / "release"
    shutil.copytree(official_tiny, folder)
    return folder


def test_missing_file_is_named(release_copy):
    (release_copy / "resampler.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"has no 'resampler.safetensors'.*Files found: .*hyper_lora"):
        load_predictor(release_copy)


def test_json_and_bank_mismatch(release_copy):
    modules = json.loads((release_copy / "hyper_lora_modules.json").read_text())
    first = next(iter(modules))
    modules[first]["hidden_size"] = 16
    (release_copy / "hyper_lora_modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointFormatError, match=r"id_down_basis has shape \[8, 64, 8\].*implies \[8, 16, 8\]"):
        load_predictor(release_copy)


def test_json_with_fewer_entries_than_queries(release_copy):
    modules = json.loads((release_copy / "hyper_lora_modules.json").read_text())
    (release_copy / "hyper_lora_modules.json").write_text(json.dumps(dict(list(modules.items())[:-1])))
    with pytest.raises(CheckpointFormatError, match=r"192 query tokens but .* lists 23 modules"):
        load_predictor(release_copy)


def test_bad_json_and_bad_entries(release_copy):
    (release_copy / "hyper_lora_modules.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        load_predictor(release_copy)
    (release_copy / "hyper_lora_modules.json").write_text(json.dumps({"lora_unet_x": {"hidden": 3}}))
    with pytest.raises(CheckpointFormatError, match="integer 'hidden_size'"):
        load_predictor(release_copy)


def test_pickle_files_are_refused_with_a_hint(release_copy):
    (release_copy / "resampler.safetensors").rename(release_copy / "resampler.bin")
    with pytest.raises(CheckpointFormatError, match=r"resampler.bin.*never loaded"):
        load_predictor(release_copy)


def test_config_from_shapes_is_pure(official_tiny):
    shapes = [read_safetensors_shapes(official_tiny / f"{n}.safetensors") for n in
              ("hyper_lora_modules", "resampler", "id_projector")]  # fmt: skip
    modules = json.loads((official_tiny / "hyper_lora_modules.json").read_text())
    config = config_from_release(modules, *shapes)
    assert (config.num_basis, config.id_rank, config.resampler_dim, config.image_embed_dim) == (8, 8, 32, 48)
    assert (config.resampler_depth, config.resampler_ff_mult, config.num_id_tokens) == (2, 4, 4)
    assert (config.resampler_heads, config.resampler_dim_head, config.license) == (12, 64, "cc-by-nc-4.0")
    assert len(config.targets) == 24 and not config.has_base


def test_release_layout_with_a_base_branch_round_trips_and_needs_its_resampler(tmp_path):
    original = tiny_hyperlora_predictor(seed=4, base_rank=2)
    folder = save_release_checkpoint(original, tmp_path / "base")
    loaded = load_predictor(folder)
    assert loaded.config.has_base and loaded.config.base_rank == 2
    torch.testing.assert_close(loaded.state_dict(), original.state_dict(), atol=0, rtol=0)
    (folder / "base_resampler.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"has no 'base_resampler.safetensors'"):
        load_predictor(folder)


def _edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "id_projector.safetensors").unlink(), r"reads ArcFace tokens .* no id_projector.safetensors"),
        (lambda f: (f / "resampler.safetensors").write_bytes(b"\0" * 16), r"resampler.safetensors is not a readable"),
        (lambda f: _edit_tensors(f / "resampler.safetensors", lambda t: t.update(latents=t["latents"][0])),
         r"'latents' must be \[1, queries, width\]"),
        (lambda f: _edit_tensors(f / "resampler.safetensors", lambda t: [t.pop(k) for k in list(t) if "layers" in k]),
         r"expected layers 0..n-1, found layers \[\]"),
        (lambda f: _edit_tensors(f / "resampler.safetensors", lambda t: [t.pop(k) for k in list(t) if "proj_in" in k]),
         r"neither 'proj_in.weight' .* nor 'proj_in_2.weight'"),
        (lambda f: _edit_tensors(f / "resampler.safetensors", lambda t: t.pop("proj_out.weight")),
         r"resampler.safetensors of .* missing \['proj_out.weight'\]"),
        (lambda f: _edit_tensors(f / "id_projector.safetensors", lambda t: t.update(extra=torch.zeros(1))),
         r"id_projector.safetensors of .* unexpected \['extra'\]"),
    ],
    ids=["no-projector", "corrupt-file", "latents", "no-layers", "no-condition", "missing-key", "unexpected-key"],
)  # fmt: skip
def test_damaged_release_files_are_named(release_copy, damage, message):
    damage(release_copy)
    with pytest.raises(CheckpointFormatError, match=message):
        load_predictor(release_copy)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: c.update(_format_version=99), r"format version 99; .* reads up to 1\. Upgrade"),
        (lambda c: c.update(num_basis="many"), r"is not a valid HyperLoRAConfig"),
    ],
    ids=["newer-format", "invalid-field"],
)
def test_damaged_library_config_is_named(tmp_path, damage, message):
    tiny_hyperlora_predictor().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    damage(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=message):
        load_predictor(tmp_path)


def test_sharded_checkpoint_with_a_broken_index_or_missing_shard(tmp_path):
    tiny_hyperlora_predictor().save_pretrained(tmp_path, max_shard_size=20_000)
    index = tmp_path / "model.safetensors.index.json"
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert index.exists() and len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointFormatError, match=rf"has no '{shards[-1].name}'"):
        load_predictor(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors.index.json of .* is not a shard index"):
        load_predictor(tmp_path)


def test_dtype_by_name_like_the_loaders(tmp_path):
    """`save_release_checkpoint(..., dtype="fp16")` as `load_predictor(torch_dtype="fp16")` / `convert_checkpoint`."""
    save_release_checkpoint(tiny_hyperlora_predictor(seed=0), tmp_path, dtype="fp16")
    assert {t.dtype for t in load_file(tmp_path / "resampler.safetensors").values()} == {torch.float16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_release_checkpoint(tiny_hyperlora_predictor(seed=0), tmp_path / "other", dtype="fp8")
