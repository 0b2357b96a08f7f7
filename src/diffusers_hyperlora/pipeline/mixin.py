"""The public surface on diffusers pipelines: `load_hyperlora`, `set_hyperlora_identity`, `unload_hyperlora`, ...

Every function here is a thin delegate to the pipeline's `HyperLoRAController` (controller.py), which owns all
HyperLoRA state; `pipe.hyperlora` returns it. `load_hyperlora(pipe, ...)` works on any pipeline *instance* whose
denoiser has the checkpoint's target layers (every SDXL pipeline for the public release). `HyperLoRAMixin` offers
the same as methods; importing `diffusers_hyperlora` installs them on diffusers' SDXL, SD, SD3 and FLUX LoRA
loader mixins, so every such pipeline (text-to-image, img2img, inpaint, ControlNet, T2I-Adapter, ...) has them.

Nothing is registered as a pipeline component: `pipe.save_pretrained` writes exactly what it wrote before.
The predictor follows the pipeline lazily: it is moved to the pipeline's execution device and the denoiser's
dtype whenever it is used, and back to the CPU afterwards under `enable_model_cpu_offload`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..adapters.sliders import DEFAULT_SLIDER_NAME, DEFAULT_SLIDER_WEIGHT, HyperLoRASlider
from ..identities.features import FeatureExtractor
from ..identities.identity import HyperLoRAIdentity
from ..io.hub import HubOptions
from ..model.predictor import HyperLoRAPredictor
from .controller import HyperLoRAController, LoadOptions

_CONTROLLER_ATTRIBUTE = "_hyperlora_controller"


def controller_of(pipe: Any) -> HyperLoRAController:
    """The pipeline's `HyperLoRAController` (created on first use; what `pipe.hyperlora` returns)."""
    controller = pipe.__dict__.get(_CONTROLLER_ATTRIBUTE)
    if controller is None:
        controller = HyperLoRAController(pipe, getattr(pipe, "hyperlora_denoiser_name", None))
        # `object.__setattr__`: diffusers pipelines route attribute writes through their config registry.
        object.__setattr__(pipe, _CONTROLLER_ATTRIBUTE, controller)
    return controller


