"""KV-cache sizes, computed from a model's attention shape alone.

Per token per layer, a cache holds

    MHA / GQA / MQA     2 · n_kv · d_h          keys and values of the n_kv KV heads
    MLA                 d_c + d_R               the latent c and the shared roped key k^R

and over a whole model, at a context of T tokens and a batch of b sequences,

    bytes_per_token = elements_per_token_per_layer · L · bytes_per_element
    total_bytes     = bytes_per_token · T · b

MLA's figure counts d_R as well as d_c.  A model's dimensions are a ``ModelShape``
(``mla_ref.model_shapes``: presets of real models, or any config.json).

``python -m mla_ref kv-cache MODEL`` prints, for a preset or a Hugging Face ``config.json``,
the model's own cache next to MLA caches of DeepSeek's size (512 + 64) and smaller, and, for a
DeepSeek model, the MHA-equivalent cache it avoids (the command is ``mla_ref.cli.kv_cache``).  The same figures are available from Python:

    >>> from mla_ref.model_shapes import load_model_shape
    >>> shape = load_model_shape("llama-2-7b")
    >>> report(shape, context=4096, batch=1, dtype="bf16")["variants"][0]["bytes_per_token"]
    524288
"""

from __future__ import annotations

from dataclasses import dataclass

from mla_ref import provenance
from mla_ref._checks import require_choice, require_non_negative_int, require_positive_int
from mla_ref.dtypes import DTYPES
from mla_ref.model_shapes import ModelShape

# (d_c, d_R) of the MLA caches listed next to every model: DeepSeek-V2/V3's size first, then smaller.
MLA_LATENTS: tuple[tuple[int, int], ...] = ((512, 64), (256, 64), (128, 32))


# ---- the formulas ----------------------------------------------------------------------------
def gqa_elements_per_token_per_layer(n_kv_heads: int, head_dim: int) -> int:
    """MHA / GQA / MQA: keys and values of the n_kv KV heads, 2 · n_kv · d_h."""
    require_positive_int("n_kv_heads", n_kv_heads)
    require_positive_int("head_dim", head_dim)
    # elements = 2 · n_kv · d_h
    return 2 * n_kv_heads * head_dim


def mla_elements_per_token_per_layer(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """MLA: the latent c and the shared roped key k^R, d_c + d_R."""
    require_positive_int("kv_lora_rank", kv_lora_rank)
    require_non_negative_int("qk_rope_head_dim", qk_rope_head_dim)
    # elements = d_c + d_R
    return kv_lora_rank + qk_rope_head_dim


def mha_equivalent_elements_per_token_per_layer(
    n_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int
) -> int:
    """The cache an MLA model would need if it stored per-head keys and values: n_h · (d_N + d_R + d_v).

    These are exactly the keys and values MLA's naive path builds from the latent: for each of
    the n_h heads a key [k_i^N ; k^R] of d_N + d_R elements and a value v_i of d_v elements
    (the shared k^R counted once per head, as an ordinary MHA cache of those keys would).
    DeepSeek-V2's Table 1 instead writes MHA as 2 · n_h · d_h with one head size d_h for keys
    and values and no roped part (2 · 128 · 128 = 32768 for DeepSeek-V2, against 40960 here).
    """
    require_positive_int("n_heads", n_heads)
    require_non_negative_int("qk_nope_head_dim", qk_nope_head_dim)
    require_non_negative_int("qk_rope_head_dim", qk_rope_head_dim)
    require_positive_int("v_head_dim", v_head_dim)
    # elements = n_h · (d_N + d_R + d_v)
    return n_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)


def bytes_per_element(dtype: str) -> int:
    """Bytes of one cached element in ``dtype`` ("bf16", "fp16" or "fp32"), as torch stores it."""
    require_choice("dtype", dtype, tuple(DTYPES))
    return DTYPES[dtype].itemsize


# ---- variants and reports ------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheVariant:
    """One way of caching a layer's attention state, and what it costs per token."""

    name: str
    elements_per_token_per_layer: int


def elements_per_token_per_layer(shape: ModelShape) -> int:
    """What one token costs in one layer of the model's own cache."""
    if shape.attention == "MLA":
        return mla_elements_per_token_per_layer(shape.kv_lora_rank, shape.qk_rope_head_dim)
    return gqa_elements_per_token_per_layer(shape.n_kv_heads, shape.head_dim)


def _own_variant_name(shape: ModelShape) -> str:
    if shape.attention == "MLA":
        return f"MLA (d_c={shape.kv_lora_rank}, d_R={shape.qk_rope_head_dim})"
    return f"{shape.attention} (n_kv={shape.n_kv_heads}, d_h={shape.head_dim})"


def cache_variants(shape: ModelShape) -> list[CacheVariant]:
    """The model's own cache first, then MLA caches of ``MLA_LATENTS`` sizes not already listed.

    For an MLA model the MHA-equivalent cache comes last: n_h heads of keys [k_i^N ; k^R]
    (d_N + d_R) and values v_i (d_v), what storing the up-projected keys and values would cost
    (see ``mha_equivalent_elements_per_token_per_layer``).
    """
    variants = [CacheVariant(_own_variant_name(shape), elements_per_token_per_layer(shape))]
    for d_c, d_r in MLA_LATENTS:
        variant = CacheVariant(f"MLA (d_c={d_c}, d_R={d_r})", mla_elements_per_token_per_layer(d_c, d_r))
        if variant.name not in {v.name for v in variants}:
            variants.append(variant)
    if shape.attention == "MLA":
        d_k = shape.qk_nope_head_dim + shape.qk_rope_head_dim
        elements = mha_equivalent_elements_per_token_per_layer(
            shape.n_heads, shape.qk_nope_head_dim, shape.qk_rope_head_dim, shape.v_head_dim
        )
        variants.append(
            CacheVariant(f"MHA-equivalent (n_h={shape.n_heads}, d_k={d_k}, d_v={shape.v_head_dim})", elements)
        )
    return variants


