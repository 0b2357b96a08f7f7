"""The `diffusers-hyperlora` command: identities, LoRA files and sliders without writing Python.

    diffusers-hyperlora identity me1.jpg me2.jpg -o me.safetensors --model org/hyperlora
    diffusers-hyperlora export me.safetensors -o me_lora.safetensors --format kohya --model org/hyperlora
    diffusers-hyperlora slider --neutral me.jpg --edited me_old.jpg -o age.safetensors --model org/hyperlora
    diffusers-hyperlora mix alice.safetensors bob.safetensors --weights 0.5 0.5 -o blend.safetensors
    diffusers-hyperlora convert path/to/release_folder out_folder --dtype fp16
    diffusers-hyperlora cache-features data/ --model org/hyperlora
    diffusers-hyperlora train --data data/ --base-model stabilityai/stable-diffusion-xl-base-1.0 --output-dir runs/me
    diffusers-hyperlora demo                      # the web demo, offline on the built-in tiny default

Only the HyperLoRA predictor (and, for photos, the face models and CLIP encoder) is loaded, never SDXL, except
by `train` and `demo`. `org/hyperlora` above is a placeholder: the public release is `--model
bytedance-research/HyperLoRA --subfolder sdxl_hyper_id_lora_v1_fidelity`.

Start-up is kept fast: heavy modules (torch, diffusers) are imported inside the subcommands. Output is quiet by
default: third-party warnings and prints are hidden unless `--verbose`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import HyperLoRAError

PROG = "diffusers-hyperlora"
IDENTITY_SUFFIX = ".safetensors"
DTYPES = ("fp32", "fp16", "bf16")
# Python keyword arguments named in library messages -> the flag that does the same here.
CLI_FLAGS = {
    "face_analyzer": "--face-models",
    "image_encoder": "--image-encoder",
    "heads": "--heads",
    "dim_head": "--dim-head",
    "subfolder": "--subfolder",
    "revision": "--revision",
    "token": "--token",
    "cache_dir": "--cache-dir",
    "local_files_only": "--local-files-only",
    "force_download": "--force-download",
    "branch": "--branch",
}
# The fields of `io.HubOptions`, as argparse destinations of `_add_hub_options`.
HUB_OPTIONS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download")
THIRD_PARTY_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "insightface")
VERBOSITY_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
DIFFUSERS_FORMAT_NOTE = (
    "note: a --format diffusers file loads only in diffusers (pipe.load_lora_weights); ComfyUI, A1111, Forge and "
    "kohya sd-scripts apply nothing from it. Use --format kohya (the default) for every other tool."
)


def torch_dtype(name: str):
    """`fp32` / `fp16` / `bf16` -> the torch dtype (torch is imported only when a command needs it)."""
    from .utils.checks import parse_dtype

    return parse_dtype(name)


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`1 identity`, `2 identities`, `3 images`."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"


def cli_wording(message: str) -> str:
    """A library message for the command line: `face_analyzer=` becomes `--face-models`, and so on."""
    names = "|".join(CLI_FLAGS)
    pattern = rf"(?:load_hyperlora's )?`({names})=`(?: to load_hyperlora)?"
    message = re.sub(pattern, lambda match: f"`{CLI_FLAGS[match.group(1)]}`", message)
    return re.sub(rf"\b({names})='([\w-]+)'", lambda match: f"`{CLI_FLAGS[match.group(1)]} {match.group(2)}`", message)


@contextlib.contextmanager
def third_party_output(verbose: bool, keep_stdout: bool = False) -> Iterator[None]:
    """Hide other libraries' warnings, log messages below errors and prints (e.g. insightface's model list).

    This library's own warnings (a photo without a face, ...) still show. `verbose=True` changes nothing.
    """
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # libraries imported already
        logger.setLevel(logging.ERROR)
    # libraries imported from now on set their own level from these when they first log
    environment = {name: os.environ.get(name) for name in VERBOSITY_VARIABLES}
    os.environ.update({name: "error" for name in VERBOSITY_VARIABLES})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.nullcontext() if keep_stdout else contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class CLIError(Exception):
    """A problem with the command line's inputs; printed without a traceback."""


