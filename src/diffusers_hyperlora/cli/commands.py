"""The subcommands: each checks its arguments (checks.py, no heavy import), then calls the public API.

Only the HyperLoRA predictor (and, for photos, the face models and the CLIP encoder) is loaded, never SDXL, except
by `train` and `demo`. `--model tiny` is the built-in tiny default (`testing.tiny_checkpoint`), written to a
temporary folder for the command and removed after it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import (
    IdentityMismatchError,
    InvalidArgumentError,
    MissingDependencyError,
    TrainingConfigError,
    TrainingDataError,
)
from ..utils.atomic_files import atomic_folder
from . import checks
from .parser import HUB_OPTIONS, NEW_CHECKPOINT_BASE_RANK, PROG, TINY, install_hint

CHECKPOINT_FLAGS = (*HUB_OPTIONS, "heads", "dim_head")
STAGE_FLAGS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "learning_rate": "lr",
    "caption_dropout": "caption_dropout",
    "mixed_precision": "mixed_precision",
    "seed": "seed",
    "cache_latents": "cache_latents",
}
"""`StageConfig` fields -> `train`'s flags (argparse destinations); a flag not given keeps the library's default."""
DIFFUSERS_FORMAT_NOTE = (
    "note: a --format diffusers file loads only in diffusers (pipe.load_lora_weights); ComfyUI, A1111, Forge and "
    "kohya sd-scripts apply nothing from it. Use --format kohya (the default) for every other tool."
)


# ---------------------------------------------------------------------------------------------- shared steps
@contextlib.contextmanager
def checkpoint_source(value: str) -> Iterator[str]:
    """The checkpoint to load: `value` itself, or for `tiny` the built-in tiny default in a temporary folder."""
    if value != TINY:
        yield value
        return
    from ..testing.tiny_checkpoint import TinyCheckpoint

    with TinyCheckpoint() as folder:
        yield os.fspath(folder)


def require_extra(module: str, extra: str, command: str) -> None:
    """`MissingDependencyError` naming the extra to install when `module` (of that extra) cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{command} needs {module}, in the {extra} extra: {install_hint(extra)}."
        ) from error


def hub_options(args: argparse.Namespace):
    from ..io import HubOptions

    return HubOptions(**{name: getattr(args, name) for name in HUB_OPTIONS})


def resolve_device(name: str | None):
    """The torch device of `--device` (the library's policy, `utils.devices`): cuda when available by default."""
    from ..utils.devices import device_and_dtype

    device, _ = device_and_dtype(name, label=checks.DEVICE_FLAG)
    return device


def load_predictor(model: str, args: argparse.Namespace):
    """The checkpoint's predictor on `--device`, placed as the library places a predictor without a pipeline
    (`pipeline.placement.place_alone`: on a CPU its small networks in float32)."""
    from ..io import load_predictor as load
    from ..pipeline.placement import place_alone

    device = resolve_device(args.device)
    predictor = load(model, hub_options(args), heads=args.heads, dim_head=args.dim_head)
    return place_alone(predictor, device).eval()


def feature_extractor(predictor, model: str, args: argparse.Namespace):
    """The library's face pipeline for the checkpoint (`face.build_feature_extractor`)."""
    from ..face import build_feature_extractor

    return build_feature_extractor(
        predictor.config,
        source=model,
        image_encoder=args.image_encoder,
        face_analyzer=args.face_models,
        hub_options=hub_options(args),
    )


def photo_predictor(predictor, model: str, args: argparse.Namespace) -> Callable[[list[str]], Any]:
    """`photos -> identity`, building the face pipeline once, on first use."""
    extractor = functools.cache(lambda: feature_extractor(predictor, model, args))

    return lambda photos: predictor.predict_photos(photos, extractor())


def resolve_identity(inputs: list[str], predict: Callable, predictor):
    from ..identities.inputs import resolve_identity as resolve

    return resolve(inputs, predict, predictor)