def report(
    shape: ModelShape, context: int, batch: int = 1, dtype: str = "bf16", compare: ModelShape | None = None
) -> dict:
    """Cache sizes of every variant of ``shape`` at ``context`` tokens and ``batch`` sequences.

    Returns {"model", "layers", "dtype", "bytes_per_element", "context", "batch", "variants":
    [{"name", "elements_per_token_per_layer", "bytes_per_token", "total_bytes"}]}, the model's
    own variant first.  bytes_per_token covers all layers; total_bytes = bytes_per_token · T · b.
    With ``compare``, also "compare": that model's own cache at the same context, batch and dtype
    ({"model", "name", "layers", "elements_per_token_per_layer", "bytes_per_token", "total_bytes"}),
    and "saving": {"fraction" (this model's own bytes over compare's), "bytes_per_token",
    "total_bytes" (what this model saves; negative when it needs more)}.
    """
    require_positive_int("context", context)
    require_positive_int("batch", batch)
    element_bytes = bytes_per_element(dtype)
    variants = []
    for variant in cache_variants(shape):
        # bytes_per_token = elements · L · bytes_per_element
        per_token = variant.elements_per_token_per_layer * shape.layers * element_bytes
        variants.append(
            {
                "name": variant.name,
                "elements_per_token_per_layer": variant.elements_per_token_per_layer,
                "bytes_per_token": per_token,
                # total_bytes = bytes_per_token · T · b
                "total_bytes": per_token * context * batch,
            }
        )
    result = {
        "model": shape.name,
        "layers": shape.layers,
        "dtype": dtype,
        "bytes_per_element": element_bytes,
        "context": context,
        "batch": batch,
        "variants": variants,
    }
    if compare is not None:
        # the other model's own cache, by the same formula: elements · L · bytes_per_element
        elements = elements_per_token_per_layer(compare)
        per_token = elements * compare.layers * element_bytes
        result["compare"] = {
            "model": compare.name,
            "name": _own_variant_name(compare),
            "layers": compare.layers,
            "elements_per_token_per_layer": elements,
            "bytes_per_token": per_token,
            "total_bytes": per_token * context * batch,
        }
        own = variants[0]
        result["saving"] = {
            "fraction": own["bytes_per_token"] / per_token,
            "bytes_per_token": per_token - own["bytes_per_token"],
            "total_bytes": (per_token - own["bytes_per_token"]) * context * batch,
        }
    return result


def format_bytes(n_bytes: int) -> str:
    """A byte count in binary units: 512 B, 36.00 KiB, 2.00 GiB."""
    value, unit = float(n_bytes), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{n_bytes} B" if unit == "B" else f"{value:.2f} {unit}"


def format_table(result: dict) -> str:
    """The report as a plain-text table; the last column is each variant's size over the model's own."""
    own_bytes = result["variants"][0]["bytes_per_token"]
    header = ("variant", "elements/token/layer", "bytes/token", "total", "vs model")
    rows = [
        (
            variant["name"] + (" [model]" if i == 0 else ""),
            f"{variant['elements_per_token_per_layer']:,}",
            f"{variant['bytes_per_token']:,}",
            format_bytes(variant["total_bytes"]),
            f"{variant['bytes_per_token'] / own_bytes:.3f}x",
        )
        for i, variant in enumerate(result["variants"])
    ]
    widths = [max(len(row[col]) for row in (header, *rows)) for col in range(len(header))]
    lines = [
        f"KV cache of {result['model']}: {result['layers']} layers, {result['dtype']} "
        f"({result['bytes_per_element']} bytes/element), context {result['context']:,}, batch {result['batch']}",
        "",
    ]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    if "compare" in result:
        other, saving = result["compare"], result["saving"]
        verb = "saves" if saving["bytes_per_token"] >= 0 else "needs"
        lines += [
            "",
            f"against {other['model']}: {other['name']}, {other['layers']} layers, "
            f"{other['bytes_per_token']:,} bytes/token, {format_bytes(other['total_bytes'])} in all",
            f"  this model's cache is {saving['fraction']:.1%} of it: {verb} {abs(saving['bytes_per_token']):,} "
            f"bytes/token, {format_bytes(abs(saving['total_bytes']))} at this context and batch"
            + ("" if verb == "saves" else " more"),
        ]
    return "\n".join(lines)


def recorded_source(model: str) -> str | None:
    """The source recorded in ``model/CONVERSION.md`` (a directory written by ``convert``), if it is still there.

    The source is found by the absolute path the record holds and checked against its fingerprint
    (``mla_ref.provenance``): a different model now at that path is refused with a ValueError.  Returns None when
    ``model`` is no such directory, or when the recorded source has gone (the output stays useful on its own;
    ``--compare`` names another).
    """
    path, expected = provenance.recorded_source(model)
    if path is None or not (path / "config.json").is_file():
        return None
    provenance.check_source(model, path, expected)
    return str(path)
