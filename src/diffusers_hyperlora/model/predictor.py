"""`HyperLoRAPredictor`: image features -> `HyperLoRAIdentity` -> LoRA weights (docs/math.md).

The module is the network only. Files are `diffusers_hyperlora.io`'s: `from_pretrained`, `save_pretrained`,
`push_to_hub` and `export_lora` below are documented one-line entries into `io` (imported when called, since `io`
builds predictors and so sits above this module; docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    CheckpointFormatError,
    FeatureShapeError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NonFiniteValueError,
)
from ..identities.features import FeatureExtractor
from ..identities.identity import HyperLoRAIdentity
from ..utils.checks import first_non_finite, parse_dtype, require_finite
from ..utils.devices import parse_device
from .bank import BasisBank
from .config import HyperLoRAConfig
from .resampler import IDProjector, PerceiverResampler


class HyperLoRAPredictor(nn.Module):
    """The hypernetwork: projector, Perceiver resampler(s) and basis banks.

    Args:
        config: the architecture.
        device: where to create the parameters (`"meta"` creates no storage, for loading).
        dtype: parameter dtype.

    Example:
        >>> import torch
        >>> from diffusers_hyperlora import HyperLoRAConfig, HyperLoRAPredictor
        >>> from diffusers_hyperlora.model.targets import TargetModule
        >>> config = HyperLoRAConfig(
        ...     targets=[TargetModule("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1", 32)],
        ...     num_basis=4, resampler_dim=16, resampler_depth=1, resampler_heads=2, resampler_dim_head=8,
        ...     num_id_tokens=2, image_embed_dim=24,
        ... )
        >>> predictor = HyperLoRAPredictor(config)
        >>> identity = predictor.predict(id_embeds=torch.randn(2, 512), clip_hidden_states=torch.randn(2, 5, 24))
        >>> identity.id_coefficients.shape, identity.num_images
        (torch.Size([8, 4]), 2)
    """

    def __init__(
        self, config: HyperLoRAConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = HyperLoRAConfig.from_dict(config)
        if not isinstance(config, HyperLoRAConfig):
            raise InvalidArgumentTypeError(
                f"HyperLoRAPredictor() takes a HyperLoRAConfig (or its dict), got a {type(config).__name__}. Load a "
                "checkpoint with `HyperLoRAPredictor.from_pretrained(path)`, or build `HyperLoRAConfig(...)` first.",
                argument="config",
            )
        device = None if device is None else parse_device(device)
        dtype = parse_dtype(dtype)
        self.config = config
        factory = {"device": device, "dtype": dtype}
        with torch.device(device) if device is not None else nullcontext():
            self.id_projector = (
                IDProjector(config.id_embed_dim, config.num_id_tokens, config.image_embed_dim)
                if config.use_id_embeds
                else None
            )
            self.resampler = _resampler(config, base=False)
            self.base_resampler = _resampler(config, base=True) if config.has_base else None
        linears = config.linears
        self.id_bank = BasisBank(linears, config.num_basis, config.id_rank, **factory)
        self.base_bank = BasisBank(linears, config.num_basis, config.base_rank, **factory) if config.has_base else None
        if dtype is not None:
            self.to(dtype)

    # ------------------------------------------------------------------ identity of the checkpoint
    @property
    def checkpoint_hash(self) -> str:
        return self.config.architecture_hash()

    @property
    def probe(self) -> torch.Tensor:
        """A few weights that tell two checkpoints with the same architecture apart."""
        return self.resampler.proj_out.weight.detach()[0, :8].float().cpu()

    @property
    def device(self) -> torch.device:
        return self.resampler.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.resampler.latents.dtype

    def to(self, *args: Any, **kwargs: Any) -> HyperLoRAPredictor:
        """`nn.Module.to`, with a device name checked first (`InvalidArgumentError` for one torch or this machine
        lacks, the module unchanged)."""
        positional = args[0] if args and not isinstance(args[0], (torch.dtype, torch.Tensor)) else None
        device = kwargs.get("device", positional)
        if device is not None:
            parse_device(device)
        return super().to(*args, **kwargs)

    # ------------------------------------------------------------------ prediction
    def _check_features(
        self, id_embeds: torch.Tensor | None, clip_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        config = self.config
        if config.use_id_embeds:
            if id_embeds is None:
                raise FeatureShapeError(
                    "This checkpoint reads ArcFace embeddings: pass `id_embeds` of shape [B, 512] or [B, 1, 512].",
                    argument="id_embeds",
                )
            id_embeds = _as_tensor(id_embeds, "id_embeds", f"[B, {config.id_embed_dim}]")
            if id_embeds.ndim == 3 and id_embeds.shape[1] == 1:
                id_embeds = id_embeds[:, 0]
            if id_embeds.ndim != 2 or id_embeds.shape[1] != config.id_embed_dim:
                raise FeatureShapeError(
                    f"`id_embeds` must have shape [B, {config.id_embed_dim}] or [B, 1, {config.id_embed_dim}] "
                    f"(normed ArcFace embeddings, one per image), got {list(id_embeds.shape)}.",
                    argument="id_embeds",
                )
            _check_batch(id_embeds, "id_embeds")
        if config.use_image_embeds:
            clip_hidden_states = _check_clip(clip_hidden_states, config.image_embed_dim, "clip_hidden_states")
        fix = "check the images and the encoders (a NaN usually comes from a damaged file or a 16-bit overflow)"
        require_finite(id_embeds, "`id_embeds`", fix, argument="id_embeds")
        require_finite(clip_hidden_states, "`clip_hidden_states`", fix, argument="clip_hidden_states")
        if (
            id_embeds is not None
            and clip_hidden_states is not None
            and id_embeds.shape[0] != clip_hidden_states.shape[0]
        ):
            raise FeatureShapeError(
                f"`id_embeds` ({id_embeds.shape[0]} images) and `clip_hidden_states` ({clip_hidden_states.shape[0]} "
                "images) must describe the same images: give both the same batch size.",
            )  # no `argument=`: neither input alone is at fault
        return id_embeds, clip_hidden_states

    def forward(
        self, id_embeds: torch.Tensor | None = None, clip_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-image ID coefficients `[B, num_tokens, K]`, before averaging and normalization."""
        return self._id_coefficients(*self._check_features(id_embeds, clip_hidden_states))

    def _id_coefficients(self, id_embeds: torch.Tensor | None, clip_hidden_states: torch.Tensor | None) -> torch.Tensor:
        cast = {"device": self.device, "dtype": self.dtype}
        id_tokens = self.id_projector(id_embeds.to(**cast)) if self.id_projector is not None else None
        image_tokens = clip_hidden_states.to(**cast) if clip_hidden_states is not None else None
        return self.resampler(id_tokens, image_tokens)

    def forward_base(self, base_clip_hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-image Base coefficients `[B, num_tokens, K]` from CLIP features of the face-blurred images."""
        states = _check_clip(base_clip_hidden_states, self.config.image_embed_dim, "base_clip_hidden_states")
        fix = "check the images and the CLIP encoder"
        require_finite(states, "`base_clip_hidden_states`", fix, argument="base_clip_hidden_states")
        return self.base_resampler(None, states.to(device=self.device, dtype=self.dtype))

    def _refuse_unread_features(self, id_embeds: Any, clip_hidden_states: Any) -> None:
        """A feature this checkpoint has no input for would be ignored without a word: refuse it by name."""
        unread = {
            "id_embeds": (id_embeds, self.config.use_id_embeds, "ArcFace embeddings"),
            "clip_hidden_states": (clip_hidden_states, self.config.use_image_embeds, "CLIP features"),
        }
        for name, (value, read, what) in unread.items():
            if value is not None and not read:
                raise InvalidArgumentError(
                    f"`{name}` was given, but this checkpoint does not read {what} (its config has no input for "
                    f"them): leave `{name}` out.",
                    argument=name,
                )

    @torch.no_grad()
    def predict(
        self,
        id_embeds: torch.Tensor | None = None,
        clip_hidden_states: torch.Tensor | None = None,
        base_clip_hidden_states: torch.Tensor | None = None,
        sources: Sequence[str] | None = None,
    ) -> HyperLoRAIdentity:
        """Predict one identity from the features of B images of a person (averaged over the images).

        Args:
            id_embeds: normed ArcFace embeddings, `[B, 512]` or `[B, 1, 512]`.
            clip_hidden_states: CLIP vision `hidden_states[-2]` of the face crops, `[B, T, E]`.
            base_clip_hidden_states: the same for the face-blurred images (checkpoints with a Base branch).
            sources: names of the images, kept in the identity.

        Raises:
            FeatureShapeError: features of the wrong shape; `InvalidArgumentTypeError`: features that are not tensors;
            `InvalidArgumentError`: a feature this checkpoint does not read (`id_embeds` for a CLIP-only one,
            `clip_hidden_states` for an ArcFace-only one, `base_clip_hidden_states` without a Base branch).
        """
        self._refuse_unread_features(id_embeds, clip_hidden_states)
        if base_clip_hidden_states is not None and self.base_resampler is None:
            raise InvalidArgumentError(
                "`base_clip_hidden_states` was given, but this checkpoint has no Base branch to read it (the public "
                "release has none): leave it out. The identity is then the ID branch's alone.",
                argument="base_clip_hidden_states",
            )
        if isinstance(sources, (str, os.PathLike)):
            raise InvalidArgumentTypeError(
                f"`sources` must be a list of image names, one per image, got the single {type(sources).__name__} "
                f"{os.fspath(sources)!r}: pass [{os.fspath(sources)!r}].",
                argument="sources",
            )
        id_embeds, clip_hidden_states = self._check_features(id_embeds, clip_hidden_states)
        base_mean = None
        if base_clip_hidden_states is not None:
            base_mean = self.forward_base(base_clip_hidden_states).float().mean(0)
        id_mean = self._id_coefficients(id_embeds, clip_hidden_states).float().mean(0)
        num_images = (id_embeds if id_embeds is not None else clip_hidden_states).shape[0]
        return HyperLoRAIdentity(
            id_mean=id_mean.cpu(),
            num_images=num_images,
            base_mean=None if base_mean is None else base_mean.cpu(),
            checkpoint=self.checkpoint_hash,
            probe=self.probe,
            sources=list(sources or []),
        )

    def predict_photos(
        self, photos: Sequence[Any], feature_extractor: FeatureExtractor, **options: Any
    ) -> HyperLoRAIdentity:
        """Predict one identity from photos of a person, through `feature_extractor` (`face.FaceFeatureExtractor`
        or your own): features on this predictor's device and dtype, with the face-blurred (Base) features when
        this checkpoint has a Base branch. `options` go to the extractor. The one photos -> identity step of
        `pipe.predict_hyperlora_identity` and the command line.
        """
        refuse_checkpoint_options(options, "the feature extractor's")
        if not callable(feature_extractor):
            raise InvalidArgumentTypeError(
                f"`feature_extractor` must be callable (a `face.FaceFeatureExtractor` or your own `FeatureExtractor`), "
                f"got {type(feature_extractor).__name__}: an object called as `extractor(images, *, device, dtype, "
                "with_base)` (docs/api.md, `FeatureExtractor`), or `pipe.predict_hyperlora_identity(photos)`, which "
                "builds the face pipeline.",
                argument="feature_extractor",
            )
        if isinstance(photos, (str, bytes, os.PathLike)) or not isinstance(photos, Iterable):
            raise InvalidArgumentTypeError(
                f"`photos` must be a list of photos (paths, PIL images, arrays), got a {type(photos).__name__}: "
                "put a single photo in a list, `[photo]`.",
                argument="photos",
            )
        features = feature_extractor(
            list(photos), device=self.device, dtype=self.dtype, with_base=self.config.has_base, **options
        )
        config = self.config  # an extractor may give features this checkpoint does not read: they are left out
        id_embeds = features.id_embeds if config.use_id_embeds else None
        clip_hidden_states = features.clip_hidden_states if config.use_image_embeds else None
        base = features.base_clip_hidden_states if config.has_base else None
        return self.predict(id_embeds, clip_hidden_states, base, features.sources)

    # ------------------------------------------------------------------ validation
    def check_identity(self, identity: HyperLoRAIdentity) -> None:
        """Raise unless `identity` belongs to this checkpoint (hash, probe, coefficient shape) and is finite."""
        if not isinstance(identity, HyperLoRAIdentity):
            raise InvalidArgumentTypeError(
                f"Expected a HyperLoRAIdentity, got {type(identity).__name__}. Predict one with "
                "`pipe.predict_hyperlora_identity(images)` or load one with `HyperLoRAIdentity.load(path)`.",
                argument="identity",
            )
        identity.check_compatible(
            self.checkpoint_hash, self.probe, shape=(self.config.num_tokens, self.config.num_basis)
        )
        identity.check_finite()

    def check_weights_finite(self) -> None:
        """Raise `NonFiniteValueError` naming the first parameter with NaN/infinite values (a damaged file)."""
        empty = [name for name, param in self.named_parameters() if param.is_meta]
        if empty:
            raise CheckpointFormatError(
                f"The HyperLoRA predictor has no weights in {empty[0]!r} (and {len(empty) - 1} more): it was created "
                "on the meta device and never loaded. Load a checkpoint with `HyperLoRAPredictor.from_pretrained` "
                "or pass the checkpoint's path to `load_hyperlora`."
            )
        found = first_non_finite(self.named_parameters())
        if found is not None:
            name, count = found
            raise NonFiniteValueError(
                f"The HyperLoRA checkpoint's weight {name!r} holds {count} NaN/infinite value(s): the file is "
                "damaged. Download it again (`force_download=True`) or re-convert it."
            )

    # ------------------------------------------------------------------ coefficients -> LoRA weights
    def bank(self, branch: str = "id") -> BasisBank:
        if branch == "id":
            return self.id_bank
        if branch == "base" and self.base_bank is not None:
            return self.base_bank
        raise InvalidArgumentError(
            f"branch must be 'id' or 'base' (this checkpoint has a Base branch: {self.config.has_base}), "
            f"got {branch!r}.",
            argument="branch",
        )

    def split_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, K]` -> `[num_linears, 2, K]`: entry i's 8 tokens are (down, up) for q, k, v, out."""
        return coefficients.reshape(-1, 2, self.config.num_basis)

    @torch.no_grad()
    def lora_weights(
        self, identity: HyperLoRAIdentity, branch: str = "id", device: torch.device | str | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(down [r, in], up [out, r])` float32 for every target linear (checkpoint order) of one branch, on `device`
        (default: the predictor's)."""
        device = self.device if device is None else parse_device(device)
        self.check_identity(identity)
        coefficients = identity.coefficients(branch)
        if coefficients is None:
            raise InvalidArgumentError(
                f"This identity has no {branch!r} coefficients (it was predicted without Base inputs): "
                "use branch='id'.",
                argument="branch",
            )
        return self.bank(branch).lora_weights(self.split_coefficients(coefficients.to(device)))

    # ------------------------------------------------------------------ files (diffusers_hyperlora.io does the work)
    def export_lora(
        self,
        identity: HyperLoRAIdentity | Any,
        path: str | os.PathLike | None = None,
        format: str | None = None,
        branch: str = "id",
        dtype: torch.dtype | str = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """The identity's (or slider's) LoRA as a standard state dict, and a `.safetensors` file when `path` is given.

        Same as `diffusers_hyperlora.io.lora_files.export_lora(predictor, ...)` (which see for the formats).

        Example:
            >>> state_dict = predictor.export_lora(identity, "me.safetensors", format="kohya")  # doctest: +SKIP
        """
        from ..io.lora_files import export_lora

        return export_lora(self, identity, path, format=format, branch=branch, dtype=dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> HyperLoRAPredictor:
        """Load a predictor from a Hub repo id or a local folder, in the library format or the release's layout.

        Same as `diffusers_hyperlora.load_predictor` (which see), whose arguments it takes.

        Example:
            >>> predictor = HyperLoRAPredictor.from_pretrained("org/hyperlora", revision="v1.0")  # doctest: +SKIP
        """
        from ..io.checkpoint import load_predictor

        return load_predictor(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str | None = None,
        model_card_kwargs: dict | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> Path | str:
        """Write `config.json`, the safetensors weights and a model card `README.md` (docs/hub-format.md).

        The files are written as one set: if writing fails midway, those already in `save_directory` are left
        as they were. An existing `README.md` is kept. Weights above `max_shard_size` (default 1 GB) are split
        into shards. The predictor's own config is written (there is no `config=` argument). `push_to_hub=True`
        then uploads the same files to `repo_id` (default: the folder's name), with `push_to_hub`'s keywords.
        Returns the folder, or the commit URL when pushing.

        Same as `diffusers_hyperlora.io.checkpoint.save_pretrained` (+ `push_to_hub`).

        Example:
            >>> predictor.save_pretrained("my-hyperlora")  # doctest: +SKIP
        """
        from ..io.checkpoint import save_pretrained

        return save_pretrained(
            self,
            save_directory,
            max_shard_size=max_shard_size,
            model_card_kwargs=model_card_kwargs,
            push_to_hub=push_to_hub,
            repo_id=repo_id,
            **push_to_hub_kwargs,
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the predictor in the library format to the Hub repo `repo_id` in one commit (created if needed).

        Same as `diffusers_hyperlora.io.checkpoint.push_predictor_to_hub` (which see for the keywords: `private`,
        `token`, `branch`, `create_pr`, `commit_message`, `model_card_kwargs`, `max_shard_size`). The model card's
        usage snippet names `repo_id`.

        Example:
            >>> predictor.push_to_hub("me/my-hyperlora", private=True)  # doctest: +SKIP
        """
        from ..io.checkpoint import push_predictor_to_hub

        return push_predictor_to_hub(self, repo_id, **kwargs)


def _resampler(config: HyperLoRAConfig, base: bool) -> PerceiverResampler:
    """A resampler of the config's size. The ID branch reads the configured conditions; the Base branch reads only
    the CLIP features of the face-blurred image."""
    return PerceiverResampler(
        num_queries=config.num_tokens,
        dim=config.resampler_dim,
        depth=config.resampler_depth,
        heads=config.resampler_heads,
        dim_head=config.resampler_dim_head,
        ff_mult=config.resampler_ff_mult,
        num_basis=config.num_basis,
        id_dim=config.image_embed_dim if config.use_id_embeds and not base else None,
        image_dim=config.image_embed_dim if config.use_image_embeds or base else None,
    )


def _check_clip(states: torch.Tensor | None, width: int, name: str) -> torch.Tensor:
    if states is None:
        raise FeatureShapeError(
            f"This checkpoint reads CLIP image features: pass `{name}` of shape [B, T, {width}] "
            "(CLIP vision hidden_states[-2]).",
            argument=name,
        )
    states = _as_tensor(states, name, f"[B, T, {width}]")
    if states.ndim != 3 or states.shape[-1] != width:
        raise FeatureShapeError(
            f"`{name}` must have shape [B, T, {width}] (CLIP vision hidden_states[-2] of each image), "
            f"got {list(states.shape)}.",
            argument=name,
        )
    _check_batch(states, name)
    return states


def _as_tensor(value: Any, name: str, shape: str) -> torch.Tensor:
    """`value` as a tensor (a tensor, a numpy array or nested lists of numbers), else `InvalidArgumentTypeError`."""
    if isinstance(value, torch.Tensor):
        return value
    why = "not numbers"
    if not isinstance(value, (str, bytes)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            why = str(error)
    raise InvalidArgumentTypeError(
        f"`{name}` must be a torch tensor of shape {shape} (or an array of numbers of that shape), got a "
        f"{type(value).__name__} ({why}). Stack per-image tensors with `torch.stack([...])`.",
        argument=name,
    )


def _check_batch(features: torch.Tensor, name: str) -> None:
    if features.shape[0] == 0:
        raise FeatureShapeError(
            f"`{name}` holds no image (batch size 0): pass the features of at least one image.", argument=name
        )


CHECKPOINT_OPTIONS = ("device", "dtype", "with_base")
"""Feature-extractor options the loaded checkpoint sets itself (its device, its dtype, whether it has a Base branch)."""


def refuse_checkpoint_options(options: dict[str, Any], what: str) -> None:
    """Refuse `device=`, `dtype=` or `with_base=` among a call's options: the checkpoint sets them (a second value
    would be Python's raw "multiple values" `TypeError`)."""
    given = [name for name in CHECKPOINT_OPTIONS if name in options]
    if given:
        raise InvalidArgumentError(
            f"{', '.join(f'{name}=' for name in given)} cannot be passed as {what} option: the loaded checkpoint "
            "sets it (its device and dtype, and whether it has a Base branch). Drop it; move the pipeline with "
            "`pipe.to(...)` to change the device or dtype.",
            argument=given[0],
        )
