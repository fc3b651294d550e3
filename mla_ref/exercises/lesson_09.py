"""Checks of lesson 09's exercises (notebooks/09_teaching_a_converted_model.ipynb): the gradient of distillation's
softened term (why it carries τ²), and the cache a conversion leaves at a budget.

The gradient check differentiates ``mla_ref.train.distillation_loss`` with autograd on logits of its own; the cache
check reads the sizes from the registry's own rule (``get_method(...).sizes``) on the shipped GQA teacher.
"""

from __future__ import annotations

import functools

import torch

from mla_ref import checkpoint
from mla_ref.convert import get_method
from mla_ref.exercises import exercise
from mla_ref.model import TinyLM
from mla_ref.train import TEACHERS_DIR, distillation_loss

# Exercise 09.2: mha2mla on the GQA teacher at an eighth of its cache, the cache in bf16
CACHE_METHOD, CACHE_BUDGET, CACHE_BYTES_PER_ELEMENT = "mha2mla", 0.125, 2


@functools.cache
def _teacher() -> TinyLM:
    return checkpoint.load(TEACHERS_DIR / "gqa")


@exercise("09.2")
def cache_of_a_conversion(answer) -> str:
    """{"rope_dim": d_R, "kv_lora_rank": d_c, "bytes_per_token": all layers, bf16} of mha2mla at 12.5 %."""
    keys = {"rope_dim", "kv_lora_rank", "bytes_per_token"}
    assert isinstance(answer, dict) and set(answer) == keys, (
        'the answer is a dict {"rope_dim": d_R, "kv_lora_rank": d_c, "bytes_per_token": bytes per token, all layers}'
    )
    for key in keys:
        assert isinstance(answer[key], int) and not isinstance(answer[key], bool), (
            f"answer[{key!r}] must be an int, got {type(answer[key]).__name__}"
        )
    teacher = _teacher()
    source = teacher.layers[0].self_attn
    sizes = get_method(CACHE_METHOD).sizes(source, budget=CACHE_BUDGET)
    pairs, d_c = sizes["rope_pairs"], sizes["kv_lora_rank"]
    d_r = 2 * pairs * source.n_kv_heads  # r rotary pairs kept in each KV head's key, 2 numbers per pair
    assert answer["rope_dim"] == d_r, (
        f"d_R = {answer['rope_dim']} is not the roped key mha2mla keeps at {CACHE_BUDGET:.1%}: it sizes it in rotary "
        f"pairs per KV head (r = {pairs}), and the key keeps 2 numbers per pair for each of the {source.n_kv_heads} KV "
        f"heads"
    )
    assert answer["kv_lora_rank"] == d_c, (
        f"d_c = {answer['kv_lora_rank']} is not mha2mla's latent at {CACHE_BUDGET:.1%}: the budget allows "
        f"{d_c + d_r} elements per token and layer, and d_R takes {d_r} of them"
    )
    per_layer = d_c + d_r  # the cache holds [c ; k^R] per token and layer
    expected = teacher.config.n_layers * per_layer * CACHE_BYTES_PER_ELEMENT
    assert answer["bytes_per_token"] == expected, (
        f"{answer['bytes_per_token']} bytes per token is not the cache's: {per_layer} elements per layer, "
        f"{teacher.config.n_layers} layers, {CACHE_BYTES_PER_ELEMENT} bytes each in bf16"
    )
    return (
        f"mha2mla at {CACHE_BUDGET:.1%}: d_R = {d_r} (r = {pairs} pairs x {source.n_kv_heads} KV heads x 2), d_c = {d_c}, "
        f"{expected} bytes per token in bf16 (its sizes rule)"
    )


def _soft_term_gradient(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """d/d(student logits) of distillation_loss at α = 1 (the τ²·KL term alone), by autograd: (n, v)."""
    logits = student.clone().requires_grad_(True)
    targets = torch.zeros(logits.shape[0], dtype=torch.long)  # unused at α = 1: its term is weighted by 0
    loss = distillation_loss(logits[None], teacher[None], targets[None], alpha=1.0, temperature=tau)
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


def _why_off(answer: torch.Tensor, truth: torch.Tensor, tau: float, n: int) -> str:
    """A hint when ``answer`` is a multiple of the truth that one of the usual slips explains."""
    ratio = float((answer * truth).sum() / truth.pow(2).sum())
    if not torch.allclose(answer, ratio * truth, rtol=1e-3, atol=1e-9):
        return ""
    hints = (
        (tau, "the student's softened logits are z/τ, so the chain rule divides by τ once"),
        (1 / tau, "the term is τ² · KL, not KL"),
        (1 / tau**2, "the term is τ² · KL, and the chain rule through z/τ leaves τ of it"),
        (float(n), "distillation_loss averages the KL over the positions"),
        (-1.0, "the sign: raising a logit where the student already gives more than the teacher raises the loss"),
    )
    for factor, hint in hints:
        if abs(ratio / factor - 1) < 1e-3:
            return f" ({hint})"
    return ""


@exercise("09.1")
def gradient_of_the_soft_term(answer) -> str:
    """``answer(student_logits, teacher_logits, tau)`` -> the gradient of τ²·KL (α = 1) for (n, v) logits."""
    assert callable(answer), (
        f"the answer is a function (student_logits, teacher_logits, tau) -> gradient, got {answer!r}"
    )
    generator = torch.Generator().manual_seed(9)
    tried = []
    for n, v, tau in ((5, 16, 1.0), (7, 32, 2.0), (3, 256, 5.0)):
        student = 3 * torch.randn(n, v, generator=generator)
        teacher = 3 * torch.randn(n, v, generator=generator)
        truth = _soft_term_gradient(student, teacher, tau)
        got = answer(student.clone(), teacher.clone(), tau)
        assert isinstance(got, torch.Tensor) and got.shape == truth.shape, (
            f"the gradient has the logits' shape {tuple(truth.shape)}, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}"
        )
        got = got.detach().float()
        # fp32 softmaxes of logits of size ~10: 1e-4 relative, and an absolute floor far below the entries (~1e-2)
        if not torch.allclose(got, truth, rtol=1e-4, atol=1e-7):
            error = float((got - truth).abs().max())
            raise AssertionError(
                f"at τ = {tau:g}, {n} positions, {v} classes, the gradient is off by up to {error:.3g} "
                f"(autograd of distillation_loss){_why_off(got, truth, tau, n)}"
            )
        tried.append(tau)
    return f"equal to autograd of distillation_loss at α = 1 for τ = {', '.join(f'{t:g}' for t in tried)}"
