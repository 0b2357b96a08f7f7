"""`HyperLoRAController`: the one owner of HyperLoRA on a pipeline (what `pipe.hyperlora` returns).

It owns the predictor, the `"id"`/`"base"` adapters, the sliders, the feature extractor, the device/offload
policy, the current identity and a lock. Every public method validates its inputs before it changes anything,
so a call that raises leaves the weights, the active adapters, the current identity and the loaded checkpoint
exactly as they were.

Concurrency: all methods that read or write HyperLoRA state hold `controller.lock` (a re-entrant lock), so
concurrent identity switches are serialized and the live weights always equal exactly one identity, the one
`identity` names. A generation (`pipe(...)`) does not take the lock: to pair a switch with the images generated
from it across threads, generate inside `with pipe.hyperlora.using(identity): ...` (or
`using_identities([...])`), which switches and holds the lock until the block ends. The lock is always the last
one taken: take any lock of your own before it, never after.

The device/offload policy is `placement.py`.

Living beside diffusers' own LoRA calls: when `pipe.unload_lora_weights()`, `pipe.delete_adapters(...)` or
`pipe.unet.unload_lora()` removed HyperLoRA's adapters, the next identity switch attaches them again (with the
adapter weights given at load) and logs a warning; `identity` is `None` until then.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from diffusers.utils import logging

from ..adapters.checks import check_adapter_name, check_adapter_weight
from ..adapters.peft_adapters import AdapterSnapshot, HyperLoRAAdapters
from ..adapters.save_hook import hide_adapters_when_saving
from ..adapters.sliders import DEFAULT_SLIDER_NAME, DEFAULT_SLIDER_WEIGHT, HyperLoRASlider, check_slider_weight
from ..adapters.writes import IdentityServing
from ..errors import (
    AdapterNameConflictError,
    HyperLoRAError,
    HyperLoRANotLoadedError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    UnsupportedPipelineError,
)
from ..identities.cache import PreparedIdentityCache
from ..identities.features import FeatureExtractor
from ..identities.identity import HyperLoRAIdentity
from ..identities.inputs import is_identity_input, resolve_identity
from ..io.hub import HubOptions
from ..io.lora_files import export_lora
from ..model.config import HyperLoRAConfig
from ..model.predictor import HyperLoRAPredictor, refuse_checkpoint_options
from ..model.targets import DENOISER_COMPONENTS, DENOISER_LAYOUTS, has_denoiser_layout
from ..utils.checks import parse_dtype
from ..utils.compat import adapter_configs
from .placement import Placement

logger = logging.get_logger(__name__)

_LOAD = "load_hyperlora()"


def find_denoiser(pipe: Any, name: str | None = None) -> torch.nn.Module:
    """The pipeline's denoiser: `name` if given, else its `unet` or its `transformer`. A transformer HyperLoRA has
    no targets for (`DENOISER_LAYOUTS`: SD3 and FLUX have) raises `UnsupportedPipelineError`."""
    for candidate in (name,) if name else DENOISER_COMPONENTS:
        module = getattr(pipe, candidate, None)
        if module is not None:
            break
    else:
        wanted = name or " or ".join(DENOISER_COMPONENTS)
        raise InvalidArgumentTypeError(
            f"{pipe.__class__.__name__} has no denoiser {wanted!r}; HyperLoRA needs a "
            "diffusers pipeline with a UNet (SD 1.5, SDXL) or an SD3 / FLUX transformer.",
            argument="pipe",
        )
    if candidate == "transformer" and not has_denoiser_layout(module):
        raise UnsupportedPipelineError(
            f"{pipe.__class__.__name__} denoises with a {type(module).__name__}; HyperLoRA supports the UNet "
            f"pipelines and the transformers {', '.join(n for n in DENOISER_LAYOUTS if 'Transformer' in n)}: use "
            "one of those pipelines (see docs/base-models.md).",
            argument="pipe",
        )
    return module


def as_image_list(images: Any, caller: str) -> list[Any]:
    """One image or a list of images -> a non-empty list (`caller` names the user's call in the error)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidArgumentError(
                f"{caller}() got an empty list: pass one image or a list of images.", argument="images"
            )
        return list(images)
    return [images]


