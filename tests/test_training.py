"""Training: stage parameter sets, gradient routing, the three-stage curriculum on the tiny pipeline, data, errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file
from training_helpers import Interrupt as _Interrupt
from training_helpers import denoising_losses as _denoising_losses
from training_helpers import distinct_people as _distinct_people
from training_helpers import resume_config as _resume_config

from diffusers_hyperlora import HyperLoRAPredictor
from diffusers_hyperlora.errors import NoFaceDetectedError, TrainingConfigError, TrainingDataError
from diffusers_hyperlora.identities.features import HyperLoRAFeatures
from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
from diffusers_hyperlora.training import (
    FrozenEncoders,
    HyperLoRATrainingDataset,
    HyperLoRATrainingModule,
    StageConfig,
    TrainingConfig,
    cache_features,
    collate_examples,
    default_curriculum,
    diffusion_loss,
    diffusion_target,
    encode_batch,
    freeze_for_stage,
    hyperlora_unet_prediction,
    identity_groups,
    lora_denoising_loss,
    prompt_with_trigger,
    sample_generator,
    stage_coefficients,
    tiny_training_dataset,
    train_curriculum,
    train_stage,
    trainable_parameter_names,
    zero_id_attention,
)
from diffusers_hyperlora.training.loop import training_adapters

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run far faster (and deterministically) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _fixed_inputs(pipe, dataset, indices, seed=1, prediction_type="epsilon"):
    batch = collate_examples([dataset[i] for i in indices])
    encoded = encode_batch(pipe, batch, "fcsks fxhks fhyks", CPU, torch.float32)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(encoded.latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (len(indices),), generator=g)
    noisy = scheduler.add_noise(encoded.latents, noise, timesteps)
    target = diffusion_target(scheduler, encoded.latents, noise, timesteps)
    return batch, encoded, noisy, timesteps, target


def _training_forward(pipe, predictor, stage, inputs, grad=False):
    batch, encoded, noisy, timesteps, _ = inputs
    with torch.set_grad_enabled(grad), training_adapters(pipe, predictor, StageConfig(stage, output_dir="x")) as names:
        return hyperlora_unet_prediction(pipe.unet, predictor, stage, batch, noisy, timesteps, encoded, names)


# ---------------------------------------------------------------------------------------------- stages and config
def test_stage_parameter_sets():
    predictor = tiny_hyperlora_predictor(base_rank=4)
    all_names = [n for n, _ in predictor.named_parameters()]
    base = set(trainable_parameter_names(predictor, "base"))
    id_clip = set(trainable_parameter_names(predictor, "id_clip"))
    id_full = set(trainable_parameter_names(predictor, "id_full"))
    assert base == {n for n in all_names if n.startswith(("base_resampler.", "base_bank."))}
    assert id_full == {n for n in all_names if n.startswith(("id_projector.", "resampler.", "id_bank."))}
    arcface_path = {n for n in id_full if n.startswith(("id_projector.", "resampler.proj_in.")) or ".attn2." in n}
    arcface_path |= {n for n in id_full if ".norm_attn2_" in n}
    assert id_clip == id_full - arcface_path
    assert "resampler.proj_in_2.weight" in id_clip and "resampler.layers.0.attn3.to_q.weight" in id_clip
    assert not base & id_full

    params = freeze_for_stage(predictor, "id_clip")
    assert {n for n, p in predictor.named_parameters() if p.requires_grad} == id_clip
    assert len(params) == len(id_clip)

    no_base = tiny_hyperlora_predictor()
    with pytest.raises(TrainingConfigError, match="has none"):
        trainable_parameter_names(no_base, "base")
    with pytest.raises(TrainingConfigError, match="Unknown training stage"):
        trainable_parameter_names(no_base, "id")


def test_config_validation():
    with pytest.raises(TrainingConfigError, match="Unknown training stage"):
        StageConfig("warmup")
    with pytest.raises(TrainingConfigError, match="steps"):
        StageConfig("base", steps=0)
    with pytest.raises(TrainingConfigError, match="mixed_precision"):
        StageConfig("base", mixed_precision="fp8")
    with pytest.raises(TrainingConfigError, match="zero_init_id_attention"):
        StageConfig("id_clip", zero_init_id_attention=True)
    with pytest.raises(TrainingConfigError, match="curriculum order"):
        TrainingConfig("runs", stages=[StageConfig("id_full"), StageConfig("base")])
    with pytest.raises(TrainingConfigError, match="one mixed_precision"):
        TrainingConfig("runs", stages=[StageConfig("base"), StageConfig("id_clip", mixed_precision="bf16")])
    config = TrainingConfig("runs", stages=default_curriculum(steps=7, batch_size=3))
    resolved = config.resolved_stages()
    assert [s.stage for s in resolved] == ["base", "id_clip", "id_full"]
    assert [s.steps for s in resolved] == [7, 7, 7] and resolved[2].zero_init_id_attention
    assert resolved[1].output_dir.endswith("id_clip")
    assert TrainingConfig(**json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()


def test_zero_id_attention_starts_id_full_where_id_clip_ended():
    predictor = tiny_hyperlora_predictor(base_rank=4)
    dataset = tiny_training_dataset(num_people=2, images_per_person=1)
    batch = collate_examples([dataset[0], dataset[1]])
    groups = identity_groups(batch["reference_key"])
    with torch.no_grad():
        clip_only = stage_coefficients(predictor, "id_clip", "id", batch, groups)
        full = stage_coefficients(predictor, "id_full", "id", batch, groups)
        assert not torch.allclose(clip_only, full, atol=1e-4)  # the ArcFace path matters ...
        zero_id_attention(predictor)
        full = stage_coefficients(predictor, "id_full", "id", batch, groups)
    torch.testing.assert_close(full, clip_only, rtol=0, atol=1e-6)  # ... and adds nothing once zeroed


# ---------------------------------------------------------------------------------------------- gradient routing
@pytest.mark.parametrize("stage", ["base", "id_clip", "id_full"])
def test_gradients_reach_exactly_the_stage_parameters(pipe, stage):
    predictor = tiny_hyperlora_predictor(pipe.unet, base_rank=4).requires_grad_(True)
    dataset = tiny_training_dataset(num_people=2, images_per_person=2)
    inputs = _fixed_inputs(pipe, dataset, [0, 1, 2])  # 0 and 1 are one person: still separate identities
    pred = _training_forward(pipe, predictor, stage, inputs, grad=True)
    diffusion_loss(pred, inputs[-1]).backward()
    reached = {n for n, p in predictor.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == set(trainable_parameter_names(predictor, stage))
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert not getattr(pipe.unet, "peft_config", None)  # training adapters removed


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_through_the_module_gives_the_gradients_of_the_plain_forward(pipe, checkpointing):
    """`lora_denoising_loss` (UNet backward per group, then one backward through the module) gives the gradients
    of backpropagating the functional_call forward directly, with and without the UNet's gradient checkpointing."""
    predictor = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
    freeze_for_stage(predictor, "id_full")
    dataset = tiny_training_dataset(num_people=2, images_per_person=2)
    inputs = _fixed_inputs(pipe, dataset, [0, 2, 0])  # two identities, one used twice
    batch, encoded, noisy, timesteps, target = inputs
    loss = diffusion_loss(_training_forward(pipe, predictor, "id_full", inputs, grad=True), target)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in predictor.named_parameters() if p.requires_grad}
    predictor.zero_grad(set_to_none=True)
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    with training_adapters(pipe, predictor, StageConfig("id_full", output_dir="x")) as names:
        factors = HyperLoRATrainingModule(predictor, "id_full", names)(batch)
        groups = identity_groups(batch["reference_key"])
        carried = lora_denoising_loss(pipe.unet, factors, groups, noisy, timesteps, encoded, target)
        restored = [n for n, _ in pipe.unet.named_parameters() if f".{names['id']}." in n]
        assert len(restored) == 2 * len(predictor.config.linears)  # the adapters' own parameters are back
    assert all(p.grad is None for p in predictor.parameters())  # nothing reached the predictor yet
    carried.backward()
    pipe.unet.disable_gradient_checkpointing()
    assert carried.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(predictor.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the curriculum
def test_three_stages_train_freeze_save_and_match_inference(pipe, tmp_path):
    """Each stage lowers the loss, changes only its parameters, leaves the UNet untouched, and the saved
    predictor, loaded into the pipeline like any checkpoint, reproduces the training forward."""
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    predictor = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
    dataset = tiny_training_dataset(num_people=2, images_per_person=1)
    inputs = _fixed_inputs(pipe, dataset, [0, 1] * 4, prediction_type="sample")  # 4 noise draws per image
    unet_before = _snapshot(pipe.unet)
    trainable, previous_loss = {}, None
    for stage in ("base", "id_clip", "id_full"):
        trainable[stage] = set(trainable_parameter_names(predictor, stage))
        config = StageConfig(
            stage,
            steps=20,
            batch_size=2,
            learning_rate=1e-2,
            output_dir=str(tmp_path / stage),
            show_progress=False,
            zero_init_id_attention=stage == "id_full",
        )
        if stage == "id_full":
            zero_id_attention(predictor)  # so that "before" is the stage's true starting point
        before_params = _snapshot(predictor)
        loss_before = diffusion_loss(_training_forward(pipe, predictor, stage, inputs), inputs[-1]).item()
        logs = []
        returned = train_stage(pipe, predictor, dataset, config, callback=logs.append)
        assert returned is predictor and not any(p.requires_grad for p in predictor.parameters())
        loss_after = diffusion_loss(_training_forward(pipe, predictor, stage, inputs), inputs[-1]).item()
        if stage == "id_full":  # the zeroed ArcFace path: id_full starts exactly where id_clip ended
            assert loss_before == pytest.approx(previous_loss, rel=1e-5)
        previous_loss = loss_after
        assert loss_after < 0.99 * loss_before, (stage, loss_before, loss_after)
        assert [log.step for log in logs] == list(range(1, 21)) and all(log.stage == stage for log in logs)
        after = predictor.state_dict()
        for name, value in before_params.items():
            if name in trainable[stage]:
                assert not torch.equal(value, after[name]), f"{stage} did not train {name}"
            else:
                assert torch.equal(value, after[name]), f"{stage} changed frozen {name}"
        reloaded = HyperLoRAPredictor.from_pretrained(tmp_path / stage / "predictor")
        for name, value in reloaded.state_dict().items():
            assert torch.equal(value, after[name])
        lines = (tmp_path / stage / "losses.jsonl").read_text().splitlines()
        assert len(lines) == 20 and json.loads(lines[-1])["loss"] == pytest.approx(logs[-1].loss)
    assert not getattr(pipe.unet, "peft_config", None)
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, unet_before[name]), name

    # The trained LoRA, written into the pipeline's adapters by the inference path, gives the training forward.
    base_forward = _training_forward(pipe, predictor, "base", inputs)
    full_forward = _training_forward(pipe, predictor, "id_full", inputs)
    batch, encoded, noisy, timesteps, _ = inputs
    pipe.load_hyperlora(HyperLoRAPredictor.from_pretrained(tmp_path / "id_full" / "predictor"))
    for i in range(2):
        identity = pipe.hyperlora.predict(
            batch["id_embeds"][i], batch["clip_hidden_states"][i], batch["base_clip_hidden_states"][i]
        )
        pipe.set_hyperlora_identity(identity)
        unet_kwargs = dict(
            encoder_hidden_states=encoded.prompt_embeds[i : i + 1],
            added_cond_kwargs={k: v[i : i + 1] for k, v in encoded.added_cond_kwargs.items()},
        )
        with torch.no_grad():
            pipe.set_adapters(["id", "base"], [1.0, 1.0])
            full = pipe.unet(noisy[i : i + 1], timesteps[i : i + 1], **unet_kwargs).sample
            pipe.set_adapters(["id", "base"], [0.0, 1.0])
            base_only = pipe.unet(noisy[i : i + 1], timesteps[i : i + 1], **unet_kwargs).sample
        torch.testing.assert_close(full[0], full_forward[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(base_only[0], base_forward[i], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full_forward[:2], base_forward[:2], atol=1e-4)


def test_train_curriculum_without_base_branch_accumulation_checkpoints_resume(pipe, tmp_path):
    predictor = tiny_hyperlora_predictor(pipe.unet)  # the release's layout: no Base branch
    dataset = tiny_training_dataset(num_people=2, images_per_person=2, with_base=False)
    stages = default_curriculum(
        steps=2, batch_size=2, gradient_accumulation_steps=2, save_every=1, num_references=2, show_progress=False
    )
    logs = []
    train_curriculum(pipe, predictor, dataset, TrainingConfig(str(tmp_path), stages=stages), callback=logs.append)
    assert [(log.stage, log.step) for log in logs] == [("id_clip", 1), ("id_clip", 2), ("id_full", 1), ("id_full", 2)]
    assert not (tmp_path / "base").exists()
    assert json.loads((tmp_path / "training_config.json").read_text())["stages"][2]["stage"] == "id_full"
    for stage in ("id_clip", "id_full"):
        assert (tmp_path / stage / "predictor" / "model.safetensors").is_file()
        assert sorted(p.name for p in (tmp_path / stage / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    final = _snapshot(predictor)

    # Resuming from the newest checkpoint of a finished stage restores its state and trains no further.
    fresh = tiny_hyperlora_predictor(pipe.unet, seed=5)
    config = StageConfig("id_full", steps=2, resume_from_checkpoint="latest", output_dir=str(tmp_path / "id_full"))
    resumed_logs = []
    train_stage(pipe, fresh, dataset, config, callback=resumed_logs.append)
    assert resumed_logs == []
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_train_stage_errors(pipe, tmp_path):
    dataset = tiny_training_dataset(num_people=1, images_per_person=1, with_base=False)
    no_base = tiny_hyperlora_predictor(pipe.unet)
    with pytest.raises(TrainingConfigError, match="has none"):
        train_stage(pipe, no_base, dataset, StageConfig("base", output_dir=str(tmp_path)))
    with_base = tiny_hyperlora_predictor(pipe.unet, base_rank=4)
    with pytest.raises(TrainingDataError, match="base_clip_hidden_states"):
        train_stage(pipe, with_base, dataset, StageConfig("id_clip", output_dir=str(tmp_path)))
    with pytest.raises(TrainingConfigError, match="output_dir"):
        train_stage(pipe, no_base, dataset, StageConfig("id_clip"))
    pipe.load_hyperlora(tiny_hyperlora_predictor(pipe.unet))
    with pytest.raises(TrainingConfigError, match="unload_hyperlora"):
        train_stage(pipe, no_base, dataset, StageConfig("id_clip", steps=1, output_dir=str(tmp_path)))


def test_train_stage_refuses_a_denoiser_that_carries_other_adapters(pipe, tmp_path):
    from peft import LoraConfig

    dataset = tiny_training_dataset(num_people=1, images_per_person=1, with_base=False)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="style")
    predictor = tiny_hyperlora_predictor(pipe.unet)
    with pytest.raises(TrainingConfigError, match=r"already carries adapters \['style'\]") as caught:
        train_stage(pipe, predictor, dataset, StageConfig("id_clip", output_dir=str(tmp_path)))
    assert caught.value.argument == "pipe" and not any(tmp_path.iterdir())


def test_diffusion_targets():
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    timesteps = torch.tensor([10, 900])
    epsilon = DDPMScheduler(prediction_type="epsilon")
    velocity = DDPMScheduler(prediction_type="v_prediction")
    assert diffusion_target(epsilon, latents, noise, timesteps) is noise
    assert diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps) is latents
    alpha = velocity.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - velocity.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(velocity, latents, noise, timesteps), alpha * noise - sigma * latents)


# ---------------------------------------------------------------------------------------------- data
class _ColourFeatures:
    """A deterministic stand-in for the face pipeline: features from the image's mean colour; no face if black."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, *, device, dtype, with_base):
        self.calls.append((images, with_base))
        pixels = np.asarray(Image.open(images[0]).convert("RGB"), dtype=np.float32) / 255
        if pixels.max() == 0:
            raise NoFaceDetectedError("no face")
        mean = torch.from_numpy(pixels.mean((0, 1)))
        embeds = torch.nn.functional.normalize(mean.repeat(171)[:512], dim=0)[None]
        clip = mean.repeat(5, 16)[None]
        return HyperLoRAFeatures(embeds.to(dtype), clip.to(dtype), (1 - clip).to(dtype) if with_base else None)


def _write_folder(root, rows, sizes):
    root.mkdir(parents=True, exist_ok=True)
    for row, (size, colour) in zip(rows, sizes):
        (root / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(root / row["file"])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_folder_dataset_with_cached_features(tmp_path):
    rows = [
        {"file": "ann/1.png", "person": "ann", "caption": "ann in a park"},
        {"file": "ann/2.png", "person": "ann", "caption": "ann indoors"},
        {"file": "bob/1.png", "person": "bob", "caption": "bob at night"},
        {"file": "bob/2.png", "person": "bob", "caption": "no face here"},
    ]
    _write_folder(
        tmp_path,
        rows,
        [((40, 20), (200, 0, 0)), ((20, 20), (0, 200, 0)), ((20, 30), (0, 0, 200))] + [((20, 20), (0, 0, 0))],
    )
    extractor = _ColourFeatures()
    path = cache_features(tmp_path, extractor, progress=False)
    assert path == tmp_path / "features.safetensors" and len(extractor.calls) == 4 and extractor.calls[0][1]
    dataset = HyperLoRATrainingDataset.from_folder(tmp_path, resolution=16, num_references=2)
    assert len(dataset) == 3 and dataset.has_features == dict.fromkeys(dataset.has_features, True)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["caption"] == "ann in a park"
    assert item["original_size"] == (20, 40) and item["crop_top_left"] == (0, 8)
    torch.testing.assert_close(item["pixel_values"][0], torch.full((16, 16), 200 / 127.5 - 1))
    assert item["id_embeds"].shape == (2, 512) and item["reference_key"] == (0, 1)
    expected = _ColourFeatures()([str(tmp_path / "ann/1.png")], device=CPU, dtype=torch.float32, with_base=True)
    torch.testing.assert_close(item["clip_hidden_states"][0], expected.clip_hidden_states[0])
    torch.testing.assert_close(item["base_clip_hidden_states"][1], dataset[1]["base_clip_hidden_states"][0])
    assert dataset[2]["reference_key"] == (2,)  # bob's other image had no face
    batch = collate_examples([dataset[0], dataset[1], dataset[2]])
    assert identity_groups(batch["reference_key"]) == [[0, 1], [2]]
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and len(batch["clip_hidden_states"]) == 3


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(TrainingDataError, match="metadata.jsonl"):
        HyperLoRATrainingDataset.from_folder(tmp_path)
    rows = [{"file": "a.png", "person": "a", "caption": "x"}]
    _write_folder(tmp_path, rows, [((8, 8), (9, 9, 9))])
    with pytest.raises(TrainingDataError, match="cache_features"):
        HyperLoRATrainingDataset.from_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file": "a.png", "caption": "x"}\n')
    with pytest.raises(TrainingDataError, match="line 1: missing or non-string 'person'"):
        HyperLoRATrainingDataset.from_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file": "b.png", "person": "a", "caption": "x"}\n')
    with pytest.raises(TrainingDataError, match="'b.png' not found"):
        HyperLoRATrainingDataset.from_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(TrainingDataError, match="not valid JSON"):
        HyperLoRATrainingDataset.from_folder(tmp_path)


def test_prompt_trigger_words():
    assert prompt_with_trigger("a man", "fcsks fxhks fhyks") == "fcsks fxhks fhyks, a man"
    assert prompt_with_trigger("fcsks fxhks fhyks, a man", "fcsks fxhks fhyks") == "fcsks fxhks fhyks, a man"
    assert prompt_with_trigger("a man", "") == "a man"


# ---------------------------------------------------------------------------------------------- accelerate's path
def _tiny_run(tmp_path, name, *extra):
    """`examples/train_tiny.py` for 3 steps of stage id_clip, as a subprocess (argv after the script's path)."""
    out = tmp_path / name
    args = [str(EXAMPLE), "--steps", "3", "--stages", "id_clip", "--cache", "--output-dir", str(out), *extra]
    return out, args


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(**extra):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def test_two_processes_with_batch_one_train_what_one_process_with_batch_two_trains(tmp_path):
    """`examples/train_tiny.py` unchanged under `accelerate launch` (2 CPU processes, gloo): `--batch-size` is per
    process, so 2 x 1 must give 1 x 2's predictor; both ranks end with identical parameters."""
    launcher = Path(sys.executable).with_name("accelerate")
    two, two_args = _tiny_run(tmp_path, "two", "--batch-size", "1")
    one, one_args = _tiny_run(tmp_path, "one", "--batch-size", "2")
    launch = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    distributed = subprocess.Popen(launch + two_args, env=_environment(ACCELERATE_USE_CPU="1"), **pipes)
    single = subprocess.run([sys.executable, *one_args], env=_environment(), timeout=600, **pipes)
    output = distributed.communicate(timeout=600)[0]
    assert distributed.returncode == 0 and single.returncode == 0, output[-3000:] + single.stdout[-3000:]

    digests = dict(re.findall(r"process (\d+)/2: predictor sha256 (\w+)", output))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], output[-2000:]  # ranks in sync
    assert "process 0/1:" in single.stdout
    trained = load_file(str(two / "id_clip" / "predictor" / "model.safetensors"))
    reference = load_file(str(one / "id_clip" / "predictor" / "model.safetensors"))
    initial = tiny_hyperlora_predictor(seed=0, base_rank=4).state_dict()  # as the example builds it
    assert not torch.equal(reference["id_bank.down.0"], initial["id_bank.down.0"])  # it trained
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=name)
    losses = [json.loads(line)["loss"] for line in (two / "id_clip" / "losses.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (one / "id_clip" / "losses.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(expected, rel=1e-5) and len(losses) == 3


def test_gradient_accumulation_equals_the_larger_batch(pipe, tmp_path):
    """`accelerator.accumulate`: batch 1 x 2 micro-batches per step trains what batch 2 trains."""
    dataset = tiny_training_dataset(num_people=2, images_per_person=1, with_base=False)
    trained = {}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        predictor = tiny_hyperlora_predictor(pipe.unet)
        config = StageConfig(
            "id_clip",
            steps=2,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
            show_progress=False,
            output_dir=str(tmp_path / str(batch_size)),
        )
        train_stage(pipe, predictor, dataset, config)
        trained[batch_size] = predictor.state_dict()
    assert not torch.equal(
        trained[2]["id_bank.down.0"], tiny_hyperlora_predictor(pipe.unet).state_dict()["id_bank.down.0"]
    )
    for name, value in trained[2].items():
        torch.testing.assert_close(trained[1][name], value, rtol=0, atol=1e-6, msg=name)


def test_an_interrupted_and_resumed_stage_equals_the_uninterrupted_one(pipe, tmp_path):
    """Bitwise on the CPU: 3 images, batch 1, 2 micro-batches per step, so step 2 ends inside epoch 2."""
    dataset = tiny_training_dataset(num_people=1, images_per_person=3, with_base=False)
    whole = tiny_hyperlora_predictor(pipe.unet)
    train_stage(pipe, whole, dataset, _resume_config(tmp_path / "whole"))

    def crash_at_step_3(log):
        if log.step == 3:
            raise _Interrupt

    interrupted = tiny_hyperlora_predictor(pipe.unet)
    with pytest.raises(_Interrupt):
        train_stage(pipe, interrupted, dataset, _resume_config(tmp_path / "cut"), callback=crash_at_step_3)
    checkpoints = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert checkpoints == ["step-000001", "step-000002"]  # complete folders only, no temporary names
    resumed = tiny_hyperlora_predictor(pipe.unet, seed=7)  # every weight comes from the checkpoint
    logs = []
    train_stage(pipe, resumed, dataset, _resume_config(tmp_path / "cut", resume_from_checkpoint="latest"), logs.append)
    assert [log.step for log in logs] == [3, 4]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert (tmp_path / "cut" / "losses.jsonl").read_text() == (tmp_path / "whole" / "losses.jsonl").read_text()


# ---------------------------------------------------------------------------------------------- caches and dropout
def test_cached_latents_and_prompts_train_exactly_as_encoding_every_step(pipe, tmp_path):
    dataset = tiny_training_dataset(num_people=2, images_per_person=1, with_base=False)
    calls = {"vae": 0, "text": 0}
    pipe.vae.encoder.register_forward_hook(lambda *_: calls.__setitem__("vae", calls["vae"] + 1))
    pipe.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    results = {}
    for cache in (False, True):
        calls.update(vae=0, text=0)
        predictor = tiny_hyperlora_predictor(pipe.unet)
        config = StageConfig(
            "id_clip",
            steps=3,
            batch_size=2,
            learning_rate=1e-2,
            cache_latents=cache,
            cache_prompt_embeds=cache,
            caption_dropout=0.5,
            show_progress=False,
            output_dir=str(tmp_path / str(cache)),
        )
        train_stage(pipe, predictor, dataset, config)
        results[cache] = (predictor.state_dict(), dict(calls))
    assert results[False][1] == {"vae": 6, "text": 6}  # every step encodes both images and both prompts
    assert results[True][1] == {"vae": 2, "text": 3}  # once per image; 2 captions + the dropped one
    for name, value in results[False][0].items():
        assert torch.equal(results[True][0][name], value), name


def test_caption_dropout_keeps_the_trigger_words_and_is_seeded(pipe):
    dataset = tiny_training_dataset(num_people=2, images_per_person=2, with_base=False)
    batch = collate_examples([dataset[i] for i in range(4)])
    trigger = "fcsks fxhks fhyks"

    def embeds(dropout, seed=0):
        encoders = FrozenEncoders(pipe, trigger, CPU, torch.float32, caption_dropout=dropout)
        return encoders.encode(batch, [sample_generator(seed, 0, i) for i in range(4)]).prompt_embeds

    kept, dropped = embeds(0.0), embeds(1.0)
    only_trigger = pipe.encode_prompt(prompt=[trigger], device=CPU, do_classifier_free_guidance=False)[0]
    captioned = pipe.encode_prompt(prompt=[f"{trigger}, {batch['caption'][0]}"], device=CPU)[0]
    torch.testing.assert_close(dropped, only_trigger.expand(4, -1, -1))
    torch.testing.assert_close(kept[:1], captioned)
    half = embeds(0.5)
    which = [torch.equal(half[i], dropped[i]) for i in range(4)]
    assert which == [torch.equal(embeds(0.5)[i], dropped[i]) for i in range(4)]  # same seed, same draws
    assert any(which) and not all(which)
    with pytest.raises(TrainingConfigError, match="caption_dropout"):
        StageConfig("id_clip", caption_dropout=1.5)


# ---------------------------------------------------------------------------------------------- it learns
def test_training_learns_identities(pipe, tmp_path):
    """After training, a held-out image of each person is denoised better with the ID-LoRA predicted from its own
    features than with the other person's, and than with none (seeded margins: 0.5% and 10%).

    The margins come from measurements (8 draws per image): a predictor whose LoRA does not depend on the person
    (seen in runs where training collapses to one LoRA for everyone) scores other/own 1.0002-1.0007, the noise of
    this measure; runs that learned identities score 1.03-1.08 here and 1.008 on the dependency floors. 0.5% is
    above that noise by 7x and below the weakest learned result; none/own is 1.31-1.48 in every run measured."""
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with torch.no_grad():  # a near-deterministic VAE posterior (like a trained VAE's), latents at unit scale
        pipe.vae.quant_conv.weight[4:] = 0
        pipe.vae.quant_conv.bias[4:] = -30.0
    data = _distinct_people(num_people=2, images_per_person=3, resolution=16)
    pipe.vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    encoders = FrozenEncoders(pipe, "", CPU, torch.float32)
    raw = torch.cat([encoders.encode(collate_examples([data[i]]), [torch.Generator()]).latents for i in range(6)])
    pipe.vae.register_to_config(scaling_factor=float(1 / raw.std()), shift_factor=float(raw.mean()))
    held_out = [2, 5]
    train = HyperLoRATrainingDataset([r for i, r in enumerate(data.records) if i not in held_out], resolution=16)
    predictor = tiny_hyperlora_predictor(pipe.unet)
    config = StageConfig(
        "id_clip",
        steps=80,
        batch_size=2,
        learning_rate=1e-2,
        cache_latents=True,
        show_progress=False,
        output_dir=str(tmp_path),
    )
    train_stage(pipe, predictor, train, config)
    own = _denoising_losses(pipe, predictor, data, held_out, lambda i: i)
    other = _denoising_losses(pipe, predictor, data, held_out, lambda i: held_out[1 - held_out.index(i)])
    none = _denoising_losses(pipe, predictor, data, held_out, lambda i: None)
    assert (own * 1.005 < other).all(), (own, other)
    assert (own * 1.10 < none).all(), (own, none)
