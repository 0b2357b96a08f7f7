"""`diffusers-hyperlora cache-features` / `train` end to end on a tiny SDXL pipeline saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from training_helpers import COLOURS, colour_dataset
from training_helpers import MeanColourFeatures as _MeanColourFeatures

from diffusers_hyperlora import HyperLoRAPredictor
from diffusers_hyperlora.cli import main
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor, tiny_sdxl_pipeline
from diffusers_hyperlora.training import cache_features


def test_train_runs_the_requested_stages(tmp_path):
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "sdxl")
    initial = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
    initial.save_pretrained(tmp_path / "init")
    data = colour_dataset(tmp_path / "data")

    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--base-model", str(tmp_path / "sdxl"), "--output-dir", str(out)]
    argv += ["--init", str(tmp_path / "init"), "--stages", "id_clip", "--steps", "2", "--resolution", "32"]
    argv += ["--cache-latents", "--caption-dropout", "0.25"]
    assert main(argv) == 0

    trained = HyperLoRAPredictor.from_pretrained(out / "id_clip" / "predictor")
    before, after = initial.state_dict(), trained.state_dict()
    assert not torch.equal(before["id_bank.down.0"], after["id_bank.down.0"])  # the ID side trained
    assert torch.equal(before["base_bank.down.0"], after["base_bank.down.0"])  # Base frozen
    assert torch.equal(before["id_projector.0.weight"], after["id_projector.0.weight"])  # no ArcFace in id_clip
    assert not (out / "base").exists() and not (out / "id_full").exists()
    stage = json.loads((out / "id_clip" / "stage_config.json").read_text())
    assert stage["cache_latents"] is True and stage["caption_dropout"] == 0.25


def test_train_reports_a_missing_feature_cache(tmp_path, capsys):
    (tmp_path / "metadata.jsonl").write_text('{"file": "a.png", "person": "a", "caption": "x"}\n')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    argv = ["train", "--data", str(tmp_path), "--base-model", str(tmp_path / "sdxl")]
    argv += ["--output-dir", str(tmp_path / "run")]
    assert main(argv) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("diffusers-hyperlora train: error:") and "cache-features" in error


# ------------------------------------------------------------------------------------ one source of truth
def _dataset_without_features(root):
    """A dataset folder whose features were never cached: a later check would name `cache-features`."""
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "metadata.jsonl").write_text('{"file": "a.png", "person": "a", "caption": "x"}\n')
    return root


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--steps", "0", "StageConfig.steps must be an integer positive, got 0"),
        ("--batch-size", "-1", "StageConfig.batch_size must be an integer positive, got -1"),
        ("--lr", "-1", "StageConfig.learning_rate must be a finite number > 0, got -1.0"),
        ("--lr", "nan", "StageConfig.learning_rate must be a finite number > 0, got nan"),
        ("--caption-dropout", "2", "StageConfig.caption_dropout must be a number in [0, 1] (a probability), got 2.0"),
        ("--seed", str(2**64), "StageConfig.seed must be an integer >= 0 and at most 4294967295"),
        ("--num-basis", "0", "HyperLoRAConfig.num_basis must be a positive integer, got 0"),
        ("--image-embed-dim", "0", "HyperLoRAConfig.image_embed_dim must be a positive integer, got 0"),
        ("--resolution", "36", "resolution must be a positive multiple of 8 (the VAE's downscaling), got 36"),
        ("--resolution", "0", "resolution must be a positive multiple of 8 (the VAE's downscaling), got 0"),
    ],
)
def test_train_numbers_are_checked_by_the_library_before_anything_is_loaded(tmp_path, capsys, flag, value, words):
    """The library's own checks (`TrainingConfig.validate`, `HyperLoRAConfig`), named by the flag, come before the
    data's feature cache is read and before --base-model (a path that does not exist) is looked at."""
    data = _dataset_without_features(tmp_path / "data")
    argv = ["train", "--data", str(data), "--base-model", str(tmp_path / "no_such_sdxl")]
    argv += ["--output-dir", str(tmp_path / "run"), flag, value]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"diffusers-hyperlora train: error: {flag}: "), err
    assert words in err, err
    assert "cache-features" not in err and "no_such_sdxl" not in err, err
    assert not (tmp_path / "run").exists()


def test_train_flags_default_to_the_library(capsys):
    """The flags carry no defaults of their own (the library's apply); --help shows the library's values."""
    from diffusers_hyperlora.cli.commands import STAGE_FLAGS
    from diffusers_hyperlora.cli.parser import NEW_CHECKPOINT_BASE_RANK, STAGE_HELP_DEFAULTS, build_parser
    from diffusers_hyperlora.model.config import HyperLoRAConfig
    from diffusers_hyperlora.training import STAGE_DEFAULTS, default_resolution, predictor_sizes

    args = build_parser().parse_args(["train", "--data", "d", "--base-model", "b", "--output-dir", "o"])
    assert {name: getattr(args, name) for name in STAGE_FLAGS.values()} == {
        name: (False if name == "cache_latents" else None) for name in STAGE_FLAGS.values()
    }
    assert STAGE_HELP_DEFAULTS == {name: STAGE_DEFAULTS[name] for name in STAGE_HELP_DEFAULTS}
    assert set(STAGE_HELP_DEFAULTS) | {"cache_latents"} == set(STAGE_FLAGS)

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field, flag in STAGE_FLAGS.items():
        if field != "cache_latents":
            shown = text.split(f"--{flag.replace('_', '-')} ")[-1].split(" --")[0]
            assert f"(default: {STAGE_DEFAULTS[field]})" in shown, (flag, shown)
    tiny = tiny_sdxl_pipeline()
    assert f"1024 for SDXL, {default_resolution(tiny)} for tiny" in text
    assert f"128 for SDXL, {predictor_sizes(tiny.unet)['num_basis']} for tiny" in text
    assert HyperLoRAConfig().num_basis == 128
    assert f"ID-LoRA rank (default: {HyperLoRAConfig().id_rank})" in text
    assert f"0 for no Base branch (default: {NEW_CHECKPOINT_BASE_RANK})" in text


