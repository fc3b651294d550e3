"""KV and latent caches: what they hold, how many bytes, and the errors for mismatched input."""

import pytest
import torch

from mla_ref.cache import KVCache, LatentCache


def test_kv_cache_returns_everything_appended_in_order():
    cache = KVCache()
    chunks = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 7)]
    for chunk in chunks:
        keys, values = cache.append(chunk, -chunk)
    torch.testing.assert_close(keys, torch.cat(chunks, dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, -torch.cat(chunks, dim=2), rtol=0, atol=0)
    assert cache.length == 14


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_cache_bytes_are_2_nkv_dh_per_token(dtype):
    b, n_kv, t, d_h = 3, 2, 37, 8
    cache = KVCache()
    for _ in range(t):  # one token at a time: the buffer grows past t, nbytes must not
        cache.append(torch.zeros(b, n_kv, 1, d_h, dtype=dtype), torch.zeros(b, n_kv, 1, d_h, dtype=dtype))
    element = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes == b * t * 2 * n_kv * d_h * element
    assert cache.reserved_nbytes >= cache.nbytes


def test_capacity_allocates_exactly_once():
    cache = KVCache(capacity=10)
    for _ in range(10):
        cache.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert cache.reserved_nbytes == cache.nbytes == 10 * 2 * 2 * 4 * 4


def test_empty_caches_hold_zero_bytes():
    assert KVCache().nbytes == 0
    assert LatentCache(8, 4).nbytes == 0


@pytest.mark.parametrize(
    "second, message",
    [
        ((torch.zeros(3, 2, 1, 4),) * 2, "batch size: this cache holds batch size 2, but was fed 3"),
        ((torch.zeros(2, 1, 1, 4),) * 2, "n_kv_heads: this cache holds n_kv_heads 2, but was fed 1"),
        ((torch.zeros(2, 2, 1, 6),) * 2, "head_dim: this cache holds head_dim 4, but was fed 6"),
        ((torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2, 4)), "must both have shape"),
    ],
)
def test_kv_cache_rejects_mismatched_input(second, message):
    cache = KVCache()
    cache.append(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4))
    with pytest.raises(ValueError, match=message):
        cache.append(*second)


def test_latent_cache_holds_latent_then_rope_key_per_token():
    cache = LatentCache(kv_lora_rank=6, qk_rope_head_dim=2)
    latents = [torch.randn(2, n, 6) for n in (4, 1, 1)]
    rope_keys = [torch.randn(2, n, 2) for n in (4, 1, 1)]
    for latent, rope_key in zip(latents, rope_keys, strict=True):
        rows = cache.append(latent, rope_key)
    assert rows.shape == (2, 6, 8)
    torch.testing.assert_close(cache.latent, torch.cat(latents, 1), rtol=0, atol=0)
    torch.testing.assert_close(cache.rope_key, torch.cat(rope_keys, 1), rtol=0, atol=0)
    assert cache.nbytes == 2 * 6 * (6 + 2) * 4


def test_latent_cache_bytes_in_bf16():
    cache = LatentCache(512, 64)
    cache.append(torch.zeros(1, 100, 512, dtype=torch.bfloat16), torch.zeros(1, 100, 64, dtype=torch.bfloat16))
    assert cache.nbytes == 100 * 576 * 2


@pytest.mark.parametrize(
    "latent, rope_key, message",
    [
        (torch.zeros(2, 1, 5), torch.zeros(2, 1, 2), r"latent must have shape \(b, s, 6\)"),
        (torch.zeros(2, 1, 6), torch.zeros(2, 1, 3), "rope_key must have shape"),
        (torch.zeros(3, 1, 6), torch.zeros(3, 1, 2), "batch size: this cache holds batch size 2, but was fed 3"),
    ],
)
def test_latent_cache_rejects_mismatched_input(latent, rope_key, message):
    cache = LatentCache(6, 2)
    cache.append(torch.zeros(2, 3, 6), torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match=message):
        cache.append(latent, rope_key)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LatentCache(0, 4), "kv_lora_rank must be a positive integer"),
        (lambda: LatentCache(8, -2), "qk_rope_head_dim must be a non-negative integer"),
        (lambda: KVCache(capacity=0), "capacity must be a positive integer"),
    ],
)
def test_bad_cache_configurations(make, message):
    with pytest.raises(ValueError, match=message):
        make()
