"""Convert a checkpoint (the release's folder layout, local or on the Hub) to the library's Hub format.

The output folder holds `config.json`, the weights and a model card `README.md`, ready for `load_predictor`,
`HyperLoRAPredictor.from_pretrained`, `pipe.load_hyperlora` or an upload. The weights are written shard by shard
(at most 1 GB each, or one bank group when that is larger), each read from the source only when its file is
written, so converting the 3 GB release never holds the whole bank in memory (docs/performance.md). The CLI's
`diffusers-hyperlora convert SRC DST` calls `convert_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..predictor import HyperLoRAPredictor
from .hub import HubOptions, Location
from .load import detect_format
from .model_card import hyperlora_model_card
from .own_format import checkpoint_writers, own_sources, read_config, weight_files, weights_metadata, write_checkpoint
from .release import BANK_FILE, check_release_shapes, read_release_config, release_sources
from .weights import MAX_SHARD_SIZE, check_shapes, meta_shapes, read_tensors, stored_dtype, weight_writers

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.float16`, `"fp16"`, `"bf16"`, `"float32"`, ... -> a torch dtype (`None` stays `None`).

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[key]


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    hub_options: HubOptions | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    heads: int | None = None,
    dim_head: int | None = None,
    image_encoder: str | None = None,
    face_models: str | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    progress: bool = True,
    **hub_kwargs: Any,
) -> Path:
    """Convert a release-layout checkpoint (or re-save a library-format one) into the library's Hub format.

    Args:
        src: a local folder or a Hub repo id (with `subfolder=` for a folder inside the repo), e.g.
            `"bytedance-research/HyperLoRA"` with `subfolder="sdxl_hyper_id_lora_v1_fidelity"`.
        dst: the output folder (created). Its `config.json`, weights and `README.md` are replaced as one set: if
            the conversion fails midway, the files already there are left as they were.
        hub_options: where to find `src` on the Hub (`HubOptions` or a dict); the keywords `subfolder`,
            `revision`, `token`, `cache_dir`, `local_files_only`, `force_download` override it.
        dtype: storage dtype of the output (`torch.float16`, `"fp16"`, `"bf16"`, `"fp32"`; default: as stored).
        heads, dim_head: the resampler's attention layout for release-layout sources (default 12 x 64).
        image_encoder: where the CLIP vision encoder comes from, written into the config: a Hub repo id, or a
            folder of the output repo (`"./image_encoder"`). Default: `openai/clip-vit-large-patch14`.
        face_models: where the AntelopeV2 face models come from (a folder of the repo or a local insightface root).
        max_shard_size: largest weight file (`"1GB"`, or bytes); a larger bank group gets a file of its own.
        progress: show a tqdm progress bar.

    Returns:
        The output folder.

    Example:
        >>> from diffusers_hyperlora.io.convert import convert_checkpoint
        >>> convert_checkpoint(
        ...     "bytedance-research/HyperLoRA", "hyperlora-fidelity-fp16",
        ...     subfolder="sdxl_hyper_id_lora_v1_fidelity", dtype="fp16",
        ... )  # doctest: +SKIP
        PosixPath('hyperlora-fidelity-fp16')
    """
    dtype = parse_dtype(dtype)
    location = Location(os.fspath(src), HubOptions.of(hub_options, **hub_kwargs))
    dst = Path(dst)
    if location.is_local and dst.resolve() == location.local_dir.resolve():
        raise ValueError(f"convert_checkpoint() would overwrite its source {str(dst)!r}: choose another output folder.")
    if detect_format(location) == "release":
        config, files = read_release_config(location, heads=heads, dim_head=dim_head)
        sources = release_sources(config, files)
        check_release_shapes(config, sources, files, location.description)
        stored = stored_dtype(files[BANK_FILE])
    else:
        if heads is not None or dim_head is not None:
            raise ValueError("`heads`/`dim_head` only apply to release-layout sources; the library format stores them.")
        config = read_config(location)
        sources, shapes = own_sources(weight_files(location))
        check_shapes(meta_shapes(config), shapes, location.description)
        stored = stored_dtype(next(iter(sources.values()))[0])
    changes = {k: v for k, v in (("image_encoder", image_encoder), ("face_models", face_models)) if v is not None}
    config = dataclasses.replace(config, **changes)
    out_dtype = dtype or stored
    planned = HyperLoRAPredictor(config, device="meta", dtype=out_dtype).state_dict()
    source = location.path + (f"/{location.options.subfolder}" if location.options.subfolder else "")
    card = hyperlora_model_card(config, source=source, dtype=str(out_dtype).removeprefix("torch."))
    total = sum(t.numel() * t.element_size() for t in planned.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Converting to {dst.name}", disable=not progress) as bar:

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            tensors = read_tensors(sources, keys, out_dtype)
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
            return tensors

        weights = weight_writers(planned, read, weights_metadata(config), max_shard_size)
        return write_checkpoint(dst, checkpoint_writers(config, weights, card))
