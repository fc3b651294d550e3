"""Checks of lesson 03's exercises (multi-head latent attention).

Each check builds its own layers (under a fixed seed, leaving the caller's random state alone) or loads the shipped
teacher, computes the truth with the package, and compares the learner's answer with it.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
from einops import rearrange

from mla_ref import MLA, checkpoint
from mla_ref.data import load_corpus, validation_windows
from mla_ref.exercises import exercise
from mla_ref.measures import relative_error
from mla_ref.train import TEACHERS_DIR


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise AssertionError(reason)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- 03.1: the rank of the key map ---------------------------------------------------------------------------

# (n_h, d_N, d_c) of the three layers of the question; d = 64, d_R = 4, d_v = 8, no latent norm
RANK_CASES = {"a": (8, 8, 28), "b": (2, 8, 28), "c": (16, 8, 96)}
RANK_D_MODEL = 64


def _key_map_rank(n_h: int, d_n: int, d_c: int) -> int:
    """The rank of x ↦ [k_0^N … k_{n_h-1}^N] of a random MLA layer of that shape, as lesson 03 §2 computes it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(31)
        layer = MLA(RANK_D_MODEL, n_h, kv_lora_rank=d_c, qk_nope_head_dim=d_n, qk_rope_head_dim=4, v_head_dim=8,
                    latent_norm=False)  # fmt: skip
    with torch.no_grad():
        w_dkv = layer.kv_a_proj_with_mqa.weight[:d_c].double()  # W_DKVᵀ: (d_c, d)
        key_map = torch.einsum("hdc,ci->hdi", layer.key_up_proj().double(), w_dkv)  # (n_h, d_N, d)
        return int(torch.linalg.matrix_rank(rearrange(key_map, "h d i -> (h d) i")).item())


@exercise("03.1")
def key_map_rank(answer: object) -> str:
    """{"a": rank, "b": rank, "c": rank}: the rank of the three layers' key maps."""
    _require(
        isinstance(answer, dict) and set(answer) == set(RANK_CASES) and all(_is_int(v) for v in answer.values()),
        'answer with a dict of ints {"a": rank, "b": rank, "c": rank}',
    )
    for case, (n_h, d_n, d_c) in RANK_CASES.items():
        truth = _key_map_rank(n_h, d_n, d_c)
        if answer[case] != truth:
            limits = {"d_c (the latent it passes through)": d_c, "n_h · d_N (its outputs)": n_h * d_n,
                      "d (its input x)": RANK_D_MODEL}  # fmt: skip
            above = [name for name, limit in limits.items() if answer[case] > limit]
            reason = (
                f"a rank above {', '.join(above)} is impossible"
                if above
                else "the map can reach the smallest of d_c, n_h · d_N and d"
            )
            raise AssertionError(f"layer ({case}) n_h = {n_h}, d_N = {d_n}, d_c = {d_c}: rank {answer[case]}: {reason}")
    return "the key map's rank is the smallest of d_c, n_h · d_N and d: " + ", ".join(
        f"({case}) {_key_map_rank(*shape)}" for case, shape in RANK_CASES.items()
    )


# ---- 03.2: the softmax scale ---------------------------------------------------------------------------------


