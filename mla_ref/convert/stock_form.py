"""Carry a converted MLA layer into the form stock DeepSeek-V3 computes, changing it as little as possible.

A conversion (``mla_ref.convert``) yields MLA layers in an exact form: the latent is used as it is, and the
shared key turns each rotary pair with the frequency its source pair had.  Stock ``DeepseekV3Attention``
differs in three ways, and this module bridges each one:

**RoPE table.**  Stock RoPE turns slot s of the d_R/2 slots with ω'_s = θ'^(-2s/d_R), one θ' per model, pairs
interleaved.  The pairs of the converted key may be listed in any order (q and k move together), so they are
sorted by frequency and θ' is chosen to minimise the mean over gaps Δ < S of 1 − cos(Δ (ω_s − ω'_s)), the
score change of a unit pair turned by the wrong angle (``fit_rope_theta``).  When the sorted table *is* a
standard one the fit is exact: TransMLA with F = 1 keeps one component for each of the d_R/2 highest source
frequencies θ^(-2j/d_h), which is the standard table with θ' = θ^(d_R/d_h).  The exact conversion and MHA2MLA
repeat each frequency once per KV head, which no θ' reproduces: the nearest is used and reported.

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

from mla_ref.hf.deepseek import DEEPSEEK_NORM_EPS
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.rope import inverse_frequencies, pair_indices

NORM_MODES: tuple[str, ...] = ("gain", "anchor")
ANCHOR_MARGIN = 2.0**13  # B ≥ 8192 · (largest possible ‖c‖): the per-token rms varies by < 2⁻²⁶


# ---- RoPE -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RopeFit:
    """The standard table chosen for the converted keys.

    theta: θ' of ω'_s = θ'^(-2s/d_R); exact: every layer's sorted table equals it (to 1e-5 relative);
    max_relative_change: max over layers and slots of |ω'_s − ω_s| / ω_s (0 where ω_s = 0 and ω'_s = 0);
    phase_error: mean over layers, slots and gaps Δ < context of 1 − cos(Δ (ω_s − ω'_s)).
    """

    theta: float
    exact: bool
    max_relative_change: float
    phase_error: float


def layer_table(module: MultiHeadLatentAttention) -> torch.Tensor:
    """The rotary frequencies of ``module``'s shared key, (d_R/2,) fp64."""
    if module.rope_frequencies is not None:
        return torch.tensor(module.rope_frequencies, dtype=torch.float64)
    return inverse_frequencies(module.qk_rope_head_dim, module.rope_theta).double()


def standard_table(theta: float | torch.Tensor, rope_dim: int) -> torch.Tensor:
    """ω'_s = θ'^(-2s/d_R): shape (d_R/2,) for a float θ', (G, d_R/2) for a (G,) tensor of them, fp64."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim  # (d_R/2,)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return theta[..., None] ** -exponents


def _phase_error(tables: torch.Tensor, candidates: torch.Tensor, context: int) -> torch.Tensor:
    """Mean over layers, slots and gaps of 1 − cos(Δ δ), δ = ω − ω'(θ').  tables (L, P) sorted; candidates (G,)."""
    delta = tables[None] - standard_table(candidates, 2 * tables.shape[1])[:, None]  # (G, L, P)
    half = delta / 2
    # mean_{Δ<S} cos(Δδ) = sin(Sδ/2) / (S sin(δ/2)) · cos((S−1)δ/2)   (the Dirichlet kernel)
    denominator = context * torch.sin(half)
    small = denominator.abs() < 1e-12
    ratio = torch.where(small, torch.ones_like(half), torch.sin(context * half) / torch.where(small, 1.0, denominator))
    return (1 - ratio * torch.cos((context - 1) * half)).mean(dim=(1, 2))  # (G,)


def fit_rope_theta(tables: list[torch.Tensor], context: int, hint: float | None = None) -> RopeFit:
    """The θ' whose standard table best matches every layer's sorted frequency table (see the module docstring).

    tables: one (d_R/2,) tensor per layer; context: the gap range S the phase error averages over;
    hint: a θ' to try first (e.g. θ^(d_R/d_h)), kept when it is exact.
    """
    sorted_tables = torch.stack([t.double().sort(descending=True).values for t in tables])  # (L, P)
    n_pairs = sorted_tables.shape[1]
    if n_pairs == 0:
        return RopeFit(theta=hint or 10000.0, exact=True, max_relative_change=0.0, phase_error=0.0)
    guesses = [hint] if hint else []
    if n_pairs > 1 and sorted_tables[0, 1] > 0:
        guesses.append(float(sorted_tables[0, 1] ** (-n_pairs)))  # ω_1 = θ'^(-1/P)
    for guess in guesses:
        if torch.allclose(
            standard_table(guess, 2 * n_pairs).expand_as(sorted_tables), sorted_tables, rtol=1e-5, atol=0
        ):
            return RopeFit(
                theta=guess, exact=True, max_relative_change=_relative_change(sorted_tables, guess), phase_error=0.0
            )
    # θ' keeps the standard table inside the source's range: its lowest frequency ≈ θ'^(-1) is at least a tenth
    # of the lowest non-zero one (beyond that, a falling phase error only means "turn nothing at all")
    positive = sorted_tables[sorted_tables > 0]
    largest = (10.0 / float(positive.min())) ** (n_pairs / max(n_pairs - 1, 1)) if positive.numel() else 1e4
    # coarse grid over log θ', then golden-section search around the best point
    grid = torch.logspace(0.001, math.log10(max(largest, 1.1)), 2000, dtype=torch.float64)
    errors = _phase_error(sorted_tables, grid, context)
    best = int(errors.argmin())
    low, high = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2

    def cost(log_theta: float) -> float:
        return float(_phase_error(sorted_tables, torch.tensor([math.exp(log_theta)]), context)[0])

    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if cost(a) < cost(b):
            high = b
        else:
            low = a
    theta = math.exp((low + high) / 2)
    return RopeFit(
        theta=theta,
        exact=False,
        max_relative_change=_relative_change(sorted_tables, theta),
        phase_error=cost(math.log(theta)),
    )


def _relative_change(sorted_tables: torch.Tensor, theta: float) -> float:
    standard = standard_table(theta, 2 * sorted_tables.shape[1])
    change = (standard - sorted_tables).abs() / sorted_tables.clamp_min(1e-30)
    return float(torch.where((sorted_tables == 0) & (standard == 0), 0.0, change).max())


def interleaved_rope_rows(module: MultiHeadLatentAttention) -> torch.Tensor:
    """Row order that lists the shared key's pairs by descending frequency, interleaved: (d_R,) long.

    New rows 2s and 2s + 1 are coordinates a and b of the pair with the s-th highest frequency.
    """
    order = layer_table(module).argsort(descending=True, stable=True)  # (d_R/2,)
    a_idx, b_idx = pair_indices(module.qk_rope_head_dim, module.rope_layout)
    return torch.stack([a_idx[order], b_idx[order]], dim=-1).flatten()


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
