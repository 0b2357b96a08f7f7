"""Prepared identities: the mixed LoRA factors of recent identities, kept under a byte budget (LRU).

Mixing the basis bank reads every basis once (the release's bank is 3 GB in 16-bit), which bounds a switch by
memory bandwidth. A mixed LoRA is about 1/K of the bank (22 MB in 16-bit for the release), so a server that
returns to people it has seen keeps their factors: a cached switch costs only the copy into the adapters.

Entries are keyed by the identity's coefficients (content, not object identity: a reloaded identity file hits),
the checkpoint, and the dtype/device the factors are kept in (the live adapters'). Factors are stored in that
dtype, rounded exactly as the adapters' own write rounds them, so a cached switch writes bitwise the same
weights as an uncached one. The owner clears the cache when the bank changes (a new checkpoint).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from .identity import HyperLoRAIdentity

# Per branch ("id", "base"): the bank's grouped factors, `(down [G, r, in], up [G, out, r])` per shape group.
PreparedFactors = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]

DEFAULT_CACHE_BYTES = 512 * 2**20  # about 23 identities of the release's SDXL LoRA in 16-bit


def identity_key(identity: HyperLoRAIdentity, dtype: torch.dtype, device: torch.device) -> str:
    """A digest of everything the mixed factors depend on besides the bank itself."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{identity.checkpoint}|{dtype}|{torch.device(device)}".encode())
    for branch in ("id", "base"):
        coefficients = identity.coefficients(branch)
        digest.update(branch.encode())
        if coefficients is not None:
            digest.update(coefficients.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_budget(max_bytes: Any) -> int:
    """`max_bytes` as an int, or `InvalidArgumentTypeError` / `InvalidArgumentError` (not a number, < 0, NaN/inf)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Real):
        raise InvalidArgumentTypeError(
            f"The cache's max_bytes must be a number of bytes, got {type(max_bytes).__name__} {max_bytes!r}; e.g. "
            "`cache.max_bytes = 2 * 2**30` (2 GiB), or 0 to turn the cache off.",
            argument="max_bytes",
        )
    if not math.isfinite(max_bytes) or max_bytes < 0:
        raise InvalidArgumentError(
            f"The cache's max_bytes must be a finite number of bytes >= 0, got {max_bytes}; e.g. "
            "`cache.max_bytes = 2 * 2**30` (2 GiB), or 0 to turn the cache off.",
            argument="max_bytes",
        )
    return int(max_bytes)


def factors_bytes(factors: PreparedFactors) -> int:
    return sum(t.numel() * t.element_size() for groups in factors.values() for pair in groups for t in pair)


class PreparedIdentityCache:
    """Least-recently-used mixed factors, at most `max_bytes` in total (0 disables the cache).

    Args:
        max_bytes: the byte budget. An entry larger than the whole budget is not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._entries: OrderedDict[str, tuple[PreparedFactors, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        """The byte budget; setting it lower evicts the least recently used entries at once (0 empties the cache)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._max_bytes = check_budget(value)
        self._evict(0)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def clear(self) -> None:
        """Drop every entry (call when the bank changed)."""
        self._entries.clear()
        self.nbytes = 0

    def get(self, key: str) -> PreparedFactors | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, factors: PreparedFactors) -> None:
        size = factors_bytes(factors)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        if size > self.max_bytes:
            return
        self._evict(size)
        self._entries[key] = (factors, size)
        self.nbytes += size

    def _evict(self, room: int) -> None:
        """Drop least recently used entries until `room` more bytes fit under the budget."""
        while self._entries and self.nbytes + room > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.nbytes -= evicted

    def prepare(
        self,
        identity: HyperLoRAIdentity,
        mix: Callable[[], PreparedFactors],
        dtype: torch.dtype,
        device: torch.device,
    ) -> PreparedFactors:
        """The identity's factors in `dtype` on `device`: from the cache, or `mix()`ed, converted and kept."""
        key = identity_key(identity, dtype, device)
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        factors = {
            branch: [(down.to(device, dtype), up.to(device, dtype)) for down, up in groups]
            for branch, groups in mix().items()
        }
        self.put(key, factors)
        return factors