def describe(identity) -> str:
    return checks.plural(identity.num_images, "image") + (
        f" ({', '.join(identity.sources)})" if identity.sources else ""
    )


def _check_model_args(args: argparse.Namespace) -> None:
    checks.check_device(args.device)
    checks.check_tiny_options(args, args.model, "--model", CHECKPOINT_FLAGS)


# ---------------------------------------------------------------------------------------------- subcommands
def run_identity(args: argparse.Namespace) -> str:
    _check_model_args(args)
    checks.check_inputs(args.inputs, "IMAGE")
    checks.check_output_file(args.output, args.inputs, args.overwrite)
    with checkpoint_source(args.model) as model:
        predictor = load_predictor(model, args)
        identity = resolve_identity(args.inputs, photo_predictor(predictor, model, args), predictor)
        identity.save(args.output)
    return f"Saved the identity of {describe(identity)} to {args.output}"


def run_export(args: argparse.Namespace) -> str:
    _check_model_args(args)
    checks.check_inputs(args.identities, "IDENTITY")
    checks.check_output_file(args.output, args.identities, args.overwrite, lora=True)
    checks.check_identity_files_only(args.identities, "export")
    from ..utils.checks import parse_dtype

    with checkpoint_source(args.model) as model:
        predictor = load_predictor(model, args)
        identity = resolve_identity(args.identities, None, predictor)
        dtype = parse_dtype(args.dtype)
        predictor.export_lora(identity, args.output, format=args.format, branch=args.branch, dtype=dtype)
    return f"Saved the {args.branch} LoRA ({args.format} format) of {describe(identity)} to {args.output}"


def run_slider(args: argparse.Namespace) -> str:
    _check_model_args(args)
    checks.check_inputs(args.neutral, "--neutral")
    checks.check_inputs(args.edited, "--edited")
    checks.check_output_file(args.output, [*args.neutral, *args.edited], args.overwrite, lora=True)
    from ..adapters.sliders import HyperLoRASlider
    from ..utils.checks import parse_dtype

    with checkpoint_source(args.model) as model:
        predictor = load_predictor(model, args)
        predict = photo_predictor(predictor, model, args)
        slider = HyperLoRASlider(
            neutral=resolve_identity(args.neutral, predict, predictor),
            edited=resolve_identity(args.edited, predict, predictor),
        )
        predictor.export_lora(slider, args.output, format=args.format, dtype=parse_dtype(args.dtype))
    return f"Saved the slider LoRA ({args.format} format) to {args.output}"


def run_mix(args: argparse.Namespace) -> str:
    checks.check_inputs(args.identities, "IDENTITY")
    checks.check_output_file(args.output, args.identities, args.overwrite)
    checks.check_identity_files_only(args.identities, "mix")
    from ..identities.identity import HyperLoRAIdentity

    identities = [HyperLoRAIdentity.load(path) for path in args.identities]
    weights = args.weights if args.weights is not None else [1.0] * len(identities)
    try:  # the library checks the weights, --spherical's two identities and that they share a checkpoint
        blend = HyperLoRAIdentity.mix(identities, weights, spherical=args.spherical)
    except IdentityMismatchError as error:
        index = getattr(error, "index", None)
        if index is None:
            raise
        paths, reason = args.identities, error.__cause__ or error  # the library's reason, without its indices
        raise IdentityMismatchError(
            f"{paths[index]} does not go with {paths[0]}: {reason}", argument="identities"
        ) from None
    blend.save(args.output)
    return f"Saved the blend of {checks.plural(len(identities), 'identity', 'identities')} to {args.output}"