def load_hyperlora(
    pipe: Any,
    pretrained_model_name_or_path: str | os.PathLike | HyperLoRAPredictor,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    torch_dtype: torch.dtype | None = None,
    heads: int | None = None,
    dim_head: int | None = None,
    image_encoder: Any = None,
    face_analyzer: Any = None,
    feature_extractor: FeatureExtractor | None = None,
    id_adapter_name: str = "id",
    base_adapter_name: str = "base",
    id_weight: float | None = None,
    base_weight: float | None = None,
    offload_bank: bool = False,
) -> Any:
    """Load a HyperLoRA checkpoint into a pipeline and register its `"id"` / `"base"` adapters.

    The load is transactional: every option is checked, the checkpoint resolved, read, scanned for NaN/inf and
    checked against the denoiser before the HyperLoRA already loaded (if any) is replaced; an error leaves that one
    in place (a failure while attaching the new adapters puts the old ones back).

    Args:
        pipe: a diffusers pipeline instance (any SDXL pipeline for the public release).
        pretrained_model_name_or_path: a Hub repo id, a local folder (library format or the release's layout),
            or a ready `HyperLoRAPredictor`.
        subfolder, revision, token, cache_dir, local_files_only, force_download: Hub options, as in diffusers.
        torch_dtype: dtype of the predictor read from files (default: the denoiser's dtype).
        heads, dim_head: resampler attention layout of release-layout checkpoints (default 12 x 64).
            The Hub options, `torch_dtype`, `heads` and `dim_head` only apply when files are read: with a
            `HyperLoRAPredictor` they are refused by name (it is used as it is; `predictor.to(dtype)` first).
        image_encoder: CLIP vision encoder: a repo id, a local folder or a ready model (default: what the
            checkpoint names). Loaded lazily, on the first call that needs it.
        face_analyzer: AntelopeV2 face models: a repo id / folder / insightface root, or a ready object.
        feature_extractor: any `FeatureExtractor` that replaces the face pipeline entirely.
        id_adapter_name, base_adapter_name: names of the two PEFT adapters.
        id_weight, base_weight: initial adapter weights, finite numbers (default: the checkpoint's, 0.8 for ID).
        offload_bank: keep the basis banks (about 3 GB in 16-bit for the release) in CPU memory and stream them
            to the GPU in chunks on each identity switch, instead of moving them to the execution device.

    Returns:
        The same pipeline, for chaining.

    Example:
        >>> from diffusers import StableDiffusionXLPipeline  # doctest: +SKIP
        >>> import diffusers_hyperlora  # doctest: +SKIP
        >>> repo = "stabilityai/stable-diffusion-xl-base-1.0"
        >>> pipe = StableDiffusionXLPipeline.from_pretrained(repo)  # doctest: +SKIP
        >>> release = "bytedance-research/HyperLoRA"
        >>> pipe.load_hyperlora(release, subfolder="sdxl_hyper_id_lora_v1_fidelity")  # doctest: +SKIP
        >>> pipe.set_hyperlora_identity(["me1.jpg", "me2.jpg"])  # doctest: +SKIP
    """
    hub_options = HubOptions(
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    options = LoadOptions(
        hub_options=hub_options,
        torch_dtype=torch_dtype,
        heads=heads,
        dim_head=dim_head,
        image_encoder=image_encoder,
        face_analyzer=face_analyzer,
        feature_extractor=feature_extractor,
        id_adapter_name=id_adapter_name,
        base_adapter_name=base_adapter_name,
        id_weight=id_weight,
        base_weight=base_weight,
        offload_bank=offload_bank,
    )
    controller_of(pipe).load(pretrained_model_name_or_path, options)
    return pipe


def predict_hyperlora_identity(pipe: Any, images: Any, **extractor_kwargs: Any) -> HyperLoRAIdentity:
    """Photos (or saved identity files) -> `HyperLoRAIdentity` with the pipeline's HyperLoRA, adapters untouched.

    Example:
        >>> identity = pipe.predict_hyperlora_identity(["me1.jpg", "me2.jpg"])  # doctest: +SKIP
    """
    return controller_of(pipe).predict_identity(images, **extractor_kwargs)


def set_hyperlora_identity(pipe: Any, images_or_identity: Any, **extractor_kwargs: Any) -> HyperLoRAIdentity:
    """Write a person's LoRA into the pipeline's `"id"` (and `"base"`) adapters, in place.

    Args:
        images_or_identity: one image or a list (PIL, numpy, torch, file path), saved identity files
            (`.safetensors`, merged when several), or a `HyperLoRAIdentity`.
        extractor_kwargs: forwarded to the feature extractor (e.g. face selection options).

    Returns:
        The identity that was written (save it with `identity.save(...)` to skip the encoders next time).

    Example:
        >>> identity = pipe.set_hyperlora_identity(["me1.jpg", "me2.jpg"])  # doctest: +SKIP
        >>> pipe.set_hyperlora_identity("me.safetensors")  # a saved identity  # doctest: +SKIP
    """
    return controller_of(pipe).set_identity(images_or_identity, **extractor_kwargs)


def set_hyperlora_identities(pipe: Any, identities: Sequence[Any], **extractor_kwargs: Any) -> list:
    """One identity per prompt: prompt *i* of the next pipeline calls uses `identities[i]` (see docs/serving.md).

    Args:
        identities: one entry per prompt: a `HyperLoRAIdentity`, or photos / an identity file (predicted here).
        extractor_kwargs: forwarded to the feature extractor for entries that are photos.

    Returns:
        The identities, in prompt order. `pipe.set_hyperlora_identity(x)` returns to one identity for all.

    Example:
        >>> pipe.set_hyperlora_identities([alice, bob])  # doctest: +SKIP
        >>> images = pipe(["alice on the moon", "bob in a garden"]).images  # doctest: +SKIP
    """
    return controller_of(pipe).set_identities(identities, **extractor_kwargs)


def preview_hyperlora_inputs(pipe: Any, images: Any, **extractor_kwargs: Any) -> list:
    """What the encoders will see for each photo: crops and masks as PIL images, plus the ArcFace embedding.

    Returns one `diffusers_hyperlora.face.FaceInputs` per photo with a face (`clip_image`, `arcface_image`,
    `background_removed`, `face_mask`, `base_image`, ...). Takes the same options as `set_hyperlora_identity`.

    Example:
        >>> inputs = pipe.preview_hyperlora_inputs("me.jpg")  # doctest: +SKIP
        >>> inputs[0].clip_image.save("clip_crop.png")  # doctest: +SKIP
    """
    return controller_of(pipe).preview_inputs(images, **extractor_kwargs)


def unload_hyperlora(pipe: Any) -> None:
    """Remove HyperLoRA's adapters and predictor; the denoiser computes exactly what it did before loading.

    A no-op when nothing is loaded.

    Example:
        >>> pipe.unload_hyperlora()  # doctest: +SKIP
    """
    controller_of(pipe).unload()


def add_hyperlora_slider(
    pipe: Any,
    neutral: Any,
    edited: Any,
    adapter_name: str = DEFAULT_SLIDER_NAME,
    weight: float = DEFAULT_SLIDER_WEIGHT,
    **extractor_kwargs: Any,
) -> HyperLoRASlider:
    """Add (or rewrite) a slider adapter that moves generations from `neutral` towards `edited`.

    Args:
        pipe: a pipeline with a HyperLoRA loaded (`pipe.load_hyperlora(...)`).
        neutral: photos (one or a list, as for `set_hyperlora_identity`) or a `HyperLoRAIdentity` of the person.
        edited: the same for the edited photos of the same person (e.g. aged, smiling).
        adapter_name: name of the PEFT adapter; add several sliders under different names.
        weight: initial adapter weight (the reference slider workflows use +-0.7). Change it later with
            `pipe.set_adapters([...], [...])` like any LoRA; a negative weight moves the other way.
        extractor_kwargs: forwarded to the feature extractor for image inputs.

    Returns:
        The `HyperLoRASlider` (export it with `pipe.hyperlora.export_lora(slider, "slider.safetensors")`).

    Example:
        >>> slider = pipe.add_hyperlora_slider(["me.jpg"], ["me_aged.jpg"], adapter_name="age")  # doctest: +SKIP
        >>> pipe.set_adapters(["id", "age"], [0.8, -0.5])  # younger  # doctest: +SKIP
    """
    return controller_of(pipe).add_slider(neutral, edited, adapter_name=adapter_name, weight=weight, **extractor_kwargs)


def remove_hyperlora_slider(pipe: Any, adapter_name: str = DEFAULT_SLIDER_NAME) -> None:
    """Delete one slider adapter created by `add_hyperlora_slider`.

    Example:
        >>> pipe.remove_hyperlora_slider("age")  # doctest: +SKIP
    """
    controller_of(pipe).remove_slider(adapter_name)


class HyperLoRAMixin:
    """HyperLoRA methods for a pipeline class. Mix into a custom pipeline, or rely on the installed methods.

    `hyperlora_denoiser_name` names the component that receives the adapters (`None`: the pipeline's `unet`, else
    its `transformer`).

    Example:
        >>> from diffusers import StableDiffusionXLPipeline
        >>> from diffusers_hyperlora import HyperLoRAMixin
        >>> class MyPipeline(HyperLoRAMixin, StableDiffusionXLPipeline):
        ...     pass
    """

    hyperlora_denoiser_name: str | None = None

    @property
    def hyperlora(self) -> HyperLoRAController:
        """The pipeline's `HyperLoRAController` (`.is_loaded`, `.predictor`, `.predict(...)`, `.export_lora(...)`)."""
        return controller_of(self)

    @property
    def hyperlora_identity(self) -> HyperLoRAIdentity | None:
        """The identity currently written into the adapters, or `None`."""
        return controller_of(self).identity

    def load_hyperlora(self, pretrained_model_name_or_path: str | os.PathLike | HyperLoRAPredictor, **kwargs: Any):
        """See `diffusers_hyperlora.load_hyperlora`."""
        return load_hyperlora(self, pretrained_model_name_or_path, **kwargs)

    def set_hyperlora_identity(self, images_or_identity: Any, **kwargs: Any) -> HyperLoRAIdentity:
        """See `diffusers_hyperlora.set_hyperlora_identity`."""
        return set_hyperlora_identity(self, images_or_identity, **kwargs)

    def set_hyperlora_identities(self, identities: Sequence[Any], **kwargs: Any) -> list:
        """See `diffusers_hyperlora.set_hyperlora_identities`."""
        return set_hyperlora_identities(self, identities, **kwargs)

    def predict_hyperlora_identity(self, images: Any, **kwargs: Any) -> HyperLoRAIdentity:
        """See `diffusers_hyperlora.predict_hyperlora_identity`."""
        return predict_hyperlora_identity(self, images, **kwargs)

    def preview_hyperlora_inputs(self, images: Any, **kwargs: Any) -> list:
        """See `diffusers_hyperlora.preview_hyperlora_inputs`."""
        return preview_hyperlora_inputs(self, images, **kwargs)

    def unload_hyperlora(self) -> None:
        """See `diffusers_hyperlora.unload_hyperlora`."""
        unload_hyperlora(self)

    def add_hyperlora_slider(self, neutral: Any, edited: Any, adapter_name: str = DEFAULT_SLIDER_NAME, **kwargs: Any):
        """See `diffusers_hyperlora.add_hyperlora_slider`."""
        return add_hyperlora_slider(self, neutral, edited, adapter_name=adapter_name, **kwargs)

    def remove_hyperlora_slider(self, adapter_name: str = DEFAULT_SLIDER_NAME) -> None:
        """See `diffusers_hyperlora.remove_hyperlora_slider`."""
        remove_hyperlora_slider(self, adapter_name)


_MIXIN_MEMBERS: Sequence[str] = (
    "hyperlora",
    "hyperlora_identity",
    "load_hyperlora",
    "set_hyperlora_identity",
    "set_hyperlora_identities",
    "predict_hyperlora_identity",
    "preview_hyperlora_inputs",
    "unload_hyperlora",
    "add_hyperlora_slider",
    "remove_hyperlora_slider",
)


def install_pipeline_methods() -> None:
    """Add HyperLoRA's methods to diffusers' SDXL, SD, SD3 and FLUX LoRA loader mixins (idempotent, never
    overwrites).

    `import diffusers_hyperlora` does this for you, as soon as diffusers' LoRA loaders are imported.

    Example:
        >>> from diffusers import StableDiffusionXLPipeline
        >>> install_pipeline_methods()  # again: changes nothing
        >>> hasattr(StableDiffusionXLPipeline, "load_hyperlora")
        True
    """
    from diffusers.loaders import (
        FluxLoraLoaderMixin,
        SD3LoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        StableDiffusionXLLoraLoaderMixin,
    )

    for target in (
        StableDiffusionXLLoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        SD3LoraLoaderMixin,
        FluxLoraLoaderMixin,
    ):
        for member in _MIXIN_MEMBERS:
            if member not in target.__dict__:
                setattr(target, member, HyperLoRAMixin.__dict__[member])
