"""Predicted LoRAs (identities and sliders) as standard LoRA state dicts and `.safetensors` files.

`export_lora` is the one entry: a predictor and an identity or slider in, a state dict (and a file) out. Below it
everything is pure layout: factors in, tensors and metadata out; no model is touched.

Two layouts:

- `kohya`: `{json_key}_{to_q|to_k|to_v|to_out_0}.lora_down.weight` `[r, in]`, `.lora_up.weight` `[out, r]` and
  `.alpha` (a scalar), exactly the reference generator's dict. ComfyUI, A1111/Forge and diffusers'
  `load_lora_weights` read it; the alpha travels in the tensors.
- `diffusers`: `{unet|transformer}.{module_path}.lora_A.weight` / `.lora_B.weight` (PEFT names, what
  `pipe.save_lora_weights` writes; the prefix is the checkpoint's `config.denoiser`) plus the adapter config
  (`r`, `lora_alpha`, `target_modules`) under the safetensors metadata key `lora_adapter_metadata`, which
  diffusers (>= 0.35) reads back. The real alpha is stored, nothing is folded into
  the weights, so the factors are the live adapter's factors. The only layout for transformer denoisers
  (SD3, FLUX), whose LoRAs have no kohya naming that every tool agrees on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from ..adapters.sliders import DEFAULT_SLIDER_WEIGHT, HyperLoRASlider, slider_alpha
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from ..identities.identity import HyperLoRAIdentity
from ..model.config import HyperLoRAConfig
from ..model.predictor import HyperLoRAPredictor
from ..model.targets import TargetLinear
from ..utils.atomic_files import atomic_path
from ..utils.checks import parse_dtype

LORA_FORMATS = ("kohya", "diffusers")
DIFFUSERS_PREFIX = "unet"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SDXL_BASE_VERSION = "sdxl_base_v1-0"
SD1_BASE_VERSION = "sd_v1"

LoraFactors = Sequence[tuple[torch.Tensor, torch.Tensor]]


def export_lora(
    predictor: HyperLoRAPredictor,
    identity: HyperLoRAIdentity | HyperLoRASlider,
    path: str | os.PathLike | None = None,
    format: str | None = None,
    branch: str = "id",
    dtype: torch.dtype | str = torch.float32,
) -> dict[str, torch.Tensor]:
    """An identity's (or slider's) LoRA from `predictor` as a standard state dict, and a `.safetensors` file when
    `path` is given (written atomically: a failed write leaves `path` as it was).

    Args:
        predictor: the checkpoint the identity was predicted with.
        identity: a `HyperLoRAIdentity`, or a `HyperLoRASlider` (exported at rank 2r, ID branch only).
        path: where to write the file (optional).
        format: `"kohya"` gives the reference generator's keys (`{json_key}_to_q.lora_down.weight`, ...,
            `.alpha`), read by ComfyUI, A1111, Forge, kohya sd-scripts and diffusers; `"diffusers"` the layout
            `pipe.load_lora_weights` reads natively, with alpha in the file's adapter metadata: diffusers only,
            use kohya for every other tool. Default (`None`): `"kohya"` for UNet checkpoints, `"diffusers"` for
            transformer ones (SD3, FLUX), which have no kohya layout.
        branch: `"id"` or `"base"` (checkpoints with a Base branch).
        dtype: dtype of the stored tensors, a torch dtype or a name (`torch.float16` or `"fp16"` halves the file).

    Example:
        >>> import torch
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> predictor = tiny_hyperlora_predictor()
        >>> identity = predictor.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
        >>> state_dict = export_lora(predictor, identity, format="kohya", dtype="fp16")
        >>> next(iter(state_dict)).endswith("_to_q.lora_down.weight"), next(iter(state_dict.values())).dtype
        (True, torch.float16)
    """
    config = predictor.config
    format = check_format_for(config, format)
    dtype = check_dtype(dtype)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentTypeError(
            f"export_lora() writes to `path`, a file name (str or Path) like 'me.safetensors', got a "
            f"{type(path).__name__} {path!r}; leave it out for the state dict alone.",
            argument="path",
        )
    if branch == "base" and not config.has_base:
        raise InvalidArgumentError(
            "This checkpoint has no Base branch (the public release distilled it into the ID LoRA): export "
            "branch='id'.",
            argument="branch",
        )
    if isinstance(identity, HyperLoRASlider):
        if branch != "id":
            raise InvalidArgumentError(
                f"Sliders are built from the ID branch; export them with branch='id', not {branch!r}.",
                argument="branch",
            )
        weights, alpha = identity.lora_weights(predictor), slider_alpha(config)
        kind, scale = "slider", DEFAULT_SLIDER_WEIGHT
    elif isinstance(identity, HyperLoRAIdentity):
        weights, alpha = predictor.lora_weights(identity, branch), config.alpha(branch)
        kind, scale = "identity", None
    else:
        raise InvalidArgumentTypeError(
            f"export_lora() takes a HyperLoRAIdentity or a HyperLoRASlider, got {type(identity).__name__}. "
            "Predict one with `pipe.predict_hyperlora_identity(images)` or load it with `HyperLoRAIdentity.load`.",
            argument="identity",
        )
    state_dict = export_lora_state_dict(config, weights, format, branch, alpha=alpha, dtype=dtype)
    if path is not None:
        save_lora_file(state_dict, path, config, format, branch, alpha=alpha, kind=kind, recommended_scale=scale)
    return state_dict


def check_format(format: str) -> str:
    """Return `format` if it is a known LoRA layout, else raise `InvalidArgumentError` naming the choices."""
    if format not in LORA_FORMATS:
        raise InvalidArgumentError(
            f"Unknown LoRA format {format!r}: use 'kohya' (ComfyUI, A1111, Forge, kohya sd-scripts, diffusers) or "
            "'diffusers' (diffusers only).",
            argument="format",
        )
    return format


def check_format_for(config: HyperLoRAConfig, format: str | None) -> str:
    """The LoRA layout to write for `config`'s checkpoint: `format`, or its denoiser's first (`kohya` for UNets,
    `diffusers` for transformers) when `None`; `InvalidArgumentError` for a layout its denoiser has no names in."""
    if format is None:
        return config.lora_formats[0]
    check_format(format)
    if format not in config.lora_formats:
        raise InvalidArgumentError(
            f"LoRA format {format!r} has no names for a {config.denoiser} denoiser (this checkpoint targets the "
            f"pipeline's `{config.denoiser}`): use format={config.lora_formats[0]!r}, which "
            "`pipe.load_lora_weights` reads.",
            argument="format",
        )
    return format


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The floating-point dtype a LoRA file stores, from a torch dtype or a name (`"fp16"`); else a clear error."""
    if dtype is None:
        raise InvalidArgumentTypeError(
            "The LoRA dtype must be given, e.g. dtype=torch.float16 or dtype='fp16'.", argument="dtype"
        )
    return parse_dtype(dtype)