def run_convert(args: argparse.Namespace) -> str:
    tiny_flags = (*CHECKPOINT_FLAGS, "dtype", "image_encoder", "face_models")
    checks.check_tiny_options(args, args.src, "SRC", tiny_flags)
    checks.check_output_folder(args.dst, args.overwrite, "DST", "dst", source=args.src)
    if args.src == TINY:
        with atomic_folder(args.dst) as temporary:
            _save_tiny(str(temporary))
        return f"Wrote the built-in tiny default to {args.dst} (use it as --model {args.dst})"
    from ..io.convert import convert_checkpoint
    from ..utils.checks import parse_dtype

    convert_checkpoint(
        args.src,
        args.dst,
        hub_options(args),
        dtype=parse_dtype(args.dtype),
        heads=args.heads,
        dim_head=args.dim_head,
        image_encoder=args.image_encoder,
        face_models=args.face_models,
        progress=not args.quiet,
    )
    return f"Converted {args.src} to {args.dst}"


def _save_tiny(folder: str) -> None:
    from ..testing.tiny_checkpoint import save_tiny_checkpoint

    save_tiny_checkpoint(folder)


def run_cache_features(args: argparse.Namespace) -> str:
    _check_model_args(args)
    if not os.path.isdir(args.data):
        raise InvalidArgumentError(
            f"DATA {args.data}: not a folder; pass the dataset folder that holds metadata.jsonl.", argument="data"
        )
    from ..training import cache_features
    from ..training.data import FEATURES_FILE

    output = os.path.join(args.data, FEATURES_FILE)
    if os.path.exists(output) and not args.overwrite:
        raise InvalidArgumentError(
            f"{output} exists already; pass --overwrite to compute the features again.", argument="overwrite"
        )
    with checkpoint_source(args.model) as model:
        predictor = load_predictor(model, args)
        path = cache_features(
            args.data,
            feature_extractor(predictor, model, args),
            with_base=not args.no_base,  # train's new checkpoints have a Base branch, whatever this checkpoint has
            device=predictor.device,
            dtype=predictor.dtype,
        )
    return f"Cached features of {args.data} in {path}"


# ---------------------------------------------------------------------------------------------- train
def _new_predictor(denoiser, args: argparse.Namespace, image_embed_dim: int | None):
    """A new checkpoint for the base model's denoiser (`training.fresh_predictor_config`: a UNet's sizes follow the
    UNet's, the release's for SDXL and smaller for smaller UNets such as tiny's; a transformer (SD3, FLUX) gets the
    release's); the flags given override its sizes.
    """
    from ..model.predictor import HyperLoRAPredictor
    from ..training import fresh_predictor_config

    sizes = {"base_rank": NEW_CHECKPOINT_BASE_RANK, **checks.new_checkpoint_sizes(args)}
    if image_embed_dim is not None:
        sizes["image_embed_dim"] = image_embed_dim
    if args.base_model != TINY:
        sizes["base_model"] = args.base_model  # recorded in the config: the pipeline the checkpoint was trained on
    return HyperLoRAPredictor(fresh_predictor_config(denoiser, **sizes))


def _data_clip_width(dataset) -> int | None:
    """The CLIP width of the cached features (`None` when the data has no CLIP features)."""
    for record in dataset.records:
        if record.clip_hidden_states is not None:
            return int(record.clip_hidden_states.shape[-1])
    return None


def _training_clip_width(args: argparse.Namespace, data_width: int | None, init_width: int | None) -> int | None:
    """The CLIP width to train with, checked against the data before any model is loaded."""
    wanted = init_width if init_width is not None else args.image_embed_dim
    if wanted is not None and data_width is not None and wanted != data_width:
        source = f"the checkpoint --init {args.init}" if init_width is not None else "--image-embed-dim"
        raise TrainingDataError(
            f"train: {source} expects CLIP features {wanted} wide, but {args.data}/features.safetensors holds "
            f"features {data_width} wide. Cache the features again with the matching CLIP encoder "
            f"(`cache-features --image-encoder ...`), or pass --image-embed-dim {data_width} for a new checkpoint.",
            argument="image_embed_dim",
        )
    return wanted if wanted is not None else data_width  # None: the config's default


