"""The public surface on diffusers pipelines: `load_hyperlora`, `set_hyperlora_identity`, `unload_hyperlora`.

`load_hyperlora(pipe, ...)` works on any pipeline *instance* whose denoiser has the checkpoint's target layers
(every SDXL pipeline for the public release). `HyperLoRAMixin` offers the same as methods; importing
`diffusers_hyperlora` installs them on diffusers' SDXL and SD LoRA loader mixins, so every such pipeline
(text-to-image, img2img, inpaint, ControlNet, T2I-Adapter, ...) has `pipe.load_hyperlora(...)`.

Nothing is registered as a pipeline component: `pipe.save_pretrained` writes exactly what it wrote before.
The predictor follows the pipeline lazily: it is moved to the pipeline's execution device and the denoiser's
dtype whenever it is used, which also keeps `enable_model_cpu_offload` working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging

from .adapter_state_dict import hide_adapters_from_state_dict
from .adapters import HyperLoRAAdapters
from .errors import HyperLoRANotLoadedError
from .features import FeatureExtractor
from .identity import HyperLoRAIdentity
from .identity_inputs import resolve_identity
from .predictor import HyperLoRAPredictor

logger = logging.get_logger(__name__)

_STATE_ATTRIBUTE = "_hyperlora_state"
_DENOISER_NAMES = ("unet", "transformer")


@dataclass
class HyperLoRAState:
    """Everything HyperLoRA keeps on a pipeline instance."""

    predictor: HyperLoRAPredictor
    adapters: HyperLoRAAdapters
    source: str | None
    feature_extractor: FeatureExtractor | None = None
    image_encoder: Any = None
    face_analyzer: Any = None
    identity: HyperLoRAIdentity | None = None
    hub_options: dict | None = None
    offload_bank: bool = False
    synced_for: tuple | None = None  # (device, dtype) of the live adapter weights at the last predictor sync
    state_dict_hook: Any = None
    sliders: dict = field(default_factory=dict)  # adapter name -> HyperLoRASlider (sliders.py)

    def adapter_names(self) -> list[str]:
        """Every adapter this state owns on the denoiser: "id", "base" and the sliders."""
        return [*self.adapters.names.values(), *self.sliders]


def _denoiser(pipe: Any, name: str | None = None):
    for candidate in (name,) if name else _DENOISER_NAMES:
        module = getattr(pipe, candidate, None)
        if module is not None:
            return module
    raise TypeError(
        f"{pipe.__class__.__name__} has no denoiser ({' or '.join(_DENOISER_NAMES)}); HyperLoRA needs a diffusers "
        "pipeline such as StableDiffusionXLPipeline."
    )


def _state(pipe: Any) -> HyperLoRAState:
    state = getattr(pipe, _STATE_ATTRIBUTE, None)
    if state is None:
        raise HyperLoRANotLoadedError(
            "No HyperLoRA is loaded on this pipeline. Call `pipe.load_hyperlora('org/hyperlora')` (or "
            "`diffusers_hyperlora.load_hyperlora(pipe, ...)`) first."
        )
    return state


def _execution_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else _denoiser(pipe).device


def sync_predictor(pipe: Any) -> HyperLoRAPredictor:
    """Move the predictor to the pipeline's execution device and the denoiser's dtype (no-op when there).

    With `offload_bank=True` (see `load_hyperlora`) the basis banks stay in CPU memory (pinned when the execution
    device is a GPU) and are streamed to the device in chunks during an identity switch.
    """
    state = _state(pipe)
    device, dtype = _execution_device(pipe), state.adapters.denoiser.dtype
    predictor = state.predictor
    if not state.offload_bank:
        if predictor.device != device or predictor.dtype != dtype:
            predictor.to(device=device, dtype=dtype)
        return predictor
    for name, module in predictor.named_children():
        if name in ("id_bank", "base_bank"):
            _offload_bank(module, dtype, pin=device.type == "cuda")
        elif module is not None:
            module.to(device=device, dtype=dtype)
    return predictor


def _offload_bank(bank: torch.nn.Module, dtype: torch.dtype, pin: bool) -> None:
    """Keep a basis bank in CPU memory in the denoiser's dtype, page-locked when it feeds a GPU."""
    for param in bank.parameters():
        data = param.data
        if data.device.type != "cpu" or data.dtype != dtype:
            data = data.to(device="cpu", dtype=dtype)
        if pin and not data.is_pinned():
            data = data.pin_memory()
        param.data = data


