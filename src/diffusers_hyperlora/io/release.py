"""The public release's folder layout (docs/hub-format.md), read unchanged, and written back.

A release folder holds `hyper_lora_modules.json` (ordered map of target modules), `hyper_lora_modules.safetensors`
(basis banks), `resampler.safetensors` and `id_projector.safetensors` (absent when the checkpoint has no ArcFace
condition). Every architecture number is read off tensor shapes; only the resampler's heads / dim_head are not
recoverable and default to the release's 12 x 64. The JSON's entry order decides which resampler tokens feed which
layer: entry `i` owns tokens `[8i, 8i + 8)`.

The shape/name functions here are pure (names and shapes in, config or keys out). `release_sources` maps each
predictor key to the release tensors it is stacked from; loading, converting and `save_release_checkpoint` (the
layout written back, for the ComfyUI plugin or to test the loader on other sizes) all follow that one map.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bank import group_linears
from ..config import HyperLoRAConfig
from ..errors import CheckpointFormatError
from ..files import atomic_write_files
from ..predictor import HyperLoRAPredictor
from ..targets import ATTENTION_LINEARS, TargetLinear, TargetModule
from .hub import Location
from .weights import Sources, build_predictor, check_shapes, meta_shapes, read_safetensors_shapes, stored_dtype

RELEASE_MODULES_JSON = "hyper_lora_modules.json"
RELEASE_WEIGHTS = ("hyper_lora_modules.safetensors", "resampler.safetensors", "id_projector.safetensors")
RELEASE_BASE_RESAMPLER = "base_resampler.safetensors"  # our extension: only for release-layout Base branches

RELEASE_HEADS = 12
RELEASE_DIM_HEAD = 64
RELEASE_LICENSE = "cc-by-nc-4.0"
BANK_FILE, RESAMPLER_FILE, PROJECTOR_FILE = RELEASE_WEIGHTS
PER_MODULE = len(ATTENTION_LINEARS)  # LoRA'd linears per JSON entry (q, k, v, out)

Shapes = Mapping[str, Sequence[int]]


def targets_from_modules_json(modules: Mapping[str, Mapping]) -> list[TargetModule]:
    """The ordered `TargetModule` list from the parsed `hyper_lora_modules.json` (file order is kept).

    Example:
        >>> targets = targets_from_modules_json(
        ...     {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2": {"hidden_size": 64,
        ...                                                                      "cross_attention_dim": 32}}
        ... )
        >>> targets[0].module_path, targets[0].context_size
        ('mid_block.attentions.0.transformer_blocks.0.attn2', 32)
    """
    if not isinstance(modules, Mapping):
        raise CheckpointFormatError(
            f"{RELEASE_MODULES_JSON} must be a JSON object mapping module names to "
            f'{{"hidden_size": int, "cross_attention_dim": int or null}}, got a {type(modules).__name__}.'
        )
    targets = []
    for name, entry in modules.items():
        ok = isinstance(entry, Mapping) and isinstance(entry.get("hidden_size"), int)
        cross = entry.get("cross_attention_dim") if isinstance(entry, Mapping) else None
        if not ok or not (cross is None or isinstance(cross, int)):
            raise CheckpointFormatError(
                f"{RELEASE_MODULES_JSON}: entry {name!r} must be an object with an integer 'hidden_size' and "
                f"'cross_attention_dim' (integer, or null for self-attention), got {entry!r}."
            )
        targets.append(TargetModule(name, int(entry["hidden_size"]), cross))
    if not targets:
        raise CheckpointFormatError(f"{RELEASE_MODULES_JSON} lists no modules.")
    return targets


def modules_json_from_targets(targets: Sequence[TargetModule]) -> dict[str, dict]:
    """The inverse of `targets_from_modules_json`: the ordered JSON object of a release folder."""
    return {t.name: {"hidden_size": t.hidden_size, "cross_attention_dim": t.cross_attention_dim} for t in targets}


def _shape(shapes: Shapes, key: str, file: str) -> list[int]:
    if key not in shapes:
        raise CheckpointFormatError(
            f"{file} has no tensor {key!r}; is this a HyperLoRA release folder (docs/hub-format.md lists the keys)?"
        )
    return list(shapes[key])


def resolve_heads(inner: int, heads: int | None, dim_head: int | None) -> tuple[int, int]:
    """`(heads, dim_head)` for an attention `inner` wide: the release's 12 x 64 by default, or the overrides.

    Give one of the two and the other follows from the width.

    Example:
        >>> resolve_heads(768, None, None), resolve_heads(64, 4, None)
        ((12, 64), (4, 16))
    """
    for name, value in (("heads", heads), ("dim_head", dim_head)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if heads is None and dim_head is None:
        heads, dim_head = RELEASE_HEADS, RELEASE_DIM_HEAD
    elif heads is None:
        heads = inner // dim_head
    elif dim_head is None:
        dim_head = inner // heads
    if heads * dim_head != inner:
        raise CheckpointFormatError(
            f"The resampler's attention layers are {inner} wide (rows of layers.0.attn1.to_q.weight), which is not "
            f"heads x dim_head = {heads} x {dim_head}. Pass the values the checkpoint was trained with, e.g. "
            f"load_hyperlora(..., heads=H, dim_head={inner}//H) with H dividing {inner}."
        )
    return heads, dim_head


def config_from_release(
    modules: Mapping[str, Mapping],
    bank_shapes: Shapes,
    resampler_shapes: Shapes,
    projector_shapes: Shapes | None,
    heads: int | None = None,
    dim_head: int | None = None,
) -> HyperLoRAConfig:
    """Read every architecture number of a release checkpoint off its tensor shapes.

    Args:
        modules: the parsed `hyper_lora_modules.json`.
        bank_shapes, resampler_shapes, projector_shapes: `{key: shape}` of the three safetensors files
            (`projector_shapes` may be `None` when the resampler has no ArcFace condition).
        heads, dim_head: the resampler's attention layout (default: the release's 12 x 64).

    Example:
        >>> config = config_from_release(modules, bank, resampler, projector)  # doctest: +SKIP
    """
    targets = targets_from_modules_json(modules)
    num_basis, _, id_rank = _shape(bank_shapes, "0.to_q.id_down_basis", BANK_FILE)
    base_rank = bank_shapes["0.to_q.base_down_basis"][2] if "0.to_q.base_down_basis" in bank_shapes else 0

    latents = _shape(resampler_shapes, "latents", RESAMPLER_FILE)
    if len(latents) != 3 or latents[0] != 1:
        raise CheckpointFormatError(f"{RESAMPLER_FILE}: 'latents' must be [1, queries, width], got {latents}.")
    _, num_queries, dim = latents
    layer_ids = {int(m.group(1)) for k in resampler_shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    depth = len(layer_ids)
    if depth == 0 or layer_ids != set(range(depth)):
        raise CheckpointFormatError(f"{RESAMPLER_FILE}: expected layers 0..n-1, found layers {sorted(layer_ids)}.")
    ff_inner = _shape(resampler_shapes, "layers.0.ff.net.0.proj.weight", RESAMPLER_FILE)[0]
    if ff_inner % dim:
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE}: the feed-forward is {ff_inner} wide, not a multiple of the resampler width {dim}."
        )
    inner = _shape(resampler_shapes, "layers.0.attn1.to_q.weight", RESAMPLER_FILE)[0]
    proj_out_basis = _shape(resampler_shapes, "proj_out.weight", RESAMPLER_FILE)[0]
    use_id = "proj_in.weight" in resampler_shapes
    use_image = "proj_in_2.weight" in resampler_shapes
    if not (use_id or use_image):
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE} has neither 'proj_in.weight' (ArcFace condition) nor 'proj_in_2.weight' (CLIP "
            "condition); a HyperLoRA resampler reads at least one."
        )
    widths = {resampler_shapes[k][1] for k in ("proj_in.weight", "proj_in_2.weight") if k in resampler_shapes}
    if len(widths) != 1:
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE}: expected proj_in / proj_in_2 to read one input width, got {sorted(widths)}."
        )
    (image_embed_dim,) = widths
    heads, dim_head = resolve_heads(inner, heads, dim_head)
    if proj_out_basis != num_basis:
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE}: proj_out gives {proj_out_basis} coefficients but {BANK_FILE} has {num_basis} bases; "
            "the files do not belong together."
        )

    num_id_tokens, id_embed_dim = 16, 512
    if use_id:
        if projector_shapes is None:
            raise CheckpointFormatError(
                f"The resampler reads ArcFace tokens (it has proj_in) but there is no {PROJECTOR_FILE}."
            )
        rows, id_embed_dim = _shape(projector_shapes, "0.weight", PROJECTOR_FILE)
        if rows % image_embed_dim:
            raise CheckpointFormatError(
                f"{PROJECTOR_FILE}: '0.weight' has {rows} rows, not a multiple of the token width {image_embed_dim}."
            )
        num_id_tokens = rows // image_embed_dim
    config = HyperLoRAConfig(
        targets=targets,
        num_basis=num_basis,
        id_rank=id_rank,
        base_rank=base_rank,
        resampler_dim=dim,
        resampler_depth=depth,
        resampler_heads=heads,
        resampler_dim_head=dim_head,
        resampler_ff_mult=ff_inner // dim,
        num_id_tokens=num_id_tokens,
        id_embed_dim=id_embed_dim,
        image_embed_dim=image_embed_dim,
        use_id_embeds=use_id,
        use_image_embeds=use_image,
        default_base_weight=0.25 if base_rank else 0.0,
        license=RELEASE_LICENSE,
    )
    if num_queries != config.num_tokens:
        raise CheckpointFormatError(
            f"The resampler has {num_queries} query tokens but {RELEASE_MODULES_JSON} lists {len(targets)} modules "
            f"({config.tokens_per_module} tokens each = {config.num_tokens}). The JSON and the weights do not "
            "belong together."
        )
    return config


def release_bank_keys(
    index: int, linear: TargetLinear, branch: str, num_basis: int, rank: int
) -> list[tuple[str, list[int]]]:
    """`[(down key, down shape), (up key, up shape)]` of one linear in `hyper_lora_modules.safetensors`.

    Example:
        >>> from diffusers_hyperlora.targets import TargetModule
        >>> q = TargetModule("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1", 64).linears()[0]
        >>> release_bank_keys(3, q, "id", 128, 8)
        [('3.to_q.id_down_basis', [128, 64, 8]), ('3.to_q.id_up_basis', [128, 8, 64])]
    """
    prefix = f"{index}.{linear.release_name}.{branch}"
    return [
        (f"{prefix}_down_basis", [num_basis, linear.in_features, rank]),
        (f"{prefix}_up_basis", [num_basis, rank, linear.out_features]),
    ]


def read_release_config(
    location: Location, heads: int | None = None, dim_head: int | None = None
) -> tuple[HyperLoRAConfig, dict[str, str]]:
    """Resolve (download if needed) the release's files and read its config. Returns `(config, {file: path})`.

    Only the files the checkpoint needs are fetched: `id_projector.safetensors` only when the resampler reads
    ArcFace tokens, `base_resampler.safetensors` only when the bank has a Base branch.
    """
    files = {name: location.require_file(name) for name in (RELEASE_MODULES_JSON, BANK_FILE, RESAMPLER_FILE)}
    with open(files[RELEASE_MODULES_JSON], encoding="utf-8") as f:
        try:
            modules = json.load(f)
        except json.JSONDecodeError as error:
            raise CheckpointFormatError(
                f"{RELEASE_MODULES_JSON} of {location.description} is not valid JSON ({error}); re-download it."
            ) from error
    bank_shapes = read_safetensors_shapes(files[BANK_FILE])
    resampler_shapes = read_safetensors_shapes(files[RESAMPLER_FILE])
    projector_shapes = None
    if "proj_in.weight" in resampler_shapes:
        files[PROJECTOR_FILE] = location.require_file(PROJECTOR_FILE)
        projector_shapes = read_safetensors_shapes(files[PROJECTOR_FILE])
    config = config_from_release(modules, bank_shapes, resampler_shapes, projector_shapes, heads, dim_head)
    if config.has_base:
        files[RELEASE_BASE_RESAMPLER] = location.require_file(RELEASE_BASE_RESAMPLER)
    return config, files


_MODULE_FILES = {
    "id_projector.": PROJECTOR_FILE, "resampler.": RESAMPLER_FILE, "base_resampler.": RELEASE_BASE_RESAMPLER,
}  # fmt: skip


def release_sources(config: HyperLoRAConfig, files: Mapping[str, str]) -> Sources:
    """Predictor state-dict key -> (path of the release file, its release key, or the release keys stacked into it).

    A resampler / projector tensor comes from one release tensor of the same name; a bank group
    (`id_bank.down.{g}` `[G, K, in, r]`) is stacked from the G release tensors of its linears.

    Example:
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_config
        >>> sources = release_sources(tiny_hyperlora_config(), {"hyper_lora_modules.safetensors": "bank.st"})
        >>> sources["id_bank.down.0"][1][:2]
        ['0.to_q.id_down_basis', '0.to_k.id_down_basis']
    """
    sources: dict[str, tuple[str, list[str]]] = {}
    for key in meta_shapes(config):
        prefix = next((p for p in _MODULE_FILES if key.startswith(p)), None)
        if prefix is not None:
            sources[key] = (files.get(_MODULE_FILES[prefix], _MODULE_FILES[prefix]), key[len(prefix) :])
    linears = config.linears
    for branch in ("id", "base") if config.has_base else ("id",):
        rank = config.rank(branch)
        for g, group in enumerate(group_linears(linears)):
            keys = [
                release_bank_keys(i // PER_MODULE, linears[i], branch, config.num_basis, rank) for i in group.members
            ]
            for side, part in enumerate(("down", "up")):
                sources[f"{branch}_bank.{part}.{g}"] = (files.get(BANK_FILE, BANK_FILE), [k[side][0] for k in keys])
    return sources


def check_release_shapes(config: HyperLoRAConfig, sources: Sources, files: Mapping[str, str], where: str) -> None:
    """Every release file must hold exactly the tensors, of the shapes, that the architecture read off them implies."""
    shapes = meta_shapes(config)
    expected: dict[str, dict[str, list[int]]] = {}
    for key, (path, names) in sources.items():
        for name in [names] if isinstance(names, str) else names:
            expected.setdefault(path, {})[name] = shapes[key] if isinstance(names, str) else shapes[key][1:]
    for file, path in files.items():
        if file != RELEASE_MODULES_JSON:
            found = read_safetensors_shapes(path)
            check_shapes(expected.get(path, {}), found, f"{file} of {where}", against=RELEASE_MODULES_JSON)


def load_release(
    location: Location,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    heads: int | None = None,
    dim_head: int | None = None,
) -> HyperLoRAPredictor:
    """Load a release-layout folder (local or Hub) into a `HyperLoRAPredictor` (default dtype: as stored)."""
    config, files = read_release_config(location, heads=heads, dim_head=dim_head)
    sources = release_sources(config, files)
    check_release_shapes(config, sources, files, location.description)
    return build_predictor(config, sources, torch_dtype or stored_dtype(files[BANK_FILE]), device)


def save_release_checkpoint(
    predictor: HyperLoRAPredictor, folder: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write `predictor` in the public release's folder layout (what the ComfyUI plugin reads).

    Files: `hyper_lora_modules.json` (entries in the config's target order), `hyper_lora_modules.safetensors`,
    `resampler.safetensors`, `id_projector.safetensors` (only with the ArcFace condition) and, for checkpoints
    with a Base branch (not in the public release), `base_resampler.safetensors`. The files are written as one
    set: if writing fails midway, those already in `folder` are left as they were. The resampler's heads /
    dim_head are not stored by this layout: loading needs them again unless they are the release's 12 x 64.

    Args:
        predictor: a `HyperLoRAPredictor`.
        folder: the output folder (created; files of the same names are replaced).
        dtype: dtype of the files (default: the predictor's). The release uses float16.

    Returns:
        The folder.

    Example:
        >>> from diffusers_hyperlora.tiny import tiny_hyperlora_predictor
        >>> import tempfile
        >>> folder = save_release_checkpoint(tiny_hyperlora_predictor(), tempfile.mkdtemp(), dtype=torch.float16)
        >>> sorted(p.name for p in folder.iterdir())[:2]
        ['hyper_lora_modules.json', 'hyper_lora_modules.safetensors']
    """
    config = predictor.config
    state = predictor.state_dict()
    per_file: dict[str, dict[str, tuple[str, int | None]]] = {}
    for key, (file, names) in release_sources(config, {}).items():
        if isinstance(names, str):
            per_file.setdefault(file, {})[names] = (key, None)
        for position, name in enumerate([] if isinstance(names, str) else names):
            per_file.setdefault(file, {})[name] = (key, position)

    def writer(entries: dict[str, tuple[str, int | None]]):
        def write(path: Path) -> None:
            tensors = {}
            for name, (key, position) in entries.items():
                tensor = state[key] if position is None else state[key][position]
                tensors[name] = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
            save_file(tensors, path, metadata={"format": "pt"})

        return write

    text = json.dumps(modules_json_from_targets(config.targets), indent=2)
    writers = {RELEASE_MODULES_JSON: lambda path: path.write_text(text, encoding="utf-8")}
    writers.update({file: writer(entries) for file, entries in per_file.items()})
    folder = atomic_write_files(folder, writers)
    for file in set(RELEASE_WEIGHTS + (RELEASE_BASE_RESAMPLER,)) - set(writers):
        (folder / file).unlink(missing_ok=True)  # e.g. an id_projector.safetensors of an earlier checkpoint
    return folder
