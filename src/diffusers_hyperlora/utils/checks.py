"""Small validators shared by every layer: one place that turns bad numbers into clear `HyperLoRAError`s.

Example:
    >>> import torch
    >>> require_finite(torch.ones(2), "`id_embeds`", "pass normed ArcFace embeddings")
    >>> count_non_finite(torch.tensor([1.0, float("nan"), float("inf")]))
    2
    >>> parse_dtype("bf16")
    torch.bfloat16
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import InvalidArgumentError, InvalidArgumentTypeError, NonFiniteValueError


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many elements of `tensor` are NaN or infinite (0 for integer tensors)."""
    if not torch.is_floating_point(tensor):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in one read and without a mask as large as the tensor: NaN and inf
    propagate into a float32 sum; only a sum that overflows (finite values near 1e38) needs the exact count."""
    if not torch.is_floating_point(tensor) or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return count_non_finite(tensor) == 0


def require_finite(tensor: torch.Tensor | None, what: str, fix: str, argument: str | None = None) -> None:
    """Raise `NonFiniteValueError` naming `what` (and `argument`, the parameter at fault) when `tensor` holds NaN or
    infinite values."""
    if tensor is None:
        return
    tensor = torch.as_tensor(tensor)
    if is_finite(tensor):
        return
    bad = count_non_finite(tensor)
    if bad:
        raise NonFiniteValueError(
            f"{what} holds {bad} NaN/infinite value(s) of {tensor.numel()}; {fix}.", argument=argument
        )


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """`(name, count)` of the first tensor holding NaN/infinite values, or `None` (scans tensor by tensor)."""
    for name, tensor in named:
        if not is_finite(tensor.detach()):
            return name, count_non_finite(tensor.detach())
    return None


_DTYPES = {
    **dict.fromkeys(("fp32", "float32"), torch.float32),
    **dict.fromkeys(("fp16", "float16", "half"), torch.float16),
    **dict.fromkeys(("bf16", "bfloat16"), torch.bfloat16),
    **dict.fromkeys(("fp64", "float64", "double"), torch.float64),
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point torch dtype from itself or a name (`"fp16"`, `"bf16"`, `"float32"`, ...); `None` stays."""
    if dtype is None:
        return None
    if not isinstance(dtype, (str, torch.dtype)):
        raise InvalidArgumentTypeError(
            f"dtype must be a torch dtype or a name like 'fp16', got {type(dtype).__name__} {dtype!r}.",
            argument="dtype",
        )
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InvalidArgumentError(
            f"dtype must be one of {sorted(_DTYPES)} (or those torch dtypes: floating point only), got {dtype!r}.",
            argument="dtype",
        )
    return _DTYPES[key]
