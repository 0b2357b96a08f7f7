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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointFormatError, InvalidArgumentError
from ..model.bank import group_linears
from ..model.config import CONFIG_NAME, HyperLoRAConfig, read_config_json
from ..model.predictor import HyperLoRAPredictor
from ..model.targets import ATTENTION_LINEARS, TargetModule
from ..utils.atomic_files import atomic_write_files
from ..utils.checks import parse_dtype
from .hub import Location
from .weights import (
    Checkpoint,
    Sources,
    check_shapes,
    meta_shapes,
    read_safetensors_shapes,
    stored_dtype,
)

RELEASE_MODULES_JSON = "hyper_lora_modules.json"
RELEASE_WEIGHTS = ("hyper_lora_modules.safetensors", "resampler.safetensors", "id_projector.safetensors")
RELEASE_BASE_RESAMPLER = "base_resampler.safetensors"  # our extension: only for release-layout Base branches
RELEASE_FILES = (RELEASE_MODULES_JSON, *RELEASE_WEIGHTS, RELEASE_BASE_RESAMPLER)

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
        raise CheckpointFormatError(
            f"{RELEASE_MODULES_JSON} lists no modules; the file is damaged or incomplete: download or write the "
            "release folder again."
        )
    return targets


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
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise InvalidArgumentError(f"`{name}` must be a positive integer, got {value!r}.", argument=name)
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

    Only what is needed to read the numbers is checked here; `read_release` then checks every tensor's shape
    against the architecture, which catches files that do not belong together.

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
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE}: 'latents' must be [1, queries, width], got {latents}; the file is damaged or not a "
            "HyperLoRA resampler: download or write the release folder again."
        )
    _, num_queries, dim = latents
    layer_ids = {int(m.group(1)) for k in resampler_shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    depth = len(layer_ids)
    if depth == 0 or layer_ids != set(range(depth)):
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE}: expected layers 0..n-1, found layers {sorted(layer_ids)}; the file is damaged or "
            "not a HyperLoRA resampler: download or write the release folder again."
        )
    ff_inner = _shape(resampler_shapes, "layers.0.ff.net.0.proj.weight", RESAMPLER_FILE)[0]
    inner = _shape(resampler_shapes, "layers.0.attn1.to_q.weight", RESAMPLER_FILE)[0]
    use_id = "proj_in.weight" in resampler_shapes
    use_image = "proj_in_2.weight" in resampler_shapes
    if not (use_id or use_image):
        raise CheckpointFormatError(
            f"{RESAMPLER_FILE} has neither 'proj_in.weight' (ArcFace condition) nor 'proj_in_2.weight' (CLIP "
            "condition); a HyperLoRA resampler reads at least one. Download or write the release folder again."
        )
    image_embed_dim = resampler_shapes["proj_in.weight" if use_id else "proj_in_2.weight"][1]
    heads, dim_head = resolve_heads(inner, heads, dim_head)

    num_id_tokens, id_embed_dim = 16, 512
    if use_id:
        if projector_shapes is None:
            raise CheckpointFormatError(
                f"The resampler reads ArcFace tokens (it has proj_in) but there is no {PROJECTOR_FILE}: put the "
                "release's id_projector.safetensors in the folder (download it again)."
            )
        rows, id_embed_dim = _shape(projector_shapes, "0.weight", PROJECTOR_FILE)
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


_MODULE_FILES = {
    "id_projector.": PROJECTOR_FILE, "resampler.": RESAMPLER_FILE, "base_resampler.": RELEASE_BASE_RESAMPLER,
}  # fmt: skip


