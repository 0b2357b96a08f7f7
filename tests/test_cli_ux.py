"""How the command line talks: flags (not Python kwargs) in messages, quiet by default, help texts, warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import random_features

from diffusers_hyperlora import cli
from diffusers_hyperlora.cli import main
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_ux")
    predictor = tiny_hyperlora_predictor(seed=0)
    predictor.save_pretrained(root / "model")
    predictor.predict(*random_features(batch=2, seed=1)).save(root / "alice.safetensors")
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_python_dash_m_runs_the_public_main_and_exits_with_its_status(tmp_path):
    """`python -m diffusers_hyperlora.cli` is `sys.exit(main())`, the console script's entry (pyproject)."""
    source = str(Path(__file__).resolve().parents[1] / "src")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "diffusers_hyperlora.cli", "mix", "missing.safetensors", "-o", "x.safetensors"]
    done = subprocess.run(argv, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("diffusers-hyperlora mix: error: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists(), done.stderr


def test_errors_name_the_flag_of_their_argument():
    """`HyperLoRAError.argument` (the Python parameter) -> the flag, by a table; the message itself is not rewritten."""
    from diffusers_hyperlora.errors import FaceModelsNotFoundError, InvalidArgumentError

    error = FaceModelsNotFoundError("No face models: pass `face_analyzer=` a folder.", argument="face_analyzer")
    assert cli.error_line("identity", error) == (
        "diffusers-hyperlora identity: error: --face-models: No face models: pass `face_analyzer=` a folder."
    )
    named = InvalidArgumentError("--weights must be finite", argument="weights")  # the flag is named already
    assert cli.error_line("mix", named) == "diffusers-hyperlora mix: error: --weights must be finite"
    plain = InvalidArgumentError("mix: no argument")
    assert cli.error_line("mix", plain) == "diffusers-hyperlora mix: error: no argument"


def test_every_flag_of_the_table_exists():
    import argparse

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [action for parser in commands.choices.values() for action in parser._actions]
    known = {flag for action in actions for flag in action.option_strings} | {action.metavar for action in actions}
    assert set(cli.FLAGS.values()) <= known, set(cli.FLAGS.values()) - known


def test_the_parsers_choices_are_the_librarys():
    """The parser copies a few of the library's choices (their modules import torch, too slow for --help): each copy
    is the library's own."""
    from diffusers_hyperlora.cli import parser
    from diffusers_hyperlora.io.lora_files import LORA_FORMATS
    from diffusers_hyperlora.model.config import DEFAULT_BASE_MODEL
    from diffusers_hyperlora.training import STAGES
    from diffusers_hyperlora.training.stages import MIXED_PRECISION
    from diffusers_hyperlora.utils.checks import parse_dtype

    assert parser.LORA_FORMATS == LORA_FORMATS and parser.STAGES == STAGES
    assert parser.MIXED_PRECISION == MIXED_PRECISION
    assert [parse_dtype(name) for name in parser.DTYPES] == [torch.float32, torch.float16, torch.bfloat16]
    text = cli.build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    assert DEFAULT_BASE_MODEL in " ".join(text.split()).replace("- ", "-")


def test_missing_face_models_error_suggests_the_flag(saved, tmp_path, capsys, monkeypatch):
    pytest.importorskip("insightface")
    from PIL import Image

    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "no_models_here"))
    Image.new("RGB", (64, 64), "white").save(tmp_path / "me.png")
    argv = ["identity", tmp_path / "me.png", "-o", tmp_path / "me.safetensors", "--model", saved / "model"]
    code, _, err = _run(argv + ["--device", "cpu", "--image-encoder", tmp_path / "clip"], capsys)
    assert code == 1 and "error: --face-models: No face models were named" in err, err
    assert not (tmp_path / "me.safetensors").exists()


SEEN_VERBOSITY = []


def _noisy_handler(args):
    # a library imported only now (lazily, as the CLI does) reads its level from the environment
    SEEN_VERBOSITY.append(os.environ.get("TRANSFORMERS_VERBOSITY"))
    print("find model: glintr100.onnx")  # insightface prints like this while loading
    logging.getLogger("transformers.image_processing").warning("requires torchvision; falling back")
    warnings.warn("some FutureWarning from a dependency", FutureWarning, stacklevel=1)
    logging.getLogger("diffusers_hyperlora.face").warning("No face detected in b.jpg: skipped.")
    return "Saved the blend of 2 identities to x"


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_by_default_verbose_on_request(saved, capsys, monkeypatch, caplog, verbose):
    monkeypatch.setitem(cli.commands.COMMANDS, "mix", _noisy_handler)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # transformers < 5 stops propagation
    argv = ["mix", saved / "alice.safetensors", "-o", "x"] + (["--verbose"] if verbose else [])
    level = logging.getLogger("transformers").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, _ = _run(argv, capsys)
    assert code == 0
    third_party = [r.name for r in caplog.records if r.name.startswith("transformers")]
    ours = [r.name for r in caplog.records if r.name.startswith("diffusers_hyperlora")]
    assert ours  # our own warnings always show
    if verbose:
        assert "find model" in out and third_party and caught and SEEN_VERBOSITY[-1] is None
    else:
        assert out == "Saved the blend of 2 identities to x\n" and not third_party and not caught
        assert SEEN_VERBOSITY[-1] == "error"
    assert "TRANSFORMERS_VERBOSITY" not in os.environ  # restored afterwards
    assert logging.getLogger("transformers").level == level  # restored afterwards


