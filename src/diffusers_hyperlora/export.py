"""Predicted LoRAs as standard LoRA state dicts and files (pure functions; no model is touched)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from .config import HyperLoRAConfig

LORA_FORMATS = ("kohya", "diffusers")


def export_lora_state_dict(
    config: HyperLoRAConfig,
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    format: str = "kohya",
    branch: str = "id",
) -> dict[str, torch.Tensor]:
    """Lay out per-linear `(down [r, in], up [out, r])` factors as a LoRA state dict.

    - `kohya`: `{json_key}_{to_q|to_k|to_v|to_out_0}.lora_down.weight`, `.lora_up.weight`, `.alpha`, exactly
      what the reference generator emits; read by ComfyUI, A1111/Forge and diffusers.
    - `diffusers`: `unet.{module_path}.lora_A.weight` / `.lora_B.weight` (PEFT names), with the LoRA scale
      `alpha / r` folded into `lora_B`, so a loader that assumes `alpha = r` gives the same update.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {LORA_FORMATS}, got {format!r}.")
    linears = config.linears
    if len(weights) != len(linears):
        raise ValueError(f"Expected LoRA weights for {len(linears)} linears, got {len(weights)}.")
    rank, alpha = config.rank(branch), config.alpha(branch)
    state_dict: dict[str, torch.Tensor] = {}
    for linear, (down, up) in zip(linears, weights):
        down = down.detach().float().contiguous().cpu()
        up = up.detach().float().contiguous().cpu()
        if format == "kohya":
            state_dict[f"{linear.kohya_name}.lora_down.weight"] = down
            state_dict[f"{linear.kohya_name}.lora_up.weight"] = up
            state_dict[f"{linear.kohya_name}.alpha"] = torch.tensor(float(alpha))
        else:
            state_dict[f"unet.{linear.module_path}.lora_A.weight"] = down
            state_dict[f"unet.{linear.module_path}.lora_B.weight"] = (up * (alpha / rank)).contiguous()
    return state_dict


def save_lora_file(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    config: HyperLoRAConfig,
    format: str = "kohya",
    branch: str = "id",
) -> None:
    """Write a LoRA state dict to a `.safetensors` file with descriptive metadata."""
    metadata = {
        "format": "pt",
        "hyperlora_format": format,
        "hyperlora_branch": branch,
        "hyperlora_checkpoint": config.architecture_hash(),
        "ss_network_dim": str(config.rank(branch)),
        "ss_network_alpha": str(config.alpha(branch)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "trigger_words": config.trigger_words,
        "recommended_scale": json.dumps(config.default_id_weight if branch == "id" else config.default_base_weight),
    }
    save_file(state_dict, os.fspath(path), metadata=metadata)
