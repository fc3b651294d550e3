"""Conversions between attention variants, each a pure function that returns a new module.

- ``mean_pool_kv_heads``: MHA → GQA by averaging K/V projections within groups (Ainslie et al. 2023).
- ``gqa_to_mla_exact``: GQA → MLA at the same cache, outputs unchanged (TransMLA's identity).
- ``MLAParts`` / ``assemble_mla``: the linear maps every GQA → MLA conversion produces, and the module
  built from them.
"""

from mla_ref.convert.exact import gqa_to_mla_exact
from mla_ref.convert.mean_pool import mean_pool_kv_heads
from mla_ref.convert.parts import MLAParts, assemble_mla

__all__ = ["MLAParts", "assemble_mla", "gqa_to_mla_exact", "mean_pool_kv_heads"]