def write_identity(pipe: Any, identity: HyperLoRAIdentity) -> None:
    """Mix the banks for `identity` and copy the factors into the live adapters (the body of an identity switch)."""
    state = _state(pipe)
    # `sync_predictor` walks every module of every component (tens of ms on SDXL), more than a GPU switch takes:
    # sync again only when the live adapter weights moved or changed dtype since the last sync.
    live = state.adapters.live_device_dtype()
    if live is None or live != state.synced_for:
        sync_predictor(pipe)
        state.synced_for = live
    predictor = state.predictor
    identity.check_compatible(predictor.checkpoint_hash, predictor.probe)
    branches = ["id"]
    if predictor.config.has_base:
        if identity.base_mean is None:
            state.adapters.clear("base")
        else:
            branches.append("base")
    for branch in branches:
        bank = predictor.bank(branch)
        coefficients = predictor.split_coefficients(identity.coefficients(branch).to(predictor.device))
        state.adapters.write_mixed(branch, bank.groups, bank.mix(coefficients))


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

    Args:
        pipe: a diffusers pipeline instance (any SDXL pipeline for the public release).
        pretrained_model_name_or_path: a Hub repo id, a local folder (library format or the release's layout),
            or a ready `HyperLoRAPredictor`.
        subfolder, revision, token, cache_dir, local_files_only, force_download: Hub options, as in diffusers.
        torch_dtype: dtype of the predictor (default: the denoiser's dtype).
        heads, dim_head: resampler attention layout of release-layout checkpoints (default 12 x 64).
        image_encoder: CLIP vision encoder: a repo id, a local folder or a ready model (default: what the
            checkpoint names). Loaded lazily, on the first call that needs it.
        face_analyzer: AntelopeV2 face models: a repo id / folder / insightface root, or a ready object.
        feature_extractor: any `FeatureExtractor` that replaces the face pipeline entirely.
        id_adapter_name, base_adapter_name: names of the two PEFT adapters.
        id_weight, base_weight: initial adapter weights (default: the checkpoint's, 0.8 for ID).
        offload_bank: keep the basis banks (about 3 GB in 16-bit for the release) in CPU memory and stream them
            to the GPU in chunks on each identity switch, instead of moving them to the execution device.

    Returns:
        The same pipeline, for chaining.

    Example:
        >>> from diffusers import StableDiffusionXLPipeline  # doctest: +SKIP
        >>> import diffusers_hyperlora  # doctest: +SKIP
        >>> repo = "stabilityai/stable-diffusion-xl-base-1.0"
        >>> pipe = StableDiffusionXLPipeline.from_pretrained(repo)  # doctest: +SKIP
        >>> pipe.load_hyperlora("org/hyperlora")  # doctest: +SKIP
        >>> pipe.set_hyperlora_identity(["me1.jpg", "me2.jpg"])  # doctest: +SKIP
    """
    denoiser = _denoiser(pipe, getattr(pipe, "hyperlora_denoiser_name", None))
    hub_options = {
        "subfolder": subfolder,
        "revision": revision,
        "token": token,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "force_download": force_download,
    }
    if isinstance(pretrained_model_name_or_path, HyperLoRAPredictor):
        predictor, source = pretrained_model_name_or_path, None
    else:
        from .io import load_predictor

        source = os.fspath(pretrained_model_name_or_path)
        predictor = load_predictor(
            source, torch_dtype=torch_dtype or denoiser.dtype, heads=heads, dim_head=dim_head, **hub_options
        )
    if getattr(pipe, _STATE_ATTRIBUTE, None) is not None:
        logger.info("Replacing the HyperLoRA already loaded on this pipeline.")
        unload_hyperlora(pipe)
    adapters = HyperLoRAAdapters.attach(
        denoiser, predictor.config, id_adapter_name, base_adapter_name, id_weight=id_weight, base_weight=base_weight
    )
    state = HyperLoRAState(
        predictor=predictor.eval().requires_grad_(False),
        adapters=adapters,
        source=source,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        face_analyzer=face_analyzer,
        hub_options=hub_options,
    )
    state.state_dict_hook = hide_adapters_from_state_dict(denoiser, state.adapter_names)
    object.__setattr__(pipe, _STATE_ATTRIBUTE, state)
    return pipe


def _as_image_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("set_hyperlora_identity() got an empty list: pass one image or a list of images.")
        return list(images)
    return [images]


def _feature_extractor(pipe: Any, state: HyperLoRAState) -> FeatureExtractor:
    if state.feature_extractor is None:
        from .face import build_feature_extractor

        state.feature_extractor = build_feature_extractor(
            state.predictor.config,
            source=state.source,
            image_encoder=state.image_encoder,
            face_analyzer=state.face_analyzer,
            hub_options=state.hub_options or {},
        )
    return state.feature_extractor


def predict_hyperlora_identity(pipe: Any, images: Any, **extractor_kwargs: Any) -> HyperLoRAIdentity:
    """Photos -> `HyperLoRAIdentity` with the pipeline's HyperLoRA, without touching the adapters.

    Saved identity files (`.safetensors`) and `HyperLoRAIdentity` objects may stand among the photos: they are
    pooled in exactly, as if their photos were given again (`diffusers_hyperlora.identity_inputs`).

    Example:
        >>> identity = pipe.predict_hyperlora_identity(["me.safetensors", "new.jpg"])  # doctest: +SKIP
    """
    state = _state(pipe)
    predictor = sync_predictor(pipe)

    def predict_photos(photos: list[Any]) -> HyperLoRAIdentity:
        extractor = _feature_extractor(pipe, state)
        features = extractor(
            photos,
            device=predictor.device,
            dtype=predictor.dtype,
            with_base=predictor.config.has_base,
            **extractor_kwargs,
        )
        return predictor.predict(
            id_embeds=features.id_embeds,
            clip_hidden_states=features.clip_hidden_states,
            base_clip_hidden_states=features.base_clip_hidden_states,
            sources=features.sources,
        )

    return resolve_identity(_as_image_list(images), predict_photos, predictor)


@torch.no_grad()
def set_hyperlora_identity(pipe: Any, images_or_identity: Any, **extractor_kwargs: Any) -> HyperLoRAIdentity:
    """Write a person's LoRA into the pipeline's `"id"` (and `"base"`) adapters, in place.

    Args:
        images_or_identity: one image or a list (PIL, numpy, torch, file path), or a `HyperLoRAIdentity`; saved
            identity files (`.safetensors`) are accepted wherever photos are, and pooled in exactly.
        extractor_kwargs: forwarded to the feature extractor (e.g. face selection options).

    Returns:
        The identity that was written (save it with `identity.save(...)` to skip the encoders next time).
    """
    state = _state(pipe)
    if isinstance(images_or_identity, HyperLoRAIdentity):
        identity = images_or_identity
    else:
        identity = predict_hyperlora_identity(pipe, images_or_identity, **extractor_kwargs)
    write_identity(pipe, identity)
    state.identity = identity
    return identity


def preview_hyperlora_inputs(pipe: Any, images: Any, **extractor_kwargs: Any) -> list:
    """What the encoders will see for each photo: crops and masks as PIL images, plus the ArcFace embedding.

    Returns one `diffusers_hyperlora.face.FaceInputs` per photo with a face (`clip_image`, `arcface_image`,
    `background_removed`, `face_mask`, `base_image`, ...). Takes the same options as `set_hyperlora_identity`.

    Example:
        >>> inputs = pipe.preview_hyperlora_inputs("me.jpg")  # doctest: +SKIP
        >>> inputs[0].clip_image.save("clip_crop.png")  # doctest: +SKIP
    """
    state = _state(pipe)
    extractor = _feature_extractor(pipe, state)
    prepare = getattr(extractor, "prepare_inputs", None)
    if prepare is None:
        raise TypeError(
            f"The pipeline's feature extractor ({type(extractor).__name__}) cannot show its inputs: only the built-in "
            "face pipeline (diffusers_hyperlora.face) has `prepare_inputs`."
        )
    return prepare(_as_image_list(images), with_base=state.predictor.config.has_base, **extractor_kwargs)


def unload_hyperlora(pipe: Any) -> None:
    """Remove HyperLoRA's adapters and predictor; the denoiser computes exactly what it did before loading."""
    state = _state(pipe)
    from .sliders import remove_all_sliders

    remove_all_sliders(state)
    if state.state_dict_hook is not None:
        state.state_dict_hook.remove()
    state.adapters.detach()
    object.__setattr__(pipe, _STATE_ATTRIBUTE, None)


class HyperLoRAMixin:
    """HyperLoRA methods for a pipeline class. Mix into a custom pipeline, or rely on the installed methods.

    `hyperlora_denoiser_name` names the component that receives the adapters.

    Example:
        >>> from diffusers import StableDiffusionXLPipeline
        >>> from diffusers_hyperlora import HyperLoRAMixin
        >>> class MyPipeline(HyperLoRAMixin, StableDiffusionXLPipeline):
        ...     pass
    """

    hyperlora_denoiser_name: str = "unet"

    @property
    def hyperlora(self) -> HyperLoRAPredictor | None:
        """The loaded `HyperLoRAPredictor`, or `None`."""
        state = getattr(self, _STATE_ATTRIBUTE, None)
        return None if state is None else state.predictor

    @property
    def hyperlora_identity(self) -> HyperLoRAIdentity | None:
        """The identity currently written into the adapters, or `None`."""
        state = getattr(self, _STATE_ATTRIBUTE, None)
        return None if state is None else state.identity

    def load_hyperlora(self, pretrained_model_name_or_path: str | os.PathLike | HyperLoRAPredictor, **kwargs: Any):
        """See `diffusers_hyperlora.load_hyperlora`."""
        return load_hyperlora(self, pretrained_model_name_or_path, **kwargs)

    def set_hyperlora_identity(self, images_or_identity: Any, **kwargs: Any) -> HyperLoRAIdentity:
        """See `diffusers_hyperlora.pipeline.set_hyperlora_identity`."""
        return set_hyperlora_identity(self, images_or_identity, **kwargs)

    def predict_hyperlora_identity(self, images: Any, **kwargs: Any) -> HyperLoRAIdentity:
        """See `diffusers_hyperlora.pipeline.predict_hyperlora_identity`."""
        return predict_hyperlora_identity(self, images, **kwargs)

    def preview_hyperlora_inputs(self, images: Any, **kwargs: Any) -> list:
        """See `diffusers_hyperlora.pipeline.preview_hyperlora_inputs`."""
        return preview_hyperlora_inputs(self, images, **kwargs)

    def unload_hyperlora(self) -> None:
        """See `diffusers_hyperlora.pipeline.unload_hyperlora`."""
        unload_hyperlora(self)

    def add_hyperlora_slider(self, neutral: Any, edited: Any, adapter_name: str = "slider", **kwargs: Any):
        """See `diffusers_hyperlora.sliders.add_hyperlora_slider`."""
        from .sliders import add_hyperlora_slider

        return add_hyperlora_slider(self, neutral, edited, adapter_name=adapter_name, **kwargs)

    def remove_hyperlora_slider(self, adapter_name: str = "slider") -> None:
        """See `diffusers_hyperlora.sliders.remove_hyperlora_slider`."""
        from .sliders import remove_hyperlora_slider

        remove_hyperlora_slider(self, adapter_name)


_MIXIN_MEMBERS: Sequence[str] = (
    "hyperlora",
    "hyperlora_identity",
    "load_hyperlora",
    "set_hyperlora_identity",
    "predict_hyperlora_identity",
    "preview_hyperlora_inputs",
    "unload_hyperlora",
    "add_hyperlora_slider",
    "remove_hyperlora_slider",
)


def install_pipeline_methods() -> None:
    """Add HyperLoRA's methods to diffusers' SDXL and SD LoRA loader mixins (idempotent, never overwrites)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    for target in (StableDiffusionXLLoraLoaderMixin, StableDiffusionLoraLoaderMixin):
        for member in _MIXIN_MEMBERS:
            if member not in target.__dict__:
                setattr(target, member, HyperLoRAMixin.__dict__[member])
