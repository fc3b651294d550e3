"""What the recoveries share (``layerwise`` and ``distill``; ``finetune`` uses ``training_only`` as well).

- checks of their arguments, each a ValueError that names the value and what is allowed;
- ``MovedTo``: modules on a device for a ``with`` block, and back where they were afterwards;
- the constants of their Adam runs (the schedule is ``mla_ref.train.learning_rate``, with a time limit's progress);
- ``balance_latent``: an MLA layer's latent brought to unit scale, the same function, so that Adam's steps are
  small relative changes for every matrix;
- ``training_only`` and ``take_step``: the parameters a run trains, and one clipped optimiser step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mla_ref._checks import require_number
from mla_ref.model import TinyLM

BETAS = (0.9, 0.95)  # a short run: the second moment must follow the gradients of the last few dozen steps
MIN_LR_RATIO = 0.1  # the cosine ends at a tenth of the peak, as recovery_config's schedule does
GRAD_CLIP = 1.0  # E_l and the distillation loss are O(1): a larger gradient norm is a bad batch, not a signal


def require_time_limit(time_limit_s) -> float | None:
    """``time_limit_s`` as a float of seconds, or None for no limit."""
    if time_limit_s is None:
        return None
    return require_number("time_limit_s", time_limit_s, lambda t: t > 0, "be a positive number of seconds or None")


def require_pair(student: TinyLM, teacher: TinyLM) -> None:
    """Refuse a student and teacher that are not two different TinyLMs of the same depth, width and vocabulary."""
    if not isinstance(student, TinyLM):
        raise ValueError(f"student must be a TinyLM, got {type(student).__name__}")
    if not isinstance(teacher, TinyLM):
        raise ValueError(f"teacher must be a TinyLM, got {type(teacher).__name__}")
    if teacher is student:
        raise ValueError("teacher must be a different model from the student (distilling a model into itself)")
    for name in ("n_layers", "d_model", "vocab_size"):
        if getattr(student.config, name) != getattr(teacher.config, name):
            raise ValueError(
                f"student and teacher must share {name}: the student has {getattr(student.config, name)}, "
                f"the teacher {getattr(teacher.config, name)}"
            )


def require_keep(student: TinyLM, keep) -> tuple[str, ...]:
    """``keep`` as a tuple of parameter names that every attention layer of ``student`` has."""
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(keep)
    names = set.intersection(*(set(dict(layer.self_attn.named_parameters())) for layer in student.layers))
    unknown = [name for name in keep if name not in names]
    if unknown:
        raise ValueError(f"keep names {unknown}, which not every attention layer has; allowed: {sorted(names)}")
    return keep


class MovedTo:
    """Move ``modules`` to ``device`` for the ``with`` block and back to where each was afterwards.

    ``Module.to`` swaps each parameter's storage and keeps the Parameter objects, so optimisers built inside the
    block see the moved tensors; a copy to a device and back is exact, so a teacher leaves as it came.
    """

    def __init__(self, device: torch.device, *modules: torch.nn.Module):
        self.device, self.modules = device, modules
        self.homes = [next(m.parameters()).device for m in modules]

    def __enter__(self):
        for module in self.modules:
            module.to(self.device)
        return self

    def __exit__(self, *exc):
        for module, home in zip(self.modules, self.homes, strict=True):
            module.to(home)


@torch.no_grad()
def balance_latent(attention: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """Bring each latent coordinate of an MLA layer to unit RMS on ``inputs``, moving its scale into kv_b_proj.

    The latent c̃ reaches the heads only through k^N, v = c̃ W_UK, c̃ W_UV, so c̃_j → c̃_j / σ_j with column j of
    kv_b_proj × σ_j computes the same function (σ_j: the RMS of c̃_j over the tokens of ``inputs``).  The
    division goes into the latent norm's gain (RMSNorm's r(c) does not depend on it) or, without a latent norm,
    into the rows of kv_a_proj_with_mqa that make c.  Why: a conversion leaves the latent at whatever scale its
    algebra gave (here up to ~100 per coordinate, with kv_b_proj ~0.1), and Adam moves every weight by about
    the learning rate whatever its scale, so one step on kv_b_proj changed every key by lr · Σ_j |c̃_j| — on
    SmolLM2 at 25% a single step of 1e-4 along the gradient took the KL to the source from 1.2 to 11.6 nats.
    After balancing, a step is the same small relative change for kv_b_proj as for the other matrices.

    Shapes: inputs (..., d_model), what the layer reads.  Returns σ (d_c,), or None for a module without a
    latent (not MLA).  Exact up to fp32 rounding.
    """
    if not hasattr(attention, "kv_b_proj"):
        return None
    d_c = attention.kv_lora_rank
    latent = attention.kv_a_proj_with_mqa(inputs)[..., :d_c]  # (..., d_c)
    if attention.latent_norm:
        latent = attention.kv_a_layernorm(latent)
    sigma = latent.flatten(0, -2).double().pow(2).mean(0).sqrt().float()  # (d_c,)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # a coordinate that is always 0 stays as it is
    if attention.latent_norm:
        attention.kv_a_layernorm.weight.div_(sigma)
    else:
        attention.kv_a_proj_with_mqa.weight[:d_c].div_(sigma[:, None])
        if attention.kv_a_proj_with_mqa.bias is not None:
            attention.kv_a_proj_with_mqa.bias[:d_c].div_(sigma)
    attention.kv_b_proj.weight.mul_(sigma[None, :])
    return sigma


def touches_kept(attention: torch.nn.Module, keep: tuple[str, ...]) -> bool:
    """Whether ``balance_latent`` would change a parameter named in ``keep``."""
    scaled = (
        ("kv_a_layernorm.weight",)
        if getattr(attention, "latent_norm", False)
        else ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias")
    )
    return any(name in keep for name in ("kv_b_proj.weight", *scaled))


def trainable(module: torch.nn.Module, keep: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` not named in ``keep``."""
    return [p for name, p in module.named_parameters() if name not in keep]


@contextmanager
def training_only(module: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Gradients for ``params`` alone among ``module``'s parameters during the ``with`` block; afterwards every
    parameter's requires_grad as it was, and no gradient left behind."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


def take_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list, lr: float) -> None:
    """One optimiser step down ``loss`` at learning rate ``lr``, the gradients clipped to a global norm of GRAD_CLIP."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