# ---------------------------------------------------------------------------------------------- argument parsing
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoint")
    group.add_argument(
        "--model",
        required=True,
        help="HyperLoRA checkpoint: a Hub repo id (org/name) or a local folder, in the library format "
        "(config.json + model.safetensors) or the release layout (hyper_lora_modules.json + 3 .safetensors).",
    )
    _add_hub_options(group)
    group.add_argument("--heads", type=int, default=None, help="Resampler heads of release-layout folders (12).")
    group.add_argument("--dim-head", type=int, default=None, help="Resampler head width, release layout (64).")
    group.add_argument(
        "--device", default=None, help="Where to run: cpu, cuda, cuda:1, ... (default: cuda if available)."
    )


def _add_hub_options(group: argparse._ActionsContainer) -> None:
    """The Hub options of `HubOptions` (docs/loading.md), for the checkpoint and the models it names."""
    group.add_argument("--subfolder", default=None, help="Folder inside the repo / folder that holds the checkpoint.")
    group.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main).")
    group.add_argument("--token", default=None, help="Hub token for private repos (default: your saved login).")
    group.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE).")
    group.add_argument(
        "--local-files-only", action="store_true", help="Never download; use the cache only (like HF_HUB_OFFLINE=1)."
    )
    group.add_argument("--force-download", action="store_true", help="Download again even if cached.")


def _hub_options(args: argparse.Namespace):
    from .io import HubOptions

    return HubOptions(**{name: getattr(args, name) for name in HUB_OPTIONS})


def _given_flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The flags among `names` (argparse destinations) that the command line set."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name)]


def _add_face_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("photos (needs the face extra: pip install 'diffusers-hyperlora[face]')")
    group.add_argument(
        "--image-encoder", default=None, help="CLIP vision encoder: repo id or folder (default: the checkpoint's)."
    )
    group.add_argument(
        "--face-models", default=None, help="AntelopeV2 face models: repo id, folder or insightface root."
    )


