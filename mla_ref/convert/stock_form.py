"""Carry a converted MLA layer into the form stock DeepSeek-V3 computes, changing it as little as possible.

A conversion (``mla_ref.convert``) yields MLA layers in an exact form: the latent is used as it is, and the
shared key turns each rotary pair with the frequency its source pair had.  Stock ``DeepseekV3Attention``
differs in three ways, and this module bridges each one:

**RoPE table.**  Stock RoPE turns slot s of the d_R/2 slots with ω'_s = θ'^(-2s/d_R), one θ' per model, pairs
interleaved: ``mla_ref.convert.rope_table`` fits that θ' to the converted layers' frequencies.

**Latent norm.**  Stock always computes c̃ = RMSNorm(c) ⊙ w = c / r(c) ⊙ w with r(c) = √(mean(c²) + ε), a
per-token factor that no fixed weight can undo.  Two ways to choose w (only the product of w with W_UK, W_UV
matters, so W_UK and W_UV stay as they are):

- ``"gain"``: scale W_DKV by α = 1/√E[mean(c²)] (so ε is negligible) and take the least-squares gain
  w_j = E[c_j u_j] / E[u_j²], u = αc / r(αc), per latent coordinate, on calibration tokens.  What is left,
  E‖u ⊙ w − c‖² / E‖c‖², measures how much r(c) varies from token to token (``fit_norm``).
- ``"anchor"``: one more latent coordinate, fed only by a bias B far larger than any ‖c‖ (bounded through
  the layer's input RMSNorm: ‖x‖ ≤ max|g| √D).  Then r ≈ B/√(n+1) is the same for every token to within
  (‖c‖/B)² ≈ 1e-8, and w = B/√(n+1) gives back c: exact in fp32 for one cached element more per token.

**Query bias.**  Stock has no ``q_proj`` bias.  A source query bias (Qwen2) goes through a ``q_a_proj`` →
``q_a_layernorm`` → ``q_b_proj`` bottleneck whose extra anchored coordinate is ≈ 1 for every token, so the
bias becomes that coordinate's column of ``q_b_proj`` (``anchored_query``); the same anchor keeps the
bottleneck's norm exact.  ``low_rank_query`` builds a genuinely low-rank query (``--q-lora-rank``) the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from mla_ref.convert.rope_table import interleaved_rope_rows
from mla_ref.hf.deepseek import DEEPSEEK_NORM_EPS
from mla_ref.mla import MultiHeadLatentAttention

NORM_MODES: tuple[str, ...] = ("gain", "anchor")
ANCHOR_MARGIN = 2.0**13  # B ≥ 8192 · (largest possible ‖c‖): the per-token rms varies by < 2⁻²⁶


# ---- RMSNorm in front of a bottleneck -----------------------------------------------------------------------
@dataclass(frozen=True)
class NormFit:
    """How well a weighted RMSNorm reproduces a linear bottleneck a = W x + b, measured on calibration tokens.

    scale: α = 1/√E[mean(a²)];  gain: (n,) least-squares weights of the normalised αa;
    errors: E‖â − a‖² / E‖a‖² for unit weights, one shared gain, per-coordinate gains and the anchor.
    """

    scale: float
    gain: torch.Tensor
    errors: dict[str, float]


def input_bound(input_norm_weight: torch.Tensor) -> float:
    """Largest ‖x‖ an RMSNorm with these weights can output: max|g| · √D (the normalised vector has norm √D)."""
    return float(input_norm_weight.abs().max()) * math.sqrt(input_norm_weight.numel())


def anchor_constant(weight: torch.Tensor, bias: torch.Tensor | None, bound: float) -> float:
    """B = a power of two ≥ ANCHOR_MARGIN · max ‖W x + b‖ over ‖x‖ ≤ bound (Frobenius bounds the spectral norm)."""
    largest = float(torch.linalg.matrix_norm(weight.double())) * bound
    largest += 0.0 if bias is None else float(bias.double().norm())
    return 2.0 ** math.ceil(math.log2(max(ANCHOR_MARGIN * largest, 1.0)))


def _normalise(a: torch.Tensor, eps: float) -> torch.Tensor:
    return a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def fit_norm(activations: torch.Tensor, anchor: float | None = None, eps: float = DEEPSEEK_NORM_EPS) -> NormFit:
    """Fit the gain of an RMSNorm placed on a bottleneck, and measure every choice.  activations (T, n).

    ``anchor``: the constant B of the anchored form, whose error is measured too when given.
    """
    a = activations.double()
    total = a.pow(2).sum().clamp_min(1e-300)
    scale = float(a.pow(2).mean().clamp_min(1e-300).rsqrt())
    u = _normalise(scale * a, eps)  # (T, n)
    gain = (u * a).sum(0) / u.pow(2).sum(0).clamp_min(1e-300)  # w_j = E[u_j a_j] / E[u_j²]
    shared = (u * a).sum() / u.pow(2).sum().clamp_min(1e-300)
    n = a.shape[1]

    def error(estimate: torch.Tensor) -> float:
        return float((estimate - a).pow(2).sum() / total)

    errors = {
        "unit weights": error(_normalise(a, eps)),
        "one gain": error(u * shared),
        "per-coordinate gains": error(u * gain),
    }
    if anchor is not None:
        padded = torch.cat([a, torch.full_like(a[:, :1], anchor)], dim=1)
        errors["anchor"] = error(_normalise(padded, eps)[:, :n] * (anchor / math.sqrt(n + 1)))
    return NormFit(scale=scale, gain=gain.float(), errors=errors)


def _bottleneck(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, *, fit: NormFit | None, anchor: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W', b', w) of RMSNorm_w(W' x + b') ≈ W x + b: gain (n rows) or anchor (n + 1 rows, last one constant)."""
    n = weight.shape[0]
    bias = torch.zeros(n) if bias is None else bias.float()
    if mode == "gain":
        return weight.float() * fit.scale, bias * fit.scale, fit.gain.float()
    weight = torch.cat([weight.float(), torch.zeros(1, weight.shape[1])])
    bias = torch.cat([bias, torch.tensor([anchor])])
    # r ≈ B/√(n+1): w = B/√(n+1) returns c; the anchor coordinate comes out ≈ 1
    gains = torch.cat([torch.full((n,), anchor / math.sqrt(n + 1)), torch.tensor([1 / math.sqrt(n + 1)])])
    return weight, bias, gains


