"""The argument parser of `diffusers-hyperlora`: one subcommand per task, every default shown in `--help`.

Nothing heavy is imported here (no torch, no diffusers): `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..model.config import DEFAULT_BASE_MODEL  # no torch: the config module is light

PROG = "diffusers-hyperlora"
TINY = "tiny"  # the built-in tiny default, as a value of --model / --init / --base-model / convert's SRC
# The library's choices, copied because the modules that define them import torch (too slow for --help);
# tests/test_cli_ux.py checks each against the library: `utils.checks.parse_dtype`, `io.lora_files.LORA_FORMATS`,
# `training.STAGES` and `training.stages.MIXED_PRECISION`.
DTYPES = ("fp32", "fp16", "bf16")
LORA_FORMATS = ("kohya", "diffusers")
STAGES = ("base", "id_clip", "id_full")
MIXED_PRECISION = ("no", "fp16", "bf16")
# The fields of `io.HubOptions`, as argparse destinations of `add_hub_options`.
HUB_OPTIONS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download")
TINY_HELP = f"`{TINY}`: the built-in tiny default (random weights, offline, seconds; see docs/cli.md)."
# `train`'s defaults, shown in its --help, are `training.STAGE_DEFAULTS` (the flags default to None and only the
# numbers given are passed on, so the library's defaults apply). Importing `training` takes seconds (torch,
# diffusers), too slow for --help: these are the values shown, and tests/test_cli_train.py checks them against
# `STAGE_DEFAULTS`.
STAGE_HELP_DEFAULTS = {
    "steps": 1000,
    "batch_size": 1,
    "learning_rate": 1e-4,
    "caption_dropout": 0.0,
    "mixed_precision": "no",
    "seed": 0,
}
NEW_CHECKPOINT_BASE_RANK = 4
"""`train`'s new checkpoints have a Base branch (the library's `HyperLoRAConfig` default is 0, the release's)."""


def install_hint(extra: str) -> str:
    """How to install an extra, today (from a clone) and once the package is on the package index."""
    return f"pip install 'diffusers-hyperlora[{extra}]' (from a clone: pip install -e '.[{extra}]')"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default (`(default: ...)`) without repeating `None` or `False`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if hidden or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _subparser(commands: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, parents=[_common_options()], formatter_class=_Formatter, **kwargs)
    return parser


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="Also show other libraries' warnings, logs.")
    return common


def add_hub_options(group: argparse._ActionsContainer) -> None:
    """The Hub options of `HubOptions` (docs/loading.md), for the checkpoint and the models it names."""
    group.add_argument("--subfolder", default=None, help="Folder inside the repo / folder that holds the checkpoint.")
    group.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main).")
    group.add_argument("--token", default=None, help="Hub token for private repos (default: your saved login).")
    group.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE).")
    group.add_argument(
        "--local-files-only", action="store_true", help="Never download; use the cache only (like HF_HUB_OFFLINE=1)."
    )
    group.add_argument("--force-download", action="store_true", help="Download again even if cached.")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoint")
    group.add_argument(
        "--model",
        required=True,
        help="HyperLoRA checkpoint: a Hub repo id (org/name) or a local folder, in the library format "
        "(config.json + model.safetensors) or the release layout (hyper_lora_modules.json + 3 .safetensors); "
        + TINY_HELP,
    )
    add_hub_options(group)
    group.add_argument("--heads", type=int, default=None, help="Resampler heads of release-layout folders (12).")
    group.add_argument("--dim-head", type=int, default=None, help="Resampler head width, release layout (64).")
    group.add_argument(
        "--device", default=None, help="Where to run: cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)."
    )


def _add_face_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"photos (needs the face extra: {install_hint('face')})")
    group.add_argument(
        "--image-encoder", default=None, help="CLIP vision encoder: repo id or folder (default: the checkpoint's)."
    )
    group.add_argument(
        "--face-models",
        default=None,
        help="AntelopeV2 face models: repo id, folder or insightface root (default: the checkpoint's).",
    )


def _add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-o", "--output", required=True, help=f"The {what} to write (.safetensors).")
    _add_overwrite(parser)


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output (never an input of the same command)."
    )


def _add_lora_options(parser: argparse.ArgumentParser, default_scale: str) -> None:
    _add_output(parser, "LoRA file")
    parser.add_argument(
        "--format",
        choices=LORA_FORMATS,
        default=LORA_FORMATS[0],
        help="kohya: the reference generator's keys; loads in ComfyUI, A1111, Forge, kohya sd-scripts "
        "and diffusers. diffusers: the layout pipe.load_lora_weights reads natively; diffusers only.",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="Dtype of the stored tensors (fp16: half).")
    parser.epilog = f"Load the file like any LoRA; recommended weight {default_scale}."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `diffusers-hyperlora` (one subcommand per task)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HyperLoRA for diffusers: turn face photos into identities, LoRA files and sliders. "
        f"Try any command offline with `--model {TINY}` (docs/cli.md).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_identity_parser(commands)
    _add_export_parser(commands)
    _add_slider_parser(commands)
    _add_mix_parser(commands)
    _add_convert_parser(commands)
    _add_cache_parser(commands)
    _add_train_parser(commands)
    _add_demo_parser(commands)
    return parser