def _add_lora_options(parser: argparse.ArgumentParser, default_scale: str) -> None:
    parser.add_argument("-o", "--output", required=True, help="The LoRA file to write (.safetensors).")
    parser.add_argument(
        "--format",
        choices=("kohya", "diffusers"),
        default="kohya",
        help="kohya (default): the reference generator's keys; loads in ComfyUI, A1111, Forge, kohya sd-scripts "
        "and diffusers. diffusers: the layout pipe.load_lora_weights reads natively; diffusers only.",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="Dtype of the stored tensors (fp16 halves the file)."
    )
    parser.epilog = f"Load the file like any LoRA; recommended weight {default_scale}."


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="Also show other libraries' warnings, logs.")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `diffusers-hyperlora` (one subcommand per task)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HyperLoRA for diffusers: turn face photos into identities, LoRA files and sliders.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    identity = commands.add_parser(
        "identity",
        parents=[_common_options()],
        help="photos -> a saved identity file",
        description="Predict one person's identity from face photos and save it (a small .safetensors file). "
        "Saved identity files given among the inputs are pooled in exactly, as if their photos were given again.",
    )
    identity.add_argument("inputs", nargs="+", metavar="IMAGE", help="Photos of one person, and/or identity files.")
    identity.add_argument("-o", "--output", required=True, help="The identity file to write (.safetensors).")
    _add_model_options(identity)
    _add_face_options(identity)
    identity.set_defaults(handler=_run_identity)

    export = commands.add_parser(
        "export",
        parents=[_common_options()],
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
    export.set_defaults(handler=_run_export)

    slider = commands.add_parser(
        "slider",
        parents=[_common_options()],
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
    slider.set_defaults(handler=_run_slider)

    mix = commands.add_parser(
        "mix",
        parents=[_common_options()],
        help="blend several identities into one",
        description="Blend different people: a weighted mix of their normalized coefficients (only the ratios of "
        "the weights matter). Use `identity` with several files to pool photos of one person instead.",
    )
    mix.add_argument("identities", nargs="+", metavar="IDENTITY", help="Identity files to blend.")
    mix.add_argument("--weights", nargs="+", type=float, default=None, help="One weight per identity (default: equal).")
    mix.add_argument(
        "--spherical", action="store_true", help="Two identities only: spherical interpolation (slerp) at the weights."
    )
    mix.add_argument("-o", "--output", required=True, help="The identity file to write (.safetensors).")
    mix.set_defaults(handler=_run_mix)

    convert = commands.add_parser(
        "convert",
        parents=[_common_options()],
        help="release folder / repo -> the library's checkpoint format",
        description="Convert a HyperLoRA checkpoint (e.g. the public release's folder layout, local or on the Hub) "
        "into the library's format (config.json + model.safetensors), optionally changing its dtype.",
    )
    convert.add_argument("src", metavar="SRC", help="Source checkpoint: Hub repo id or local folder.")
    convert.add_argument("dst", metavar="DST", help="Output folder.")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="Output dtype (default: as stored).")
    _add_hub_options(convert)
    convert.add_argument("--heads", type=int, default=None, help="Resampler heads of release-layout sources (12).")
    convert.add_argument("--dim-head", type=int, default=None, help="Resampler head width of release-layout sources.")
    convert.add_argument(
        "--image-encoder", default=None, help="CLIP encoder to record in the config: repo id or './folder' of DST."
    )
    convert.add_argument("--face-models", default=None, help="Face models to record in the config (folder of DST).")
    convert.add_argument("--quiet", action="store_true", help="No progress bar.")
    convert.set_defaults(handler=_run_convert)

    cache = commands.add_parser(
        "cache-features",
        parents=[_common_options()],
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
    _add_model_options(cache)
    _add_face_options(cache)
    cache.set_defaults(handler=_run_cache_features)

    train = commands.add_parser(
        "train",
        parents=[_common_options()],
        help="train a HyperLoRA with the paper's three-stage curriculum",
        description="Train the projector, resampler(s) and basis banks on a dataset folder whose features were "
        "cached by `cache-features`; SDXL and the encoders stay frozen. Stages run in order: base (Base-LoRA "
        "warm-up on face-blurred inputs; skipped without a Base branch), id_clip (ID-LoRA from CLIP features), "
        "id_full (ArcFace added). The predictor is saved after each stage to OUTPUT_DIR/<stage>/predictor.",
    )
    train.add_argument("--data", required=True, help="Dataset folder with metadata.jsonl and features.safetensors.")
    train.add_argument("--base-model", required=True, help="SDXL pipeline to train against: repo id or folder.")
    train.add_argument("--output-dir", required=True, help="Where checkpoints, losses and predictors go.")
    train.add_argument(
        "--init",
        default=None,
        help="Start from this HyperLoRA checkpoint: Hub repo id or local folder (default: a new one).",
    )
    _add_hub_options(train.add_argument_group("Hub options of --init (the checkpoint to start from; need --init)"))
    train.add_argument(
        "--stages",
        nargs="+",
        choices=("base", "id_clip", "id_full"),
        default=None,
        metavar="STAGE",
        help="Which stages to run, in curriculum order: base, id_clip, id_full (default: all; base is skipped "
        "without a Base branch).",
    )
    train.add_argument("--steps", type=int, default=1000, help="Optimizer steps per stage.")
    train.add_argument(
        "--batch-size", type=int, default=1, help="Images per optimizer step and process (default 1; per GPU)."
    )
    train.add_argument(
        "--cache-latents",
        action="store_true",
        help="Encode every image with the VAE once before each stage instead of every step (more CPU memory).",
    )
    train.add_argument(
        "--caption-dropout", type=float, default=0.0, help="Probability of training a sample without its caption."
    )
    train.add_argument("--lr", type=float, default=1e-4, help="Learning rate (id_full uses half).")
    train.add_argument("--resolution", type=int, default=1024, help="Training image size in pixels.")
    train.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="accelerate's mixed precision: no (float32, default), fp16, or bf16 (on hardware that has it).",
    )
    train.add_argument(
        "--image-embed-dim",
        type=int,
        default=None,
        help="New checkpoints: CLIP width (default: read from DATA/features.safetensors; 1024 for ViT-L/14).",
    )
    train.add_argument("--num-basis", type=int, default=128, help="New checkpoints: bases per LoRA matrix (K).")
    train.add_argument("--rank", type=int, default=8, help="New checkpoints: ID-LoRA rank.")
    train.add_argument("--base-rank", type=int, default=4, help="New checkpoints: Base-LoRA rank (0: no Base).")
    train.set_defaults(handler=_run_train)
    _add_demo_parser(commands)
    return parser


def _add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[_common_options()],
        help="the web demo (Gradio): photos -> identity -> images, LoRA downloads, sliders",
        description="Serve the web demo. Without CHECKPOINT it starts offline, in seconds, on the built-in tiny "
        "default (random weights: every real step, noise-like images). Needs the extra: "
        "pip install 'diffusers-hyperlora[demo]'.",
    )
    demo.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        metavar="CHECKPOINT",
        help="HyperLoRA checkpoint: Hub repo id or local folder (e.g. bytedance-research/HyperLoRA with --subfolder "
        "sdxl_hyper_id_lora_v1_fidelity). Default: the built-in tiny default.",
    )
    _add_hub_options(
        demo.add_argument_group(
            "Hub options of CHECKPOINT (need a CHECKPOINT; --token, --cache-dir, --local-files-only and "
            "--force-download also apply to --base-model)"
        )
    )
    demo.add_argument(
        "--base-model",
        default=None,
        help="SDXL pipeline: repo id or folder (default with a CHECKPOINT: stabilityai/stable-diffusion-xl-base-1.0).",
    )
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    demo.add_argument("--image-encoder", default=None, help="CLIP vision encoder (default: the checkpoint's).")
    demo.add_argument("--face-models", default=None, help="AntelopeV2 face models: repo id or folder.")
    demo.add_argument("--host", default="127.0.0.1", help="Address to serve on (default: this machine only).")
    demo.add_argument("--port", type=int, default=7860, help="Port to serve on (default: 7860).")
    demo.set_defaults(handler=_run_demo)