def _pad_columns(weight: torch.Tensor, column: torch.Tensor | None = None) -> torch.Tensor:
    """Append one column (zeros, or ``column``) to a (m, n) up-projection: the anchor coordinate's."""
    extra = torch.zeros(weight.shape[0], 1) if column is None else column.float()[:, None]
    return torch.cat([weight.float(), extra], dim=1)


# ---- building the modules -------------------------------------------------------------------------------------
def _module_like(
    module: MultiHeadLatentAttention,
    *,
    kv_lora_rank: int,
    q_lora_rank: int | None,
    bias: bool,
    stock: bool,
    theta: float,
) -> MultiHeadLatentAttention:
    """``module``'s shape with a new latent width, query bottleneck and biases; in stock form also the latent norm,
    one RoPE θ and interleaved pairs (what ``DeepseekV3Attention`` builds)."""
    stock_settings = dict(latent_norm=True, rope_theta=theta, rope_layout="interleaved", rope_frequencies=None)
    return module.like(
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=q_lora_rank,
        bias=bias,
        norm_eps=DEEPSEEK_NORM_EPS,  # the bottlenecks are scaled so that ε is negligible (see ``fit_norm``)
        **(stock_settings if stock else {}),
    )


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float()


@torch.no_grad()
def low_rank_query(
    module: MultiHeadLatentAttention,
    calibration_inputs: torch.Tensor,
    rank: int,
    *,
    mode: str,
    bound: float,
    norm_eps: float = DEEPSEEK_NORM_EPS,
) -> MultiHeadLatentAttention:
    """Replace ``q_proj`` by q_a_proj → q_a_layernorm → q_b_proj of ``rank`` (plus one with the anchor).

    q = W_Q x + b_Q ≈ U Uᵀ [W_Q | b_Q] [x; 1], U the top ``rank`` principal directions of the queries on the
    calibration inputs (b, s, D).  W_DQ = Uᵀ [W_Q | b_Q] feeds the norm (``mode`` "gain" or "anchor"), U is
    q_b_proj.  Everything else is copied.
    """
    if module.q_lora_rank is not None:
        raise ValueError("the module already has a low-rank query")
    weight, q_bias = module.q_proj.weight.double(), _bias(module.q_proj)
    most = min(weight.shape[0], weight.shape[1] + (q_bias is not None))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= most:
        raise ValueError(f"q_lora_rank must lie in [1, {most}] (the query map's rank), got {rank!r}")
    x = rearrange(calibration_inputs.double(), "b s i -> (b s) i")  # (T, D)
    if q_bias is not None:
        weight = torch.cat([weight, q_bias.double()[:, None]], dim=1)  # [W_Q | b_Q]
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [x; 1]
    # U: top eigenvectors of W E[x xᵀ] Wᵀ, the queries' second moment
    _, vectors = torch.linalg.eigh(weight @ (x.T @ x / x.shape[0]) @ weight.T)
    up = vectors.flip(-1)[:, :rank]  # (n_h·(d_N+d_R), Q)
    down = up.T @ weight  # (Q, D [+1])
    down_weight, down_bias = (down[:, :-1], down[:, -1]) if q_bias is not None else (down, None)
    fit = fit_norm(x @ down.T, eps=norm_eps) if mode == "gain" else None
    anchor = anchor_constant(down_weight, down_bias, bound) if mode == "anchor" else None
    a_weight, a_bias, gains = _bottleneck(down_weight, down_bias, mode, fit=fit, anchor=anchor)
    up = up.float() if mode == "gain" else _pad_columns(up)
    had_bias = module.o_proj.bias is not None  # an MLA's biases come together (q, kv_a, o)
    needs_bias = had_bias or mode == "anchor"
    result = _module_like(
        module, kv_lora_rank=module.kv_lora_rank, q_lora_rank=a_weight.shape[0], bias=needs_bias, stock=False,
        theta=module.rope_theta,
    )  # fmt: skip
    result.q_a_layernorm.eps = norm_eps
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("q_proj.")}
    state.update({"q_a_proj.weight": a_weight, "q_a_layernorm.weight": gains, "q_b_proj.weight": up})
    if needs_bias:
        state["q_a_proj.bias"] = a_bias
        if not had_bias:  # the anchor needs q_a_proj's bias; the others are zero
            state["kv_a_proj_with_mqa.bias"] = torch.zeros(module.kv_a_proj_with_mqa.weight.shape[0])
            state["o_proj.bias"] = torch.zeros(module.d_model)
    result.load_state_dict(state)
    return result