def _add_identity_parser(commands: Any) -> None:
    identity = _subparser(
        commands,
        "identity",
        help="photos -> a saved identity file",
        description="Predict one person's identity from face photos and save it (a small .safetensors file). "
        "Saved identity files given among the inputs are pooled in exactly, as if their photos were given again.",
    )
    identity.add_argument("inputs", nargs="+", metavar="IMAGE", help="Photos of one person, and/or identity files.")
    _add_output(identity, "identity file")
    _add_model_options(identity)
    _add_face_options(identity)


def _add_export_parser(commands: Any) -> None:
    export = _subparser(
        commands,
        "export",
        help="identity -> a LoRA file for ComfyUI, A1111/Forge, diffusers",
        description="Turn saved identities into a standard LoRA file. Several identity files of the same person "
        "are pooled first (exactly like predicting from all their photos).",
    )
    export.add_argument("identities", nargs="+", metavar="IDENTITY", help="Identity file(s) written by `identity`.")
    export.add_argument(
        "--branch", choices=("id", "base"), default="id", help="Which LoRA to export (base: checkpoints with one)."
    )
    _add_lora_options(export, "0.75-0.85")
    _add_model_options(export)


def _add_slider_parser(commands: Any) -> None:
    slider = _subparser(
        commands,
        "slider",
        help="neutral + edited photos of one person -> a slider LoRA file",
        description="Build a slider LoRA that moves generations from the neutral photos towards the edited ones "
        "(e.g. the same person aged). Its update is exactly LoRA(edited) - LoRA(neutral); use a negative weight "
        "to move the other way. Each side takes photos and/or saved identity files.",
    )
    slider.add_argument("--neutral", nargs="+", required=True, metavar="INPUT", help="Neutral photos / identity files.")
    slider.add_argument("--edited", nargs="+", required=True, metavar="INPUT", help="Edited photos / identity files.")
    _add_lora_options(slider, "+-0.7")
    _add_model_options(slider)
    _add_face_options(slider)


def _add_mix_parser(commands: Any) -> None:
    mix = _subparser(
        commands,
        "mix",
        help="blend several identities into one",
        description="Blend different people: a weighted mix of their normalized coefficients (only the ratios of "
        "the weights matter). Use `identity` with several files to pool photos of one person instead.",
    )
    mix.add_argument("identities", nargs="+", metavar="IDENTITY", help="Identity files to blend.")
    mix.add_argument("--weights", nargs="+", type=float, default=None, help="One weight per identity (default: equal).")
    mix.add_argument(
        "--spherical", action="store_true", help="Two identities only: spherical interpolation (slerp) at the weights."
    )
    _add_output(mix, "identity file")


def _add_convert_parser(commands: Any) -> None:
    convert = _subparser(
        commands,
        "convert",
        help="release folder / repo -> the library's checkpoint format",
        description="Convert a HyperLoRA checkpoint (e.g. the public release's folder layout, local or on the Hub) "
        "into the library's format (config.json + model.safetensors), optionally changing its dtype. "
        f"SRC `{TINY}` writes the built-in tiny default (with its CLIP encoder and face models) to DST.",
    )
    convert.add_argument("src", metavar="SRC", help="Source checkpoint: Hub repo id or local folder; " + TINY_HELP)
    convert.add_argument("dst", metavar="DST", help="Output folder (new, or with --overwrite).")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="Output dtype (default: as stored).")
    add_hub_options(convert)
    convert.add_argument("--heads", type=int, default=None, help="Resampler heads of release-layout sources (12).")
    convert.add_argument("--dim-head", type=int, default=None, help="Resampler head width of release-layout sources.")
    convert.add_argument(
        "--image-encoder", default=None, help="CLIP encoder to record in the config: repo id or './folder' of DST."
    )
    convert.add_argument("--face-models", default=None, help="Face models to record in the config (folder of DST).")
    convert.add_argument("--quiet", action="store_true", help="No progress bar.")
    _add_overwrite(convert)


def _add_cache_parser(commands: Any) -> None:
    cache = _subparser(
        commands,
        "cache-features",
        help="training data folder -> cached face features (features.safetensors)",
        description="Run the face pipeline once per image listed in DATA/metadata.jsonl (lines of "
        '{"file": ..., "person": ..., "caption": ...}) and store ArcFace + CLIP features for `train`. '
        "Images without a face are left out.",
    )
    cache.add_argument("data", metavar="DATA", help="Dataset folder holding metadata.jsonl and the images.")
    cache.add_argument(
        "--no-base",
        action="store_true",
        help="Skip the face-blurred (Base branch) features; then train only checkpoints without a Base branch "
        "(train --base-rank 0).",
    )
    _add_overwrite(cache)
    _add_model_options(cache)
    _add_face_options(cache)


def _stage_help(field: str, text: str) -> str:
    return f"{text} (default: {STAGE_HELP_DEFAULTS[field]})."


