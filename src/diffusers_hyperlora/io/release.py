"""The public release's folder layout (spec section 3), loaded unchanged.

Every architecture number is read off tensor shapes; only the resampler's heads / dim_head are not
recoverable and default to the release's 12 x 64. The JSON's entry order decides which resampler tokens
feed which layer. Conversion functions here are pure (names and shapes in, config or keys out); the loader
streams the bank tensor by tensor into the predictor's stacked layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open

from ..config import HyperLoRAConfig
from ..errors import CheckpointFormatError
from ..targets import TargetModule
from .hub import RELEASE_BASE_RESAMPLER, RELEASE_MODULES_JSON, RELEASE_WEIGHTS, CheckpointLocation

RELEASE_HEADS = 12
RELEASE_DIM_HEAD = 64
RELEASE_LICENSE = "cc-by-nc-4.0"

Shapes = Mapping[str, Sequence[int]]


def targets_from_modules_json(modules: Mapping[str, Mapping]) -> list[TargetModule]:
    """The ordered `TargetModule` list from the parsed `hyper_lora_modules.json`."""
    targets = []
    for name, entry in modules.items():
        if not isinstance(entry, Mapping) or "hidden_size" not in entry:
            raise CheckpointFormatError(
                f"{RELEASE_MODULES_JSON}: entry {name!r} must be an object with 'hidden_size' and "
                f"'cross_attention_dim', got {entry!r}."
            )
        targets.append(TargetModule(name, int(entry["hidden_size"]), entry.get("cross_attention_dim")))
    if not targets:
        raise CheckpointFormatError(f"{RELEASE_MODULES_JSON} lists no modules.")
    return targets


def _shape(shapes: Shapes, key: str, file: str) -> list[int]:
    if key not in shapes:
        raise CheckpointFormatError(f"{file} has no tensor {key!r}; is this a HyperLoRA release folder?")
    return list(shapes[key])


def config_from_release(
    modules: Mapping[str, Mapping],
    bank_shapes: Shapes,
    resampler_shapes: Shapes,
    projector_shapes: Shapes,
    heads: int | None = None,
    dim_head: int | None = None,
) -> HyperLoRAConfig:
    """Read every architecture number of a release checkpoint off its tensor shapes.

    `heads` / `dim_head` default to the release's 12 x 64; give one and the other follows from the width.
    """
    targets = targets_from_modules_json(modules)
    num_basis, _, id_rank = _shape(bank_shapes, "0.to_q.id_down_basis", RELEASE_WEIGHTS[0])
    base_rank = bank_shapes["0.to_q.base_down_basis"][2] if "0.to_q.base_down_basis" in bank_shapes else 0

    _, num_queries, dim = _shape(resampler_shapes, "latents", RELEASE_WEIGHTS[1])
    depth = len({m.group(1) for k in resampler_shapes if (m := re.match(r"layers\.(\d+)\.", k))})
    ff_inner = _shape(resampler_shapes, "layers.0.ff.net.0.proj.weight", RELEASE_WEIGHTS[1])[0]
    inner = _shape(resampler_shapes, "layers.0.attn1.to_q.weight", RELEASE_WEIGHTS[1])[0]
    proj_out_basis = _shape(resampler_shapes, "proj_out.weight", RELEASE_WEIGHTS[1])[0]
    use_id = "proj_in.weight" in resampler_shapes
    use_image = "proj_in_2.weight" in resampler_shapes
    widths = {resampler_shapes[k][1] for k in ("proj_in.weight", "proj_in_2.weight") if k in resampler_shapes}
    if len(widths) != 1:
        raise CheckpointFormatError(
            f"{RELEASE_WEIGHTS[1]}: expected proj_in / proj_in_2 reading one input width, got {sorted(widths)}."
        )
    (image_embed_dim,) = widths

    if heads is None and dim_head is None:
        heads, dim_head = RELEASE_HEADS, RELEASE_DIM_HEAD
    elif heads is None:
        heads = inner // dim_head
    elif dim_head is None:
        dim_head = inner // heads
    if heads * dim_head != inner:
        raise CheckpointFormatError(
            f"The resampler's attention is {inner} wide, which is not heads x dim_head = {heads} x {dim_head}. "
            "Pass the checkpoint's `heads=` and `dim_head=` to load_hyperlora()."
        )
    if proj_out_basis != num_basis:
        raise CheckpointFormatError(
            f"resampler proj_out gives {proj_out_basis} coefficients but the bank has {num_basis} bases."
        )

    num_id_tokens, id_embed_dim = 0, 512
    if use_id:
        rows, id_embed_dim = _shape(projector_shapes, "0.weight", RELEASE_WEIGHTS[2])
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
        num_id_tokens=num_id_tokens or 16,
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
            f"({config.tokens_per_module} tokens each = {config.num_tokens}). The JSON and weights do not belong together."
        )
    _check_bank_shapes(config, bank_shapes)
    return config


def _check_bank_shapes(config: HyperLoRAConfig, bank_shapes: Shapes) -> None:
    branches = [("id", config.id_rank)] + ([("base", config.base_rank)] if config.has_base else [])
    for index, target in enumerate(config.targets):
        for linear in target.linears():
            for branch, rank in branches:
                for key, expected in release_bank_keys(index, linear, branch, config.num_basis, rank):
                    got = list(_shape(bank_shapes, key, RELEASE_WEIGHTS[0]))
                    if got != expected:
                        raise CheckpointFormatError(
                            f"{RELEASE_WEIGHTS[0]}: {key} has shape {got}, but {RELEASE_MODULES_JSON} entry "
                            f"{target.name!r} implies {expected}."
                        )


def release_bank_keys(index: int, linear, branch: str, num_basis: int, rank: int) -> list[tuple[str, list[int]]]:
    """`[(down key, down shape), (up key, up shape)]` of one linear in `hyper_lora_modules.safetensors`."""
    prefix = f"{index}.{linear.release_name}.{branch}"
    return [
        (f"{prefix}_down_basis", [num_basis, linear.in_features, rank]),
        (f"{prefix}_up_basis", [num_basis, rank, linear.out_features]),
    ]


def _read_shapes(path: str) -> dict[str, list[int]]:
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_slice(key).get_shape() for key in handle.keys()}


def _default_dtype(path: str) -> torch.dtype:
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor("0.to_q.id_down_basis").dtype


def read_release_config(location: CheckpointLocation, heads: int | None = None, dim_head: int | None = None):
    """Resolve (download if needed) the release's files and read its config. Returns `(config, files)`."""
    files = {name: location.require_file(name) for name in (RELEASE_MODULES_JSON, *RELEASE_WEIGHTS)}
    with open(files[RELEASE_MODULES_JSON], encoding="utf-8") as f:
        try:
            modules = json.load(f)
        except json.JSONDecodeError as error:
            raise CheckpointFormatError(f"{RELEASE_MODULES_JSON} of {location.description} is not JSON: {error}")
    shapes = [_read_shapes(files[name]) for name in RELEASE_WEIGHTS]
    config = config_from_release(modules, *shapes, heads=heads, dim_head=dim_head)
    if config.has_base:
        files[RELEASE_BASE_RESAMPLER] = location.require_file(RELEASE_BASE_RESAMPLER)
    return config, files


