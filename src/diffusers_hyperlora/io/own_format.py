"""The library's own checkpoint format: `config.json` (a `HyperLoRAConfig`) + `model.safetensors`.

Written by `HyperLoRAPredictor.save_pretrained` / `push_to_hub` (huggingface_hub's `PyTorchModelHubMixin`).
Loading builds the model without allocating random weights and never falls back to pickle files.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ..config import HyperLoRAConfig
from ..errors import CheckpointFormatError
from .hub import OWN_CONFIG, OWN_WEIGHTS, CheckpointLocation


def build_predictor_from_state_dict(cls, config: HyperLoRAConfig, state_dict: dict, device, torch_dtype):
    """Instantiate `cls(config)` with no storage, then adopt `state_dict`'s tensors (strict keys and shapes)."""
    predictor = cls(config, device="meta")
    expected = predictor.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            details.append(f"{k} has shape {list(state_dict[k].shape)}, config expects {list(expected[k].shape)}")
        raise CheckpointFormatError("Weights do not match the config: " + "; ".join(details) + ".")
    state_dict = {k: v.to(device=device, dtype=torch_dtype or v.dtype) for k, v in state_dict.items()}
    predictor.load_state_dict(state_dict, strict=True, assign=True)
    return predictor.eval()


def load_own_format_weights(cls, model_id: str, config, *, subfolder=None, device="cpu", torch_dtype=None, **hub):
    """`PyTorchModelHubMixin._from_pretrained` body: the config is already read by the mixin."""
    location = CheckpointLocation(model_id, subfolder=subfolder, **hub)
    if isinstance(config, dict):
        config = HyperLoRAConfig.from_dict(config)
    weights = location.require_file(OWN_WEIGHTS)
    return build_predictor_from_state_dict(cls, config, load_file(weights), device, torch_dtype)


def load_own_format(location: CheckpointLocation, torch_dtype: torch.dtype | None = None, device="cpu"):
    """Load a predictor in the library's format from `location`."""
    from ..predictor import HyperLoRAPredictor

    with open(location.require_file(OWN_CONFIG), encoding="utf-8") as f:
        raw = json.load(f)
    config = HyperLoRAConfig.from_dict(raw.get("config", raw))
    weights = location.require_file(OWN_WEIGHTS)
    return build_predictor_from_state_dict(HyperLoRAPredictor, config, load_file(weights), device, torch_dtype)
