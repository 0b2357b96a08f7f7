"""Convert a checkpoint (the release's folder layout, local or on the Hub) to the library's Hub format.

The output folder holds `config.json`, `model.safetensors` and a model card `README.md`, ready for
`HyperLoRAPredictor.from_pretrained`, `load_predictor`, `pipe.load_hyperlora` or an upload. Tensors are streamed
one at a time from the source files into the output file, so the 3 GB bank is never held in memory (let alone
twice). The CLI's `diffusers-hyperlora convert SRC DST` calls `convert_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import CheckpointFormatError
from .hub import OWN_CONFIG, OWN_WEIGHTS, CheckpointLocation, hub_offline
from .model_card import hyperlora_model_card
from .own_format import _read_config, weights_metadata, write_config
from .release import iter_release_tensors, read_release_config, release_dtype
from .streaming import SafetensorsStreamWriter, tensor_nbytes

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
    *,
    dtype: torch.dtype | str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    heads: int | None = None,
    dim_head: int | None = None,
    image_encoder: str | None = None,
    face_models: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a release-layout checkpoint (or re-save a library-format one) into the library's Hub format.

    Args:
        src: a local folder or a Hub repo id (with `subfolder=` for a folder inside the repo), e.g.
            `"bytedance-research/HyperLoRA"` with `subfolder="sdxl_hyper_id_lora_v1_fidelity"`.
        dst: the output folder (created). Existing `config.json` / `model.safetensors` / `README.md` are replaced.
        dtype: storage dtype of the output (`torch.float16`, `"fp16"`, `"bf16"`, `"fp32"`; default: as stored).
        subfolder, revision, token: where to find `src` on the Hub.
        heads, dim_head: the resampler's attention layout for release-layout sources (default 12 x 64).
        image_encoder: where the CLIP vision encoder comes from, written into the config: a Hub repo id, or a
            folder of the output repo (`"./image_encoder"`). Default: `openai/clip-vit-large-patch14`.
        face_models: where the AntelopeV2 face models come from (a folder of the repo or a local insightface root).
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
    location = CheckpointLocation(
        os.fspath(src), subfolder=subfolder or None, revision=revision, token=token, local_files_only=hub_offline()
    )
    dst = Path(dst)
    if location.is_local and dst.resolve() == location.local_dir().resolve():
        raise ValueError(f"convert_checkpoint() would overwrite its source {str(dst)!r}: choose another output folder.")
    source_format = location.detect_format()
    if source_format == "release":
        config, files = read_release_config(location, heads=heads, dim_head=dim_head)
        stored = release_dtype(files)
        tensors = iter_release_tensors(config, files, None, stack=False)
    else:
        if heads is not None or dim_head is not None:
            raise ValueError("`heads`/`dim_head` only apply to release-layout sources; the library format stores them.")
        config = _read_config(location)
        weights = location.require_file(OWN_WEIGHTS)
        with safe_open(weights, framework="pt") as handle:
            stored = handle.get_tensor(next(iter(handle.keys()))).dtype
        tensors = _iter_file(weights)
    changes = {}
    if image_encoder is not None:
        changes["image_encoder"] = image_encoder
    if face_models is not None:
        changes["face_models"] = face_models
    config = dataclasses.replace(config, **changes)
    out_dtype = dtype or stored

    from ..predictor import HyperLoRAPredictor

    expected = HyperLoRAPredictor(config, device="meta").state_dict()
    entries = {key: (out_dtype, list(t.shape)) for key, t in expected.items()}
    total = sum(tensor_nbytes(out_dtype, shape) for _, shape in entries.values())
    dst.mkdir(parents=True, exist_ok=True)
    for name in (OWN_CONFIG, "README.md"):
        (dst / name).unlink(missing_ok=True)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Converting to {dst.name}", disable=not progress)
    try:
        with SafetensorsStreamWriter(dst / OWN_WEIGHTS, entries, weights_metadata(config)) as writer:
            for key, tensor in tensors:
                if key not in entries:
                    raise CheckpointFormatError(f"{location.description} holds {key!r}, which its config does not.")
                tensor = tensor.to(out_dtype)
                writer.write(key, tensor)
                bar.update(tensor.numel() * tensor.element_size())
    finally:
        bar.close()
    write_config(config, dst)
    source = location.path + (f"/{location.subfolder}" if location.subfolder else "")
    card = hyperlora_model_card(config, source=source, dtype=str(out_dtype).removeprefix("torch."))
    card.save(dst / "README.md")
    return dst


def _iter_file(path: str):
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            yield key, handle.get_tensor(key)
