"""How far one model's predictions are from another's: the measures every comparison in the package uses.

    KL(p_ref ‖ p) = Σ_v p_ref(v) · (log p_ref(v) − log p(v))      per position, in nats, computed in fp32
    relative error = ‖actual − expected‖ / ‖expected‖               Frobenius norms over all elements

The KL is what conversion reports (the converted model against its source), what the split search minimises, and
what recovery's distillation pulls down (with a temperature τ: both distributions softened as softmax(logits / τ)).
"""

from __future__ import annotations

import torch


def kl_from_log_probs(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) at every position from log-probabilities (..., v); returns (...,)."""
    return (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)


def kl_per_position(reference_logits: torch.Tensor, logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(ref / τ) ‖ softmax(logits / τ)) at every position, from logits (..., v), in fp32; returns (...,)."""
    reference = (reference_logits.float() / temperature).log_softmax(-1)
    return kl_from_log_probs(reference, (logits.float() / temperature).log_softmax(-1))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over all elements (Frobenius norms), as a float."""
    return ((actual - expected).norm() / expected.norm()).item()
