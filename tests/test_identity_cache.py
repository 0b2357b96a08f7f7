"""The prepared-identity cache: LRU under a byte budget, and a cached switch writes exactly what a mix writes."""

from __future__ import annotations

import pytest
import torch

from diffusers_hyperlora.identities.cache import PreparedIdentityCache, factors_bytes, identity_key
from diffusers_hyperlora.identities.identity import HyperLoRAIdentity


def _identity(predictor, seed: int) -> HyperLoRAIdentity:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(predictor.config.num_tokens, predictor.config.num_basis, generator=g)
    return HyperLoRAIdentity(mean, 1, None, predictor.checkpoint_hash, predictor.probe)


def _factors(size: int) -> dict:
    return {"id": [(torch.zeros(size // 8), torch.zeros(size // 8))]}  # size bytes in float32


def test_lru_eviction_under_byte_budget():
    cache = PreparedIdentityCache(max_bytes=100)
    for key in "abc":
        cache.put(key, _factors(40))  # 40 bytes each: two fit
    assert "a" not in cache and "b" in cache and "c" in cache and cache.nbytes == 80
    assert cache.get("b") is not None  # b is now the most recent
    cache.put("d", _factors(40))
    assert "c" not in cache and "b" in cache and "d" in cache
    cache.put("huge", _factors(200))  # larger than the whole budget: not kept, nothing evicted
    assert "huge" not in cache and len(cache) == 2 and cache.nbytes == 80
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        PreparedIdentityCache(max_bytes=-1)


def test_key_follows_content_checkpoint_and_dtype(predictor):
    a, b = _identity(predictor, 0), _identity(predictor, 1)
    same_as_a = HyperLoRAIdentity(a.id_mean.clone(), 1, None, a.checkpoint, a.probe)
    cpu = torch.device("cpu")
    assert identity_key(a, torch.float32, cpu) == identity_key(same_as_a, torch.float32, cpu)
    assert identity_key(a, torch.float32, cpu) != identity_key(b, torch.float32, cpu)
    assert identity_key(a, torch.float32, cpu) != identity_key(a, torch.float16, cpu)
    other_checkpoint = HyperLoRAIdentity(a.id_mean.clone(), 1, None, "another", a.probe)
    assert identity_key(a, torch.float32, cpu) != identity_key(other_checkpoint, torch.float32, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_switch_writes_bitwise_the_uncached_weights(pipe, predictor, dtype):
    pipe.unet.to(dtype)
    pipe.load_hyperlora(predictor)
    people = [_identity(predictor, seed) for seed in range(3)]
    uncached = []
    for person in people:
        pipe.set_hyperlora_identity(person)
        uncached.append([(a.clone(), b.clone()) for a, b in pipe.hyperlora.adapters.lora_parameters("id")])
    cache = pipe.hyperlora.cache
    assert cache.misses == 3 and cache.hits == 0
    for index in (1, 0, 2):  # back to people seen before: every switch is a hit, the mix is not run
        pipe.set_hyperlora_identity(people[index])
        for (a, b), (ra, rb) in zip(pipe.hyperlora.adapters.lora_parameters("id"), uncached[index], strict=True):
            assert torch.equal(a, ra) and torch.equal(b, rb)
    assert cache.hits == 3 and cache.misses == 3
    assert cache.nbytes == sum(factors_bytes(cache.get(key)) for key in list(cache._entries))


def test_cache_budget_option_reaches_the_cache(pipe, predictor):
    pipe.load_hyperlora(predictor)
    pipe.hyperlora.cache.max_bytes = 0  # disabled: every switch mixes
    people = [_identity(predictor, seed) for seed in range(2)]
    for person in people + people:
        pipe.set_hyperlora_identity(person)
    assert pipe.hyperlora.cache.hits == 0 and len(pipe.hyperlora.cache) == 0