@dataclass(frozen=True)
class LoadOptions:
    """Everything `load_hyperlora` takes besides the checkpoint (see its docstring), kept for the whole load:
    the face pipeline is built from it on first use, and the adapters are re-attached with it."""

    hub_options: HubOptions = field(default_factory=HubOptions)
    torch_dtype: torch.dtype | None = None
    heads: int | None = None
    dim_head: int | None = None
    image_encoder: Any = None
    face_analyzer: Any = None
    feature_extractor: FeatureExtractor | None = None
    id_adapter_name: str = "id"
    base_adapter_name: str = "base"
    id_weight: float | None = None
    base_weight: float | None = None
    offload_bank: bool = False

    @property
    def adapter_names(self) -> tuple[str, str]:
        return self.id_adapter_name, self.base_adapter_name

    def checked(self, checkpoint: Any) -> LoadOptions:
        """These options with the weights as floats, or the `HyperLoRAError` of the first bad one (named by
        `argument=`). Checked before a load changes anything; the Hub options checked themselves already."""
        if not isinstance(checkpoint, (str, os.PathLike, HyperLoRAPredictor)):
            raise InvalidArgumentTypeError(
                f"{_LOAD}: `pretrained_model_name_or_path` must be a Hub repo id, a local folder or a "
                f"HyperLoRAPredictor, got {type(checkpoint).__name__}.",
                argument="pretrained_model_name_or_path",
            )
        if isinstance(checkpoint, HyperLoRAPredictor):
            self._refuse_file_options()
        self._check_file_options()
        self._check_face_options()
        if not isinstance(self.offload_bank, bool):
            raise InvalidArgumentTypeError(
                f"{_LOAD}: `offload_bank` must be True or False, got {self.offload_bank!r}.", argument="offload_bank"
            )
        for name, example in (("id_adapter_name", "'hyper_id'"), ("base_adapter_name", "'hyper_base'")):
            check_adapter_name(getattr(self, name), _LOAD, name, example)
        weights = {
            name: None if getattr(self, name) is None else check_adapter_weight(getattr(self, name), _LOAD, name)
            for name in ("id_weight", "base_weight")
        }
        return replace(self, **weights)

    def _check_file_options(self) -> None:
        try:
            parse_dtype(self.torch_dtype)
        except HyperLoRAError as error:
            raise type(error)(f"{_LOAD}: `torch_dtype`: {error}", argument="torch_dtype") from error
        for name in ("heads", "dim_head"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise (InvalidArgumentError if isinstance(value, int) else InvalidArgumentTypeError)(
                    f"{_LOAD}: `{name}` must be a positive int (the release's resampler uses heads=12, dim_head=64) "
                    f"or None, got {value!r}.",
                    argument=name,
                )

    def _check_face_options(self) -> None:
        for name in ("image_encoder", "face_analyzer"):
            value = getattr(self, name)
            empty = isinstance(value, str) and not value.strip()
            if empty or isinstance(value, (bool, int, float, complex, bytes)):
                raise (InvalidArgumentError if empty else InvalidArgumentTypeError)(
                    f"{_LOAD}: `{name}` must be None (what the checkpoint names), a Hub repo id or local folder, or a "
                    f"ready model, got {value!r}.",
                    argument=name,
                )
        if self.feature_extractor is not None and not callable(self.feature_extractor):
            raise InvalidArgumentTypeError(
                f"{_LOAD}: `feature_extractor` must be a FeatureExtractor (a callable: images -> features) or None, "
                f"got {type(self.feature_extractor).__name__}.",
                argument="feature_extractor",
            )

    def _refuse_file_options(self) -> None:
        """Refuse by name the options that only apply when reading a checkpoint's files (not to a predictor)."""
        default_hub = HubOptions()
        given = [
            f.name for f in fields(HubOptions) if getattr(self.hub_options, f.name) != getattr(default_hub, f.name)
        ]
        given += [name for name in ("torch_dtype", "heads", "dim_head") if getattr(self, name) is not None]
        if given:
            raise InvalidArgumentError(
                f"{_LOAD}: {', '.join(f'`{name}`' for name in given)} only apply when reading a checkpoint's files; "
                "a HyperLoRAPredictor passed in is used as it is. Drop them, or convert the predictor first "
                "(`predictor.to(dtype)`), or pass the checkpoint's repo id / folder instead.",
                argument=given[0],
            )


class _Loaded:
    """What one `load` put on the pipeline; replaced as a whole by the next `load`."""

    def __init__(
        self, predictor: HyperLoRAPredictor, adapters: HyperLoRAAdapters, source: str | None, options: LoadOptions
    ) -> None:
        self.predictor = predictor
        self.adapters = adapters
        self.source = source
        self.options = options
        self.feature_extractor: FeatureExtractor | None = options.feature_extractor
        self.identity: HyperLoRAIdentity | None = None
        self.sliders: dict[str, HyperLoRASlider] = {}
        self.synced_for: tuple | None = None
        self.save_hook: Any = None
        self.serving: IdentityServing | None = None  # cached switches, per-sample identities (adapters/writes.py)


class HyperLoRAController:
    """HyperLoRA on one pipeline. Get it as `pipe.hyperlora`; `pipe.load_hyperlora(...)` & co. delegate to it.

    Example:
        >>> import torch
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_pipeline, tiny_hyperlora_predictor
        >>> pipe = tiny_sdxl_pipeline()
        >>> controller = pipe.hyperlora
        >>> controller.is_loaded
        False
        >>> _ = pipe.load_hyperlora(tiny_hyperlora_predictor())
        >>> identity = controller.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
        >>> _ = controller.set_identity(identity)
        >>> controller.identity is identity
        True
    """

    def __init__(self, pipe: Any, denoiser_name: str | None = None) -> None:
        self._pipe = pipe
        self._denoiser_name = denoiser_name
        self._loaded: _Loaded | None = None
        self.lock = threading.RLock()
        self._placement = Placement(pipe, self._denoiser)

    # ------------------------------------------------------------------ what is loaded
    @property
    def is_loaded(self) -> bool:
        """Whether a HyperLoRA checkpoint is loaded on the pipeline."""
        return self._loaded is not None

    def _require(self, caller: str) -> _Loaded:
        if self._loaded is None:
            raise HyperLoRANotLoadedError(
                f"{caller}: no HyperLoRA is loaded on this pipeline. Call `pipe.load_hyperlora(...)` first (a Hub "
                "repo id such as 'bytedance-research/HyperLoRA' with its `subfolder=`, or a local folder)."
            )
        return self._loaded

    @property
    def predictor(self) -> HyperLoRAPredictor:
        """The loaded `HyperLoRAPredictor`."""
        return self._require("pipe.hyperlora.predictor").predictor

    @property
    def config(self) -> HyperLoRAConfig:
        """The loaded checkpoint's `HyperLoRAConfig`."""
        return self.predictor.config

    @property
    def adapters(self) -> HyperLoRAAdapters:
        """The `"id"`/`"base"` PEFT adapters on the denoiser."""
        return self._require("pipe.hyperlora.adapters").adapters

    @property
    def dtype(self) -> torch.dtype:
        return self.predictor.dtype

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def source(self) -> str | None:
        """Where the checkpoint was loaded from (`None` for a predictor passed in)."""
        return self._require("pipe.hyperlora.source").source

    @property
    def identity(self) -> HyperLoRAIdentity | None:
        """The identity written into the adapters, or `None` (nothing written, or the adapters were removed)."""
        loaded = self._loaded
        if loaded is None or not loaded.adapters.is_attached():
            return None
        return loaded.identity

    @property
    def sliders(self) -> dict[str, HyperLoRASlider]:
        """The sliders on the pipeline, by adapter name (a copy)."""
        loaded = self._loaded
        return {} if loaded is None else dict(loaded.sliders)

    @property
    def feature_extractor(self) -> FeatureExtractor | None:
        """The feature extractor (photos -> features), or `None` until the first call that needs it built it."""
        loaded = self._loaded
        return None if loaded is None else loaded.feature_extractor

    def adapter_names(self) -> list[str]:
        """Every adapter HyperLoRA owns on the denoiser: "id", "base" and the sliders."""
        loaded = self._loaded
        return [] if loaded is None else [*loaded.adapters.names.values(), *loaded.sliders]

    def _denoiser(self) -> torch.nn.Module:
        return find_denoiser(self._pipe, self._denoiser_name)

    # ------------------------------------------------------------------ load / unload
    def load(self, pretrained_model_name_or_path: str | os.PathLike | HyperLoRAPredictor, options: LoadOptions) -> None:
        """Load a checkpoint transactionally: resolve, read and check it against the denoiser, then replace the
        HyperLoRA that was there. Any error leaves the old one (and its identity) in place."""
        options = options.checked(pretrained_model_name_or_path)
        with self.lock:
            denoiser = self._denoiser()
            self._placement.check_supported()
            predictor, source = self._read(pretrained_model_name_or_path, options, denoiser.dtype)
            predictor.check_weights_finite()
            names = options.adapter_names
            HyperLoRAAdapters.check_attachable(denoiser, predictor.config, *names, replacing=self.adapter_names())
            old = self._loaded
            snapshot = None if old is None else old.adapters.snapshot(list(old.sliders))
            self.unload()
            try:
                adapters = HyperLoRAAdapters.attach(
                    denoiser, predictor.config, *names, id_weight=options.id_weight, base_weight=options.base_weight
                )
            except BaseException:
                self._put_back(old, snapshot, denoiser)
                raise
            loaded = _Loaded(predictor.eval().requires_grad_(False), adapters, source, options)
            self._install(loaded, denoiser)

    def _install(self, loaded: _Loaded, denoiser: torch.nn.Module) -> None:
        loaded.save_hook = hide_adapters_when_saving(denoiser, self.adapter_names_of(loaded))
        self._loaded = loaded

    def _put_back(self, old: _Loaded | None, snapshot: AdapterSnapshot | None, denoiser: torch.nn.Module) -> None:
        """Roll back a load that failed after `unload`: the old HyperLoRA, its adapters (bitwise), sliders and
        identity come back. Adapters that diffusers had removed stay removed (`_ensure_attached` re-attaches)."""
        if old is None:
            return
        if snapshot is not None:
            old.adapters = snapshot.restore(denoiser)
        old.serving = None
        self._install(old, denoiser)

    @staticmethod
    def _read(
        checkpoint: str | os.PathLike | HyperLoRAPredictor, options: LoadOptions, dtype: torch.dtype
    ) -> tuple[HyperLoRAPredictor, str | None]:
        if isinstance(checkpoint, HyperLoRAPredictor):
            return checkpoint, None
        from ..io import load_predictor

        source = os.fspath(checkpoint)
        predictor = load_predictor(
            source,
            options.hub_options,
            torch_dtype=options.torch_dtype or dtype,
            heads=options.heads,
            dim_head=options.dim_head,
        )
        return predictor, source

    @staticmethod
    def adapter_names_of(loaded: _Loaded) -> Callable[[], list[str]]:
        return lambda: [*loaded.adapters.names.values(), *loaded.sliders]

    def unload(self) -> None:
        """Remove HyperLoRA's adapters and predictor; the denoiser computes exactly what it did before loading.

        A no-op when nothing is loaded (like diffusers' `unload_lora_weights`).
        """
        with self.lock:
            loaded = self._loaded
            if loaded is None:
                return
            if loaded.serving is not None:
                loaded.serving.close()
            loaded.adapters.remove_adapters(list(loaded.sliders))
            if loaded.save_hook is not None:
                loaded.save_hook.remove()
            loaded.adapters.detach()
            self._loaded = None

    # ------------------------------------------------------------------ device policy (placement.py)
    def _sync(self, loaded: _Loaded) -> HyperLoRAPredictor:
        return self._placement.sync(loaded.predictor, loaded.options.offload_bank)

    def prepare_predictor(self) -> HyperLoRAPredictor:
        """Move the predictor where the next switch computes (honouring `offload_bank`) and return it."""
        with self.lock:
            return self._sync(self._require("pipe.hyperlora.prepare_predictor()"))

    @contextmanager
    def _offload_lifted(self, loaded: _Loaded) -> Iterator[None]:
        """Refuse group offloading; lift sequential CPU offload for the block (see `Placement.lifted`)."""
        self._placement.check_supported()
        with self._placement.lifted(loaded.adapters.live_device_dtype()) as lifted:
            if lifted:
                loaded.synced_for = None
            yield

    def _rest(self, loaded: _Loaded) -> None:
        """Under CPU offload, send the predictor back to the CPU after use, like the offloaded models."""
        if self._placement.rest(loaded.predictor):
            loaded.synced_for = None

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        id_embeds: torch.Tensor | None = None,
        clip_hidden_states: torch.Tensor | None = None,
        base_clip_hidden_states: torch.Tensor | None = None,
        sources: Sequence[str] | None = None,
    ) -> HyperLoRAIdentity:
        """Features -> `HyperLoRAIdentity` (the features path: no face or CLIP models needed). Validated: wrong
        shapes raise `FeatureShapeError`, NaN/inf raise `NonFiniteValueError`."""
        with self.lock:
            loaded = self._require("pipe.hyperlora.predict()")
            with self._computing(loaded) as predictor:
                return predictor.predict(id_embeds, clip_hidden_states, base_clip_hidden_states, sources)

    def predict_identity(self, images: Any, caller: str = "predict_hyperlora_identity", **kwargs: Any):
        """Photos -> `HyperLoRAIdentity`, without touching the adapters. Saved identity files (`.safetensors`) and
        `HyperLoRAIdentity` objects may stand among the photos: they are pooled in exactly."""
        with self.lock:
            loaded = self._require(f"pipe.{caller}()")
            inputs = as_image_list(images, caller)
            _check_options_apply(caller, [inputs], kwargs)
            return resolve_identity(
                inputs, lambda photos: self._predict_photos(loaded, photos, kwargs), loaded.predictor
            )

    def _predict_photos(self, loaded: _Loaded, photos: list[Any], kwargs: dict[str, Any]) -> HyperLoRAIdentity:
        with self._computing(loaded) as predictor:
            return predictor.predict_photos(photos, self._extractor(loaded), **kwargs)

    def _extractor(self, loaded: _Loaded) -> FeatureExtractor:
        if loaded.feature_extractor is None:
            from ..face import build_feature_extractor

            options = loaded.options
            loaded.feature_extractor = build_feature_extractor(
                loaded.predictor.config,
                source=loaded.source,
                image_encoder=options.image_encoder,
                face_analyzer=options.face_analyzer,
                hub_options=options.hub_options,
            )
        return loaded.feature_extractor

    def preview_inputs(self, images: Any, **kwargs: Any) -> list:
        """What the encoders will see for each photo (see `pipe.preview_hyperlora_inputs`)."""
        with self.lock:
            loaded = self._require("pipe.preview_hyperlora_inputs()")
            images = as_image_list(images, "preview_hyperlora_inputs")
            extractor = self._extractor(loaded)
            prepare = getattr(extractor, "prepare_inputs", None)
            if prepare is None:
                raise InvalidArgumentTypeError(
                    f"The pipeline's feature extractor ({type(extractor).__name__}) cannot show its inputs: only the "
                    "built-in face pipeline (diffusers_hyperlora.face) has `prepare_inputs`.",
                    argument="feature_extractor",
                )
            refuse_checkpoint_options(kwargs, "a preview")
            return prepare(images, with_base=loaded.predictor.config.has_base, **kwargs)

    # ------------------------------------------------------------------ switching identities
    @torch.no_grad()
    def set_identity(self, images_or_identity: Any, **kwargs: Any) -> HyperLoRAIdentity:
        """Write a person's LoRA into the `"id"` (and `"base"`) adapters in place (see
        `pipe.set_hyperlora_identity`). Everything is validated and mixed before the first weight changes."""
        with self.lock:
            loaded = self._require("pipe.set_hyperlora_identity()")
            identity = self._as_identity(images_or_identity, "set_hyperlora_identity", kwargs)
            self._write(loaded, [identity], per_sample=False)
            return identity

    @torch.no_grad()
    def set_identities(self, identities: Sequence[Any], **kwargs: Any) -> list[HyperLoRAIdentity]:
        """One identity per prompt for the next pipeline calls (see `pipe.set_hyperlora_identities`).

        Every entry is predicted (photos, identity files) and validated before anything changes.
        """
        with self.lock:
            loaded = self._require("pipe.set_hyperlora_identities()")
            if isinstance(identities, (str, HyperLoRAIdentity)) or not isinstance(identities, Sequence):
                raise InvalidArgumentTypeError(
                    "set_hyperlora_identities() takes a list with one entry per prompt (a HyperLoRAIdentity, or "
                    f"photos / an identity file), got a {type(identities).__name__}. For one identity for the whole "
                    "batch use `pipe.set_hyperlora_identity(x)`.",
                    argument="identities",
                )
            _check_options_apply("set_hyperlora_identities", identities, kwargs)
            resolved = [self._entry_identity(index, entry, kwargs) for index, entry in enumerate(identities)]
            self._write(loaded, resolved, per_sample=True)
            return resolved

    def _entry_identity(self, index: int, entry: Any, kwargs: dict[str, Any]) -> HyperLoRAIdentity:
        """Entry `index` of `set_identities` as an identity; an error names the entry (one of several)."""
        try:
            return self._as_identity(entry, "set_hyperlora_identities", kwargs, checked=True)
        except HyperLoRAError as error:
            error.args = (f"set_hyperlora_identities(): entry {index} (prompt {index}): {error}", *error.args[1:])
            raise

    def _write(self, loaded: _Loaded, identities: list[HyperLoRAIdentity], per_sample: bool) -> None:
        """The one write path of both switches: validate every identity, re-attach the adapters if diffusers
        removed them, then write one identity for the batch or one per prompt."""
        for identity in identities:
            loaded.predictor.check_identity(identity)
        self._ensure_attached(loaded)
        with self._writing(loaded) as serving:
            if per_sample:
                serving.set_identities(identities)
            else:
                serving.write(identities[0])
        loaded.identity = None if per_sample else identities[0]

    @contextmanager
    def using(self, images_or_identity: Any, **kwargs: Any) -> Iterator[HyperLoRAIdentity]:
        """Switch to an identity and hold `lock` until the block ends, so that no other thread switches before the
        images of the block are generated. The identity stays set afterwards.

        Example:
            >>> with pipe.hyperlora.using(alice) as identity:  # doctest: +SKIP
            ...     image = pipe("a photo of a person as an astronaut").images[0]
        """
        with self.lock:
            yield self.set_identity(images_or_identity, **kwargs)

    @contextmanager
    def using_identities(self, identities: Sequence[Any], **kwargs: Any) -> Iterator[list[HyperLoRAIdentity]]:
        """`set_identities` (one identity per prompt) holding `lock` until the block ends, like `using`."""
        with self.lock:
            yield self.set_identities(identities, **kwargs)

    @contextmanager
    def _writing(self, loaded: _Loaded) -> Iterator[IdentityServing]:
        """What a write into the adapters needs: sequential-offload hooks lifted, the predictor where the live
        adapter weights are, and put back to rest afterwards."""
        with self._offload_lifted(loaded):
            # `_sync` walks every module of every component (tens of ms on SDXL), more than a GPU switch takes:
            # sync again only when the live adapter weights moved or changed dtype since the last sync.
            live = loaded.adapters.live_device_dtype()
            if live is None or live != loaded.synced_for:
                self._sync(loaded)
                loaded.synced_for = live
            try:
                yield self._serving(loaded)  # the prepared-identity cache and the per-sample mode
            finally:
                self._rest(loaded)

    @contextmanager
    def _computing(self, loaded: _Loaded) -> Iterator[HyperLoRAPredictor]:
        """The predictor on the execution device in the denoiser's dtype for one computation, at rest after."""
        predictor = self._sync(loaded)
        try:
            yield predictor
        finally:
            self._rest(loaded)

    def _serving(self, loaded: _Loaded) -> IdentityServing:
        """The cache and per-sample mode of the current adapters (made again, same cache budget, after a
        re-attach)."""
        serving = loaded.serving
        if serving is None or serving.adapters is not loaded.adapters:
            if serving is None:
                serving = IdentityServing(loaded.predictor, loaded.adapters)
            else:
                serving.close()
                serving = IdentityServing(loaded.predictor, loaded.adapters, serving.cache.max_bytes)
            loaded.serving = serving
        return serving

    @property
    def identities(self) -> list[HyperLoRAIdentity] | None:
        """The per-prompt identities of `set_identities`, or `None` (one identity for the whole batch)."""
        loaded = self._loaded
        if loaded is None or loaded.serving is None or not loaded.serving.per_sample_active:
            return None
        return list(loaded.serving.identities)

    @property
    def per_sample_active(self) -> bool:
        """Whether the next pipeline calls use one identity per prompt."""
        return self.identities is not None

    @property
    def cache(self) -> PreparedIdentityCache:
        """The prepared-identity cache (mixed factors of recent identities, LRU under `cache.max_bytes`)."""
        with self.lock:
            loaded = self._require("pipe.hyperlora.cache")
            return self._serving(loaded).cache

    def _ensure_attached(self, loaded: _Loaded) -> None:
        """Attach the adapters again when diffusers' own LoRA calls removed them."""
        adapters = loaded.adapters
        if adapters.is_attached():
            return
        denoiser = self._denoiser()
        logger.warning(
            "HyperLoRA's adapters were removed from the denoiser (by `unload_lora_weights`, `delete_adapters` or "
            "`unload_lora`); attaching them again with the weights given at load."
        )
        adapters.detach()
        existing = adapter_configs(denoiser)
        loaded.sliders = {name: s for name, s in loaded.sliders.items() if name in existing}
        options = loaded.options
        HyperLoRAAdapters.check_attachable(denoiser, loaded.predictor.config, *options.adapter_names)
        loaded.adapters = HyperLoRAAdapters.attach(
            denoiser,
            loaded.predictor.config,
            *options.adapter_names,
            id_weight=options.id_weight,
            base_weight=options.base_weight,
        )
        loaded.identity = None
        loaded.synced_for = None

    # ------------------------------------------------------------------ LoRA weights and files
    def lora_weights(self, identity: HyperLoRAIdentity, branch: str = "id") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(down [r, in], up [out, r])` float32 for every target linear of a branch."""
        with self.lock:
            loaded = self._require("pipe.hyperlora.lora_weights()")
            with self._computing(loaded) as predictor:
                return predictor.lora_weights(identity, branch)

    def export_lora(
        self,
        identity: HyperLoRAIdentity | HyperLoRASlider,
        path: str | os.PathLike | None = None,
        format: str | None = None,
        branch: str = "id",
        dtype: torch.dtype | str = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """The identity's (or slider's) LoRA as a standard state dict, and a file when `path` is given (written
        atomically). See `diffusers_hyperlora.io.lora_files.export_lora` for the formats."""
        with self.lock:
            loaded = self._require("pipe.hyperlora.export_lora()")
            with self._computing(loaded) as predictor:
                return export_lora(predictor, identity, path, format=format, branch=branch, dtype=dtype)

    # ------------------------------------------------------------------ sliders
    @torch.no_grad()
    def add_slider(
        self,
        neutral: Any,
        edited: Any,
        adapter_name: str = DEFAULT_SLIDER_NAME,
        weight: float = DEFAULT_SLIDER_WEIGHT,
        **kwargs: Any,
    ) -> HyperLoRASlider:
        """Add (or rewrite) a slider adapter (see `pipe.add_hyperlora_slider`)."""
        with self.lock:
            loaded = self._require("pipe.add_hyperlora_slider()")
            weight = check_slider_weight(weight)
            check_adapter_name(adapter_name, "add_hyperlora_slider()", "adapter_name", repr(DEFAULT_SLIDER_NAME))
            if adapter_name in loaded.adapters.names.values():
                raise AdapterNameConflictError(
                    f"add_hyperlora_slider(): {adapter_name!r} is one of HyperLoRA's own adapters "
                    f"({sorted(loaded.adapters.names.values())}); give the slider another name, e.g. "
                    f"`adapter_name={DEFAULT_SLIDER_NAME!r}`.",
                    argument="adapter_name",
                )
            slider = HyperLoRASlider(
                neutral=self._slider_side(neutral, "neutral", kwargs, (neutral, edited)),
                edited=self._slider_side(edited, "edited", kwargs, (neutral, edited)),
            )
            with self._computing(loaded) as predictor:
                difference = slider.lora_weights(predictor)
            self._ensure_attached(loaded)
            with self._offload_lifted(loaded):
                replace = adapter_name in loaded.sliders
                loaded.adapters.put_slider(adapter_name, difference, weight, replace=replace)
            loaded.sliders[adapter_name] = slider
            return slider

    def _slider_side(self, value: Any, side: str, kwargs: dict, sides: tuple) -> HyperLoRAIdentity:
        if value is None:
            raise InvalidArgumentError(
                f"add_hyperlora_slider(): `{side}` is missing; pass images or a HyperLoRAIdentity.", argument=side
            )
        _check_options_apply("add_hyperlora_slider", sides, kwargs)
        return self._as_identity(value, "add_hyperlora_slider", kwargs, checked=True)

    def _as_identity(self, value: Any, caller: str, kwargs: dict, checked: bool = False) -> HyperLoRAIdentity:
        """A `HyperLoRAIdentity` as given, else predicted from photos / identity files.

        Args:
            checked: the caller already made sure that `kwargs` (feature extractor options) apply to some photos.
        """
        if not checked:
            _check_options_apply(caller, [value], kwargs)
        if isinstance(value, HyperLoRAIdentity):
            return value
        if checked and not _has_photos(value):
            kwargs = {}  # options for the photos of other entries
        return self.predict_identity(value, caller=caller, **kwargs)

    def remove_slider(self, adapter_name: str = DEFAULT_SLIDER_NAME) -> None:
        """Delete one slider adapter created by `add_slider`."""
        with self.lock:
            loaded = self._require("pipe.remove_hyperlora_slider()")
            if adapter_name not in loaded.sliders:
                raise InvalidArgumentError(
                    f"remove_hyperlora_slider(): no HyperLoRA slider named {adapter_name!r} on this pipeline "
                    f"(sliders: {sorted(loaded.sliders) or 'none'}). Use the name given to `add_hyperlora_slider`.",
                    argument="adapter_name",
                )
            loaded.adapters.remove_adapters([adapter_name])
            del loaded.sliders[adapter_name]

    def __repr__(self) -> str:
        loaded = self._loaded
        if loaded is None:
            return "HyperLoRAController(not loaded)"
        return (
            f"HyperLoRAController(source={loaded.source!r}, adapters={self.adapter_names()}, "
            f"identity={'set' if self.identity is not None else None})"
        )


def _has_photos(value: Any) -> bool:
    """Whether one input (an image, a path, a list of them) holds at least one photo, not only saved identities."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(not is_identity_input(item) for item in values)


def _check_options_apply(caller: str, entries: Sequence[Any], options: Mapping[str, Any]) -> None:
    """Refuse feature extractor options when no entry holds a photo: they would be silently ignored."""
    if options and not any(_has_photos(entry) for entry in entries):
        names = ", ".join(f"{name}=" for name in sorted(options))
        raise InvalidArgumentError(
            f"{caller}(): {names} are options of the face pipeline, which only photos go through; the input is only "
            "saved identities (HyperLoRAIdentity objects or .safetensors files), used as they are. Drop the "
            "options, or pass photos.",
            argument=sorted(options)[0],
        )
