"""``python -m mla_ref demo``: a headless tour that checks what it shows.

Each section builds small random modules, runs them, and prints figures that were
asserted a line earlier, so the demo doubles as a smoke test of the package.
"""

from __future__ import annotations

import argparse

import torch

from mla_ref.attention import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from mla_ref.calculator import format_bytes, load_model_shape, report
from mla_ref.convert import mean_pool_kv_heads
from mla_ref.mla import MLA

D_MODEL, N_HEADS, HEAD_DIM = 256, 8, 32
PROMPT, DECODE_STEPS = 48, 16


def _prefill_then_decode(module, x: torch.Tensor, **kwargs):
    """Run x[:, :PROMPT] as one prompt, then the rest one token at a time; return (outputs, cache)."""
    cache = module.new_cache()
    outputs = [module(x[:, :PROMPT], cache, **kwargs)]
    outputs += [module(x[:, t : t + 1], cache, **kwargs) for t in range(PROMPT, x.shape[1])]
    return torch.cat(outputs, dim=1), cache


def gqa_family_section(x: torch.Tensor) -> None:
    print("== The GQA family: MHA, GQA and MQA share one implementation ==")
    print(f"d_model {D_MODEL}, {N_HEADS} query heads of {HEAD_DIM}, {x.shape[1]} tokens, fp32")
    torch.manual_seed(0)
    mha = MultiHeadAttention(D_MODEL, N_HEADS, HEAD_DIM)
    for name, module in (
        ("MHA (n_kv=8)", mha),
        ("GQA (n_kv=2)", mean_pool_kv_heads(mha, 2)),
        ("MQA (n_kv=1)", mean_pool_kv_heads(mha, 1)),
    ):
        full = module(x)
        cached, cache = _prefill_then_decode(module, x)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        assert cache.nbytes == x.shape[1] * module.cache_elements_per_token() * 4
        error = ((full - mha(x)).norm() / mha(x).norm()).item()
        print(
            f"  {name}: cache {cache.nbytes:>7,} bytes = {module.cache_elements_per_token():>3} elements/token; "
            f"prefill+decode = full recompute: True; mean-pooled vs MHA rel. error {error:.3f}"
        )
    assert isinstance(MultiQueryAttention(D_MODEL, N_HEADS, HEAD_DIM), GroupedQueryAttention)


def mla_section(x: torch.Tensor) -> None:
    print("\n== MLA: a latent cache, and two paths that agree ==")
    torch.manual_seed(0)
    mla = MLA(D_MODEL, N_HEADS, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    naive, naive_cache = _prefill_then_decode(mla, x, path="naive")
    absorbed, absorbed_cache = _prefill_then_decode(mla, x, path="absorbed")
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)
    max_diff = (absorbed - naive).abs().max().item()
    assert naive_cache.nbytes == absorbed_cache.nbytes == x.shape[1] * (64 + 16) * 4
    print(f"  d_c 64 + d_R 16 = {mla.cache_elements_per_token()} elements/token; cache {naive_cache.nbytes:,} bytes")
    print(f"  naive vs absorbed (prefill {PROMPT} + decode {DECODE_STEPS}): max |diff| {max_diff:.1e} (fp32)")
    gqa_elements = 2 * 2 * HEAD_DIM
    mha_elements = 2 * N_HEADS * HEAD_DIM
    print(
        f"  cache per token: MHA {mha_elements}, GQA(n_kv=2) {gqa_elements}, MQA {2 * HEAD_DIM}, "
        f"MLA {mla.cache_elements_per_token()} elements  (MLA = {mla.cache_elements_per_token() / mha_elements:.1%}"
        " of MHA)"
    )


def real_models_section() -> None:
    print("\n== Real models: KV cache per token in bf16, over all layers ==")
    for name in ("llama-2-7b", "llama-3-8b", "qwen2.5-7b", "deepseek-v3"):
        result = report(load_model_shape(name), context=32_768, batch=1, dtype="bf16")
        own, mla = result["variants"][0], next(v for v in result["variants"] if v["name"].startswith("MLA (d_c=512"))
        print(
            f"  {name:<12} {own['name']:<32} {own['bytes_per_token']:>9,} B/token; "
            f"{format_bytes(own['total_bytes'])} at 32K tokens; MLA 512+64 needs {mla['bytes_per_token']:,} B/token"
        )
    print("  (python -m mla_ref kv-cache MODEL for the full table)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mla_ref demo", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(1, PROMPT + DECODE_STEPS, D_MODEL)
    with torch.no_grad():
        gqa_family_section(x)
        mla_section(x)
    real_models_section()
    print("\nAll checks in this demo passed.")
    return 0
