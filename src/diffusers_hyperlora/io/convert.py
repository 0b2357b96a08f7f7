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

from ..errors import InvalidArgumentError
from ..model.predictor import HyperLoRAPredictor
from ..utils.checks import parse_dtype
from .checkpoint import read_checkpoint, write_checkpoint
from .hub import HubOptions, Location
from .model_card import hyperlora_model_card
from .weights import MAX_SHARD_SIZE, check_max_shard_size, read_tensors


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
    check_max_shard_size(max_shard_size)  # before the source is read
    location = Location.of(src, HubOptions.of(hub_options, **hub_kwargs))
    dst = Path(dst)
    if location.is_local and dst.resolve() == location.local_dir.resolve():
        raise InvalidArgumentError(
            f"convert_checkpoint() would overwrite its source {str(dst)!r}: choose another output folder.",
            argument="dst",
        )
    checkpoint = read_checkpoint(location, heads=heads, dim_head=dim_head)
    changes = {k: v for k, v in (("image_encoder", image_encoder), ("face_models", face_models)) if v is not None}
    config = dataclasses.replace(checkpoint.config, **changes)
    out_dtype = dtype or checkpoint.dtype
    planned = HyperLoRAPredictor(config, device="meta", dtype=out_dtype).state_dict()
    source = location.path + (f"/{location.options.subfolder}" if location.options.subfolder else "")
    card = hyperlora_model_card(config, source=source, dtype=str(out_dtype).removeprefix("torch."))
    total = sum(t.numel() * t.element_size() for t in planned.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Converting to {dst.name}", disable=not progress) as bar:

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            tensors = read_tensors(checkpoint.sources, keys, out_dtype)
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
            return tensors

        return write_checkpoint(dst, config, planned, read, card, max_shard_size)
