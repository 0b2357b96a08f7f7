"""The `diffusers-hyperlora` command, run in-process on saved tiny checkpoints and identity files."""

from __future__ import annotations

import pytest
import torch
from conftest import random_features
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_hyperlora import HyperLoRAIdentity, load_predictor
from diffusers_hyperlora.adapters.sliders import HyperLoRASlider
from diffusers_hyperlora.cli import build_parser, main
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint in the library format and three saved identities of it."""
    root = tmp_path_factory.mktemp("cli")
    predictor = tiny_hyperlora_predictor(seed=0)
    predictor.save_pretrained(root / "model")
    paths = []
    for name, batch, seed in (("alice", 2, 1), ("alice_more", 3, 2), ("alice_old", 1, 3)):
        identity = predictor.predict(
            *random_features(batch=batch, seed=seed), sources=[f"{name}{i}.jpg" for i in range(batch)]
        )
        identity.save(root / f"{name}.safetensors")
        paths.append(str(root / f"{name}.safetensors"))
    return root, predictor, paths


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", ["identity", "export", "slider", "mix", "convert"])
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"diffusers-hyperlora {command}" in text
    if command != "mix" and command != "convert":
        assert "--model" in text and "repo id" in text
    if command == "convert":
        assert "--dtype" in text and "--subfolder" in text and "--revision" in text


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_export_writes_the_same_lora_as_the_api(setup, tmp_path, capsys, format):
    root, predictor, (alice, _, _) = setup
    out = tmp_path / "lora.safetensors"
    code, stdout, _ = _run(["export", alice, "-o", out, "--format", format, "--model", root / "model"], capsys)
    assert code == 0 and str(out) in stdout
    expected = predictor.export_lora(HyperLoRAIdentity.load(alice), format=format)
    written = load_file(str(out))
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, atol=1e-6, rtol=1e-6)
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["hyperlora_format"] == format


def test_export_of_several_files_pools_them_and_fp16(setup, tmp_path, capsys):
    root, predictor, (alice, alice_more, _) = setup
    out = tmp_path / "lora.safetensors"
    code, stdout, _ = _run(
        ["export", alice, alice_more, "-o", out, "--model", root / "model", "--dtype", "fp16"], capsys
    )
    assert code == 0 and "5 images" in stdout
    pooled = HyperLoRAIdentity.merge([HyperLoRAIdentity.load(alice), HyperLoRAIdentity.load(alice_more)])
    expected = predictor.export_lora(pooled)
    written = load_file(str(out))
    key = next(k for k in expected if k.endswith("lora_up.weight"))
    assert written[key].dtype == torch.float16
    torch.testing.assert_close(written[key].float(), expected[key], atol=1e-3, rtol=1e-2)


def test_identity_pools_saved_identities_exactly(setup, tmp_path, capsys):
    root, predictor, (alice, alice_more, _) = setup
    out = tmp_path / "alice_all.safetensors"
    code, _, _ = _run(["identity", alice, alice_more, "-o", out, "--model", root / "model"], capsys)
    assert code == 0
    pooled = HyperLoRAIdentity.load(out)
    together = predictor.predict(
        *(torch.cat(parts) for parts in zip(random_features(batch=2, seed=1), random_features(batch=3, seed=2)))
    )
    assert pooled.num_images == 5 and pooled.sources[:2] == ["alice0.jpg", "alice1.jpg"]
    torch.testing.assert_close(pooled.id_mean, together.id_mean, atol=1e-6, rtol=1e-5)


def test_slider_from_identity_files(setup, tmp_path, capsys):
    root, predictor, (alice, alice_more, alice_old) = setup
    out = tmp_path / "age.safetensors"
    argv = ["slider", "--neutral", alice, alice_more, "--edited", alice_old, "-o", out, "--model", root / "model"]
    code, _, _ = _run(argv, capsys)
    assert code == 0
    neutral = HyperLoRAIdentity.merge([HyperLoRAIdentity.load(alice), HyperLoRAIdentity.load(alice_more)])
    expected = predictor.export_lora(HyperLoRASlider(neutral, HyperLoRAIdentity.load(alice_old)))
    written = load_file(str(out))
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, atol=1e-6, rtol=1e-6)
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["hyperlora_kind"] == "slider"


def test_mix_blends_people(setup, tmp_path, capsys):
    _, _, (alice, _, alice_old) = setup
    out = tmp_path / "blend.safetensors"
    code, _, _ = _run(["mix", alice, alice_old, "--weights", "1", "3", "-o", out], capsys)
    assert code == 0
    a, b = HyperLoRAIdentity.load(alice), HyperLoRAIdentity.load(alice_old)
    expected = HyperLoRAIdentity.interpolate(a, b, 0.75)
    torch.testing.assert_close(HyperLoRAIdentity.load(out).id_coefficients, expected.id_coefficients)
    code, _, _ = _run(["mix", alice, alice_old, "--weights", "1", "3", "--spherical", "-o", out, "--overwrite"], capsys)
    expected = HyperLoRAIdentity.interpolate(a, b, 0.75, spherical=True)
    assert code == 0
    torch.testing.assert_close(HyperLoRAIdentity.load(out).id_coefficients, expected.id_coefficients)


def test_errors_are_reported_not_raised(setup, tmp_path, capsys):
    root, _, (alice, _, alice_old) = setup
    other = tmp_path / "other_model"
    tiny_hyperlora_predictor(seed=7).save_pretrained(other)
    out = tmp_path / "x.safetensors"

    code, _, err = _run(["export", alice, "-o", out, "--model", other], capsys)
    assert code == 1 and "another HyperLoRA checkpoint" in err and not out.exists()

    code, _, err = _run(["export", tmp_path / "nope.safetensors", "-o", out, "--model", root / "model"], capsys)
    assert code == 1 and "no such file" in err

    code, _, err = _run(["export", alice, "-o", out, "--model", tmp_path / "empty_dir_or_repo"], capsys)
    assert code == 1 and "error" in err

    code, _, err = _run(["mix", alice, alice_old, "--weights", "1", "-o", out], capsys)
    assert code == 1 and "give one weight per identity" in err
    assert "mix: error: --weights: HyperLoRAIdentity.mix() got 2 identities but 1 weight:" in err, err
    assert "mix: mix:" not in err, err
    code, _, err = _run(["mix", alice, "--weights", "1", "2", "-o", out], capsys)
    assert code == 1 and "got 1 identity but 2 weights" in err, err

    code, _, err = _run(["export", alice, "-o", out, "--model", root / "model", "--branch", "base"], capsys)
    assert code == 1 and "error: --branch: " in err, err

    lora = tmp_path / "lora.safetensors"
    assert _run(["export", alice, "-o", lora, "--model", root / "model"], capsys)[0] == 0
    code, _, err = _run(["export", lora, "-o", out, "--model", root / "model"], capsys)
    assert code == 1 and "looks like a LoRA file" in err


def test_model_options_reach_the_loader():
    args = build_parser().parse_args(
        [
            "slider",
            "--neutral",
            "a.jpg",
            "--edited",
            "b.jpg",
            "-o",
            "s.safetensors",
            "--model",
            "org/repo",
            "--subfolder",
            "fidelity",
            "--revision",
            "v1",
            "--heads",
            "6",
            "--dim-head",
            "32",
            "--device",
            "cpu",
        ]
    )
    assert (args.model, args.subfolder, args.revision, args.heads, args.dim_head) == (
        "org/repo",
        "fidelity",
        "v1",
        6,
        32,
    )
    assert args.format == "kohya" and args.dtype == "fp32"


def test_convert_the_official_tiny_release(official_tiny, tmp_path, capsys):
    out = tmp_path / "converted"
    code, stdout, _ = _run(["convert", official_tiny, out, "--dtype", "fp16", "--quiet"], capsys)
    assert code == 0 and "Converted" in stdout
    converted = load_predictor(out)
    reference = load_predictor(official_tiny)
    assert converted.dtype == torch.float16
    assert converted.checkpoint_hash == reference.checkpoint_hash
    pairs = zip(sorted(converted.state_dict().items()), sorted(reference.state_dict().items()), strict=True)
    for (key, a), (_, b) in pairs:
        torch.testing.assert_close(a.float(), b.to(torch.float16).float(), atol=0, rtol=0, msg=key)