def _check_feature_cache(args: argparse.Namespace) -> None:
    from ..training.data import FEATURES_FILE, METADATA_FILE

    data = args.data
    if os.path.isfile(os.path.join(data, METADATA_FILE)) and not os.path.isfile(os.path.join(data, FEATURES_FILE)):
        raise TrainingDataError(
            f"train: {os.path.join(data, FEATURES_FILE)} not found: the face features are cached once before "
            f"training. Run `{PROG} cache-features {data} --model CHECKPOINT` first.",
            argument="data",
        )


def _check_base_features(args: argparse.Namespace, dataset, predictor) -> None:
    """A checkpoint with a Base branch trains on face-blurred features in every stage: the data must hold them."""
    base_rank = args.base_rank if args.base_rank is not None else NEW_CHECKPOINT_BASE_RANK
    has_base = predictor.config.has_base if predictor is not None else base_rank > 0
    if has_base and not dataset.has_features.get("base_clip_hidden_states", False):
        if predictor is not None:
            source, fix = f"the checkpoint --init {args.init}", ""
        else:
            source = f"a new checkpoint (--base-rank {base_rank})"
            fix = ", or pass --base-rank 0 for a new checkpoint without a Base branch"
        raise TrainingDataError(
            f"train: {source} has a Base branch, which needs the face-blurred (Base) features in every stage, but "
            f"{args.data}/features.safetensors holds none. Cache them with `{PROG} cache-features {args.data} "
            f"--model CHECKPOINT` (without --no-base){fix}.",
            argument="data",
        )


def _base_pipeline(args: argparse.Namespace):
    if args.base_model == TINY:
        from ..testing.tiny_models import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline()
    from diffusers import DiffusionPipeline

    from ..model.targets import DENOISER_COMPONENTS
    from ..training import TRAINING_FAMILIES, trainable_family

    components = DiffusionPipeline.load_config(args.base_model)  # model_index.json: nothing big is loaded yet
    denoiser = next((components[name] for name in DENOISER_COMPONENTS if name in components), None)
    denoiser_class = denoiser[-1] if isinstance(denoiser, (list, tuple)) and denoiser else None
    if denoiser_class is None or trainable_family(denoiser_class) is None:
        raise TrainingConfigError(
            f"--base-model {args.base_model} is a {components.get('_class_name', 'pipeline')} whose denoiser is a "
            f"{denoiser_class or 'missing component'}: train runs on pipelines denoising with "
            f"{', '.join(TRAINING_FAMILIES)} (SDXL, SD 1.5, SD 2.x, SD3, FLUX).",
            argument="base_model",
        )
    # Components the folder records as absent ([null, null], e.g. SD3 without its T5) are loaded as absent.
    absent = {name: None for name, value in components.items() if isinstance(value, list) and value == [None, None]}
    return DiffusionPipeline.from_pretrained(args.base_model, **absent)  # any UNet, SD3 or FLUX pipeline


def _training_config(args: argparse.Namespace):
    """The curriculum of the flags given (and `--resolution`), checked by the library (`TrainingConfig.validate`,
    `check_resolution`) before any model is loaded; a flag not given keeps the library's default
    (`training.STAGE_DEFAULTS`)."""
    from ..training import TrainingConfig, check_resolution, default_curriculum

    check_resolution(args.resolution)
    given = {field: getattr(args, name) for field, name in STAGE_FLAGS.items()}
    given = {field: value for field, value in given.items() if value is not None and value is not False}
    stages = [stage for stage in default_curriculum(**given) if args.stages is None or stage.stage in args.stages]
    return TrainingConfig(args.output_dir, stages=stages)


