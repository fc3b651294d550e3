"""BKV-PCA (TransMLA): one small latent for the position-free keys and the values, by a balanced joint PCA.

After RoRoPE (``rorope.py``) the cache holds the kept roped pairs k^R and a latent c = [k^N ; v] of
d_N + n_kv · d_h coordinates: the position-free key components and the values of the n_kv heads.
BKV-PCA shrinks that latent to any d_c:

    α  = ‖V‖ / ‖K^N‖                      on the calibration activations (balance=True; else α = 1)
    z  = S c,  S = diag(α·1_{d_N}, 1)     keys and values on an equal footing
    P  = top-d_c eigenvectors of E[z zᵀ]  (d_N + n_kv·d_h, d_c), sorted by eigenvalue
    c' = Pᵀ S c                           the new latent:  W_DKV' = Pᵀ S W_DKV
    c ≈ S⁻¹ P c'                          so  W_UK'^i = W_UK^i S⁻¹ P,   W_UV'^i = W_UV^i S⁻¹ P

Without balancing, whichever of keys and values has the larger activations claims the latent (keys
are often several times larger than values); α gives both the same total energy before the PCA.

In general the PCA minimises E[(c − ĉ)ᵀ M (c − ĉ)] for a metric M (``latent_metric``): the paper's is
M = S² (``metric="norm"``).  ``metric="score"`` measures each error where it lands instead — a key
error through the queries that read it (the score error), a value error through W_O (the output
error) — and balances those two the same way.

Query fold: after the PCA every head's key up-projection W_UK'^i is (d_N, d_c).  When d_c < d_N,
q_i^N · (W_UK'^i c') = (W_UK'^iᵀ q_i^N) · c', so the query takes the map over: q_i^N ← W_UK'^iᵀ q_i^N
and W_UK'^i ← I.  Then d_N = min(d_N, d_c): the scores are the same, the naive path up-projects fewer
dims, and the absorbed path is unchanged (it multiplies the same two maps).

``transmla_convert`` runs the whole pipeline: RoRoPE (or FreqFold) → BKV-PCA → ``assemble_mla``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from mla_ref._checks import require_choice, require_positive_int
from mla_ref.convert.activations import input_moment
from mla_ref.convert.parts import MLAParts

LATENT_METRICS: tuple[str, ...] = ("norm", "score")


@torch.no_grad()
def latent_metric(
    parts: MLAParts,
    calibration_inputs: torch.Tensor,
    *,
    metric: str = "norm",
    balance: bool = True,
    key_weight: float = 1.0,
    x_moment: torch.Tensor | None = None,
) -> torch.Tensor:
    """The metric M the latent's PCA minimises, E[(c − ĉ)ᵀ M (c − ĉ)]: (d_full, d_full), fp64, symmetric.

    M = β M_K + M_V.  ``"norm"`` (the paper): M_K, M_V are the identity on the key and on the value
    coordinates, and β = α² = ‖V‖² / ‖K^N‖², the balance.  ``"score"``: the error each part causes
    downstream — keys through the queries, M_K = mean_i W_UK^iᵀ E[q_i^N q_i^Nᵀ] W_UK^i (the mean
    squared score error), values through the output, M_V = Σ_i W_UV^iᵀ W_O^iᵀ W_O^i W_UV^i — with β
    again equalising the two parts' energies E[cᵀ M_K c] and E[cᵀ M_V c].  ``balance=False``: β = 1.
    ``key_weight`` w multiplies β: w > 1 gives the keys more of the latent than the balance would.
    Shapes: calibration_inputs (b, s, d_model); the latent is [k^N (d_N) ; v], as ``rorope_parts`` make it.
    ``x_moment``: E[x xᵀ] of the calibration inputs (``input_moment``), when already computed.
    """
    _check_key_weight(key_weight)
    terms = latent_metric_terms(parts, calibration_inputs, metric=metric, balance=balance, x_moment=x_moment)
    return terms.at(key_weight)


def _check_key_weight(key_weight: object) -> None:
    if isinstance(key_weight, bool) or not isinstance(key_weight, (int, float)) or not key_weight > 0:
        raise ValueError(f"key_weight must be a positive number, got {key_weight!r}")


@dataclass
class LatentMetricTerms:
    """The parts of ``latent_metric`` that do not depend on the key weight w: M = w β M_K + M_V (fp64)."""

    key_metric: torch.Tensor  # M_K, (d_full, d_full)
    value_metric: torch.Tensor  # M_V, (d_full, d_full)
    balance: float  # β

    def at(self, key_weight: float) -> torch.Tensor:
        """M for the key weight w."""
        return key_weight * self.balance * self.key_metric + self.value_metric


@torch.no_grad()
def latent_metric_terms(
    parts: MLAParts,
    calibration_inputs: torch.Tensor,
    *,
    metric: str = "norm",
    balance: bool = True,
    x_moment: torch.Tensor | None = None,
) -> LatentMetricTerms:
    """M_K, M_V and β of ``latent_metric`` (see there), to combine with any key weight (``LatentMetricTerms.at``)."""
    require_choice("metric", metric, LATENT_METRICS)
    n_heads, d_nope, d_full = parts.key_up.shape[0], parts.key_up.shape[1], parts.latent_down.shape[0]
    if x_moment is None:
        x_moment = input_moment(calibration_inputs, parts.latent_down.shape[1]).to(parts.latent_down.device)
    latent_down = parts.latent_down.double()  # (d_full, D)
    latent_moment = latent_down @ x_moment @ latent_down.T  # E[c cᵀ], (d_full, d_full)
    if metric == "norm":
        key_metric = torch.diag((torch.arange(d_full, device=x_moment.device) < d_nope).double())
        value_metric = torch.eye(d_full, dtype=torch.float64, device=x_moment.device) - key_metric
    else:
        key_up, query_nope = parts.key_up.double(), parts.query_nope.double()  # (h, d_N, d_full), (h, d_N, D)
        query_moment = torch.einsum("hni,ij,hmj->hnm", query_nope, x_moment, query_nope)  # E[q_i q_iᵀ]
        key_metric = torch.einsum("hnc,hnm,hmf->cf", key_up, query_moment, key_up) / n_heads
        w_o = rearrange(parts.output.double(), "i (h v) -> h i v", h=n_heads)  # W_O^i, (h, D, d_v)
        value_maps = torch.einsum("hiv,hvc->hic", w_o, parts.value_up.double())  # W_O^i W_UV^i, (h, D, d_full)
        value_metric = torch.einsum("hic,hif->cf", value_maps, value_maps)
    key_energy = (key_metric * latent_moment).sum()  # E[cᵀ M_K c] = tr(M_K E[c cᵀ])
    value_energy = (value_metric * latent_moment).sum()
    weight = (value_energy / key_energy).item() if balance and d_nope > 0 and key_energy > 0 else 1.0
    return LatentMetricTerms(key_metric, value_metric, weight)


def key_value_balance(parts: MLAParts, calibration_inputs: torch.Tensor) -> float:
    """α = ‖V‖ / ‖K^N‖ over the calibration tokens, for a latent laid out [k^N (d_N) ; v]; 1 if d_N = 0.

    Shapes: calibration_inputs (b, s, d_model).
    """
    metric = latent_metric(parts, calibration_inputs, metric="norm", balance=True)
    return metric[0, 0].sqrt().item() if parts.key_up.shape[1] > 0 else 1.0


@torch.no_grad()
def bkv_pca_parts(
    parts: MLAParts,
    calibration_inputs: torch.Tensor,
    *,
    kv_lora_rank: int,
    balance: bool = True,
    metric: str = "norm",
    key_weight: float = 1.0,
    fold_query: bool = True,
    x_moment: torch.Tensor | None = None,
    metric_terms: LatentMetricTerms | None = None,
) -> MLAParts:
    """Compress the latent [k^N ; v] of ``parts`` (as ``rorope_parts`` make it) to ``kv_lora_rank`` dims.

    The PCA runs on z = M^½ c, M from ``latent_metric`` (the paper's balanced norm by default):
    P = top-d_c eigenvectors of E[z zᵀ], c' = Pᵀ M^½ c, ĉ = M^-½ P c'.  For ``"norm"`` M^½ = S above.
    The latent's first d_N coordinates must be the position-free keys, the only ones W_UK reads.
    With kv_lora_rank equal to the latent's width nothing is lost.  ``key_weight`` scales the keys' part of M
    (``latent_metric``).  Shapes: calibration_inputs
    (b, s, d_model); the result has d_c = kv_lora_rank and d_N = min(d_N, d_c) when ``fold_query``.  ``x_moment``:
    E[x xᵀ] of the calibration inputs (``input_moment``), when already computed — all the PCA needs of them.
    ``metric_terms``: ``latent_metric_terms`` of ``parts`` with this ``metric`` and ``balance``, when already
    computed (they do not depend on ``key_weight``).
    """
    d_nope, d_full = parts.key_up.shape[1], parts.latent_down.shape[0]
    require_positive_int("kv_lora_rank", kv_lora_rank)
    require_choice("metric", metric, LATENT_METRICS)
    if kv_lora_rank > d_full:
        raise ValueError(
            f"kv_lora_rank must be at most the latent's width d_N + n_kv·d_h = {d_full} (the source's cache "
            f"less the roped key), got {kv_lora_rank}"
        )
    if (parts.key_up[:, :, d_nope:] != 0).any():
        raise ValueError(f"the latent must start with the {d_nope} position-free key dims, the only ones W_UK reads")
    if x_moment is None:
        x_moment = input_moment(calibration_inputs, parts.latent_down.shape[1]).to(parts.latent_down.device)
    if metric_terms is None:
        metric_terms = latent_metric_terms(parts, calibration_inputs, metric=metric, balance=balance, x_moment=x_moment)
    _check_key_weight(key_weight)
    weights = metric_terms.at(key_weight)  # M, (d_full, d_full)
    values, vectors = torch.linalg.eigh(weights)
    values = values.clamp_min(values.max() * 1e-10)  # a metric blind to some direction still reconstructs it
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T  # M^½
    inverse_root = vectors @ torch.diag(values.rsqrt()) @ vectors.T  # M^-½
    latent_down = parts.latent_down.double()  # (d_full, D)
    whitening = root @ latent_down  # z = M^½ c = (M^½ W_DKV) x
    _, eigenvectors = torch.linalg.eigh(whitening @ x_moment @ whitening.T)  # E[z zᵀ], ascending
    principal = eigenvectors.flip(-1)[:, :kv_lora_rank]  # P, (d_full, d_c)
    # c' = Pᵀ M^½ c;  c ≈ M^-½ P c'
    new_down = principal.T @ root @ latent_down  # (d_c, D)
    back = inverse_root @ principal  # (d_full, d_c)
    key_up = torch.einsum("hnf,fc->hnc", parts.key_up.double(), back)  # (n_h, d_N, d_c)
    value_up = torch.einsum("hvf,fc->hvc", parts.value_up.double(), back)  # (n_h, d_v, d_c)
    query_nope = parts.query_nope.double()  # (n_h, d_N, D)
    if fold_query and kv_lora_rank < d_nope:
        # q_i^N · (W_UK^i c') = (W_UK^iᵀ q_i^N) · c'
        query_nope = torch.einsum("hnc,hni->hci", key_up, query_nope)  # (n_h, d_c, D)
        key_up = torch.eye(kv_lora_rank, dtype=torch.float64, device=x_moment.device).expand(key_up.shape[0], -1, -1)
    return MLAParts(
        query_nope=query_nope.float(),
        query_rope=parts.query_rope.clone(),
        latent_down=new_down.float(),
        key_rope=parts.key_rope.clone(),
        key_up=key_up.float().contiguous(),
        value_up=value_up.float(),
        output=parts.output.clone(),
        rope_frequencies=parts.rope_frequencies,
        source_scale=parts.source_scale,
        rope_theta=parts.rope_theta,
    )
