"""`load_predictor`: the one way a `HyperLoRAPredictor` is loaded, from either checkpoint format.

A checkpoint is either the library's own format (`config.json` + safetensors weights, written by `save_pretrained`)
or the public release's folder layout (`hyper_lora_modules.json` and three `.safetensors` files). The format is told
from the files, and only the files of that format are downloaded. Pickle files are never loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.utils import logging

from ..errors import CheckpointFormatError
from ..predictor import HyperLoRAPredictor
from .hub import HubOptions, Location
from .own_format import CONFIG_NAME, is_own_config_file, load_own_format
from .release import RELEASE_MODULES_JSON, RELEASE_WEIGHTS, load_release

logger = logging.get_logger(__name__)


def detect_format(location: Location) -> str:
    """`"own"` or `"release"`; raises `CheckpointFormatError` when the location is neither."""
    config = location.file(CONFIG_NAME)
    if config is not None and is_own_config_file(config):
        return "own"
    if location.file(RELEASE_MODULES_JSON) is not None:
        return "release"
    if config is not None:
        raise CheckpointFormatError(
            f"{location.description} has a {CONFIG_NAME!r}, but it is not a HyperLoRA config (no 'targets' / "
            f"'num_basis'; it may belong to another model), and no {RELEASE_MODULES_JSON!r}. Point to the folder "
            "of a HyperLoRA checkpoint (use `subfolder=` for a folder inside a repo)."
        )
    raise CheckpointFormatError(
        f"{location.description} is not a HyperLoRA checkpoint: looked for {CONFIG_NAME!r} (library format, with "
        f"model.safetensors) and {RELEASE_MODULES_JSON!r} (release layout, with {', '.join(RELEASE_WEIGHTS)}). "
        f"Files found: {location.listing_text()}. If the checkpoint is in a folder of the repo, pass `subfolder=`."
        + location.unsafe_hint()
    )


def load_predictor(
    pretrained_model_name_or_path: str | os.PathLike,
    hub_options: HubOptions | Mapping[str, Any] | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    heads: int | None = None,
    dim_head: int | None = None,
    **hub_kwargs: Any,
) -> HyperLoRAPredictor:
    """Load a `HyperLoRAPredictor` from a local folder or Hub repo, in either checkpoint format.

    Args:
        pretrained_model_name_or_path: a Hub repo id (`"org/hyperlora"`) or a local folder.
        hub_options: a `HubOptions` (or a dict of its fields); the keywords below override it.
        torch_dtype: dtype of the parameters (default: as stored, e.g. float16 for the release).
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
    if options.force_download and options.offline:
        logger.warning("force_download=True is ignored: downloads are off (HF_HUB_OFFLINE or local_files_only).")
    location = Location(os.fspath(pretrained_model_name_or_path), options)
    if detect_format(location) == "release":
        return load_release(location, torch_dtype=torch_dtype, device=device, heads=heads, dim_head=dim_head)
    if heads is not None or dim_head is not None:
        raise ValueError(
            f"`heads`/`dim_head` only apply to release-layout checkpoints; {location.description} is in the library "
            "format, whose config.json already stores them. Drop the two arguments."
        )
    return load_own_format(location, torch_dtype=torch_dtype, device=device)