def run_train(args: argparse.Namespace) -> str:
    checks.check_train_arguments(args)
    checks.check_tiny_options(args, args.init, "--init", HUB_OPTIONS)
    require_extra("accelerate", "train", "train")
    from ..io import load_predictor as load
    from ..training import HyperLoRATrainingDataset, pipeline_denoiser, train_curriculum

    # Everything cheap is checked first (the flags, the data, the checkpoint's CLIP width); only then SDXL is loaded.
    config = _training_config(args)
    _check_feature_cache(args)
    dataset = HyperLoRATrainingDataset.from_folder(args.data, resolution=args.resolution)  # None: the base model's
    with checkpoint_source(args.init) if args.init else contextlib.nullcontext() as init:
        predictor = load(init, hub_options(args)) if init else None
    init_width = predictor.config.image_embed_dim if predictor is not None else None
    width = _training_clip_width(args, _data_clip_width(dataset), init_width)
    _check_base_features(args, dataset, predictor)

    pipe = _base_pipeline(args)
    predictor = predictor if predictor is not None else _new_predictor(pipeline_denoiser(pipe), args, width)
    existed = os.path.isdir(args.output_dir)
    fresh = not existed or not any(os.scandir(args.output_dir))  # new or empty (else --overwrite was given)
    try:
        train_curriculum(pipe, predictor, dataset, config)
    except BaseException:  # Ctrl-C or an error: the folders the run made and left empty go (files are kept)
        if fresh:
            _remove_empty_folders(args.output_dir, keep_root=existed)
        raise
    return f"Trained stages {', '.join(s.stage for s in config.stages)}; predictors saved under {args.output_dir}"


def _remove_empty_folders(root: str, keep_root: bool) -> None:
    """Remove the folders under `root` (and `root` unless `keep_root`) that hold no file: the same command then runs
    again without --overwrite. Folders with a file (a saved checkpoint) stay."""
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: entry[0].count(os.sep), reverse=True):
        if keep_root and os.path.samefile(folder, root):
            continue
        with contextlib.suppress(OSError):  # not empty
            os.rmdir(folder)


# ---------------------------------------------------------------------------------------------- demo
def run_demo(args: argparse.Namespace) -> None:
    checks.check_device(args.device)
    checks.check_port(args.port)
    require_extra("gradio", "demo", "demo")
    from ..demo import DemoEngine, launch_demo

    # A device given is refused here, in --device's words, before any model is built. Without one, each engine
    # keeps its own default: the tiny default the CPU (the same images on every machine), a checkpoint the GPU.
    device = None if args.device is None else str(resolve_device(args.device))
    if args.checkpoint is None:
        given = checks.given_flags(args, (*HUB_OPTIONS, "base_model", "image_encoder", "face_models"))
        if given:
            raise InvalidArgumentError(
                f"demo: {', '.join(given)} need a CHECKPOINT; without one the demo runs the built-in tiny default. "
                "Pass a CHECKPOINT (Hub repo id or local folder), or drop them.",
                argument="checkpoint",
            )
        engine = DemoEngine.tiny_default() if device is None else DemoEngine.tiny_default(device=device)
    else:
        engine = DemoEngine.from_pretrained(
            args.checkpoint,
            hub_options(args),
            base_model=args.base_model,  # None: the library's default SDXL
            device=device,
            image_encoder=args.image_encoder,
            face_models=args.face_models,
        )
    page = launch_demo(engine, host=args.host, port=args.port, block=False)
    print(f"HyperLoRA demo running on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    page.block_thread()


def print_format_note(args: argparse.Namespace) -> None:
    if getattr(args, "format", None) == "diffusers":
        print(f"{PROG} {args.command}: {DIFFUSERS_FORMAT_NOTE}", file=sys.stderr)


COMMANDS: dict[str, Callable[[argparse.Namespace], str | None]] = {
    "identity": run_identity,
    "export": run_export,
    "slider": run_slider,
    "mix": run_mix,
    "convert": run_convert,
    "cache-features": run_cache_features,
    "train": run_train,
    "demo": run_demo,
}
