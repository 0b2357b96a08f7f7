"""`HyperLoRAIdentity`: what a prediction returns, small enough to store and exact to merge.

The predictor averages the resampler's output over the images of a person, then L2-normalizes each
coefficient vector (docs/math.md, step 4). Because the mean comes first, an identity keeps the *un-normalized*
mean and the number of images: merging two saved identities then equals predicting from all photos at once.

Two kinds of combination, with different math on purpose:

- `HyperLoRAIdentity.merge` pools *photos of one person*: the image-count-weighted mean of the un-normalized
  means, exactly what the predictor computes from all images together.
- `HyperLoRAIdentity.mix` / `interpolate` blend *different people*: a weighted sum of the *normalized*
  coefficient vectors, renormalized when used. Every coefficient vector the bank ever sees has unit norm, so
  the blend stays on the sphere the model was trained on, and each person counts with exactly the given weight,
  whatever the number of photos or the length of their raw mean (averaging many varied photos shortens the
  raw mean, which would otherwise pull a blend toward the person with fewer photos).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging

from ..errors import (
    IdentityFormatError,
    IdentityMismatchError,
    IdentityNotFoundError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from ..utils.atomic_files import atomic_path
from ..utils.checks import count_non_finite, require_finite
from ..utils.devices import parse_device

logger = logging.get_logger(__name__)

NORM_EPS = 1e-8
IDENTITY_FORMAT_VERSION = 1
_FORMAT_KEY = "hyperlora_identity_version"
IDENTITY_KINDS = ("photos", "mix")


def normalize_coefficients(mean: torch.Tensor) -> torch.Tensor:
    """`t * rsqrt(sum(t^2) + 1e-8)` over the last (basis) dimension, in float32."""
    mean = mean.to(torch.float32)
    return mean * torch.rsqrt(mean.square().sum(-1, keepdim=True) + NORM_EPS)


def blend_directions(means: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i * normalize(mean_i)`: the (not yet normalized) direction of a weighted blend.

    >>> a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    >>> normalize_coefficients(blend_directions([a, b], [0.5, 0.5]))
    tensor([[0.7071, 0.7071]])
    """
    return sum(w * normalize_coefficients(m) for m, w in zip(means, weights))