def iter_release_tensors(config: HyperLoRAConfig, files: Mapping[str, str], dtype: torch.dtype | None = None):
    """Yield `(predictor key, tensor)` one at a time, the bank already stacked per shape group.

    Peak memory is one stacked group plus one release tensor, never the whole bank twice.
    """
    from ..bank import group_linears

    with safe_open(files[RELEASE_WEIGHTS[2]], framework="pt") as handle:
        if config.use_id_embeds:
            for key in handle.keys():
                yield f"id_projector.{key}", _cast(handle.get_tensor(key), dtype)
    for file, prefix in ((RELEASE_WEIGHTS[1], "resampler"), (RELEASE_BASE_RESAMPLER, "base_resampler")):
        if file not in files:
            continue
        with safe_open(files[file], framework="pt") as handle:
            for key in handle.keys():
                yield f"{prefix}.{key}", _cast(handle.get_tensor(key), dtype)

    linears = config.linears
    per_module = len(linears) // len(config.targets)
    branches = [("id", config.id_rank)] + ([("base", config.base_rank)] if config.has_base else [])
    with safe_open(files[RELEASE_WEIGHTS[0]], framework="pt") as handle:
        for branch, rank in branches:
            for g, group in enumerate(group_linears(linears)):
                for side in (0, 1):
                    stacked = None
                    for position, index in enumerate(group.members):
                        key, _ = release_bank_keys(index // per_module, linears[index], branch, config.num_basis, rank)[
                            side
                        ]
                        tensor = _cast(handle.get_tensor(key), dtype)
                        if stacked is None:
                            stacked = torch.empty((len(group.members), *tensor.shape), dtype=tensor.dtype)
                        stacked[position] = tensor
                    yield f"{branch}_bank.{'down' if side == 0 else 'up'}.{g}", stacked


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def load_release(
    location: CheckpointLocation,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    heads: int | None = None,
    dim_head: int | None = None,
):
    """Load a release-layout folder (local or Hub) into a `HyperLoRAPredictor`."""
    from ..predictor import HyperLoRAPredictor

    config, files = read_release_config(location, heads=heads, dim_head=dim_head)
    dtype = torch_dtype or _default_dtype(files[RELEASE_WEIGHTS[0]])
    predictor = HyperLoRAPredictor(config, device="meta")
    expected = predictor.state_dict()
    loaded = {}
    for key, tensor in iter_release_tensors(config, files, dtype):
        if key not in expected:
            raise CheckpointFormatError(f"Unexpected tensor {key!r} in {location.description}.")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointFormatError(
                f"{key} has shape {list(tensor.shape)} in {location.description}, expected {list(expected[key].shape)}."
            )
        loaded[key] = tensor.to(device)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointFormatError(f"{location.description} lacks tensors {missing[:5]}.")
    predictor.load_state_dict(loaded, strict=True, assign=True)
    return predictor.eval()
