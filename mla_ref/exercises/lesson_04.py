"""Checks of lesson 04's exercises (weight absorption).

Each check builds its own layers and tensors (under a fixed seed, leaving the caller's random state alone) — on the
meta device where a layer of DeepSeek-V3's size is only counted — and computes the truth with the package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mla_ref import MLA, apply_rope
from mla_ref.exercises import exercise
from mla_ref.model_shapes import load_model_shape
from mla_ref.roofline import decode_step_cost


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise AssertionError(reason)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _deepseek_v3(**changes) -> MLA:
    """One attention layer of DeepSeek-V3's shape on the meta device: shapes and counts, no memory."""
    shape = load_model_shape("deepseek-v3")
    sizes = dict(
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        kv_lora_rank=shape.kv_lora_rank,
        qk_nope_head_dim=shape.qk_nope_head_dim,
        qk_rope_head_dim=shape.qk_rope_head_dim,
        v_head_dim=shape.v_head_dim,
    )
    with torch.device("meta"):
        return MLA(**(sizes | changes))


# ---- 04.1: absorb W_UK into the query projection ----------------------------------------------------------------


@exercise("04.1")
def absorb_the_query(answer: object) -> str:
    """A function ``attn -> M_Q`` of shape (n_h, d, d_c): M_Q^i = W_Q^{N,i} W_UK^iᵀ, x's map into latent space."""
    _require(callable(answer), "answer with a function absorb_query(attn) -> M_Q of shape (n_h, d, d_c)")
    absorb_query: Callable = answer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(41)
        attn = MLA(48, 3, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=8)
        x = torch.randn(2, 6, 48)
    n_h, d, d_c = attn.n_heads, attn.d_model, attn.kv_lora_rank
    with torch.no_grad():
        m_q = absorb_query(attn)
        _require(isinstance(m_q, torch.Tensor), "the function should return a tensor")
        if tuple(m_q.shape) == (n_h, d_c, d):
            raise AssertionError(
                f"shape (n_h, d_c, d) = {tuple(m_q.shape)} is nn.Linear's orientation; M_Q^i maps a row x (1 × d) "
                "into latent space, so it is (d × d_c): mind the orientation"
            )
        _require(tuple(m_q.shape) == (n_h, d, d_c), f"M_Q should have shape (n_h, d, d_c) = {(n_h, d, d_c)}")
        # the naive position-free scores q_i^N · k_i^N against (x M_Q^i) · c_t, on the module's own latents
        cache = attn.new_cache()
        attn(x, cache)
        q_nope = torch.einsum("bsm,hnm->bhsn", x, attn.query_nope_proj())  # q_i^N = x W_Q^{N,i}
        k_nope = torch.einsum("btc,hnc->bhtn", cache.latent, attn.key_up_proj())  # k_i^N = c W_UK^i
        naive = torch.einsum("bhsn,bhtn->bhst", q_nope, k_nope)
        absorbed = torch.einsum("bsm,hmc,btc->bhst", x, m_q, cache.latent)
        try:  # fp32, O(1) scores: the same products in another order
            torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)
        except AssertionError:
            raise AssertionError(
                "(x M_Q^i) · c_t differs from q_i^N · k_i^N: M_Q^i should be W_Q^{N,i} (the position-free rows of "
                "head i's query projection, transposed) times W_UK^iᵀ"
            ) from None
        try:
            torch.testing.assert_close(m_q, attn.absorbed_query_proj().transpose(1, 2), rtol=1e-5, atol=1e-6)
        except AssertionError:
            raise AssertionError("M_Q gives the right scores but is not absorbed_query_proj()ᵀ") from None
    return "on the check's own layer, x M_Q^i · c_t equals q_i^N · k_i^N, and M_Q = absorbed_query_proj()ᵀ"


# ---- 04.2: merged or factored -------------------------------------------------------------------------------------


@exercise("04.2")
def merged_or_factored(answer: object) -> str:
    """(parameters of the merged M_O^i for all heads, parameters of W_UV and W_O together), DeepSeek-V3's shapes."""
    _require(
        isinstance(answer, tuple | list) and len(answer) == 2 and all(_is_int(v) for v in answer),
        "answer with a pair of ints: (parameters of M_O, parameters of W_UV and W_O together)",
    )
    layer = _deepseek_v3()
    merged = layer.absorbed_output_proj().numel()  # M_O^i: (d, d_c) per head
    factored = layer.value_up_proj().numel() + layer.o_proj.weight.numel()  # W_UV^i: (d_c, d_v), W_O^i: (d_v, d)
    if answer[0] != merged:
        per_head = merged // layer.n_heads
        raise AssertionError(
            "that is one head's M_O^i: there is one per head"
            if answer[0] == per_head
            else "M_O^i = W_UV^i W_O^i is a (d_c × d) matrix for each of the n_h heads"
        )
    _require(answer[1] == factored, "W_UV holds n_h blocks of (d_c × d_v) and W_O n_h blocks of (d_v × d)")
    return (
        f"merged M_O: {merged:,} parameters, W_UV and W_O: {factored:,} ({merged / factored:.2f}x fewer), and as each "
        "parameter is one multiply-add per decoded token, the factored form also costs that many times fewer FLOPs"
    )


