"""The command line's guards: arguments checked before heavy imports, outputs never overwritten silently, numbers
passed to the library as it checks them, Ctrl-C as one line. Each test fails when its guard is removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import random_features

from diffusers_hyperlora import HyperLoRAIdentity
from diffusers_hyperlora.cli import commands, main
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint, two identities of it and one of another checkpoint."""
    root = tmp_path_factory.mktemp("cli_guards")
    predictor = tiny_hyperlora_predictor(seed=0)
    predictor.save_pretrained(root / "model")
    predictor.predict(*random_features(batch=2, seed=1)).save(root / "alice.safetensors")
    predictor.predict(*random_features(batch=1, seed=2)).save(root / "bob.safetensors")
    other = tiny_hyperlora_predictor(seed=0, num_basis=4)
    other.predict(*random_features(batch=1, seed=3)).save(root / "foreign.safetensors")
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------ before heavy imports
LIGHT_CASES = [
    *[
        (["export", "{a}", "-o", "x.safetensors", "--model", "m", "--device", device], f"--device '{device}'")
        for device in ("tpu", "meta", "xpu", "nonsense", "cuda:x")
    ],
    (["export", "{root}/missing.safetensors", "-o", "x.safetensors", "--model", "m"], "no such file"),
    (["identity", "{root}", "-o", "x.safetensors", "--model", "m"], "is a folder, not a photo"),
    # train's stage numbers (--steps, --lr, ...) are checked by the library, after the import of training (see
    # tests/test_cli_train.py); the sizes of a new checkpoint by `HyperLoRAConfig`, a light import.
    (["train", "--data", "{root}", "--base-model", "b", "--output-dir", "o", "--num-basis", "0"], "--num-basis: "),
    (["train", "--data", "{root}", "--base-model", "b", "--output-dir", "o", "--rank", "0"], "--rank: "),
    (["train", "--data", "{root}", "--base-model", "b", "--output-dir", "o", "--base-rank", "-1"], "--base-rank: "),
    (["train", "--data", "{root}", "--base-model", "b", "--output-dir", "o", "--init", "i", "--rank", "4"], "own"),
    (["train", "--data", "{root}/nope", "--base-model", "b", "--output-dir", "o"], "--data"),
    (["demo", "--port", "99999"], "--port must be a whole number from 1 to 65535 (e.g. 7860), got 99999"),
    (["demo", "--port", "0"], "--port must be a whole number"),
    (["identity", "{a}", "-o", "x.safetensors", "--model", "tiny", "--revision", "v1"], "--revision"),
]


def test_arguments_are_checked_before_heavy_imports(saved, tmp_path):
    """One process runs every bad command line: each is one error line, and torch is never imported."""
    cases = [
        ([arg.format(a=saved / "alice.safetensors", b=saved / "bob.safetensors", root=saved) for arg in argv], words)
        for argv, words in LIGHT_CASES
    ]
    code = (
        "import contextlib, io, json, sys\n"
        "from diffusers_hyperlora.cli import main\n"
        "results = []\n"
        "for argv, words in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        status = main(argv)\n"
        "    results.append([argv, status, err.getvalue(), 'torch' in sys.modules, 'diffusers' in sys.modules])\n"
        "print(json.dumps(results))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for (argv, status, err, torch_loaded, diffusers_loaded), (_, words) in zip(results, cases, strict=True):
        assert status == 1 and words in err and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"diffusers-hyperlora {argv[0]}: error: "), (argv, err)
        assert not torch_loaded and not diffusers_loaded, f"{argv} imported torch before its argument check"


# ------------------------------------------------------------------------------------ outputs
def test_an_existing_output_needs_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "blend.safetensors"
    out.write_bytes(b"keep me")
    argv = ["mix", saved / "alice.safetensors", saved / "bob.safetensors", "-o", out]
    code, _, err = _run(argv, capsys)
    assert code == 1 and "exists already" in err and "--overwrite" in err and out.read_bytes() == b"keep me"
    assert _run([*argv, "--overwrite"], capsys)[0] == 0
    assert HyperLoRAIdentity.load(out).num_images == 3


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_input_is_never_overwritten(saved, tmp_path, capsys, overwrite):
    me = tmp_path / "me.safetensors"
    me.write_bytes((saved / "alice.safetensors").read_bytes())
    before = me.read_bytes()
    argv = ["export", me, "-o", tmp_path / "." / "me.safetensors", "--model", saved / "model", *overwrite]
    code, _, err = _run(argv, capsys)
    assert code == 1 and "also an input" in err and me.read_bytes() == before, err
    code, _, err = _run(["mix", me, saved / "bob.safetensors", "-o", me, *overwrite], capsys)
    assert code == 1 and "also an input" in err and me.read_bytes() == before, err


