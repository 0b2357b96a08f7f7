"""Every internal of diffusers, PEFT, accelerate, torch and insightface that HyperLoRA relies on, in one place.

Each function below reaches something with no public equivalent (a private attribute, a private function, a
behaviour no API promises). Keeping them here means an upgrade of one of those libraries breaks this file only;
`tests/test_compat.py` checks every one of them against the installed versions and names the library and its
version when one changed. Callers elsewhere in the package use these names, never the internals themselves.

Importing this module loads the standard library only (torch, PEFT and diffusers are imported by the functions that
use them): `pipeline/install.py` reads `LORA_LOADERS_MODULE` during `import diffusers_hyperlora`, which stays light.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn

# ---------------------------------------------------------------------------------------------- diffusers modules
# The module that defines diffusers' SD / SDXL LoRA loader mixins (exported by `diffusers.loaders`). Every such
# pipeline class imports it, so the pipeline methods are installed when it loads; the module path is diffusers'
# own layout (older releases named it `diffusers.loaders.lora`), not an API.
LORA_LOADERS_MODULE = "diffusers.loaders.lora_pipeline"

# ---------------------------------------------------------------------------------------------- state-dict layout
# PEFT stores a wrapped layer's own weights under `<path>.base_layer.<name>` and an adapter's factors under
# `<path>.lora_A.<adapter>.weight` / `<path>.lora_B.<adapter>.weight`; no PEFT API names these keys.
BASE_LAYER_KEY = ".base_layer."
ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def lora_parameter_name(module_path: str, factor: str, adapter_name: str) -> str:
    """`<module_path>.lora_A.<adapter>.weight` (factor `"A"`) or `...lora_B...` (`"B"`): PEFT's parameter names."""
    return f"{module_path}.lora_{factor}.{adapter_name}.weight"


# ---------------------------------------------------------------------------------------------- PEFT layers
def lora_factors(layer: BaseTunerLayer, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter] | None:
    """The `(lora_A.weight, lora_B.weight)` parameters of one adapter on a PEFT LoRA layer, `None` without it.

    PEFT keeps them in the `lora_A` / `lora_B` `ModuleDict`s of the layer; it has no getter for them.
    """
    if adapter_name not in layer.lora_A:
        return None
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


def layer_adapter_names(layer: BaseTunerLayer) -> set[str]:
    """The LoRA adapters a PEFT layer carries (the keys of its `lora_A` `ModuleDict`; no public getter)."""
    return set(layer.lora_A.keys())


def merged_adapter_names(layer: BaseTunerLayer) -> list[str]:
    """The adapters merged into the layer's base weight (PEFT's `merged_adapters` list; no public getter)."""
    return list(layer.merged_adapters)


def mark_unmerged(layer: BaseTunerLayer) -> None:
    """Tell PEFT that nothing is merged into the layer any more (after its base weight was restored by us)."""
    layer.merged_adapters.clear()


def adapter_runs_in_forward(layer: BaseTunerLayer, adapter_name: str) -> bool:
    """Whether PEFT's own forward of `layer` would add `adapter_name`'s LoRA (not disabled, not merged, active).

    Mirrors the checks inside `peft.tuners.lora.Linear.forward`, which exposes no predicate for them.
    """
    return not layer.disable_adapters and not layer.merged and adapter_name in layer.active_adapters


def adapter_scale(layer: BaseTunerLayer, adapter_name: str) -> float:
    """The scale PEFT multiplies `adapter_name`'s LoRA by on this layer (`lora_alpha / r * weight`, `scaling`)."""
    return layer.scaling[adapter_name]


def set_adapter_scale(layer: BaseTunerLayer, adapter_name: str, scale: float) -> None:
    """Put back a scale read with `adapter_scale`, bitwise (PEFT's `set_scale` takes a weight and recomputes it)."""
    layer.scaling[adapter_name] = scale


