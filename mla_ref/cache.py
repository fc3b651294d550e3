"""KV caches that hold exactly what each attention variant stores, and count its bytes.

- ``KVCache`` (MHA / GQA / MQA): the keys and values of the n_kv KV heads,
  (b, n_kv, t, d_h) each — never the copies repeated for each query head.
  Elements per token per layer: 2 · n_kv · d_h.
- ``LatentCache`` (MLA): one row per token holding the latent c (d_c) followed by
  the shared roped key k^R (d_R), shape (b, t, d_c + d_R).  Elements per token per
  layer: d_c + d_R.  The first d_c columns double as the values on the absorbed path.

``nbytes`` is measured from the tensors the cache holds (the filled part);
``reserved_nbytes`` is the size of the buffers actually allocated.  Buffers grow by
doubling so that a long decode costs amortised O(1) copies per token; pass
``capacity`` to allocate exactly once (what profiling wants).
"""

from __future__ import annotations

import torch

from mla_ref._checks import require_non_negative_int, require_positive_int


class _TokenBuffer:
    """A tensor that grows along its token dimension, with amortised doubling.

    ``dim`` is the token axis; every other axis is fixed by the first append.
    """

    def __init__(self, token_dim: int, capacity: int | None = None):
        self.token_dim = token_dim
        self.capacity = capacity
        self.length = 0
        self._storage: torch.Tensor | None = None

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` along the token axis; return a view of all tokens held."""
        n_new = new.shape[self.token_dim]
        needed = self.length + n_new
        if self._storage is None:
            size = self.capacity if self.capacity is not None else max(needed, 16)
            self._storage = self._allocate(new, max(size, needed))
        elif needed > self._storage.shape[self.token_dim]:
            grown = self._allocate(new, max(needed, 2 * self._storage.shape[self.token_dim]))
            grown.narrow(self.token_dim, 0, self.length).copy_(self.view())
            self._storage = grown
        self._storage.narrow(self.token_dim, self.length, n_new).copy_(new)
        self.length = needed
        return self.view()

    def _allocate(self, like: torch.Tensor, n_tokens: int) -> torch.Tensor:
        shape = list(like.shape)
        shape[self.token_dim] = n_tokens
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def view(self) -> torch.Tensor:
        assert self._storage is not None
        return self._storage.narrow(self.token_dim, 0, self.length)

    @property
    def reserved_nbytes(self) -> int:
        if self._storage is None:
            return 0
        return self._storage.numel() * self._storage.element_size()


def _check_same(name: str, expected: int | None, got: int, what: str) -> None:
    if expected is not None and got != expected:
        raise ValueError(f"{name}: this cache holds {what} {expected}, but was fed {got}")


class KVCache:
    """Keys and values of the n_kv KV heads of one layer.

    Shapes: keys, values (b, n_kv, t, d_h).
    """

    def __init__(self, capacity: int | None = None):
        if capacity is not None:
            require_positive_int("capacity", capacity)
        self._keys = _TokenBuffer(token_dim=2, capacity=capacity)
        self._values = _TokenBuffer(token_dim=2, capacity=capacity)
        self._shape: tuple[int, int, int] | None = None  # (b, n_kv, d_h)

    @property
    def length(self) -> int:
        """Number of cached tokens t."""
        return self._keys.length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store s new tokens; return all keys and values held, (b, n_kv, t, d_h) each.

        Shapes: keys, values (b, n_kv, s, d_h).
        """
        if keys.ndim != 4 or keys.shape != values.shape:
            raise ValueError(
                "keys and values must both have shape (b, n_kv, s, d_h); got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        b, n_kv, _, d_h = keys.shape
        if self._shape is not None:
            _check_same("batch size", self._shape[0], b, "batch size")
            _check_same("n_kv_heads", self._shape[1], n_kv, "n_kv_heads")
            _check_same("head_dim", self._shape[2], d_h, "head_dim")
        self._shape = (b, n_kv, d_h)
        return self._keys.append(keys), self._values.append(values)

    @property
    def keys(self) -> torch.Tensor:
        return self._keys.view()

    @property
    def values(self) -> torch.Tensor:
        return self._values.view()

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (b · t · 2 · n_kv · d_h · element size)."""
        if self.length == 0:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated for the buffers (≥ nbytes; equal when ``capacity`` was exact)."""
        return self._keys.reserved_nbytes + self._values.reserved_nbytes


class LatentCache:
    """MLA's cache for one layer: the latent c and the shared roped key k^R, side by side.

    Shape of ``latent_and_rope_key``: (b, t, d_c + d_R); ``latent`` is its first d_c
    columns (b, t, d_c) and ``rope_key`` the last d_R (b, t, d_R).
    """

    def __init__(self, kv_lora_rank: int, qk_rope_head_dim: int, capacity: int | None = None):
        self.kv_lora_rank = require_positive_int("kv_lora_rank", kv_lora_rank)
        self.qk_rope_head_dim = require_non_negative_int("qk_rope_head_dim", qk_rope_head_dim)
        if capacity is not None:
            require_positive_int("capacity", capacity)
        self._rows = _TokenBuffer(token_dim=1, capacity=capacity)
        self._batch: int | None = None

    @property
    def length(self) -> int:
        """Number of cached tokens t."""
        return self._rows.length

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor:
        """Store s new tokens; return all rows held, (b, t, d_c + d_R).

        Shapes: latent (b, s, d_c); rope_key (b, s, d_R).
        """
        d_c, d_r = self.kv_lora_rank, self.qk_rope_head_dim
        if latent.ndim != 3 or latent.shape[-1] != d_c:
            raise ValueError(f"latent must have shape (b, s, {d_c}), got {tuple(latent.shape)}")
        if rope_key.shape != (*latent.shape[:2], d_r):
            raise ValueError(f"rope_key must have shape {(*latent.shape[:2], d_r)}, got {tuple(rope_key.shape)}")
        _check_same("batch size", self._batch, latent.shape[0], "batch size")
        self._batch = latent.shape[0]
        return self._rows.append(torch.cat([latent, rope_key], dim=-1))

    @property
    def latent_and_rope_key(self) -> torch.Tensor:
        return self._rows.view()

    @property
    def latent(self) -> torch.Tensor:
        return self._rows.view()[..., : self.kv_lora_rank]

    @property
    def rope_key(self) -> torch.Tensor:
        return self._rows.view()[..., self.kv_lora_rank :]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (b · t · (d_c + d_R) · element size)."""
        if self.length == 0:
            return 0
        rows = self._rows.view()
        return rows.numel() * rows.element_size()

    @property
    def reserved_nbytes(self) -> int:
        """Bytes allocated for the buffer (≥ nbytes; equal when ``capacity`` was exact)."""
        return self._rows.reserved_nbytes
