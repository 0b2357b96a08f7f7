"""Saved identities wherever photos are accepted.

`pipe.set_hyperlora_identity(["me.safetensors", "new_photo.jpg"])` and the CLI's inputs mix photos with identity
files (and `HyperLoRAIdentity` objects). `resolve_identity` splits such a list, predicts the photos together, and
pools everything exactly (`HyperLoRAIdentity.merge`), as if the saved identities' photos were given again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from .identity import HyperLoRAIdentity

IDENTITY_FILE_SUFFIX = ".safetensors"


def is_identity_input(value: Any) -> bool:
    """True for a `HyperLoRAIdentity` or a path ending in `.safetensors` (photos never do).

    Example:
        >>> is_identity_input("me.safetensors"), is_identity_input("me.jpg")
        (True, False)
    """
    if isinstance(value, HyperLoRAIdentity):
        return True
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).lower().endswith(IDENTITY_FILE_SUFFIX)


def split_identity_inputs(inputs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """`(photos, identities)`: the inputs in their order, identity files and objects apart from photos.

    Example:
        >>> split_identity_inputs(["a.jpg", "me.safetensors", "b.png"])
        (['a.jpg', 'b.png'], ['me.safetensors'])
    """
    photos = [value for value in inputs if not is_identity_input(value)]
    identities = [value for value in inputs if is_identity_input(value)]
    return photos, identities


def resolve_identity(
    inputs: Sequence[Any],
    predict_photos: Callable[[list[Any]], HyperLoRAIdentity],
    predictor: Any = None,
) -> HyperLoRAIdentity:
    """Photos, identity files and identities -> one identity, pooled exactly.

    Args:
        inputs: photos (anything the face pipeline reads), `.safetensors` identity files, `HyperLoRAIdentity`s.
        predict_photos: called once with all the photos (skipped when there are none).
        predictor: checks identity files against this checkpoint as they are read (`IdentityMismatchError`).

    Example:
        >>> from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor
        >>> import torch
        >>> predictor = tiny_hyperlora_predictor()
        >>> predict = lambda photos: predictor.predict(
        ...     id_embeds=torch.nn.functional.normalize(torch.randn(len(photos), 512), dim=-1),
        ...     clip_hidden_states=torch.randn(len(photos), 17, 48))
        >>> saved = predict(["old.jpg"])
        >>> resolve_identity([saved, "new1.jpg", "new2.jpg"], predict).num_images
        3
    """
    if isinstance(inputs, (str, bytes, os.PathLike, HyperLoRAIdentity)) or not isinstance(inputs, Iterable):
        raise InvalidArgumentTypeError(
            f"resolve_identity() takes a list of photos, identity files and identities, got a {type(inputs).__name__}: "
            "put a single one in a list, `[value]`.",
            argument="inputs",
        )
    photos, saved = split_identity_inputs(inputs)
    identities = [
        value if isinstance(value, HyperLoRAIdentity) else HyperLoRAIdentity.load(value, predictor=predictor)
        for value in saved
    ]
    if photos:
        identities.append(predict_photos(photos))
    if not identities:
        raise InvalidArgumentError(
            "No photos and no identities were given: pass photos, identity files or identities.", argument="inputs"
        )
    return identities[0] if len(identities) == 1 else HyperLoRAIdentity.merge(identities)
