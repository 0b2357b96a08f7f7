"""The library's own checkpoint format: `config.json` (a `HyperLoRAConfig`), the weights, and `README.md`.

Written by `HyperLoRAPredictor.save_pretrained` / `push_to_hub` and by `convert_checkpoint`. The weights are the
predictor's state dict in safetensors, as transformers and diffusers store theirs: `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` above 1 GB. Keys: the release's projector /
resampler keys under `id_projector.` / `resampler.`, and the basis banks stacked per shape group
(`id_bank.down.{g}` `[G, K, in, r]`, `id_bank.up.{g}` `[G, K, r, out]`). docs/hub-format.md describes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from ..config import HyperLoRAConfig
from ..errors import CheckpointFormatError
from ..files import atomic_write_files
from ..predictor import HyperLoRAPredictor
from .hub import Location
from .model_card import hyperlora_model_card
from .weights import (
    MAX_SHARD_SIZE,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    Sources,
    build_predictor,
    check_shapes,
    meta_shapes,
    read_safetensors_shapes,
    remove_stale_weights,
    weight_writers,
)

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
CLASS_NAME = "HyperLoRAPredictor"


def _library_version() -> str:
    try:
        return importlib_metadata.version("diffusers-hyperlora")
    except importlib_metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def config_to_json_dict(config: HyperLoRAConfig) -> dict:
    """The content of `config.json`: the config's fields plus `_class_name`, `_format_version`, `_library_version`.

    Example:
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_config
        >>> data = config_to_json_dict(tiny_hyperlora_config())
        >>> data["_class_name"], data["num_basis"], len(data["targets"])
        ('HyperLoRAPredictor', 8, 24)
    """
    return {
        "_class_name": CLASS_NAME,
        "_format_version": FORMAT_VERSION,
        "_library_version": _library_version(),
        **config.to_dict(),
    }


def config_from_json_dict(raw: Mapping, where: str = CONFIG_NAME) -> HyperLoRAConfig:
    """Parse `config.json` (also the older `{"config": {...}}` nesting) into a `HyperLoRAConfig`."""
    if isinstance(raw.get("config"), Mapping):
        raw = raw["config"]
    version = raw.get("_format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where} is format version {version!r}; this diffusers-hyperlora reads up to {FORMAT_VERSION}. "
            "Upgrade diffusers-hyperlora."
        )
    try:
        return HyperLoRAConfig.from_dict(dict(raw))
    except (TypeError, ValueError) as error:
        raise CheckpointFormatError(f"{where} is not a valid HyperLoRAConfig: {error}") from error


def is_own_config_file(path: str | os.PathLike) -> bool:
    """Whether a `config.json` is a `HyperLoRAConfig` (the library format), not some other model's config."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(raw, dict):
        return False
    raw = raw.get("config", raw) if isinstance(raw.get("config"), dict) else raw
    return isinstance(raw.get("targets"), list) and "num_basis" in raw


def read_config(location: Location) -> HyperLoRAConfig:
    """The `HyperLoRAConfig` in `config.json` of `location`."""
    where = f"{CONFIG_NAME} of {location.description}"
    try:
        with open(location.require_file(CONFIG_NAME), encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(f"{where} is not valid JSON ({error}).") from error
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(f"{where} must be a JSON object, got {type(raw).__name__}.")
    return config_from_json_dict(raw, where)


def weight_files(location: Location) -> list[str]:
    """Local paths of the weight files: `model.safetensors`, or the shards its index lists."""
    single = location.file(WEIGHTS_NAME)
    if single is not None:
        return [single]
    index = location.file(WEIGHTS_INDEX_NAME)
    if index is None:
        return [location.require_file(WEIGHTS_NAME)]  # raises, naming the file and what is there instead
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    return [location.require_file(name) for name in dict.fromkeys(weight_map.values())]


def own_sources(files: list[str]) -> tuple[Sources, dict[str, list[int]]]:
    """`(key -> (file, key), key -> shape)` over the weight files."""
    sources, shapes = {}, {}
    for path in files:
        for key, shape in read_safetensors_shapes(path).items():
            sources[key], shapes[key] = (path, key), shape
    return sources, shapes


def load_own_format(
    location: Location, torch_dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> HyperLoRAPredictor:
    """Load a predictor in the library's format from `location`, tensor by tensor, never from pickle files."""
    config = read_config(location)
    sources, shapes = own_sources(weight_files(location))
    check_shapes(meta_shapes(config), shapes, location.description)
    return build_predictor(config, sources, torch_dtype, device)


def weights_metadata(config: HyperLoRAConfig) -> dict[str, str]:
    """`__metadata__` of the weight files."""
    return {
        "format": "pt",
        "hyperlora_format_version": str(FORMAT_VERSION),
        "hyperlora_architecture": config.architecture_hash(),
    }


def checkpoint_writers(config: HyperLoRAConfig, weights: dict, card: Any | None) -> dict:
    """`weights` (file name -> writer) plus `config.json` and, when given, the model card."""
    text = json.dumps(config_to_json_dict(config), indent=2)
    writers = {**weights, CONFIG_NAME: lambda path: path.write_text(text, encoding="utf-8")}
    if card is not None:
        writers[CARD_NAME] = card.save
    return writers


def write_checkpoint(folder: str | os.PathLike, writers: dict) -> Path:
    """Write the files as one set (all or nothing), then drop weight files of an earlier, differently sharded save."""
    folder = atomic_write_files(folder, writers)
    remove_stale_weights(folder, writers)
    return folder


def save_pretrained(
    predictor: HyperLoRAPredictor,
    folder: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    model_card_kwargs: dict | None = None,
) -> Path:
    """Write `predictor` in the library format: `config.json`, the weights and (unless present) `README.md`.

    If writing fails midway, the files already in `folder` are left as they were.

    Example:
        >>> import tempfile
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_predictor
        >>> folder = save_pretrained(tiny_hyperlora_predictor(), tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
    """
    state = predictor.state_dict()
    weights = weight_writers(
        state, lambda keys: {k: state[k] for k in keys}, weights_metadata(predictor.config),
        max_shard_size or MAX_SHARD_SIZE,
    )  # fmt: skip
    has_card = Path(folder, CARD_NAME).exists()  # an existing card may have been edited: keep it
    card = None if has_card else hyperlora_model_card(predictor.config, **(model_card_kwargs or {}))
    return write_checkpoint(folder, checkpoint_writers(predictor.config, weights, card))