def peft_merge(layer: BaseTunerLayer, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """PEFT's own `merge` of the layer's class, bypassing a per-instance override (`override_merge`)."""
    type(layer).merge(
        layer, safe_merge=safe_merge, adapter_names=None if adapter_names is None else list(adapter_names)
    )


def peft_unmerge(layer: BaseTunerLayer) -> None:
    """PEFT's own `unmerge` of the layer's class (subtracts the deltas), bypassing a per-instance override."""
    type(layer).unmerge(layer)


def override_merge(layer: BaseTunerLayer, merge: Callable[..., None], unmerge: Callable[..., None]) -> None:
    """Make `layer.merge` / `layer.unmerge` call these functions (bound to the layer) instead of PEFT's.

    diffusers' `fuse_lora` / `unfuse_lora` call `module.merge(...)` / `module.unmerge()` on every PEFT layer; an
    instance attribute is the only hook point (no merge callback exists). `copy.deepcopy` rebinds bound methods.
    """
    layer.merge = types.MethodType(merge, layer)
    layer.unmerge = types.MethodType(unmerge, layer)


@contextmanager
def quiet_peft_adapter_warnings() -> Iterator[None]:
    """Silence PEFT's warnings about a model's second adapter and about deleting an active adapter.

    Several adapters on one model are HyperLoRA's design (ID, Base, sliders); PEFT has no option to turn these
    warnings off, so they are filtered by their text.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """The adapters registered on a diffusers model, by name (`peft_config`, set by `add_adapter`; `{}` if none)."""
    return dict(getattr(model, "peft_config", None) or {})


def remove_peft_wrappers(model: nn.Module) -> None:
    """Replace every (adapter-less) PEFT wrapper of a diffusers model by its base layer and forget the adapters.

    diffusers has no public "remove the empty PEFT wrappers" call; this is what its `unload_lora` does, including
    resetting the private `_hf_peft_config_loaded` flag so that a later `load_lora_weights` starts fresh.
    """
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        return

    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = None


# ---------------------------------------------------------------------------------------------- diffusers calls
def denoiser_call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(sample, encoder_hidden_states)` of one UNet forward call, from a forward pre-hook's `args` / `kwargs`.

    `UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)`: pipelines pass the conditioning
    by keyword, but the positional order (index 2) is diffusers' signature, not a documented contract.
    """
    import torch

    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    prompts = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    return sample, prompts if isinstance(prompts, torch.Tensor) else None


def calling_pipeline_guidance() -> bool | None:
    """Whether the diffusers pipeline whose `__call__` is running in this thread (the innermost one on the call
    stack) runs classifier-free guidance; `None` when no pipeline is calling (the denoiser called directly) or
    the pipeline has no `do_classifier_free_guidance`.

    A denoiser is shared by every pipeline made from the same components (`from_pipe`), so its forward cannot
    know which pipeline calls it, and diffusers passes no guidance flag to the denoiser: the calling frame is
    the only source. The pipeline's own `do_classifier_free_guidance` is set at the start of its `__call__`.
    """
    from diffusers import DiffusionPipeline

    frame = inspect.currentframe()
    try:
        while frame is not None:
            # Only `__call__` frames are looked into: reading `f_locals` snapshots a frame's locals.
            candidate = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
            if isinstance(candidate, DiffusionPipeline):
                try:
                    return bool(candidate.do_classifier_free_guidance)
                except AttributeError:
                    return None
            frame = frame.f_back
        return None
    finally:
        del frame


def execution_device(pipe: Any) -> torch.device | None:
    """Where the pipeline computes (accelerate offload hooks included): its `_execution_device`, no public name."""
    import torch

    device = getattr(pipe, "_execution_device", None)
    return None if device is None else torch.device(device)


def sequential_offload_device(pipe: Any) -> Any:
    """The device `enable_sequential_cpu_offload` was given (`_offload_device`; diffusers has no getter)."""
    return getattr(pipe, "_offload_device", None)


def has_accelerate_hook(module: nn.Module) -> bool:
    """Whether accelerate's offload hooks manage `module` (its private `_hf_hook`, set by `add_hook_to_module`)."""
    return getattr(module, "_hf_hook", None) is not None


def remove_accelerate_hooks(pipe: Any) -> None:
    """Remove accelerate's hooks from every model component of the pipeline (weights come back from `meta`).

    diffusers' own `load_lora_weights` does the same through its private `_func_optionally_disable_offloading`.
    """
    from accelerate.hooks import remove_hook_from_module
    from torch import nn

    for component in pipe.components.values():
        if isinstance(component, nn.Module) and hasattr(component, "_hf_hook"):
            remove_hook_from_module(component, recurse=True)


# `accelerator.save_state` of one prepared model, optimizer and scheduler writes them to these files (accelerate's
# `SAFE_MODEL_NAME`, `OPTIMIZER_NAME` and `SCHEDULER_NAME` plus extensions; the folder layout is not documented). A
# checkpoint is checked file by file before `load_state` touches anything.
ACCELERATE_MODEL_FILE = "model.safetensors"
ACCELERATE_OPTIMIZER_FILE = "optimizer.bin"
ACCELERATE_SCHEDULER_FILE = "scheduler.bin"


def load_accelerate_state(accelerator: Any, folder: str) -> None:
    """`accelerator.load_state(folder)`, every pickled file unpickled weights-only (tensors, plain containers and
    numpy arrays, never code).

    accelerate >= 1.8 takes `load_kwargs={"weights_only": True}`; 1.2 to 1.7 load weights-only by default and allow
    the numpy types of their own random-state file. Before 1.2 accelerate calls plain `torch.load`, weights-only by
    default from torch 2.6 on: it then refuses the numpy arrays in accelerate's own `random_states_0.pkl`, skips the
    random states and fails on their missing "step" (KeyError). Those numpy types, which run no code, are allowed for
    the call (torch < 2.6 unpickles without restriction there, as accelerate < 1.2 always did).
    """
    import torch

    if "load_kwargs" in inspect.signature(accelerator.load_state).parameters:
        accelerator.load_state(folder, load_kwargs={"weights_only": True})
        return
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with nullcontext() if allow is None else allow(_numpy_array_globals()):
        accelerator.load_state(folder)


def _numpy_array_globals() -> list[Any]:
    """What a pickled numpy array refers to: its reconstructor, `ndarray` and its dtype's classes (numpy 1 and 2)."""
    import numpy as np

    array = np.zeros(1, dtype=np.uint32)  # numpy's random state is a uint32 array
    return [array.__reduce__()[0], np.ndarray, np.dtype, type(array.dtype)]


def group_offload_enabled(module: nn.Module) -> bool:
    """Whether diffusers' group offloading (`enable_group_offload`) manages `module` or one of its submodules.

    diffusers only has the private `_is_group_offload_enabled` for this (it reads its hook registry).
    """
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:  # a diffusers without group offloading cannot have it enabled
        return False
    return _is_group_offload_enabled(module)


# ---------------------------------------------------------------------------------------------- torch
def foreach_copy_(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`destinations[i].copy_(sources[i])` for all `i` in a few kernels (torch's private `_foreach_copy_`)."""
    import torch

    torch._foreach_copy_(destinations, sources)


def foreach_zero_(tensors: list[torch.Tensor]) -> None:
    """Zero every tensor in a few kernels (torch's private `_foreach_zero_`)."""
    import torch

    torch._foreach_zero_(tensors)


def take_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """Unregister and return the parameter `name` of `module` (no public API unregisters a parameter)."""
    return module._parameters.pop(name)


def put_parameter(module: nn.Module, name: str, parameter: nn.Parameter) -> None:
    """Register `parameter` again under `name` after `take_parameter`, without `register_parameter`'s checks."""
    module._parameters[name] = parameter


# ---------------------------------------------------------------------------------------------- FLUX latents
# FLUX's transformer reads latents as a sequence of 2x2 patches with their (0, row, column) positions; diffusers
# has only the pipeline's private static methods for this layout (`FluxPipeline._pack_latents`, ...).
def flux_pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` latents as FLUX's packed sequence `[B, h/2 * w/2, 4C]` (`FluxPipeline._pack_latents`)."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def flux_unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `flux_pack_latents` for `[*, *, height, width]` latents (`FluxPipeline._unpack_latents`)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, 1)


def flux_latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The `img_ids` `[height * width, 3]` of a `height x width` grid of packed patches
    (`FluxPipeline._prepare_latent_image_ids`)."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height, width, device, dtype)


# ---------------------------------------------------------------------------------------------- diffusers saving
def override_save_pretrained(model: nn.Module, save: Callable[..., Any]) -> None:
    """Make `model.save_pretrained(...)` (also when `pipe.save_pretrained` saves the component) call `save`, bound
    to the model; `restore_save_pretrained` undoes it.

    No diffusers API changes what a component writes. `DiffusionPipeline.save_pretrained` looks each component's
    `save_pretrained` up on the instance, so an instance attribute is the hook point, and `ModelMixin.save_pretrained`
    takes the weights from `model.state_dict()`, so a state-dict post-hook registered by `save` applies to the file.
    A bound method is rebound by `copy.deepcopy`.
    """
    model.__dict__["save_pretrained"] = types.MethodType(save, model)


def restore_save_pretrained(model: nn.Module) -> None:
    """Undo `override_save_pretrained` (the class's `save_pretrained` again); nothing when there is no override."""
    model.__dict__.pop("save_pretrained", None)


# ---------------------------------------------------------------------------------------------- diffusers VAE
def sample_latent_distribution(parameters: torch.Tensor, generator: Any = None) -> torch.Tensor:
    """A sample of the VAE's diagonal Gaussian whose `[mean, logvar]` are stacked on dim 1 (what the encoder outputs
    before `vae.encode(...).latent_dist`), with `generator` (one, or one per row).

    diffusers' `DiagonalGaussianDistribution` lives in `diffusers.models.autoencoders.vae`, a module path it is not
    exported from (it moved from `diffusers.models.vae` before); caching the moments and sampling them later has
    no other API.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(parameters).sample(generator=generator)


# ---------------------------------------------------------------------------------------------- insightface
def insightface_app_from_folder(folder: Path, providers: Sequence[Any], tasks: Sequence[str]) -> Any | None:
    """insightface's `FaceAnalysis` over the ONNX files in `folder` (models of `tasks` only), or `None` when
    insightface finds no face detector there.

    insightface has no "load this folder" API: `FaceAnalysis(name, root)` reads `<root>/models/<name>` and
    downloads it when missing. An absolute `name` makes that path `folder` itself (`os.path.join` drops what comes
    before an absolute part; insightface >= 2 also reads a `name` that is a folder directly), so nothing is
    downloaded. A folder without a detector fails insightface's `assert "detection" in self.models` (a
    `KeyError` on `self.models["detection"]` under `python -O`), not an exception of its own.
    """
    from insightface.app import FaceAnalysis

    folder = Path(folder)
    try:
        return FaceAnalysis(
            name=str(folder), root=str(folder.parent), allowed_modules=list(tasks), providers=list(providers)
        )
    except (AssertionError, KeyError):
        return None


def insightface_tasks(app: Any) -> set[str]:
    """The tasks (`"detection"`, `"landmark_2d_106"`, `"recognition"`, ...) a `FaceAnalysis` loaded models for: the
    keys of its `models` dict (no public getter; `set()` for an object without one)."""
    return set(getattr(app, "models", None) or {})