# ---- 04.3: heads for equal intensity -------------------------------------------------------------------------------

INTENSITY_CONTEXT, BF16_BYTES = 131072, 2


def decode_intensity(layer: MLA, path: str, tokens: int = INTENSITY_CONTEXT) -> float:
    """FLOPs per byte of one decoding step over ``tokens`` cached tokens, as lesson 04 §6 counts them (bf16).

    FLOPs: what differs between the paths — the package's attention FLOPs (``decode_step_cost``) plus the new
    token's own up-projection or absorption, 2 · |W_UKV| on either path.  Bytes: the cache read, plus, on the naive
    path, the up-projected keys and values written and read back, 2 · T · n_h · (d_N + d_v) elements.
    """
    cost = decode_step_cost(layer, 1, tokens, torch.bfloat16, path=path)
    flops = cost.attention_flops + 2 * layer.kv_b_proj.weight.numel()
    rebuilt = 2 * tokens * layer.n_heads * (layer.qk_nope_head_dim + layer.v_head_dim) * BF16_BYTES
    return flops / (cost.cache_bytes + (rebuilt if path == "naive" else 0))


def equal_intensity_heads() -> int:
    """The smallest n_h at which the absorbed decode's intensity reaches the naive one's, DeepSeek-V3's other shapes."""
    heads = 1
    while True:
        layer = _deepseek_v3(n_heads=heads)
        if decode_intensity(layer, "absorbed") >= decode_intensity(layer, "naive"):
            return heads
        heads += 1


@exercise("04.3")
def heads_for_equal_intensity(answer: object) -> str:
    """The smallest n_h whose absorbed decode intensity reaches the naive one's at T = 131072, bf16."""
    _require(_is_int(answer) and answer > 0, "answer with a positive int: a number of heads")
    truth = equal_intensity_heads()
    if answer != truth:
        layer = _deepseek_v3(n_heads=answer)
        absorbed, naive = decode_intensity(layer, "absorbed"), decode_intensity(layer, "naive")
        raise AssertionError(
            f"with n_h = {answer} the absorbed intensity is {absorbed:.1f} and the naive one {naive:.1f} FLOP/byte: "
            + ("still below: more heads" if absorbed < naive else "already reached: is a smaller n_h enough?")
        )
    return f"n_h = {truth} is the first head count at which absorbed decoding does as many FLOPs per byte as naive"


# ---- 04.4: RoPE on the latent's keys breaks absorption --------------------------------------------------------


@exercise("04.4")
def where_absorption_survives_rope(answer: object) -> str:
    """The cached positions t = 0 … 7 at which the absorbed score RoPE(q, 7) W_UKᵀ · c_t equals the true score
    RoPE(q, 7) · RoPE(c_t W_UK, t) of a layer that rotates its position-free keys."""
    _require(
        isinstance(answer, list | tuple) and all(_is_int(t) for t in answer),
        "answer with a list of positions t (ints)",
    )
    d_c, d_n, query_at = 24, 16, 7
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(44)
        w_uk, q, latents = torch.randn(d_c, d_n), torch.randn(d_n), torch.randn(query_at + 1, d_c)
    positions = torch.arange(query_at + 1)
    keys = apply_rope(latents @ w_uk, positions)  # k_t = RoPE(c_t W_UK, t): (8, d_N)
    q_rotated = apply_rope(q[None], torch.tensor([query_at]))[0]  # RoPE(q, 7)
    true_scores = keys @ q_rotated
    absorbed_scores = latents @ (q_rotated @ w_uk.T)  # one absorbed query for every cached token
    agree = torch.isclose(absorbed_scores, true_scores, rtol=1e-4, atol=1e-4 * true_scores.abs().max().item())
    truth = [t for t in range(query_at + 1) if agree[t]]
    if sorted(answer) != truth:
        hint = (
            "the absorbed score rotates only the query; the key's rotation R_t sits between W_UK and c_t and drops "
            "out only where R_t is the identity"
        )
        if query_at in answer and query_at not in truth:
            hint = (
                "t = s is where the relative rotation R_{s-t} vanishes, but the absorbed score lost R_t, not R_{s-t}: "
                + hint
            )
        raise AssertionError(f"the two scores do not agree exactly at t = {sorted(answer)}: {hint}")
    return (
        f"on the check's own tensors the absorbed score is right only at t = {truth}: with RoPE on k^N each cached "
        "token needs its own rotation between W_UK and c_t, so no single absorbed query serves them all"
    )