def test_plural_of_identities(saved, tmp_path, capsys):
    code, out, _ = _run(["mix", saved / "alice.safetensors", "-o", tmp_path / "one.safetensors"], capsys)
    assert code == 0 and "blend of 1 identity to" in out
    two = ["mix", saved / "alice.safetensors", saved / "alice.safetensors", "-o", tmp_path / "two.safetensors"]
    code, out, _ = _run(two, capsys)
    assert code == 0 and "blend of 2 identities to" in out


def test_diffusers_format_says_it_is_for_diffusers_only(saved, tmp_path, capsys):
    base = ["export", saved / "alice.safetensors", "--model", saved / "model", "--device", "cpu"]
    code, _, err = _run(base + ["-o", tmp_path / "d.safetensors", "--format", "diffusers"], capsys)
    assert code == 0 and "loads only in diffusers" in err and "--format kohya" in err
    code, _, err = _run(base + ["-o", tmp_path / "k.safetensors"], capsys)
    assert code == 0 and "loads only in diffusers" not in err


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in {
        "--stages": "curriculum order",
        "--batch-size": "Images per optimizer step",
        "--mixed-precision": "accelerate's mixed precision",
        "--image-embed-dim": "CLIP width",
        "--init": "Start from this HyperLoRA checkpoint",
        "--local-files-only": "Never download",
        "--cache-dir": "Hugging Face cache folder",
    }.items():
        assert flag in text and words in text
    assert "Hub options of --init" in text


def test_hub_flags_are_the_fields_of_hub_options():
    import dataclasses

    from diffusers_hyperlora.io import HubOptions

    assert cli.HUB_OPTIONS == tuple(field.name for field in dataclasses.fields(HubOptions))


