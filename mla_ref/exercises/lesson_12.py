"""Checks of lesson 12's exercises (MLA trained from scratch against a converted model).

Every check works out the truth itself: cache sizes from the shipped teachers' configs with the calculator,
perplexities by converting and evaluating the shipped teachers, budgets from their training records.
"""

from __future__ import annotations

import math
from functools import cache
from numbers import Real

import torch

from mla_ref import checkpoint
from mla_ref.calculator import elements_per_token_per_layer, mla_elements_per_token_per_layer
from mla_ref.convert.model import convert_model_by_method
from mla_ref.data import load_corpus, random_batch, validation_windows
from mla_ref.exercises import exercise
from mla_ref.model_shapes import load_model_shape
from mla_ref.recovery import budget_steps, pretraining_tokens
from mla_ref.train import TEACHERS_DIR, evaluate

# 12.1: an MLA model of these sizes, trained from scratch beside the MHA teacher
SCRATCH_LATENT, SCRATCH_ROPE = 48, 16

# 12.2: the GQA teacher converted training-free by the recipe at d_R = 16 and one of two latents, against the MLA
# teacher on the first 2,048 bytes of the validation split; "matches" = perplexity at most MATCH × the MLA teacher's
CONVERSION_ROPE = 16
CONVERSION_LATENTS = (48, 112)
CALIBRATION_WINDOWS, SEQ_LEN, SLICE_BYTES = 8, 128, 2048
MATCH = 1.05
NEITHER = "neither"

# 12.3: the README's longer fine-tune budget, at this lesson's fine-tune shape
BUDGET_FRACTION, BUDGET_BATCH = 0.02, 8


def _number(answer, what: str) -> float:
    if isinstance(answer, bool) or not isinstance(answer, Real):
        raise AssertionError(f"the answer is {what}, a number; got {type(answer).__name__} {answer!r}")
    return float(answer)


def _cache_of(name: str) -> int:
    """A shipped teacher's cache: elements per token and layer, by the calculator from its config."""
    return elements_per_token_per_layer(load_model_shape(TEACHERS_DIR / name))


@exercise("12.1")
def scratch_fraction_of_mha(answer) -> str:
    """The fraction of the MHA teacher's cache per token and layer that an MLA of d_c 48 + d_R 16 keeps."""
    value = _number(answer, "a fraction of the MHA teacher's cache")
    mla = mla_elements_per_token_per_layer(SCRATCH_LATENT, SCRATCH_ROPE)  # d_c + d_R
    mha = _cache_of("mha")  # 2 · n_kv · d_h
    truth = mla / mha
    if math.isclose(value, truth, rel_tol=1e-9):
        return f"d_c + d_R = {mla} of the MHA teacher's 2 n_kv d_h = {mha}: {truth:.4g} of its cache"
    if math.isclose(value, 100 * truth, rel_tol=1e-9):
        raise AssertionError("that is a percentage; give the fraction (a number between 0 and 1)")
    if math.isclose(value, mla / _cache_of("gqa"), rel_tol=1e-9):
        raise AssertionError(
            "that is the fraction of the GQA teacher's cache; the question compares with the MHA teacher, whose "
            "n_kv is its n_h"
        )
    if math.isclose(value, SCRATCH_LATENT / mha, rel_tol=1e-9):
        raise AssertionError("MLA caches the shared roped key k^R beside the latent c: count d_R as well as d_c")
    if math.isclose(value, mha / mla, rel_tol=1e-9):
        raise AssertionError("that is how many times smaller the MLA cache is; give MLA's cache over the MHA teacher's")
    raise AssertionError(
        f"{value:g} is not (d_c + d_R) / (2 n_kv d_h) with d_c = {SCRATCH_LATENT}, d_R = {SCRATCH_ROPE} and the MHA "
        "teacher's n_kv and d_h (read them from its config, or use mla_ref.calculator)"
    )