@exercise("03.2")
def wrong_softmax_scale(answer: object) -> str:
    """A function ``(attn, x, scale) -> output``: attn's naive output with the softmax scale replaced by ``scale``."""
    _require(callable(answer), "answer with a function output_at_scale(attn, x, scale) -> (b, T, d) output")
    output_at_scale: Callable = answer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(32)
        attn = MLA(96, 6, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=32)
        with torch.no_grad():
            attn.q_b_proj.weight.mul_(3.0)  # sharper attention than at initialisation, so the scale shows
        x = torch.randn(2, 9, 96)
    d_n, d_r, d_c = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    with torch.no_grad():
        right = attn(x, path="naive")
        errors = {}
        for name, scale in (("1/√(d_N + d_R)", 1 / math.sqrt(d_n + d_r)), ("1/√d_N", 1 / math.sqrt(d_n)),
                            ("1/√d_c", 1 / math.sqrt(d_c))):  # fmt: skip
            # the package's own output at that scale: scores are linear in the query, so scaling W_UQ and W_QR by
            # scale / (the right scale) scales every score as the changed softmax scale would
            rescaled = copy.deepcopy(attn)
            rescaled.q_b_proj.weight.mul_(scale / attn.softmax_scale)
            truth = rescaled(x, path="naive")
            yours = output_at_scale(attn, x, scale)
            _require(
                isinstance(yours, torch.Tensor) and yours.shape == truth.shape,
                f"the function should return the (b, T, d) output, shape {tuple(truth.shape)}",
            )
            try:  # fp32: the same products in another order, ~1e-6 relative
                torch.testing.assert_close(yours, truth, rtol=1e-5, atol=1e-5)
            except AssertionError:
                raise AssertionError(
                    f"at scale {name} your output is not the layer's output with that softmax scale: the scale "
                    "multiplies the whole score q_i · k_i, position-free and rotary parts alike"
                ) from None
            errors[name] = relative_error(truth, right)
    _require(errors["1/√(d_N + d_R)"] < 1e-5, "at the right scale the output must be the module's")
    _require(errors["1/√d_N"] > 0.02 and errors["1/√d_c"] > 0.02, f"both wrong scales should move the output: {errors}")
    return (
        "on the check's own layer, your outputs at the three scales are right; the wrong ones are off by "
        + ", ".join(f"{errors[name]:.2f} ({name})" for name in ("1/√d_N", "1/√d_c"))
    )


# ---- 03.3: the smallest latent for the teacher's values -------------------------------------------------------

VALUE_LAYER, VALUE_BOUND = 0, 0.05


def _values_through_latent(attn, inputs, d_c):
    """attn with its value map x ↦ x W_V replaced by its rank-d_c version x W_V P Pᵀ, P the top d_c principal
    directions of the values x W_V over ``inputs``."""
    with torch.no_grad():
        values = (inputs.reshape(-1, inputs.shape[-1]) @ attn.v_proj.weight.T).double()  # (tokens, n_h·d_h)
        directions = torch.linalg.svd(values, full_matrices=False).Vh[:d_c].T.float()  # P: (n_h·d_h, d_c)
        low_rank = copy.deepcopy(attn)
        low_rank.v_proj.weight.copy_(directions @ directions.T @ attn.v_proj.weight)  # (out, in): P Pᵀ W_Vᵀ
    return low_rank


@functools.cache
def _teacher_layer():
    """The MHA teacher's layer-``VALUE_LAYER`` attention, its inputs over the first 2,048 validation bytes, and its
    output on them (loaded once)."""
    teacher = checkpoint.load(TEACHERS_DIR / "mha")
    text = validation_windows(load_corpus().val, 128, 2048)[:, :-1]  # (16, 128) bytes
    with torch.no_grad():
        inputs = teacher.attention_inputs(text)[VALUE_LAYER]
        attn = teacher.layers[VALUE_LAYER].self_attn
        return attn, inputs, attn(inputs)


def value_latent_error(d_c: int) -> float:
    """The relative error of the MHA teacher's layer-``VALUE_LAYER`` attention output when its values pass through
    a latent of ``d_c`` numbers (their top principal directions on the first 2,048 validation bytes)."""
    attn, inputs, exact = _teacher_layer()
    with torch.no_grad():
        return relative_error(_values_through_latent(attn, inputs, d_c)(inputs), exact)


@exercise("03.3")
def smallest_value_latent(answer: object) -> str:
    """The smallest d_c whose latent keeps the teacher layer's output within VALUE_BOUND (relative)."""
    _require(_is_int(answer) and 1 <= answer <= 256, "answer with an int d_c between 1 and n_h · d_h = 256")
    error = value_latent_error(answer)
    _require(
        error < VALUE_BOUND,
        f"with d_c = {answer} the output is off by {error:.3f}, not under {VALUE_BOUND}: the latent is too small",
    )
    if answer > 1:
        below = value_latent_error(answer - 1)
        _require(
            below >= VALUE_BOUND,
            f"d_c = {answer - 1} already keeps the output within {VALUE_BOUND} ({below:.3f}): look for a smaller one",
        )
    return (
        f"d_c = {answer} keeps layer {VALUE_LAYER}'s output within {VALUE_BOUND} ({error:.3f}), d_c = {answer - 1} "
        f"does not: the values of 8 heads x 32 need a latent of {answer}, not 256"
    )