def _training_data(root, width: int):
    import json

    from PIL import Image

    from diffusers_hyperlora import HyperLoRAFeatures
    from diffusers_hyperlora.training import cache_features

    class Features:
        def __call__(self, images, *, device, dtype, with_base, **options):
            g = torch.Generator().manual_seed(len(images))
            embeds = torch.nn.functional.normalize(torch.randn(len(images), 512, generator=g), dim=-1)
            clip = torch.randn(len(images), 5, width, generator=g)
            return HyperLoRAFeatures(embeds, clip, None, [str(i) for i in images])

    root.mkdir()
    rows = []
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / f"{i}.png")
        rows.append({"file": f"{i}.png", "person": f"p{i}", "caption": "a photo of a person"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache_features(root, Features(), with_base=False, progress=False)


def test_train_checks_the_clip_width_before_loading_models(tmp_path, capsys):
    _training_data(tmp_path / "data", width=48)
    argv = ["train", "--data", tmp_path / "data", "--output-dir", tmp_path / "run"]
    argv += ["--base-model", tmp_path / "no_such_sdxl", "--image-embed-dim", "1024"]
    code, _, err = _run(argv, capsys)
    assert code == 1 and "48 wide" in err and "1024" in err and "no_such_sdxl" not in err


def test_train_without_init_reads_the_clip_width_from_the_data(tmp_path, capsys):
    from diffusers_hyperlora import HyperLoRAPredictor
    from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline

    _training_data(tmp_path / "data", width=48)
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    argv = ["train", "--data", tmp_path / "data", "--output-dir", tmp_path / "run", "--base-model", tmp_path / "sdxl"]
    argv += ["--stages", "id_clip", "--steps", "1", "--resolution", "32", "--num-basis", "4", "--rank", "2"]
    argv += ["--base-rank", "0"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    trained = HyperLoRAPredictor.from_pretrained(tmp_path / "run" / "id_clip" / "predictor")
    assert trained.config.image_embed_dim == 48 and trained.config.num_basis == 4


def test_train_init_takes_every_hub_option(tmp_path, capsys, monkeypatch):
    """`train --init REPO` with the Hub flags reads the checkpoint from a pre-filled Hub cache, offline."""
    import huggingface_hub.constants
    from test_hub import COMMIT_V2, add_snapshot, folder_files

    from diffusers_hyperlora import io
    from diffusers_hyperlora.io import HubOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _training_data(tmp_path / "data", width=40)
    tiny_hyperlora_predictor(seed=2).save_pretrained(tmp_path / "init")  # CLIP width 48
    cache = tmp_path / "cache"
    add_snapshot(cache, "org/init", COMMIT_V2, folder_files(tmp_path / "init", "v1/"), ref="v2")
    calls, load_predictor = [], io.load_predictor

    def spy(path, hub_options=None, **kwargs):
        calls.append((path, hub_options))
        return load_predictor(path, hub_options, **kwargs)

    monkeypatch.setattr(io, "load_predictor", spy)
    hub = ["--subfolder", "v1", "--revision", "v2", "--token", "hf_test", "--cache-dir", cache]
    hub += ["--local-files-only", "--force-download"]
    argv = ["train", "--data", tmp_path / "data", "--output-dir", tmp_path / "run"]
    argv += ["--base-model", tmp_path / "no_such_sdxl", "--init", "org/init", *hub]
    code, _, err = _run(argv, capsys)
    # The checkpoint was read from the cache (its CLIP width, 48, is checked against the data's, 40), before SDXL.
    assert code == 1 and "--init org/init expects CLIP features 48 wide" in err and "40 wide" in err, err
    assert "no_such_sdxl" not in err
    expected = HubOptions("v1", "v2", "hf_test", str(cache), local_files_only=True, force_download=True)
    assert calls == [("org/init", expected)]
    # Without --revision the cache has no such checkpoint: only v2 is cached.
    code, _, err = _run([a for a in argv if a not in ("--revision", "v2")], capsys)
    assert code == 1 and "revision 'main' is not in the cache" in err, err


@pytest.mark.parametrize(
    "flags",
    [["--subfolder", "v1"], ["--revision", "v2"], ["--token", "t"], ["--cache-dir", "c"], ["--local-files-only"]]
    + [["--force-download"]],
)
def test_train_hub_options_need_init(flags, tmp_path, capsys):
    argv = ["train", "--data", tmp_path / "no_data", "--output-dir", tmp_path / "run", "--base-model", "x", *flags]
    code, _, err = _run(argv, capsys)
    assert code == 1 and f"{flags[0]} apply to --init" in err and "Pass --init CHECKPOINT" in err, err
    assert "no_data" not in err  # checked before the data is read


def test_export_and_mix_take_identity_files_not_photos(saved, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "me.jpg")
    out = tmp_path / "out.safetensors"
    code, _, err = _run(["export", tmp_path / "me.jpg", "-o", out, "--model", saved / "model"], capsys)
    assert code == 1 and "not photos" in err and "me.jpg" in err and "identity PHOTO" in err, err
    code, _, err = _run(["mix", saved / "alice.safetensors", tmp_path / "me.jpg", "-o", out], capsys)
    assert code == 1 and "not photos" in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["identity", "mix"])
def test_identity_outputs_must_be_safetensors(command, saved, tmp_path, capsys):
    """The CLI tells identity files from photos by the suffix: an identity saved as `.png` could not be read back."""
    out = tmp_path / "me.png"
    argv = [command, saved / "alice.safetensors", "-o", out] + (["--model", saved / "model"] * (command == "identity"))
    code, _, err = _run(argv, capsys)
    assert code == 1 and "must end in .safetensors" in err and "me.safetensors" in err, err
    assert not out.exists()


def test_a_bad_device_is_an_error_not_a_traceback(saved, tmp_path, capsys):
    argv = ["export", saved / "alice.safetensors", "-o", tmp_path / "x.safetensors", "--model", saved / "model"]
    code, _, err = _run(argv + ["--device", "gpu"], capsys)
    assert code == 1 and "--device 'gpu' is not a device" in err, err
    if not torch.cuda.is_available():
        code, _, err = _run(argv + ["--device", "cuda"], capsys)
        assert code == 1 and "sees no CUDA GPU" in err and "--device cpu" in err, err


def test_train_checks_the_base_features_before_loading_models(tmp_path, capsys):
    _training_data(tmp_path / "data", width=48)  # cached without Base features
    argv = ["train", "--data", tmp_path / "data", "--output-dir", tmp_path / "run"]
    code, _, err = _run(argv + ["--base-model", tmp_path / "no_such_sdxl"], capsys)
    assert code == 1 and "Base branch" in err and "cache-features" in err and "--base-rank 0" in err, err
    assert "no_such_sdxl" not in err


def test_train_without_a_feature_cache_names_the_command(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file": "a.png", "person": "a", "caption": "x"}\n')
    argv = ["train", "--data", tmp_path / "data", "--output-dir", tmp_path / "run", "--base-model", "x"]
    code, _, err = _run(argv, capsys)
    assert code == 1 and "diffusers-hyperlora cache-features" in err and "--model CHECKPOINT" in err, err
