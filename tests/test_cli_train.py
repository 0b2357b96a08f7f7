"""`diffusers-hyperlora cache-features` / `train` end to end on a tiny SDXL pipeline saved to disk."""

from __future__ import annotations

import json

import torch
from PIL import Image
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
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (40, 40), colour).save(data / f"{i}.png")
        rows.append({"file": f"{i}.png", "person": f"p{i % 2}", "caption": "a photo of a person"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache_features(data, _MeanColourFeatures(), progress=False)

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