def anchored_query(weight: torch.Tensor, bias: torch.Tensor, bound: float) -> dict[str, torch.Tensor]:
    """An exact q_a_proj → q_a_layernorm → q_b_proj for q = W x + b (the bias rides on an anchored coordinate).

    W_DQ = I (D rows) when W has more rows than columns, else W itself; q_b_proj = [W or I | b].
    """
    rows, columns = weight.shape
    down, up = (torch.eye(columns), weight.float()) if rows > columns else (weight.float(), torch.eye(rows))
    anchor = anchor_constant(down, None, bound)
    a_weight, a_bias, gains = _bottleneck(down, None, "anchor", fit=None, anchor=anchor)
    return {
        "q_a_proj.weight": a_weight,
        "q_a_proj.bias": a_bias,
        "q_a_layernorm.weight": gains,
        "q_b_proj.weight": _pad_columns(up, bias),
    }


@torch.no_grad()
def stock_mla(
    module: MultiHeadLatentAttention,
    *,
    theta: float,
    mode: str,
    fit: NormFit | None,
    bound: float,
    bias: bool,
) -> MultiHeadLatentAttention:
    """``module`` (an exact-form layer: no latent norm) in stock DeepSeek-V3 form (see the module docstring).

    theta: the model's θ' (``fit_rope_theta``); mode: "gain" (with ``fit`` from ``fit_norm`` on this layer's
    latent) or "anchor"; bound: ``input_bound`` of the layer's input norm; bias: whether the stock model has
    attention biases (needed for the anchor, a key or latent bias, or a query bias).
    """
    if module.latent_norm:
        raise ValueError("stock_mla takes an exact-form layer (latent_norm=False)")
    d_c, d_n = module.kv_lora_rank, module.qk_nope_head_dim
    rope_rows = interleaved_rope_rows(module)  # (d_R,)
    kv_weight, kv_bias = module.kv_a_proj_with_mqa.weight.float(), _bias(module.kv_a_proj_with_mqa)
    kv_bias = torch.zeros(kv_weight.shape[0]) if kv_bias is None else kv_bias
    anchor = anchor_constant(kv_weight[:d_c], kv_bias[:d_c], bound) if mode == "anchor" else None
    latent_weight, latent_bias, gains = _bottleneck(kv_weight[:d_c], kv_bias[:d_c], mode, fit=fit, anchor=anchor)
    kv_b = module.kv_b_proj.weight.float() if mode == "gain" else _pad_columns(module.kv_b_proj.weight)

    def reorder_queries(weight: torch.Tensor) -> torch.Tensor:
        """Per head [nope ; rope]: the rope rows take the interleaved, sorted order."""
        heads = rearrange(weight, "(h e) i -> h e i", h=module.n_heads)
        heads = torch.cat([heads[:, :d_n], heads[:, d_n:][:, rope_rows]], dim=1)
        return rearrange(heads, "h e i -> (h e) i")

    state = {
        "kv_a_proj_with_mqa.weight": torch.cat([latent_weight, kv_weight[d_c:][rope_rows]]),
        "kv_a_layernorm.weight": gains,
        "kv_b_proj.weight": kv_b,
        "o_proj.weight": module.o_proj.weight.float(),
    }
    q_lora_rank = module.q_lora_rank
    q_bias = _bias(module.q_proj) if q_lora_rank is None else None
    if q_lora_rank is not None:
        state.update(
            {
                "q_a_proj.weight": module.q_a_proj.weight.float(),
                "q_a_layernorm.weight": module.q_a_layernorm.weight.float(),
                "q_b_proj.weight": reorder_queries(module.q_b_proj.weight.float()),
            }
        )
        if module.q_a_proj.bias is not None:
            state["q_a_proj.bias"] = module.q_a_proj.bias.float()
    elif q_bias is not None and bool(q_bias.any()):
        q_weight = reorder_queries(module.q_proj.weight.float())
        q_bias = reorder_queries(q_bias[:, None])[:, 0]
        state.update(anchored_query(q_weight, q_bias, bound))
        q_lora_rank = state["q_a_proj.weight"].shape[0]
    else:
        state["q_proj.weight"] = reorder_queries(module.q_proj.weight.float())
    result = _module_like(
        module, kv_lora_rank=latent_weight.shape[0], q_lora_rank=q_lora_rank, bias=bias, stock=True, theta=theta
    )
    if bias:
        state["kv_a_proj_with_mqa.bias"] = torch.cat([latent_bias, kv_bias[d_c:][rope_rows]])
        state["o_proj.bias"] = torch.zeros(module.d_model) if module.o_proj.bias is None else module.o_proj.bias.float()
        if q_lora_rank is None:
            state["q_proj.bias"] = torch.zeros(module.q_proj.weight.shape[0])  # stock has none: it must stay 0
        elif "q_a_proj.bias" not in state:
            state["q_a_proj.bias"] = torch.zeros(q_lora_rank)
    elif any(_bias(m) is not None and bool(_bias(m).any()) for m in (module.kv_a_proj_with_mqa, module.o_proj)):
        raise ValueError("the layer has biases: pass bias=True")
    result.load_state_dict(state)
    return result
