"""The library's own checkpoint format: `config.json` (a `HyperLoRAConfig`) + `model.safetensors` (+ `README.md`).

Written by `HyperLoRAPredictor.save_pretrained` / `push_to_hub` (huggingface_hub's `PyTorchModelHubMixin`) and by
`diffusers_hyperlora.io.convert.convert_checkpoint`. `model.safetensors` holds the predictor's state dict: the
release's projector / resampler keys under `id_projector.` / `resampler.`, and the basis banks stacked per shape
group (`id_bank.down.{g}` `[G, K, in, r]`, `id_bank.up.{g}` `[G, K, r, out]`). docs/hub-format.md describes it.

Loading builds the model without allocating random weights, reads one tensor at a time (casting as it goes) and
never falls back to pickle files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import HyperLoRAConfig
from ..errors import CheckpointFormatError
from .hub import OWN_CONFIG, OWN_WEIGHTS, CheckpointLocation
from .streaming import SafetensorsStreamWriter

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


def config_from_json_dict(raw: Mapping, where: str = OWN_CONFIG) -> HyperLoRAConfig:
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


def write_config(config: HyperLoRAConfig, folder: str | os.PathLike) -> Path:
    """Write `config.json` into `folder` and return its path."""
    path = Path(folder) / OWN_CONFIG
    path.write_text(json.dumps(config_to_json_dict(config), indent=2, sort_keys=False), encoding="utf-8")
    return path


def weights_metadata(config: HyperLoRAConfig) -> dict[str, str]:
    """`__metadata__` of `model.safetensors`."""
    return {
        "format": "pt",
        "hyperlora_format_version": str(FORMAT_VERSION),
        "hyperlora_architecture": config.architecture_hash(),
    }


def save_own_format(
    predictor, folder: str | os.PathLike, dtype: torch.dtype | None = None, write_config_file: bool = True
) -> Path:
    """Write `model.safetensors` (and `config.json`) of `predictor` into `folder`, one tensor at a time.

    Example:
        >>> import tempfile
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_predictor
        >>> folder = save_own_format(tiny_hyperlora_predictor(), tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = predictor.state_dict()
    entries = {key: (dtype or t.dtype, list(t.shape)) for key, t in state.items()}
    with SafetensorsStreamWriter(folder / OWN_WEIGHTS, entries, weights_metadata(predictor.config)) as writer:
        for key, tensor in state.items():
            writer.write(key, tensor.detach().to(dtype or tensor.dtype))
    if write_config_file:
        write_config(predictor.config, folder)
    return folder


def _iter_weights(path: str, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            yield key, tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def build_predictor_from_weights(cls, config: HyperLoRAConfig, weights_path: str, device, torch_dtype, where: str):
    """Instantiate `cls(config)` with no storage, then adopt the file's tensors (strict keys and shapes)."""
    from .release import read_safetensors_shapes

    predictor = cls(config, device="meta")
    expected = predictor.state_dict()
    shapes = read_safetensors_shapes(weights_path)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and list(shapes[k]) != list(expected[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            details.append(f"{k} has shape {list(shapes[k])}, the config implies {list(expected[k].shape)}")
        raise CheckpointFormatError(
            f"{OWN_WEIGHTS} of {where} does not match its {OWN_CONFIG}: " + "; ".join(details) + ". The two files "
            "must come from the same save_pretrained()/convert call."
        )
    state_dict = {key: tensor.to(device) for key, tensor in _iter_weights(weights_path, torch_dtype)}
    predictor.load_state_dict(state_dict, strict=True, assign=True)
    return predictor.eval()


def load_own_format_weights(cls, model_id: str, config, *, subfolder=None, device="cpu", torch_dtype=None, **hub):
    """`PyTorchModelHubMixin._from_pretrained` body: the config is already read by the mixin."""
    location = CheckpointLocation(model_id, subfolder=subfolder, **hub)
    if config is None:
        config = _read_config(location)
    elif isinstance(config, Mapping):
        config = config_from_json_dict(config, f"{OWN_CONFIG} of {location.description}")
    weights = location.require_file(OWN_WEIGHTS)
    return build_predictor_from_weights(cls, config, weights, device, torch_dtype, location.description)


def _read_config(location: CheckpointLocation) -> HyperLoRAConfig:
    path = location.require_file(OWN_CONFIG)
    where = f"{OWN_CONFIG} of {location.description}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(f"{where} is not valid JSON ({error}).") from error
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(f"{where} must be a JSON object, got {type(raw).__name__}.")
    return config_from_json_dict(raw, where)


def load_own_format(location: CheckpointLocation, torch_dtype: torch.dtype | None = None, device="cpu", cls=None):
    """Load a predictor in the library's format from `location`.

    Example:
        >>> from diffusers_hyperlora.io import CheckpointLocation
        >>> predictor = load_own_format(CheckpointLocation("org/my-hyperlora"))  # doctest: +SKIP
    """
    if cls is None:
        from ..predictor import HyperLoRAPredictor as cls
    config = _read_config(location)
    weights = location.require_file(OWN_WEIGHTS)
    return build_predictor_from_weights(cls, config, weights, device, torch_dtype, location.description)