def lora_state_dict(
    linears: Sequence[TargetLinear],
    weights: LoraFactors,
    alpha: float,
    format: str = "kohya",
    dtype: torch.dtype = torch.float32,
    prefix: str = DIFFUSERS_PREFIX,
) -> dict[str, torch.Tensor]:
    """Lay out per-linear `(down [r, in], up [out, r])` factors as a LoRA state dict.

    The update of each linear a loader applies at weight `w` is `w * (alpha / r) * up @ down`. `prefix` is the
    denoiser's component name in the `diffusers` layout (`unet`, `transformer`).

    Example:
        >>> from diffusers_hyperlora.model.targets import TargetModule
        >>> linears = TargetModule("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1", 4).linears()
        >>> factors = [(torch.zeros(2, 4), torch.zeros(4, 2))] * 4
        >>> [key.split("attn1_")[1] for key in lora_state_dict(linears, factors, alpha=1.0)][:3]
        ['to_q.lora_down.weight', 'to_q.lora_up.weight', 'to_q.alpha']
    """
    check_format(format)
    dtype = check_dtype(dtype)
    if len(weights) != len(linears):
        raise InvalidArgumentError(
            f"Expected LoRA factors for {len(linears)} linears, got {len(weights)}.", argument="weights"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for linear, (down, up) in zip(linears, weights):
        _check_factors(linear, down, up)
        down = down.detach().to(device="cpu", dtype=dtype).contiguous()
        up = up.detach().to(device="cpu", dtype=dtype).contiguous()
        if format == "kohya":
            state_dict[f"{linear.kohya_name}.lora_down.weight"] = down
            state_dict[f"{linear.kohya_name}.lora_up.weight"] = up
            state_dict[f"{linear.kohya_name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        else:
            state_dict[f"{prefix}.{linear.module_path}.lora_A.weight"] = down
            state_dict[f"{prefix}.{linear.module_path}.lora_B.weight"] = up
    return state_dict


def _check_factors(linear: TargetLinear, down: torch.Tensor, up: torch.Tensor) -> None:
    rank = down.shape[0]
    if tuple(down.shape) != (rank, linear.in_features) or tuple(up.shape) != (linear.out_features, rank):
        raise InvalidArgumentError(
            f"LoRA factors of {linear.module_path} must be down [r, {linear.in_features}] and up "
            f"[{linear.out_features}, r], got {list(down.shape)} and {list(up.shape)}.",
            argument="weights",
        )


def export_lora_state_dict(
    config: HyperLoRAConfig,
    weights: LoraFactors,
    format: str | None = None,
    branch: str = "id",
    *,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """`lora_state_dict` for a checkpoint's target linears; `alpha` defaults to the branch's (`r / 2`), `format` to
    the denoiser's first layout (`check_format_for`)."""
    format = check_format_for(config, format)
    alpha = config.alpha(branch) if alpha is None else alpha
    return lora_state_dict(config.linears, weights, alpha, format, dtype, prefix=config.denoiser)


def diffusers_adapter_metadata(
    linears: Sequence[TargetLinear], rank: int, alpha: float, prefix: str = DIFFUSERS_PREFIX
) -> dict[str, object]:
    """The `LoraConfig` fields diffusers rebuilds the adapter from, keyed `{prefix}.{field}` as diffusers packs them.

    >>> from diffusers_hyperlora.model.targets import TargetModule
    >>> linears = TargetModule("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1", 4).linears()[:1]
    >>> metadata = diffusers_adapter_metadata(linears, rank=8, alpha=4.0)
    >>> metadata["unet.r"], metadata["unet.lora_alpha"], metadata["unet.target_modules"]
    (8, 4.0, ['mid_block.attentions.0.transformer_blocks.0.attn1.to_q'])
    """
    return {
        f"{prefix}.r": int(rank),
        f"{prefix}.lora_alpha": float(alpha),
        f"{prefix}.target_modules": [linear.module_path for linear in linears],
        # diffusers 0.35 reads these two unconditionally (KeyError without them); empty: one rank, one alpha
        f"{prefix}.rank_pattern": {},
        f"{prefix}.alpha_pattern": {},
    }


def lora_file_metadata(
    config: HyperLoRAConfig,
    format: str,
    rank: int,
    alpha: float,
    *,
    kind: str = "identity",
    branch: str = "id",
    recommended_scale: float | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Safetensors metadata of an exported LoRA: what it is, its rank/alpha (kohya `ss_*` keys), trigger words.

    For the `diffusers` format it also holds `lora_adapter_metadata`, so `load_lora_weights` restores alpha.
    """
    format = check_format_for(config, format)
    if recommended_scale is None:
        recommended_scale = config.default_id_weight if branch == "id" else config.default_base_weight
    metadata = {
        "format": "pt",
        "hyperlora_format": format,
        "hyperlora_kind": kind,
        "hyperlora_branch": branch,
        "hyperlora_checkpoint": config.architecture_hash(),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": json.dumps(float(alpha)),
        "ss_base_model_version": base_model_version(config),
        "trigger_words": config.trigger_words,
        "recommended_scale": json.dumps(recommended_scale),
    }
    if config.license:
        metadata["license"] = config.license
    if format == "diffusers":
        adapter = diffusers_adapter_metadata(config.linears, rank, alpha, prefix=config.denoiser)
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter, indent=2, sort_keys=True)
    metadata.update(extra or {})
    return metadata


def base_model_version(config: HyperLoRAConfig) -> str:
    """kohya's `ss_base_model_version` for the checkpoint's base model: SDXL, SD 1.x, else the model's name."""
    name = config.base_model.lower()
    if "xl" in name:
        return SDXL_BASE_VERSION
    if "v1-5" in name or "v1-4" in name or "stable-diffusion-v1" in name:
        return SD1_BASE_VERSION
    return config.base_model


def lora_rank(state_dict: dict[str, torch.Tensor]) -> int:
    """The rank of a state dict written by `lora_state_dict` (rows of its first down / `lora_A` matrix)."""
    for key, tensor in state_dict.items():
        if key.endswith((".lora_down.weight", ".lora_A.weight")):
            return int(tensor.shape[0])
    raise InvalidArgumentError(
        "The state dict has no `.lora_down.weight` / `.lora_A.weight` tensor: it is not a LoRA.", argument="state_dict"
    )


def save_lora_file(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    config: HyperLoRAConfig,
    format: str | None = None,
    branch: str = "id",
    *,
    alpha: float | None = None,
    kind: str = "identity",
    recommended_scale: float | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write a LoRA state dict made by `lora_state_dict` to a `.safetensors` file with descriptive metadata.

    Example:
        >>> state_dict = export_lora(predictor, identity, format="kohya")  # doctest: +SKIP
        >>> save_lora_file(state_dict, "me.safetensors", pipe.hyperlora.config)  # doctest: +SKIP
    """
    alpha = config.alpha(branch) if alpha is None else alpha
    metadata = lora_file_metadata(
        config,
        format,
        lora_rank(state_dict),
        alpha,
        kind=kind,
        branch=branch,
        recommended_scale=recommended_scale,
        extra=extra_metadata,
    )
    with atomic_path(path) as temporary:
        save_file(state_dict, os.fspath(temporary), metadata=metadata)