# ---------------------------------------------------------------------------------------------- helpers
def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name!r} is not a device; use cpu, cuda, cuda:1, mps, ...") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {name}: this torch installation sees no CUDA GPU (torch {torch.__version__}). Pass "
            "--device cpu, or install the CUDA build of torch for your machine."
        )
    return device


def _load_predictor(args: argparse.Namespace):
    from .io import load_predictor

    device = _device(args.device)
    predictor = load_predictor(args.model, _hub_options(args), heads=args.heads, dim_head=args.dim_head)
    if device.type == "cpu":
        # 16-bit matmuls are slow (or missing) on CPUs: run the small networks in float32; the banks already
        # accumulate in float32 whatever their storage dtype, so they keep theirs (half the memory).
        for name, module in predictor.named_children():
            if not name.endswith("bank") and module is not None:
                module.float()
    return predictor.to(device).eval()


def _split_inputs(inputs: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    """`(images, identity files)`; every path must exist."""
    missing = [path for path in inputs if not os.path.isfile(path)]
    if missing:
        raise CLIError(f"{what}: no such file(s): {', '.join(missing)}. Pass existing photos or identity files.")
    identities = [path for path in inputs if path.lower().endswith(IDENTITY_SUFFIX)]
    images = [path for path in inputs if not path.lower().endswith(IDENTITY_SUFFIX)]
    return images, identities


def _identity_files_only(inputs: Sequence[str], what: str) -> None:
    """`export` and `mix` read saved identities, not photos: say which command turns photos into one."""
    photos = [path for path in inputs if not path.lower().endswith(IDENTITY_SUFFIX)]
    if photos:
        raise CLIError(
            f"{what} takes identity files ({IDENTITY_SUFFIX}, written by `identity`), not photos: "
            f"{', '.join(photos)}. Make an identity first: `{PROG} identity PHOTO... -o person{IDENTITY_SUFFIX} "
            "--model CHECKPOINT`."
        )


def _check_identity_output(path: str, what: str) -> None:
    """Identity files are told from photos by their suffix: one written under another name could not be read back."""
    if not path.lower().endswith(IDENTITY_SUFFIX):
        raise CLIError(
            f"{what}: -o {path}: identity files must end in {IDENTITY_SUFFIX} (inputs are read as identities by "
            f"that suffix, anything else as a photo). Pass e.g. -o {os.path.splitext(path)[0]}{IDENTITY_SUFFIX}."
        )


def _predict_from_images(predictor, images: list[str], args: argparse.Namespace):
    try:
        from .face import build_feature_extractor
    except ImportError as error:
        raise CLIError(
            f"Reading photos needs the face models ({error}). Install them with "
            "`pip install 'diffusers-hyperlora[face]'`, or pass saved identity files instead of photos."
        ) from error
    extractor = build_feature_extractor(
        predictor.config,
        source=args.model,
        image_encoder=args.image_encoder,
        face_analyzer=args.face_models,
        hub_options=_hub_options(args),
    )
    features = extractor(images, device=predictor.device, dtype=predictor.dtype, with_base=predictor.config.has_base)
    return predictor.predict(
        id_embeds=features.id_embeds,
        clip_hidden_states=features.clip_hidden_states,
        base_clip_hidden_states=features.base_clip_hidden_states,
        sources=features.sources or [os.path.basename(path) for path in images],
    )


def _resolve_identity(inputs: Sequence[str], args: argparse.Namespace, predictor, what: str):
    """Photos and identity files -> one identity: the photos predicted together, then everything pooled exactly."""
    from .identities.inputs import resolve_identity

    _split_inputs(inputs, what)
    return resolve_identity(inputs, lambda photos: _predict_from_images(predictor, photos, args), predictor)


def _describe(identity) -> str:
    return plural(identity.num_images, "image") + (f" ({', '.join(identity.sources)})" if identity.sources else "")


# ---------------------------------------------------------------------------------------------- subcommands
def _run_identity(args: argparse.Namespace) -> str:
    _check_identity_output(args.output, "identity")
    predictor = _load_predictor(args)
    identity = _resolve_identity(args.inputs, args, predictor, "identity")
    identity.save(args.output)
    return f"Saved the identity of {_describe(identity)} to {args.output}"


def _run_export(args: argparse.Namespace) -> str:
    _split_inputs(args.identities, "export")
    _identity_files_only(args.identities, "export")
    predictor = _load_predictor(args)
    identity = _resolve_identity(args.identities, args, predictor, "export")
    predictor.export_lora(identity, args.output, format=args.format, branch=args.branch, dtype=torch_dtype(args.dtype))
    return f"Saved the {args.branch} LoRA ({args.format} format) of {_describe(identity)} to {args.output}"


def _run_slider(args: argparse.Namespace) -> str:
    from .adapters.sliders import HyperLoRASlider

    _split_inputs(list(args.neutral) + list(args.edited), "slider")
    predictor = _load_predictor(args)
    slider = HyperLoRASlider(
        neutral=_resolve_identity(args.neutral, args, predictor, "slider --neutral"),
        edited=_resolve_identity(args.edited, args, predictor, "slider --edited"),
    )
    predictor.export_lora(slider, args.output, format=args.format, dtype=torch_dtype(args.dtype))
    return f"Saved the slider LoRA ({args.format} format) to {args.output}"


def _run_mix(args: argparse.Namespace) -> str:
    from .identities.identity import HyperLoRAIdentity

    _split_inputs(args.identities, "mix")
    _identity_files_only(args.identities, "mix")
    _check_identity_output(args.output, "mix")
    identities = [HyperLoRAIdentity.load(path) for path in args.identities]
    weights = args.weights if args.weights is not None else [1.0] * len(identities)
    if len(weights) != len(identities):
        raise CLIError(
            f"mix: {plural(len(identities), 'identity', 'identities')} but {len(weights)} --weights; give one "
            "weight each."
        )
    if args.spherical:
        if len(identities) != 2:
            raise CLIError("mix --spherical blends exactly two identities.")
        total = weights[0] + weights[1]
        if total <= 0:
            raise CLIError(f"mix: --weights must have a positive sum, got {weights}.")
        blend = HyperLoRAIdentity.interpolate(identities[0], identities[1], weights[1] / total, spherical=True)
    else:
        blend = HyperLoRAIdentity.mix(identities, weights)
    blend.save(args.output)
    return f"Saved the blend of {plural(len(identities), 'identity', 'identities')} to {args.output}"


def _run_convert(args: argparse.Namespace) -> str:
    try:
        from .io.convert import convert_checkpoint
    except ImportError as error:
        raise CLIError(f"This installation has no checkpoint converter ({error}).") from error
    convert_checkpoint(
        args.src,
        args.dst,
        _hub_options(args),
        dtype=torch_dtype(args.dtype) if args.dtype else None,
        heads=args.heads,
        dim_head=args.dim_head,
        image_encoder=args.image_encoder,
        face_models=args.face_models,
        progress=not args.quiet,
    )
    return f"Converted {args.src} to {args.dst}"


def _run_cache_features(args: argparse.Namespace) -> str:
    from .face import build_feature_extractor
    from .training import cache_features

    predictor = _load_predictor(args)
    extractor = build_feature_extractor(
        predictor.config,
        source=args.model,
        image_encoder=args.image_encoder,
        face_analyzer=args.face_models,
        hub_options=_hub_options(args),
    )
    path = cache_features(
        args.data,
        extractor,
        with_base=not args.no_base,  # train's new checkpoints have a Base branch, whatever this checkpoint has
        device=predictor.device,
        dtype=predictor.dtype,
    )
    return f"Cached features of {args.data} in {path}"


def _new_predictor(unet, args: argparse.Namespace, image_embed_dim: int):
    from .model.config import HyperLoRAConfig
    from .model.predictor import HyperLoRAPredictor
    from .model.targets import targets_from_unet

    config = HyperLoRAConfig(
        targets=targets_from_unet(unet),
        num_basis=args.num_basis,
        id_rank=args.rank,
        base_rank=args.base_rank,
        image_embed_dim=image_embed_dim,
    )
    return HyperLoRAPredictor(config)


def _data_clip_width(dataset) -> int | None:
    """The CLIP width of the cached features (`None` when the data has no CLIP features)."""
    for record in dataset.records:
        if record.clip_hidden_states is not None:
            return int(record.clip_hidden_states.shape[-1])
    return None


def _training_clip_width(args: argparse.Namespace, data_width: int | None, init_width: int | None) -> int:
    """The CLIP width to train with, checked against the data before any model is loaded."""
    wanted = init_width if init_width is not None else args.image_embed_dim
    if wanted is not None and data_width is not None and wanted != data_width:
        source = f"the checkpoint --init {args.init}" if init_width is not None else "--image-embed-dim"
        raise CLIError(
            f"train: {source} expects CLIP features {wanted} wide, but {args.data}/features.safetensors holds "
            f"features {data_width} wide. Cache the features again with the matching CLIP encoder "
            f"(`cache-features --image-encoder ...`), or pass --image-embed-dim {data_width} for a new checkpoint."
        )
    return wanted if wanted is not None else (data_width if data_width is not None else 1024)


def _check_init_options(args: argparse.Namespace) -> None:
    """The Hub flags of `train` say how to fetch --init: without --init they are a mistake, not silently unused."""
    given = _given_flags(args, HUB_OPTIONS)
    if given and not args.init:
        raise CLIError(
            f"train: {', '.join(given)} apply to --init, the checkpoint to start from, but no --init was given. "
            "Pass --init CHECKPOINT (Hub repo id or local folder), or drop them to train a new checkpoint."
        )


def _check_feature_cache(args: argparse.Namespace) -> None:
    from .training.data import FEATURES_FILE, METADATA_FILE

    data = args.data
    if os.path.isfile(os.path.join(data, METADATA_FILE)) and not os.path.isfile(os.path.join(data, FEATURES_FILE)):
        raise CLIError(
            f"train: {os.path.join(data, FEATURES_FILE)} not found: the face features are cached once before "
            f"training. Run `{PROG} cache-features {data} --model CHECKPOINT` first."
        )


def _check_base_features(args: argparse.Namespace, dataset, predictor) -> None:
    """A checkpoint with a Base branch trains on face-blurred features in every stage: the data must hold them."""
    has_base = predictor.config.has_base if predictor is not None else args.base_rank > 0
    if has_base and not dataset.has_features.get("base_clip_hidden_states", False):
        if predictor is not None:
            source, fix = f"the checkpoint --init {args.init}", ""
        else:
            source = f"a new checkpoint (--base-rank {args.base_rank})"
            fix = ", or pass --base-rank 0 for a new checkpoint without a Base branch"
        raise CLIError(
            f"train: {source} has a Base branch, which needs the face-blurred (Base) features in every stage, but "
            f"{args.data}/features.safetensors holds none. Cache them with `{PROG} cache-features {args.data} "
            f"--model CHECKPOINT` (without --no-base){fix}."
        )


def _run_train(args: argparse.Namespace) -> str:
    from .io import load_predictor
    from .training import HyperLoRATrainingDataset, TrainingConfig, default_curriculum, train_curriculum

    # Everything cheap is checked first (the flags, the data, the checkpoint's CLIP width); only then SDXL is loaded.
    _check_init_options(args)
    _check_feature_cache(args)
    dataset = HyperLoRATrainingDataset.from_folder(args.data, resolution=args.resolution)
    predictor = load_predictor(args.init, _hub_options(args)) if args.init else None
    init_width = predictor.config.image_embed_dim if predictor is not None else None
    width = _training_clip_width(args, _data_clip_width(dataset), init_width)
    _check_base_features(args, dataset, predictor)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.base_model)
    predictor = predictor if predictor is not None else _new_predictor(pipe.unet, args, width)
    stages = default_curriculum(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        mixed_precision=args.mixed_precision,
        cache_latents=args.cache_latents,
        caption_dropout=args.caption_dropout,
    )
    stages = [stage for stage in stages if args.stages is None or stage.stage in args.stages]
    train_curriculum(pipe, predictor, dataset, TrainingConfig(args.output_dir, stages=stages))
    return f"Trained stages {', '.join(s.stage for s in stages)}; predictors saved under {args.output_dir}"