def slerp_directions(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of every row of `normalize(a)` towards `normalize(b)` (constant angular speed).

    Rows that are (nearly) parallel or where either side is zero fall back to the linear blend.

    >>> slerp_directions(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 1 / 3)
    tensor([[0.8660, 0.5000]])
    """
    ua, ub = normalize_coefficients(a), normalize_coefficients(b)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    linear = (1 - t) * ua + t * ub
    safe = sin.abs() > 1e-6
    sin = torch.where(safe, sin, torch.ones_like(sin))
    spherical = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / sin
    return torch.where(safe, spherical, linear)


def normalize_mix_weights(weights: Sequence[float], count: int, caller: str = "HyperLoRAIdentity.mix") -> list[float]:
    """Blend weights as fractions that sum to one, checked: one finite number per identity, a positive sum.

    Only the ratios of the weights matter, so they are first divided by the largest magnitude: huge weights
    (`1e308`) cannot overflow the sum, and `[1e308, 1e308]` is the midpoint like `[1, 1]`.

    >>> normalize_mix_weights([1e308, 1e308], 2)
    [0.5, 0.5]
    >>> [round(w, 6) for w in normalize_mix_weights([3, -1], 2)]
    [1.5, -0.5]
    """
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as error:
        raise InvalidArgumentTypeError(
            f"{caller}() weights must be numbers, one per identity, got {weights!r}.", argument="weights"
        ) from error
    if len(values) != count:
        raise InvalidArgumentError(
            f"{caller}() got {count} {'identity' if count == 1 else 'identities'} but {len(values)} "
            f"{'weight' if len(values) == 1 else 'weights'}: give one weight per identity.",
            argument="weights",
        )
    largest = max((abs(w) for w in values), default=0.0)
    if not all(math.isfinite(w) for w in values) or largest == 0:
        raise InvalidArgumentError(
            f"{caller}() weights must be finite numbers with a positive sum, got {values}; e.g. [0.5, 0.5].",
            argument="weights",
        )
    scaled = [w / largest for w in values]  # in [-1, 1]: the sum cannot overflow
    total = math.fsum(scaled)
    if total <= 0:
        raise InvalidArgumentError(
            f"{caller}() weights must be finite numbers with a positive sum, got {values}; e.g. [0.5, 0.5].",
            argument="weights",
        )
    return [w / total for w in scaled]


def _all_have_base(identities: Sequence[HyperLoRAIdentity], operation: str) -> bool:
    """Whether every identity has Base coefficients; warns when only some do, since the result then has none."""
    with_base = [identity.base_mean is not None for identity in identities]
    if any(with_base) and not all(with_base):
        logger.warning(
            f"{operation}() got identities with and without Base coefficients (clothes, background, light): the "
            "result has none. Predict every identity with its face-blurred photos (a checkpoint with a Base "
            "branch does so by default) to keep the Base part."
        )
    return all(with_base)


def _identity_list(identities: Any, what: str) -> list[HyperLoRAIdentity]:
    """`identities` as a list, refusing one identity or a non-list (Python's "not iterable" otherwise)."""
    if isinstance(identities, (HyperLoRAIdentity, str, bytes, os.PathLike)) or not isinstance(identities, Iterable):
        raise InvalidArgumentTypeError(
            f"HyperLoRAIdentity.{what}() takes a list of HyperLoRAIdentity objects, got a {type(identities).__name__}: "
            f"put them in a list, e.g. HyperLoRAIdentity.{what}([a, b]" + (", [0.5, 0.5])." if what == "mix" else ")."),
            argument="identities",
        )
    return list(identities)


def _check_same_checkpoint(identities: Sequence[HyperLoRAIdentity], what: str) -> None:
    if not identities:
        raise InvalidArgumentError(
            f"HyperLoRAIdentity.{what}() got no identities: pass at least one HyperLoRAIdentity.",
            argument="identities",
        )
    for index, other in enumerate(identities):
        if not isinstance(other, HyperLoRAIdentity):
            raise InvalidArgumentTypeError(
                f"HyperLoRAIdentity.{what}() takes HyperLoRAIdentity objects; item {index} is a "
                f"{type(other).__name__}. Load saved ones with `HyperLoRAIdentity.load(path)`.",
                argument="identities",
            )
    first = identities[0]
    for index, other in enumerate(identities[1:], start=1):
        try:
            other.check_compatible(first.checkpoint, first.probe)
            if other.id_mean.shape != first.id_mean.shape:
                raise IdentityMismatchError(
                    f"Its coefficients have shape {list(other.id_mean.shape)}, the first's {list(first.id_mean.shape)}"
                    ": they come from different checkpoints. Predict them with one checkpoint."
                )
        except IdentityMismatchError as error:
            foreign = IdentityMismatchError(
                f"HyperLoRAIdentity.{what}(): identities[{index}] does not go with identities[0]: {error}",
                argument="identities",
            )
            foreign.index = index  # which one, so front ends can name their own input (the CLI: the file)
            raise foreign from error  # the reason alone, for front ends that word the first part themselves


@dataclass
class HyperLoRAIdentity:
    """Coefficients of one person for one checkpoint.

    Attributes:
        id_mean: `[num_tokens, K]` float32, the mean over images of the ID resampler's output (not normalized).
            For a blend (`kind == "mix"`) it is the weighted sum of the normalized coefficients instead.
        num_images: how many images the mean is over.
        base_mean: the same for the Base branch, or `None` (checkpoint without Base, or no Base input).
        checkpoint: `architecture_hash` of the predictor's config.
        probe: a few weights of the predictor, to tell apart checkpoints with the same architecture.
        sources: names of the input images, when known.
        kind: `"photos"` (a prediction, or a merge of predictions) or `"mix"` (a blend of people).

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> predictor = tiny_hyperlora_predictor()
        >>> a = predictor.predict(id_embeds=torch.randn(2, 512), clip_hidden_states=torch.randn(2, 5, 48))
        >>> b = predictor.predict(id_embeds=torch.randn(1, 512), clip_hidden_states=torch.randn(1, 5, 48))
        >>> HyperLoRAIdentity.merge([a, b]).num_images
        3
        >>> HyperLoRAIdentity.interpolate(a, b, 0.25).kind
        'mix'
    """

    id_mean: torch.Tensor
    num_images: int
    base_mean: torch.Tensor | None = None
    checkpoint: str = ""
    probe: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    kind: str = "photos"

    @property
    def id_coefficients(self) -> torch.Tensor:
        """Normalized ID coefficients `[num_tokens, K]` (float32)."""
        return normalize_coefficients(self.id_mean)

    @property
    def base_coefficients(self) -> torch.Tensor | None:
        """Normalized Base coefficients, or `None`."""
        return None if self.base_mean is None else normalize_coefficients(self.base_mean)

    def coefficients(self, branch: str = "id") -> torch.Tensor | None:
        """Normalized coefficients of `branch` (`"id"` or `"base"`), `None` when the identity has none."""
        if branch not in ("id", "base"):
            raise InvalidArgumentError(f"branch must be 'id' or 'base', got {branch!r}.", argument="branch")
        return self.id_coefficients if branch == "id" else self.base_coefficients

    def check_compatible(
        self, checkpoint: str, probe: torch.Tensor | None, shape: tuple[int, int] | None = None
    ) -> None:
        """Raise `IdentityMismatchError` unless this identity was predicted by the given checkpoint.

        Args:
            checkpoint: the loaded checkpoint's `architecture_hash`.
            probe: the loaded checkpoint's probe weights; an identity without a probe then cannot be matched.
            shape: the coefficient shape `[num_tokens, K]` the checkpoint reads, checked when given.
        """
        fix = "Predict it again from the photos with the loaded checkpoint."
        if self.checkpoint != checkpoint:
            raise IdentityMismatchError(
                f"This identity was predicted by another HyperLoRA checkpoint, of another architecture (hash "
                f"{self.checkpoint!r}); the loaded checkpoint's is {checkpoint!r}. {fix}"
            )
        if probe is not None:
            self._check_probe(probe.float().cpu(), fix)
        if shape is not None:
            for name, mean in (("id_mean", self.id_mean), ("base_mean", self.base_mean)):
                if mean is not None and tuple(mean.shape) != tuple(shape):
                    raise IdentityMismatchError(
                        f"The identity's `{name}` has shape {list(mean.shape)}, but the loaded checkpoint reads "
                        f"coefficients of shape {list(shape)} ([num_tokens, K]). {fix}"
                    )

    def _check_probe(self, probe: torch.Tensor, fix: str) -> None:
        if self.probe is None:
            raise IdentityMismatchError(
                "The identity carries no `probe` weights, so nothing shows it was predicted by the loaded "
                f"checkpoint's weights (only the architecture matches). {fix}"
            )
        mine = self.probe.float().cpu()
        if mine.shape != probe.shape:
            raise IdentityMismatchError(
                f"The identity's probe has shape {list(mine.shape)}, the loaded checkpoint's {list(probe.shape)}. {fix}"
            )
        if not torch.allclose(mine, probe, atol=1e-2):
            difference = float((mine - probe).abs().nan_to_num(float("inf")).max())
            raise IdentityMismatchError(
                "The identity was predicted by another HyperLoRA checkpoint with the same architecture but other "
                f"weights: its probe weights differ from the loaded checkpoint's by up to {difference:.3g} (tolerance "
                f"0.01). {fix}"
            )

    def check_finite(self) -> None:
        """Raise `NonFiniteValueError` when a coefficient is NaN or infinite."""
        fix = "predict the identity again from the photos"
        require_finite(self.id_mean, "The identity's `id_mean`", fix)
        require_finite(self.base_mean, "The identity's `base_mean`", fix)

    # ------------------------------------------------------------------ combining identities
    @classmethod
    def merge(cls, identities: Sequence[HyperLoRAIdentity]) -> HyperLoRAIdentity:
        """Pool the photos of several identities: equal to predicting from all their images together.

        Example:
            >>> sets = [HyperLoRAIdentity.load(p) for p in ("a.safetensors", "b.safetensors")]  # doctest: +SKIP
            >>> person = HyperLoRAIdentity.merge(sets)  # doctest: +SKIP
        """
        identities = _identity_list(identities, "merge")
        _check_same_checkpoint(identities, "merge")
        if any(i.kind != "photos" for i in identities):
            logger.warning(
                "merge() got a blended identity (kind 'mix'): the result is a count-weighted pool, not the prediction "
                "from any set of photos. Use HyperLoRAIdentity.mix to blend people."
            )
        first = identities[0]
        total = sum(i.num_images for i in identities)
        id_mean = sum(i.id_mean.float() * i.num_images for i in identities) / total
        has_base = _all_have_base(identities, "merge")
        base_mean = sum(i.base_mean.float() * i.num_images for i in identities) / total if has_base else None
        sources = [s for i in identities for s in i.sources]
        kind = "photos" if all(i.kind == "photos" for i in identities) else "mix"
        return cls(id_mean, total, base_mean, first.checkpoint, first.probe, sources, kind)

    @classmethod
    def mix(
        cls, identities: Sequence[HyperLoRAIdentity], weights: Sequence[float], spherical: bool = False
    ) -> HyperLoRAIdentity:
        """Blend several people: `normalize(sum_i w_i * normalize(coefficients_i))` for every coefficient vector.

        Weights need not sum to one (only their ratios matter) but must be finite with a positive sum; a negative
        weight subtracts a person (identity arithmetic). Each person counts with its weight whatever its number of
        photos: to pool photos of *one* person, use `merge` instead. `spherical=True` (two identities only) is
        `interpolate(a, b, t, spherical=True)` at `t = w_b / (w_a + w_b)`, with the same checks on the weights.
        Identities of another checkpoint than `identities[0]`'s raise `IdentityMismatchError`, whose `index` says
        which one.

        Example:
            >>> blend = HyperLoRAIdentity.mix([alice, bob, carol], [0.5, 0.3, 0.2])  # doctest: +SKIP
            >>> halfway = HyperLoRAIdentity.mix([alice, bob], [1, 1], spherical=True)  # doctest: +SKIP
        """
        identities = _identity_list(identities, "mix")
        _check_same_checkpoint(identities, "mix")
        weights = normalize_mix_weights(weights, len(identities))
        _check_spherical(spherical, "mix")
        if spherical:
            if len(identities) != 2:
                raise InvalidArgumentError(
                    f"HyperLoRAIdentity.mix(spherical=True) blends exactly two identities, got {len(identities)}: "
                    "drop spherical=True to blend more.",
                    argument="spherical",
                )
            return cls.interpolate(identities[0], identities[1], weights[1], spherical=True)
        first = identities[0]
        id_mean = blend_directions([i.id_mean for i in identities], weights)
        has_base = _all_have_base(identities, "mix")
        base_mean = blend_directions([i.base_mean for i in identities], weights) if has_base else None
        return cls(
            id_mean=id_mean,
            num_images=sum(i.num_images for i in identities),
            base_mean=base_mean,
            checkpoint=first.checkpoint,
            probe=first.probe,
            sources=[s for i in identities for s in i.sources],
            kind="mix",
        )

    @classmethod
    def interpolate(
        cls, a: HyperLoRAIdentity, b: HyperLoRAIdentity, t: float, spherical: bool = False
    ) -> HyperLoRAIdentity:
        """The identity a fraction `t` of the way from `a` (`t = 0`) to `b` (`t = 1`).

        Default: `mix([a, b], [1 - t, t])` (normalized linear blend). `spherical=True` moves along the great
        circle between the coefficient vectors at constant angular speed (slerp): the same endpoints and midpoint,
        a more even pace in between. A `t` outside `[0, 1]` extrapolates (e.g. `t = 1.2`: "more `b` than `b`");
        keep it small, the further out the less the result looks like a person.

        Example:
            >>> halfway = HyperLoRAIdentity.interpolate(alice, bob, 0.5)  # doctest: +SKIP
        """
        t = _fraction(t)
        if not math.isfinite(t):
            raise InvalidArgumentError(
                f"HyperLoRAIdentity.interpolate() needs a finite t (0 = a, 1 = b), got {t}.", argument="t"
            )
        _check_spherical(spherical, "interpolate")
        if not spherical:
            return cls.mix([a, b], [1.0 - t, t])
        _check_same_checkpoint([a, b], "interpolate")
        has_base = _all_have_base([a, b], "interpolate")
        return cls(
            id_mean=slerp_directions(a.id_mean, b.id_mean, t),
            num_images=a.num_images + b.num_images,
            base_mean=slerp_directions(a.base_mean, b.base_mean, t) if has_base else None,
            checkpoint=a.checkpoint,
            probe=a.probe,
            sources=list(a.sources) + list(b.sources),
            kind="mix",
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the identity to a `.safetensors` file (float32 coefficients + metadata; ~0.6 MB for the release).

        Example:
            >>> identity = pipe.set_hyperlora_identity(["me1.jpg", "me2.jpg"])  # doctest: +SKIP
            >>> identity.save("me.safetensors")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        path = _file_path(path, "save")
        self.check_finite()
        tensors = {"id_mean": self.id_mean.detach().float().cpu().contiguous()}
        if self.base_mean is not None:
            tensors["base_mean"] = self.base_mean.detach().float().cpu().contiguous()
        if self.probe is not None:
            tensors["probe"] = self.probe.detach().float().cpu().contiguous()
        metadata = {
            "format": "pt",
            _FORMAT_KEY: str(IDENTITY_FORMAT_VERSION),
            "checkpoint": self.checkpoint,
            "num_images": str(int(self.num_images)),
            "sources": json.dumps([str(s) for s in self.sources]),
            "kind": self.kind,
        }
        with atomic_path(path) as temporary:
            save_file(tensors, os.fspath(temporary), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, predictor: Any = None) -> HyperLoRAIdentity:
        """Read an identity written by `save`.

        Args:
            path: the `.safetensors` file.
            predictor: optional `HyperLoRAPredictor` (or `pipe.hyperlora`); when given, raise
                `IdentityMismatchError` right away if the identity belongs to another checkpoint (otherwise that is
                checked when the identity is used).

        Example:
            >>> identity = HyperLoRAIdentity.load("me.safetensors")  # doctest: +SKIP
            >>> pipe.set_hyperlora_identity(identity)  # doctest: +SKIP
        """
        path = _file_path(path, "load")
        tensors, metadata = _read_identity_file(path)
        identity = identity_from_tensors(tensors, metadata, path)
        if predictor is not None:
            predictor = getattr(predictor, "predictor", predictor)  # `pipe.hyperlora` stands for its predictor
            if not hasattr(predictor, "checkpoint_hash"):
                raise InvalidArgumentTypeError(
                    f"HyperLoRAIdentity.load(predictor=...) takes a HyperLoRAPredictor or `pipe.hyperlora`, got "
                    f"{type(predictor).__name__}.",
                    argument="predictor",
                )
            try:
                identity.check_compatible(predictor.checkpoint_hash, predictor.probe)
            except IdentityMismatchError as error:  # name the file: it may be one of several
                raise IdentityMismatchError(f"{path}: {error}", argument=error.argument) from None
        return identity

    def to(self, device: torch.device | str) -> HyperLoRAIdentity:
        """A copy with the coefficient tensors on `device` (a `torch.device` or a name: "cpu", "cuda:1", ...)."""
        device = parse_device(device)
        base = None if self.base_mean is None else self.base_mean.to(device)
        return HyperLoRAIdentity(
            self.id_mean.to(device), self.num_images, base, self.checkpoint, self.probe, list(self.sources), self.kind
        )


def _check_spherical(spherical: Any, caller: str) -> None:
    """`spherical` is a bool: a string such as "no" would otherwise count as true."""
    if not isinstance(spherical, bool):
        raise InvalidArgumentTypeError(
            f"HyperLoRAIdentity.{caller}() needs spherical=True or False, got the {type(spherical).__name__} "
            f"{spherical!r}.",
            argument="spherical",
        )


def _fraction(t: Any) -> float:
    """`t` as a float, refusing what is not one number (a string, a list, a tensor of several values)."""
    why = "not a number"
    if not isinstance(t, (str, bytes)):
        try:
            return float(t)
        except (TypeError, ValueError, RuntimeError) as error:
            why = str(error)
    raise InvalidArgumentTypeError(
        f"HyperLoRAIdentity.interpolate() needs t as one number (0 = a, 1 = b, 0.5 = halfway), got a "
        f"{type(t).__name__} {t!r} ({why}).",
        argument="t",
    )


def _file_path(path: Any, what: str) -> str:
    """`path` as a string, refusing what is not a path (`None`, a number) with the file to give."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentTypeError(
            f"HyperLoRAIdentity.{what}() takes the path of a .safetensors file (str or Path), got a "
            f'{type(path).__name__} {path!r}; e.g. "person.safetensors".',
            argument="path",
        )
    return os.fspath(path)


def _read_identity_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise IdentityNotFoundError(
            f"No identity file at {path!r}. Pass the path of a file written by `identity.save(...)` or "
            "`diffusers-hyperlora identity ... -o person.safetensors`."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise IdentityFormatError(
            f"{path!r} is not a readable .safetensors file ({error}). Expected a HyperLoRA identity written by "
            "`identity.save(...)`; predict the identity again from the photos."
        ) from error
    return tensors, metadata


def identity_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> HyperLoRAIdentity:
    """Validate the contents of an identity file and build the `HyperLoRAIdentity` (pure; `name` is for messages)."""
    expected = "Expected a HyperLoRA identity written by `identity.save(...)`"
    if _FORMAT_KEY not in metadata:
        hint = " It looks like a LoRA file (export output), not an identity." if "hyperlora_format" in metadata else ""
        raise IdentityFormatError(
            f"{name!r} is not a HyperLoRA identity file (no {_FORMAT_KEY!r} metadata).{hint} {expected}."
        )
    try:
        version = int(metadata[_FORMAT_KEY])
        num_images = int(metadata.get("num_images", "1"))
        sources = json.loads(metadata.get("sources", "[]"))
    except (ValueError, json.JSONDecodeError) as error:
        raise IdentityFormatError(f"{name!r} has damaged identity metadata ({error}). {expected}.") from error
    if version > IDENTITY_FORMAT_VERSION:
        raise IdentityFormatError(
            f"{name!r} was written by a newer diffusers-hyperlora (identity format {version}, this version reads up to "
            f"{IDENTITY_FORMAT_VERSION}). Upgrade diffusers-hyperlora (`pip install -U diffusers-hyperlora`; "
            "from a clone: `git pull`, then `pip install -e .`)."
        )
    id_mean = tensors.get("id_mean")
    if id_mean is None or id_mean.ndim != 2:
        raise IdentityFormatError(f"{name!r} lacks a 2-D 'id_mean' tensor [num_tokens, K]. {expected}.")
    base_mean = tensors.get("base_mean")
    if base_mean is not None and base_mean.shape != id_mean.shape:
        raise IdentityFormatError(
            f"{name!r}: 'base_mean' has shape {list(base_mean.shape)}, expected {list(id_mean.shape)} like 'id_mean'."
        )
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise IdentityFormatError(
                f"{name!r}: tensor {key!r} is {tensor.dtype}, not floating point; the file is damaged. {expected}."
            )
        if count_non_finite(tensor):
            raise IdentityFormatError(
                f"{name!r}: tensor {key!r} holds NaN/infinite values; the file is damaged. {expected}."
            )
    kind = metadata.get("kind", "photos")
    if num_images < 1 or kind not in IDENTITY_KINDS or not isinstance(sources, list):
        raise IdentityFormatError(
            f"{name!r} has invalid metadata (num_images={num_images}, kind={kind!r}, sources={sources!r}). {expected}."
        )
    return HyperLoRAIdentity(
        id_mean=id_mean.float(),
        num_images=num_images,
        base_mean=None if base_mean is None else base_mean.float(),
        checkpoint=metadata.get("checkpoint", ""),
        probe=tensors.get("probe"),
        sources=[str(s) for s in sources],
        kind=kind,
    )
