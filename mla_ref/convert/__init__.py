"""Conversions between attention variants, each a pure function that returns a new module.

- ``mean_pool_kv_heads``: MHA → GQA by averaging K/V projections within groups (Ainslie et al. 2023).
- ``gqa_to_mla_exact``: GQA → MLA at the same cache, outputs unchanged (TransMLA's identity).
- ``MLAParts`` / ``assemble_mla``: the linear maps every GQA → MLA conversion produces, and the module
  built from them.
- ``mha2mla_convert``: MHA2MLA without fine-tuning — partial RoPE (``select_rotary_pairs``,
  ``partial_rope_parts``), then SVD low rank (``svd_low_rank_parts``); ``mha2mla_ranks`` sizes it for a cache.
- ``transmla_convert``: TransMLA without training — RoRoPE / FreqFold (``rorope_basis``, ``rorope_parts``) gather
  the keys' position information into d_R dims, then BKV-PCA (``bkv_pca_parts``) gives the latent.
- ``refit_output_proj``: after a lossy conversion, o_proj re-solved by least squares so the layer's output
  matches its source's on the calibration inputs (this project's addition); ``recipe_convert``: the project's
  training-free recipe (TransMLA with one roped component per frequency and the score metric, the keys' share of
  the latent chosen per layer, then the refit).
- ``convert_model``: a whole TinyLM with each attention layer converted (``mla_config`` is its config);
  ``convert_model_by_method``: the same by a registered method, its split of a budget chosen as ``convert`` chooses
  it (``split_choice``: the split whose layers come out closest to their sources on the calibration tokens).
- ``METHODS`` / ``get_method``: the conversion methods by name (exact, transmla, mha2mla, recipe), each with
  its steps, its sizing rule for a cache budget and its layer converter; every caller picks methods here.

Recovery fine-tuning of a converted model is training, and lives in ``mla_ref.recovery``.
"""

from mla_ref.convert.bkv_pca import bkv_pca_parts, key_value_balance, latent_metric
from mla_ref.convert.exact import gqa_to_mla_exact
from mla_ref.convert.mean_pool import mean_pool_kv_heads
from mla_ref.convert.methods import METHODS, Method, budget_elements, get_method
from mla_ref.convert.methods.mha2mla import mha2mla_convert, mha2mla_ranks
from mla_ref.convert.methods.recipe import recipe_convert
from mla_ref.convert.methods.transmla import transmla_convert, transmla_parts
from mla_ref.convert.model import convert_model, convert_model_by_method, mla_config
from mla_ref.convert.partial_rope import (
    keep_top_pairs,
    pair_norm_scores,
    pair_rotation_scores,
    partial_rope_parts,
    select_rotary_pairs,
)
from mla_ref.convert.parts import MLAParts, assemble_mla
from mla_ref.convert.refit import refit_output_proj
from mla_ref.convert.rorope import RotatedKeyBasis, rorope_basis, rorope_parts, select_rope_components
from mla_ref.convert.svd_low_rank import svd_low_rank_parts

__all__ = [
    "METHODS",
    "Method",
    "budget_elements",
    "get_method",
    "MLAParts",
    "RotatedKeyBasis",
    "assemble_mla",
    "bkv_pca_parts",
    "gqa_to_mla_exact",
    "keep_top_pairs",
    "key_value_balance",
    "convert_model",
    "convert_model_by_method",
    "mla_config",
    "latent_metric",
    "mean_pool_kv_heads",
    "mha2mla_convert",
    "mha2mla_ranks",
    "pair_norm_scores",
    "recipe_convert",
    "refit_output_proj",
    "pair_rotation_scores",
    "partial_rope_parts",
    "rorope_basis",
    "rorope_parts",
    "select_rope_components",
    "select_rotary_pairs",
    "svd_low_rank_parts",
    "transmla_convert",
    "transmla_parts",
]