def _run_demo(args: argparse.Namespace) -> None:
    try:
        from .demo import DemoEngine, launch_demo
    except ImportError as error:
        raise CLIError(f"The demo needs its extra ({error}): pip install 'diffusers-hyperlora[demo]'.") from error
    if args.checkpoint is None:
        given = _given_flags(args, (*HUB_OPTIONS, "base_model", "image_encoder", "face_models"))
        if given:
            raise CLIError(
                f"demo: {', '.join(given)} need a CHECKPOINT; without one the demo runs the built-in tiny default. "
                "Pass a CHECKPOINT (Hub repo id or local folder), or drop them."
            )
        engine = DemoEngine.tiny_default()
    else:
        engine = DemoEngine.from_pretrained(
            args.checkpoint,
            _hub_options(args),
            base_model=args.base_model or "stabilityai/stable-diffusion-xl-base-1.0",
            device=args.device,
            image_encoder=args.image_encoder,
            face_models=args.face_models,
        )
    page = launch_demo(engine, host=args.host, port=args.port, block=False)
    print(f"HyperLoRA demo running on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    page.block_thread()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 on a reported error).

    Example:
        >>> main(["export", "me.safetensors", "-o", "lora.safetensors", "--model", "org/hyperlora"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "format", None) == "diffusers":
        print(f"{PROG} {args.command}: {DIFFUSERS_FORMAT_NOTE}", file=sys.stderr)
    try:
        # the demo prints its address and serves until stopped: its output stays
        with third_party_output(args.verbose, keep_stdout=args.command == "demo"):
            message = args.handler(args)
    except (CLIError, HyperLoRAError, OSError, ValueError, TypeError) as error:
        message = cli_wording(str(error)).removeprefix(f"{args.command}: ")  # the prefix below names it already
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    if message:
        print(message)
    return 0


def _entry_point(argv: Any = None) -> None:  # pragma: no cover - `python -m diffusers_hyperlora.cli`
    sys.exit(main(argv))


if __name__ == "__main__":  # pragma: no cover
    _entry_point()
