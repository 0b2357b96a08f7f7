"""The library's checkpoint format, and `load_predictor`: the one way a predictor is loaded, from either format.

The library format (written by `save_pretrained` / `push_to_hub` and `convert_checkpoint`): `config.json` (a
`HyperLoRAConfig`), the predictor's state dict in safetensors as transformers and diffusers store theirs
(`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` above 1 GB),
and a model card `README.md`; docs/hub-format.md describes it. The release's layout is read by `release.py`. The
format is told from a location's JSON files, and only that format's files are downloaded. Pickle files are never
loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging
from huggingface_hub import HfApi, ModelCard

from ..errors import CheckpointFormatError, InvalidArgumentError, InvalidArgumentTypeError
from ..model.config import CONFIG_NAME, FORMAT_VERSION, HyperLoRAConfig, read_config_json
from ..model.predictor import HyperLoRAPredictor
from ..utils.atomic_files import atomic_write_files
from ..utils.checks import parse_dtype
from ..utils.devices import parse_device
from .hub import HubOptions, Location
from .model_card import hyperlora_model_card
from .release import RELEASE_MODULES_JSON, RELEASE_WEIGHTS, read_release
from .weights import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    Checkpoint,
    Sources,
    build_predictor,
    check_max_shard_size,
    check_shapes,
    meta_shapes,
    read_safetensors_shapes,
    remove_stale_weights,
    stored_dtype,
    weight_writers,
)

logger = logging.get_logger(__name__)

CARD_NAME = "README.md"
OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors")


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(location: Location, heads: int | None = None, dim_head: int | None = None) -> Checkpoint:
    """Find the checkpoint at `location` (either format), read its config and check every tensor's shape.

    `heads` / `dim_head` apply to the release's layout only (the library format stores them).
    """
    folder = location.folder([CONFIG_NAME, RELEASE_MODULES_JSON], what="the checkpoint's JSON files")
    raw = read_config_json(folder / CONFIG_NAME)
    if raw is None and (folder / RELEASE_MODULES_JSON).is_file():
        return read_release(location, heads=heads, dim_head=dim_head)
    if raw is None:
        raise _not_a_checkpoint(location, has_config=(folder / CONFIG_NAME).is_file())
    if heads is not None or dim_head is not None:
        raise InvalidArgumentError(
            f"`heads`/`dim_head` only apply to release-layout checkpoints; {location.description} is in the library "
            "format, whose config.json already stores them. Drop the two arguments.",
            argument="heads" if heads is not None else "dim_head",
        )
    config = HyperLoRAConfig.from_json_dict(raw, f"{CONFIG_NAME} of {location.description}")
    files = _weight_files(location, location.folder(OWN_FILES, what="the weights"))
    sources, shapes = _own_sources(files, location)
    _check_depth(config, shapes, location)  # before the shape check, which builds every layer the config names
    check_shapes(meta_shapes(config), shapes, location.description)
    return Checkpoint(config, sources, stored_dtype(files[0]))


def _own_sources(files: list[str], location: Location) -> tuple[Sources, dict[str, list[int]]]:
    """`(key -> (file, key), key -> shape)` over the weight files; a key must be stored once."""
    sources, shapes = {}, {}
    for path in files:
        for key, shape in read_safetensors_shapes(path).items():
            if key in sources:
                raise CheckpointFormatError(
                    f"{location.description} stores tensor {key!r} in both {Path(sources[key][0]).name} and "
                    f"{Path(path).name}; which one is meant cannot be told. Save or download the checkpoint again."
                )
            sources[key], shapes[key] = (path, key), shape
    return sources, shapes


def _check_depth(config: HyperLoRAConfig, shapes: Mapping[str, Any], location: Location) -> None:
    stored = {key.split(".")[2] for key in shapes if key.startswith("resampler.layers.")}
    if config.resampler_depth != len(stored):
        raise CheckpointFormatError(
            f"{CONFIG_NAME} of {location.description} says resampler_depth={config.resampler_depth}, but the weights "
            f"hold {len(stored)} resampler layers. The files of a checkpoint must belong together: download or save "
            "them again as one set."
        )


def _weight_files(location: Location, folder: Path) -> list[str]:
    """Local paths of the weight files: `model.safetensors`, or the shards its index lists."""
    if (folder / WEIGHTS_NAME).is_file() or not (folder / WEIGHTS_INDEX_NAME).is_file():
        location.require(folder, WEIGHTS_NAME)  # raises, naming the file and what is there instead
        return [str(folder / WEIGHTS_NAME)]
    try:
        weight_map = json.loads((folder / WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointFormatError(
            f"{WEIGHTS_INDEX_NAME} of {location.description} is not a shard index ({error!r}); save or download the "
            "checkpoint again."
        ) from error
    outside = next((name for name in names if not isinstance(name, str) or Path(name).name != name), None)
    if outside is not None:
        raise CheckpointFormatError(
            f"{WEIGHTS_INDEX_NAME} of {location.description} names the shard {outside!r}, which is not a file name in "
            "the folder (shards are read from the checkpoint's own folder only). Save or download the checkpoint again."
        )
    location.require(folder, *names)
    return [str(folder / name) for name in names]


def _not_a_checkpoint(location: Location, has_config: bool) -> CheckpointFormatError:
    if has_config:
        return CheckpointFormatError(
            f"{location.description} has a {CONFIG_NAME!r}, but it is not a HyperLoRA config (no 'targets' / "
            f"'num_basis'; it may belong to another model), and no {RELEASE_MODULES_JSON!r}. Point to the folder "
            "of a HyperLoRA checkpoint (use `subfolder=` for a folder inside a repo)."
        )
    return CheckpointFormatError(
        f"{location.description} is not a HyperLoRA checkpoint: looked for {CONFIG_NAME!r} (library format, with "
        f"{WEIGHTS_NAME}) and {RELEASE_MODULES_JSON!r} (release layout, with {', '.join(RELEASE_WEIGHTS)}). "
        f"Files found: {location.listing_text()}. If the checkpoint is in a folder of the repo, pass `subfolder=`."
        + location.unsafe_hint()
    )


def load_predictor(
    pretrained_model_name_or_path: str | os.PathLike,
    hub_options: HubOptions | Mapping[str, Any] | None = None,
    *,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    heads: int | None = None,
    dim_head: int | None = None,
    **hub_kwargs: Any,
) -> HyperLoRAPredictor:
    """Load a `HyperLoRAPredictor` from a local folder or Hub repo, in either checkpoint format.

    Args:
        pretrained_model_name_or_path: a Hub repo id (`"org/hyperlora"`) or a local folder.
        hub_options: a `HubOptions` (or a dict of its fields); the keywords below override it.
        torch_dtype: dtype of the parameters, a torch dtype or a name (`"fp16"`, `"bf16"`; default: as stored,
            e.g. float16 for the release).
        device: where to put the parameters.
        heads, dim_head: resampler attention layout for release-layout checkpoints (default 12 x 64); they
            cannot be read off tensor shapes. The library format stores them.
        **hub_kwargs: `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, as in
            diffusers' loaders (docs/loading.md). `HF_HUB_OFFLINE=1` implies `local_files_only=True`.

    Raises:
        CheckpointNotFoundError: no such folder, repo, revision, or nothing cached while offline.
        CheckpointFormatError: the location is neither format, misses a file, or its tensors do not fit.

    Example:
        >>> predictor = load_predictor("path/to/sdxl_hyper_id_lora_v1_fidelity")  # doctest: +SKIP
        >>> predictor = load_predictor(
        ...     "bytedance-research/HyperLoRA", subfolder="sdxl_hyper_id_lora_v1_fidelity", torch_dtype=torch.float16
        ... )  # doctest: +SKIP
    """
    options = HubOptions.of(hub_options, **hub_kwargs)
    torch_dtype = parse_dtype(torch_dtype)
    if options.force_download and options.offline:
        logger.warning("force_download=True is ignored: downloads are off (HF_HUB_OFFLINE or local_files_only).")
    location = Location.of(pretrained_model_name_or_path, options)
    device = parse_device(device)
    checkpoint = read_checkpoint(location, heads=heads, dim_head=dim_head)
    return build_predictor(checkpoint.config, checkpoint.sources, torch_dtype or checkpoint.dtype, device)


# ---------------------------------------------------------------------------------------------- writing
def write_checkpoint(
    folder: str | os.PathLike,
    config: HyperLoRAConfig,
    tensors: Mapping[str, torch.Tensor],
    read: Callable[[list[str]], Mapping[str, torch.Tensor]],
    card: ModelCard | None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write `config.json`, the weights and `card` as one set (all or nothing); drop stale shards of an earlier save.

    `tensors` plans the weight files (meta tensors are fine); `read(keys)` gives each file's tensors when it is
    written, so one shard is in memory at a time.
    """
    metadata = {
        "format": "pt",
        "hyperlora_format_version": str(FORMAT_VERSION),
        "hyperlora_architecture": config.architecture_hash(),
    }
    writers = weight_writers(tensors, read, metadata, check_max_shard_size(max_shard_size))
    text = json.dumps(config.to_json_dict(), indent=2)
    writers[CONFIG_NAME] = lambda path: path.write_text(text, encoding="utf-8")
    if card is not None:
        writers[CARD_NAME] = card.save
    folder = atomic_write_files(folder, writers)
    remove_stale_weights(folder, writers)
    return folder


def save_pretrained(
    predictor: HyperLoRAPredictor,
    folder: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    model_card_kwargs: dict | None = None,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    **push_to_hub_kwargs: Any,
) -> Path | str:
    """Write `predictor` in the library format: `config.json`, the weights and (unless present) `README.md`.

    If writing fails midway, the files already in `folder` are left as they were. With `push_to_hub=True` the
    same files are then uploaded to `repo_id` (default: the folder's name) by `push_predictor_to_hub`, which
    takes the remaining keywords; the commit URL is returned instead of the folder.

    Example:
        >>> import tempfile
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save_pretrained(tiny_hyperlora_predictor(), tmp)
        ...     sorted(p.name for p in folder.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
    """
    _check_push_arguments(push_to_hub, repo_id, push_to_hub_kwargs)
    _check_save_arguments(folder, model_card_kwargs)
    state = predictor.state_dict()
    has_card = Path(folder, CARD_NAME).exists()  # an existing card may have been edited: keep it
    card = None if has_card else hyperlora_model_card(predictor.config, **(model_card_kwargs or {}))
    read = lambda keys: {key: state[key] for key in keys}  # noqa: E731
    folder = write_checkpoint(folder, predictor.config, state, read, card, max_shard_size)
    if push_to_hub:
        return push_predictor_to_hub(
            predictor,
            repo_id or folder.name,
            model_card_kwargs=model_card_kwargs,
            max_shard_size=max_shard_size,
            **push_to_hub_kwargs,
        )
    return folder


def _check_save_arguments(folder: Any, model_card_kwargs: Any) -> None:
    """Refuse a folder that is not a path and card keywords that are not a mapping, before anything is written."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InvalidArgumentTypeError(
            f"save_pretrained() writes into a folder: pass its path (str or Path), got a {type(folder).__name__} "
            f"{folder!r}; e.g. predictor.save_pretrained('my-hyperlora').",
            argument="save_directory",
        )
    if model_card_kwargs is not None and not isinstance(model_card_kwargs, Mapping):
        raise InvalidArgumentTypeError(
            f"model_card_kwargs must be a dict of model card fields (e.g. {{'license': 'mit'}}), got a "
            f"{type(model_card_kwargs).__name__} {model_card_kwargs!r}.",
            argument="model_card_kwargs",
        )


def _check_push_arguments(push: bool, repo_id: str | None, kwargs: dict[str, Any]) -> None:
    """Refuse what would be silently ignored: `config=` (the predictor's own config is written) and Hub keywords
    without `push_to_hub=True`."""
    if "config" in kwargs:
        raise InvalidArgumentError(
            "save_pretrained() writes the predictor's own config (`predictor.config`) and takes no `config=`: build "
            "the predictor from the config you want (`HyperLoRAPredictor(config)`) and save that.",
            argument="config",
        )
    unused = sorted(kwargs) + (["repo_id"] if repo_id is not None else [])
    if unused and not push:
        raise InvalidArgumentError(
            f"save_pretrained() got Hub upload option(s) {unused} without push_to_hub=True: add push_to_hub=True "
            "to upload, or drop them.",
            argument=unused[0],
        )


def push_predictor_to_hub(
    predictor: HyperLoRAPredictor,
    repo_id: str,
    *,
    commit_message: str = "Upload HyperLoRA predictor",
    private: bool | None = None,
    token: str | bool | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    model_card_kwargs: dict | None = None,
    max_shard_size: int | str | None = None,
) -> str:
    """Upload `predictor` in the library format to the Hub repo `repo_id` (created if needed) in one commit.

    The files are those `save_pretrained` writes, saved to a temporary folder that is removed afterwards; the
    model card's usage snippet names `repo_id` unless `model_card_kwargs` says otherwise.

    Args:
        predictor: the predictor to upload.
        repo_id: `"namespace/name"` (created if missing; `private` applies then).
        commit_message, branch, create_pr: as in `huggingface_hub.HfApi.upload_folder` (`branch` is its
            `revision`).
        token: a Hub token (default: the logged-in user's).
        model_card_kwargs: passed to the model card (`hyperlora_model_card`).
        max_shard_size: as in `save_pretrained`.

    Returns the URL of the commit.

    Example:
        >>> push_predictor_to_hub(predictor, "me/my-hyperlora", private=True)  # doctest: +SKIP
    """
    check_max_shard_size(max_shard_size)  # before the repo is created
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
    with tempfile.TemporaryDirectory(prefix="hyperlora-push-") as temporary:
        folder = Path(temporary, "checkpoint")
        save_pretrained(predictor, folder, max_shard_size=max_shard_size, model_card_kwargs=card_kwargs)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            commit_message=commit_message,
            revision=branch,
            create_pr=create_pr,
        )