def _add_train_parser(commands: Any) -> None:
    train = _subparser(
        commands,
        "train",
        help="train a HyperLoRA with the paper's three-stage curriculum",
        description="Train the projector, resampler(s) and basis banks on a dataset folder whose features were "
        "cached by `cache-features`; SDXL and the encoders stay frozen. Stages run in order: base (Base-LoRA "
        "warm-up on face-blurred inputs; skipped without a Base branch), id_clip (ID-LoRA from CLIP features), "
        "id_full (ArcFace added). The predictor is saved after each stage to OUTPUT_DIR/<stage>/predictor.",
    )
    train.add_argument("--data", required=True, help="Dataset folder with metadata.jsonl and features.safetensors.")
    train.add_argument(
        "--base-model",
        required=True,
        help="pipeline to train against (SDXL, SD 1.5, SD 2.x, SD3, FLUX): repo id or folder; " + TINY_HELP,
    )
    train.add_argument("--output-dir", required=True, help="Where checkpoints, losses and predictors go (new).")
    _add_overwrite(train)
    train.add_argument(
        "--init",
        default=None,
        help="Start from this HyperLoRA checkpoint: Hub repo id or local folder, or `tiny` (default: a new one).",
    )
    add_hub_options(train.add_argument_group("Hub options of --init (the checkpoint to start from; need --init)"))
    train.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=None,
        metavar="STAGE",
        help=f"Which stages to run, in curriculum order: {', '.join(STAGES)} (default: all; base is skipped "
        "without a Base branch).",
    )
    train.add_argument("--steps", type=int, default=None, help=_stage_help("steps", "Optimizer steps per stage, > 0"))
    train.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=_stage_help("batch_size", "Images per optimizer step and process (per GPU), > 0"),
    )
    train.add_argument(
        "--cache-latents",
        action="store_true",
        help="Encode every image with the VAE once before each stage instead of every step (more CPU memory).",
    )
    train.add_argument(
        "--caption-dropout",
        type=float,
        default=None,
        help=_stage_help("caption_dropout", "Probability of training a sample without its caption, in [0, 1]"),
    )
    train.add_argument(
        "--lr", type=float, default=None, help=_stage_help("learning_rate", "Learning rate, > 0 (id_full uses half)")
    )
    train.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training image size in pixels, a multiple of 8 (default: the base model's native size: 1024 for "
        "SDXL, 64 for tiny).",
    )
    train.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default=None,
        help=_stage_help(
            "mixed_precision", "accelerate's mixed precision: no (float32), fp16, or bf16 (on hardware that has it)"
        ),
    )
    train.add_argument(
        "--seed",
        type=int,
        default=None,
        help=_stage_help("seed", "Seeds data order, noise and timesteps (0 to 2**32-1)"),
    )
    new_checkpoint = train.add_argument_group(
        "a new checkpoint (without --init): its sizes follow the base model (training.fresh_predictor_config)"
    )
    new_checkpoint.add_argument(
        "--image-embed-dim",
        type=int,
        default=None,
        help="CLIP width (default: read from DATA/features.safetensors; 1024 for ViT-L/14).",
    )
    new_checkpoint.add_argument(
        "--num-basis",
        type=int,
        default=None,
        help="Bases per LoRA matrix K (default: by the base model's size: 128 for SDXL, 8 for tiny).",
    )
    new_checkpoint.add_argument("--rank", type=int, default=None, help="ID-LoRA rank (default: 8).")
    new_checkpoint.add_argument(
        "--base-rank",
        type=int,
        default=None,
        help=f"Base-LoRA rank, 0 for no Base branch (default: {NEW_CHECKPOINT_BASE_RANK}).",
    )


def _add_demo_parser(commands: Any) -> None:
    demo = _subparser(
        commands,
        "demo",
        help="the web demo (Gradio): photos -> identity -> images, LoRA downloads, sliders",
        description="Serve the web demo. Without CHECKPOINT it starts offline, in seconds, on the built-in tiny "
        "default (random weights: every real step, noise-like images). Needs the extra: "
        f"{install_hint('demo')}.",
    )
    demo.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        metavar="CHECKPOINT",
        help="HyperLoRA checkpoint: Hub repo id or local folder (e.g. bytedance-research/HyperLoRA with --subfolder "
        "sdxl_hyper_id_lora_v1_fidelity). Default: the built-in tiny default.",
    )
    add_hub_options(
        demo.add_argument_group(
            "Hub options of CHECKPOINT (need a CHECKPOINT; --token, --cache-dir, --local-files-only and "
            "--force-download also apply to --base-model)"
        )
    )
    demo.add_argument(
        "--base-model",
        default=None,
        help=f"SDXL pipeline: repo id or folder (default with a CHECKPOINT: {DEFAULT_BASE_MODEL}).",
    )
    demo.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu; the tiny default: cpu).",
    )
    demo.add_argument("--image-encoder", default=None, help="CLIP vision encoder (default: the checkpoint's).")
    demo.add_argument("--face-models", default=None, help="AntelopeV2 face models: repo id or folder.")
    demo.add_argument("--host", default="127.0.0.1", help="Address to serve on (this machine only).")
    demo.add_argument("--port", type=int, default=7860, help="Port to serve on (1-65535).")