def test_train_new_checkpoint_sizes_follow_the_base_model(tmp_path):
    """Without --init or size flags, a new checkpoint takes `fresh_predictor_config`'s sizes for the UNet (a toy run
    writes megabytes, not the release's hundreds) and the stages keep the library's defaults."""
    from diffusers_hyperlora.training import STAGE_DEFAULTS, predictor_sizes

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "sdxl")
    data = colour_dataset(tmp_path / "data", colours=COLOURS[:2])

    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--base-model", str(tmp_path / "sdxl"), "--output-dir", str(out)]
    assert main([*argv, "--stages", "id_clip", "--steps", "1"]) == 0
    config = HyperLoRAPredictor.from_pretrained(out / "id_clip" / "predictor").config
    sizes = predictor_sizes(pipe.unet)
    assert {name: getattr(config, name) for name in sizes} == sizes
    assert config.base_rank == 4 and config.image_embed_dim == 48 and config.base_model == str(tmp_path / "sdxl")
    assert (out / "id_clip" / "predictor" / "model.safetensors").stat().st_size < 20_000_000
    stage = json.loads((out / "id_clip" / "stage_config.json").read_text())
    assert {name: stage[name] for name in ("batch_size", "learning_rate", "caption_dropout", "seed")} == {
        name: STAGE_DEFAULTS[name] for name in ("batch_size", "learning_rate", "caption_dropout", "seed")
    }


def test_an_interrupted_train_leaves_no_empty_output_folder(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the first step: one line, status 130, and no `--output-dir` left behind (so the same command
    runs again without --overwrite)."""
    from diffusers_hyperlora.training import loop

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "sdxl")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(data / "0.png")
    (data / "metadata.jsonl").write_text('{"file": "0.png", "person": "p", "caption": "a photo of a person"}\n')
    cache_features(data, _MeanColourFeatures(), progress=False)
    made = []

    def interrupted(run, *args, **kwargs):
        made.extend(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*"))
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_micro_step", interrupted)
    argv = ["train", "--data", str(data), "--base-model", str(tmp_path / "sdxl"), "--output-dir", str(tmp_path / "run")]
    assert main([*argv, "--stages", "id_clip", "--steps", "1"]) == 130
    assert capsys.readouterr().err.endswith(
        "diffusers-hyperlora train: interrupted; no output was left half-written.\n"
    )
    assert made and not (tmp_path / "run").exists()  # the stage folder was made, then removed
    (tmp_path / "run").mkdir()  # an empty --output-dir given: it stays, empty
    made.clear()
    assert main([*argv, "--stages", "id_clip", "--steps", "1"]) == 130
    assert made and list((tmp_path / "run").iterdir()) == []


def test_a_new_checkpoint_for_a_transformer_gets_the_release_sizes():
    """`predictor_sizes` is for UNets: a new checkpoint for an SD3 / FLUX transformer keeps `HyperLoRAConfig`'s sizes
    (the release's), targeting the transformer; the flags given still apply."""
    from diffusers_hyperlora.cli.commands import _new_predictor
    from diffusers_hyperlora.cli.parser import build_parser
    from diffusers_hyperlora.model.config import HyperLoRAConfig
    from diffusers_hyperlora.testing.tiny_base_models import tiny_sd3_components

    transformer = tiny_sd3_components()["transformer"]
    argv = ["train", "--data", "d", "--base-model", "sd3", "--output-dir", "o", "--num-basis", "2", "--rank", "2"]
    args = build_parser().parse_args([*argv, "--base-rank", "0"])
    with torch.device("meta"):  # the sizes are what is checked: no need to allocate the bank
        config = _new_predictor(transformer, args, image_embed_dim=48).config
    expected = HyperLoRAConfig.from_denoiser(transformer)
    assert config.denoiser == "transformer" == expected.denoiser and config.targets == expected.targets
    assert (config.num_basis, config.id_rank, config.base_rank, config.image_embed_dim) == (2, 2, 0, 48)
    assert (config.resampler_dim, config.num_id_tokens) == (expected.resampler_dim, expected.num_id_tokens)
    assert config.base_model == "sd3"


def test_fresh_predictor_config_is_the_one_rule_for_every_denoiser():
    """`train`'s new checkpoint and a Python user's `fresh_predictor_config` agree: a transformer gets the release's
    sizes on its attention modules (`HyperLoRAConfig.from_denoiser`), with the overrides given."""
    from diffusers_hyperlora.model.config import HyperLoRAConfig
    from diffusers_hyperlora.testing.tiny_base_models import tiny_flux_components
    from diffusers_hyperlora.training import fresh_predictor_config

    transformer = tiny_flux_components()["transformer"]
    config = fresh_predictor_config(transformer, num_basis=2, image_embed_dim=48)
    assert config == HyperLoRAConfig.from_denoiser(transformer, num_basis=2, image_embed_dim=48)