def test_export_output_must_be_safetensors(saved, tmp_path, capsys):
    out = tmp_path / "lora.txt"
    code, _, err = _run(["export", saved / "alice.safetensors", "-o", out, "--model", saved / "model"], capsys)
    assert code == 1 and "LoRA files must end in .safetensors" in err and "lora.safetensors" in err, err
    assert not out.exists()


def test_convert_never_writes_into_another_checkpoint(saved, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_hyperlora_predictor(seed=5).save_pretrained(other)
    weights = (other / "model.safetensors").read_bytes()
    code, _, err = _run(["convert", saved / "model", other, "--quiet"], capsys)
    assert code == 1 and "not empty" in err and "--overwrite" in err, err
    code, _, err = _run(["convert", saved / "model", saved / "model", "--quiet", "--overwrite"], capsys)
    assert code == 1 and "source checkpoint itself" in err, err
    assert (other / "model.safetensors").read_bytes() == weights


def test_convert_tiny_writes_a_complete_checkpoint(tmp_path, capsys):
    code, out, err = _run(["convert", "tiny", tmp_path / "tiny"], capsys)
    assert code == 0, err
    names = sorted(path.name for path in (tmp_path / "tiny").iterdir())
    assert names == ["README.md", "config.json", "face_models", "image_encoder", "model.safetensors"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # the temporary folder is gone
    code, _, err = _run(["convert", "tiny", tmp_path / "tiny", "--dtype", "fp16"], capsys)
    assert code == 1 and "--dtype" in err, err


def test_train_never_writes_into_its_dataset_folder(saved, capsys):
    before = sorted(saved.iterdir())
    argv = ["train", "--data", saved, "--base-model", "tiny", "--output-dir", saved, "--overwrite"]
    code, _, err = _run(argv, capsys)  # was: trained, and wrote the runs' files among the dataset's
    assert code == 1 and "--output-dir" in err and "is the dataset folder (--data) itself" in err, err
    assert sorted(saved.iterdir()) == before


def test_cache_features_keeps_existing_features(saved, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "features.safetensors").write_bytes(b"old")
    code, _, err = _run(["cache-features", data, "--model", saved / "model"], capsys)
    assert code == 1 and "--overwrite" in err and (data / "features.safetensors").read_bytes() == b"old", err


# ------------------------------------------------------------------------------------ numbers, names
def test_spherical_mix_of_huge_weights_is_the_midpoint(saved, tmp_path, capsys):
    a, b = (HyperLoRAIdentity.load(saved / name) for name in ("alice.safetensors", "bob.safetensors"))
    out = tmp_path / "mid.safetensors"
    argv = ["mix", saved / "alice.safetensors", saved / "bob.safetensors", "--spherical", "-o", out]
    code, _, err = _run([*argv, "--weights", "1e308", "1e308"], capsys)
    assert code == 0, err
    expected = HyperLoRAIdentity.interpolate(a, b, 0.5, spherical=True)
    torch.testing.assert_close(HyperLoRAIdentity.load(out).id_mean, expected.id_mean)


@pytest.mark.parametrize("spherical", [[], ["--spherical"]])
def test_non_finite_weights_are_refused_with_and_without_spherical(saved, tmp_path, capsys, spherical):
    out = tmp_path / "x.safetensors"
    argv = ["mix", saved / "alice.safetensors", saved / "bob.safetensors", "--weights", "inf", "1", "-o", out]
    code, _, err = _run([*argv, *spherical], capsys)
    assert code == 1 and "--weights" in err and not out.exists(), err


def test_spherical_and_plain_mix_refuse_weights_with_one_error(saved, tmp_path, capsys):
    """`--spherical` is `HyperLoRAIdentity.mix(..., spherical=True)`: the library's one weight check, one message."""
    out = tmp_path / "x.safetensors"
    argv = ["mix", saved / "alice.safetensors", saved / "bob.safetensors", "--weights", "1", "-2", "-o", out]
    plain = _run(argv, capsys)
    spherical = _run([*argv, "--spherical"], capsys)
    assert plain[0] == spherical[0] == 1 and not out.exists()
    assert "--weights: " in plain[2] and "positive sum" in plain[2], plain[2]
    assert spherical[2] == plain[2]


@pytest.mark.parametrize(
    ("names", "options", "words"),
    [
        (["alice", "bob"], ["--weights", "1"], "--weights: HyperLoRAIdentity.mix() got 2 identities but 1 weight: "),
        (["alice"], ["--weights", "1", "2"], "--weights: HyperLoRAIdentity.mix() got 1 identity but 2 weights: "),
        (
            ["alice", "bob", "alice"],
            ["--spherical"],
            "--spherical: HyperLoRAIdentity.mix(spherical=True) blends exactly",
        ),
    ],
)
def test_mix_weight_count_and_spherical_are_the_librarys_checks_naming_the_flag(
    saved, tmp_path, capsys, names, options, words
):
    """The library's own checks (no copy in the CLI): its `argument` names the flag, one line, nothing written."""
    out = tmp_path / "x.safetensors"
    code, _, err = _run(["mix", *(saved / f"{name}.safetensors" for name in names), *options, "-o", out], capsys)
    assert code == 1 and f"diffusers-hyperlora mix: error: {words}" in err and not out.exists(), err
    assert len(err.strip().splitlines()) == 1, err


def test_export_names_the_foreign_identity_among_several(saved, tmp_path, capsys):
    files = [saved / "alice.safetensors", saved / "foreign.safetensors"]
    out = tmp_path / "lora.safetensors"
    code, _, err = _run(["export", *files, "-o", out, "--model", saved / "model"], capsys)
    assert code == 1 and "foreign.safetensors" in err and "another HyperLoRA checkpoint" in err, err
    assert not out.exists()


def test_mix_names_the_foreign_identity_among_several(saved, tmp_path, capsys):
    files = [saved / "alice.safetensors", saved / "bob.safetensors", saved / "foreign.safetensors"]
    out = tmp_path / "blend.safetensors"
    code, _, err = _run(["mix", *files, "-o", out], capsys)
    assert code == 1 and "foreign.safetensors does not go with" in err and "another HyperLoRA checkpoint" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_is_one_line_status_130_and_leaves_nothing(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "load_predictor", interrupted)
    out = tmp_path / "me.safetensors"
    code, stdout, err = _run(["export", saved / "alice.safetensors", "-o", out, "--model", "tiny"], capsys)
    assert code == 130 and err == "diffusers-hyperlora export: interrupted; no output was left half-written.\n"
    assert not out.exists() and not list((tmp_path / "tmp").iterdir())  # the tiny checkpoint folder is removed


def test_a_failed_feature_write_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """A write that fails (here: the target is a folder, which no file can replace) is one error line, no traceback."""
    from diffusers_hyperlora.testing.tiny_checkpoint import tiny_example_photo

    data = tmp_path / "data"
    data.mkdir()
    tiny_example_photo(data / "me.png")
    (data / "metadata.jsonl").write_text('{"file": "me.png", "person": "me", "caption": "a photo"}\n')
    (data / "features.safetensors").mkdir()
    code, _, err = _run(["cache-features", data, "--model", "tiny", "--overwrite", "--device", "cpu"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(errors) == 1 and "features.safetensors" in errors[0] and "Traceback" not in err, err
    assert (data / "features.safetensors").is_dir() and sorted(p.name for p in data.iterdir()) == [
        "features.safetensors",
        "me.png",
        "metadata.jsonl",
    ]


def test_a_missing_clip_encoder_is_named_once(tmp_path, capsys, monkeypatch):
    from diffusers_hyperlora.testing.tiny_checkpoint import tiny_example_photo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_example_photo(tmp_path / "me.png")
    argv = ["identity", tmp_path / "me.png", "-o", tmp_path / "me.safetensors", "--model", "tiny"]
    code, _, err = _run([*argv, "--image-encoder", "nobody-xyz/no-clip", "--device", "cpu"], capsys)
    assert code == 1 and err.startswith("diffusers-hyperlora identity: error: --image-encoder: "), err
    assert err.count("Could not load the CLIP image encoder") == 1 and "nobody-xyz/no-clip" in err, err