@cache
def _conversion_ratios() -> dict[int, float]:
    """Perplexity of each conversion in CONVERSION_LATENTS as a multiple of the MLA teacher's, on the same slice."""
    corpus = load_corpus()
    calibration, _ = random_batch(corpus.train, CALIBRATION_WINDOWS, SEQ_LEN, torch.Generator().manual_seed(0))
    windows = validation_windows(corpus.val, SEQ_LEN, SLICE_BYTES)
    gqa = checkpoint.load(TEACHERS_DIR / "gqa")
    scratch = evaluate(checkpoint.load(TEACHERS_DIR / "mla"), windows).perplexity
    ratios = {}
    for latent in CONVERSION_LATENTS:
        converted = convert_model_by_method(gqa, "recipe", calibration, kv_lora_rank=latent, rope_dim=CONVERSION_ROPE)
        ratios[latent] = evaluate(converted, windows).perplexity / scratch
    return ratios


@exercise("12.2")
def latent_to_match_scratch(answer) -> str:
    """The smaller of CONVERSION_LATENTS whose training-free conversion comes within MATCH of the MLA teacher."""
    choices = (*CONVERSION_LATENTS, NEITHER)
    if isinstance(answer, bool) or answer not in choices:
        raise AssertionError(f"answer one of {', '.join(repr(c) for c in choices)}; got {answer!r}")
    ratios = _conversion_ratios()
    measured = ", ".join(f"d_c = {latent}: {ratio:.2f}×" for latent, ratio in ratios.items())
    matching = [latent for latent, ratio in ratios.items() if ratio <= MATCH]
    truth = matching[0] if matching else NEITHER
    if answer == truth:
        return f"measured against the MLA teacher ({measured}; a match is at most {MATCH}×)"
    if answer == NEITHER:
        raise AssertionError(f"d_c = {truth} already comes within {MATCH}× of the MLA teacher ({measured})")
    if ratios[answer] > MATCH:
        whole = " — and that is the GQA teacher's whole cache" if answer == max(CONVERSION_LATENTS) else ""
        raise AssertionError(
            f"at d_c = {answer} the conversion is {ratios[answer]:.2f}× the MLA teacher's perplexity, more than "
            f"{MATCH}×{whole} ({measured})"
        )
    raise AssertionError(f"d_c = {truth} is the smaller latent that comes within {MATCH}× ({measured})")


@exercise("12.3")
def steps_for_two_percent(answer) -> str:
    """Optimiser steps of batch BUDGET_BATCH × 128 that fit in BUDGET_FRACTION of the GQA teacher's pre-training."""
    value = _number(answer, "a number of optimiser steps")
    pretraining = pretraining_tokens(TEACHERS_DIR / "gqa")
    truth = budget_steps(BUDGET_FRACTION, pretraining, batch_size=BUDGET_BATCH, seq_len=SEQ_LEN)
    if value == truth:
        tokens = truth * BUDGET_BATCH * SEQ_LEN
        return (
            f"{truth} steps × {BUDGET_BATCH} × {SEQ_LEN} = {tokens:,} tokens, {tokens / pretraining:.2%} of the "
            f"teacher's {pretraining:,}"
        )
    if math.isclose(value, BUDGET_FRACTION * pretraining, rel_tol=1e-9):
        raise AssertionError(f"that is the budget in tokens; a step takes {BUDGET_BATCH} × {SEQ_LEN} of them")
    for batch in (4, 16, 32):
        if value == budget_steps(BUDGET_FRACTION, pretraining, batch_size=batch, seq_len=SEQ_LEN):
            raise AssertionError(f"that many steps fit at batch {batch}; the question's batch is {BUDGET_BATCH}")
    if value == math.floor(value) and value * BUDGET_BATCH * SEQ_LEN > BUDGET_FRACTION * pretraining:
        raise AssertionError(
            f"{value:g} steps would spend more than {BUDGET_FRACTION:.0%} of the teacher's {pretraining:,} "
            "pre-training tokens (its TRAINING.md record's tokens_seen)"
        )
    raise AssertionError(
        f"{value:g} is not the most whole steps of {BUDGET_BATCH} × {SEQ_LEN} tokens within {BUDGET_FRACTION:.0%} of "
        "the teacher's pre-training tokens"
    )