def release_sources(config: HyperLoRAConfig, files: Mapping[str, str]) -> Sources:
    """Predictor state-dict key -> (path of the release file, its release key, or the release keys stacked into it).

    A resampler / projector tensor comes from one release tensor of the same name; a bank group
    (`id_bank.down.{g}` `[G, K, in, r]`) is stacked from the G release tensors of its linears.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config
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
        for g, group in enumerate(group_linears(linears)):
            for part in ("down", "up"):
                names = [f"{i // PER_MODULE}.{linears[i].release_name}.{branch}_{part}_basis" for i in group.members]
                sources[f"{branch}_bank.{part}.{g}"] = (files.get(BANK_FILE, BANK_FILE), names)
    return sources


def read_release(location: Location, heads: int | None = None, dim_head: int | None = None) -> Checkpoint:
    """Find a release-layout checkpoint, read its config off the tensor shapes and check every tensor against it.

    `id_projector.safetensors` is needed only when the resampler reads ArcFace tokens, `base_resampler.safetensors`
    only when the bank has a Base branch; other files of the folder are not read.
    """
    folder = location.folder(RELEASE_FILES, what="the release files")
    location.require(folder, RELEASE_MODULES_JSON, BANK_FILE, RESAMPLER_FILE)
    shapes = {name: read_safetensors_shapes(folder / name) for name in RELEASE_WEIGHTS if (folder / name).is_file()}
    modules = _read_modules_json(folder / RELEASE_MODULES_JSON, location)
    projector = shapes.get(PROJECTOR_FILE)
    config = config_from_release(modules, shapes[BANK_FILE], shapes[RESAMPLER_FILE], projector, heads, dim_head)
    if config.has_base:
        location.require(folder, RELEASE_BASE_RESAMPLER)
        shapes[RELEASE_BASE_RESAMPLER] = read_safetensors_shapes(folder / RELEASE_BASE_RESAMPLER)
    used = [BANK_FILE, RESAMPLER_FILE] + [PROJECTOR_FILE] * config.use_id_embeds
    files = {name: str(folder / name) for name in used + [RELEASE_BASE_RESAMPLER] * config.has_base}
    sources = release_sources(config, files)
    expected = _expected_shapes(config, sources)
    for name, path in files.items():
        where = f"{name} of {location.description}"
        check_shapes(expected.get(path, {}), shapes[name], where, against="the architecture read off the files")
    return Checkpoint(config, sources, stored_dtype(files[BANK_FILE]))


def _read_modules_json(path: Path, location: Location) -> Mapping:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointFormatError(
            f"{RELEASE_MODULES_JSON} of {location.description} is not valid JSON ({error}); re-download it."
        ) from error


def _expected_shapes(config: HyperLoRAConfig, sources: Sources) -> dict[str, dict[str, list[int]]]:
    """`{file path: {release key: shape}}` that the architecture implies."""
    shapes = meta_shapes(config)
    expected: dict[str, dict[str, list[int]]] = {}
    for key, (path, names) in sources.items():
        for name in [names] if isinstance(names, str) else names:
            expected.setdefault(path, {})[name] = shapes[key] if isinstance(names, str) else shapes[key][1:]
    return expected


def save_release_checkpoint(
    predictor: HyperLoRAPredictor, folder: str | os.PathLike, dtype: torch.dtype | str | None = None
) -> Path:
    """Write `predictor` in the public release's folder layout (what the ComfyUI plugin reads).

    Files: `hyper_lora_modules.json` (entries in the config's target order), `hyper_lora_modules.safetensors`,
    `resampler.safetensors`, `id_projector.safetensors` (only with the ArcFace condition) and, for checkpoints
    with a Base branch (not in the public release), `base_resampler.safetensors`. The files are written as one
    set: if writing fails midway, those already in `folder` are left as they were. The resampler's heads /
    dim_head are not stored by this layout: loading needs them again unless they are the release's 12 x 64.

    Args:
        predictor: a `HyperLoRAPredictor`.
        folder: the output folder (created; files of the same names are replaced). A folder holding a
            library-format checkpoint (`config.json`) is refused: that one would be loaded instead.
        dtype: dtype of the files, a torch dtype or a name (`"fp16"`, `"bf16"`, `"fp32"`; default: the
            predictor's). The release uses float16.

    Returns:
        The folder.

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save_release_checkpoint(tiny_hyperlora_predictor(), tmp, dtype=torch.float16)
        ...     sorted(p.name for p in folder.iterdir())[:2]
        ['hyper_lora_modules.json', 'hyper_lora_modules.safetensors']
    """
    dtype = parse_dtype(dtype)
    _refuse_library_checkpoint(Path(folder))
    config = predictor.config
    state = predictor.state_dict()
    per_file: dict[str, dict[str, torch.Tensor]] = {}  # file -> {release key: tensor (a view of the state)}
    for key, (file, names) in release_sources(config, {}).items():
        stored = {names: state[key]} if isinstance(names, str) else dict(zip(names, state[key]))
        per_file.setdefault(file, {}).update(stored)

    def writer(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
        def write(path: Path) -> None:  # cast when the file is written: one file's copy in memory at a time
            cast = {name: t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in tensors.items()}
            save_file(cast, path, metadata={"format": "pt"})

        return write

    modules = {
        t.name: {"hidden_size": t.hidden_size, "cross_attention_dim": t.cross_attention_dim} for t in config.targets
    }
    text = json.dumps(modules, indent=2)
    writers = {RELEASE_MODULES_JSON: lambda path: path.write_text(text, encoding="utf-8")}
    writers.update({file: writer(tensors) for file, tensors in per_file.items()})
    folder = atomic_write_files(folder, writers)
    for file in set(RELEASE_WEIGHTS + (RELEASE_BASE_RESAMPLER,)) - set(writers):
        (folder / file).unlink(missing_ok=True)  # e.g. an id_projector.safetensors of an earlier checkpoint
    return folder


def _refuse_library_checkpoint(folder: Path) -> None:
    """A library-format `config.json` is read before the release layout: writing the release next to it would
    report success while loading the folder gives the old checkpoint."""
    if read_config_json(folder / CONFIG_NAME) is not None:
        raise InvalidArgumentError(
            f"{str(folder)!r} holds a HyperLoRA checkpoint in the library format ({CONFIG_NAME}), which would be "
            "loaded instead of the release-layout files written there. Write the release layout to another folder, "
            f"or delete {CONFIG_NAME} and the model*.safetensors files first.",
            argument="folder",
        )
