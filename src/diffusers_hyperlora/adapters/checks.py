"""The checks of adapter options shared by `load_hyperlora` and the sliders: weights and names."""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidArgumentError, InvalidArgumentTypeError


def check_adapter_weight(weight: Any, caller: str, argument: str, example: str = "0.8") -> float:
    """`weight` as a float: `InvalidArgumentTypeError` for a non-number (or a bool), `InvalidArgumentError` for
    NaN/inf. `caller` and `argument` name the call and the parameter in the message and on the error."""
    try:
        value = None if isinstance(weight, bool) else float(weight)  # float(True) would be 1.0
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise InvalidArgumentTypeError(
            f"{caller}: `{argument}` must be a number (an adapter weight, e.g. {argument}={example}), got {weight!r}.",
            argument=argument,
        )
    if not math.isfinite(value):
        raise InvalidArgumentError(
            f"{caller}: `{argument}` must be a finite number, got {value}; e.g. {argument}={example}.",
            argument=argument,
        )
    return value


def check_adapter_name(name: Any, caller: str, argument: str, example: str = "'hyper_id'") -> str:
    """Refuse what PEFT cannot name an adapter: a non-`str` (`InvalidArgumentTypeError`), an empty name or one
    with a dot (`InvalidArgumentError`: PEFT keeps adapters in `nn.ModuleDict`s, whose keys cannot hold either)."""
    if not isinstance(name, str):
        raise InvalidArgumentTypeError(
            f"{caller}: `{argument}` must be an adapter name (a str, e.g. {argument}={example}), got "
            f"{type(name).__name__} {name!r}.",
            argument=argument,
        )
    if not name or "." in name:
        raise InvalidArgumentError(
            f"{caller}: `{argument}` must be a non-empty adapter name without dots, got {name!r}; e.g. "
            f"{argument}={example}.",
            argument=argument,
        )
    return name
