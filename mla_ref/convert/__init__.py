"""Conversions between attention variants, each a pure function that returns a new module.

- ``mean_pool_kv_heads``: MHA → GQA by averaging K/V projections within groups.
"""

from mla_ref.convert.mean_pool import mean_pool_kv_heads

__all__ = ["mean_pool_kv_heads"]
