"""Checks of lesson 05's exercises (notebooks/05_profiling_kv_cache_savings.ipynb): how many query heads put absorbed
MLA's attention at a device's ridge, and what a decode step's bytes allow at a stated copy rate.

Every check counts with ``mla_ref.roofline.decode_step_cost`` on modules built on the meta device (shapes only).
"""

from __future__ import annotations

import math

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.exercises import exercise
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.roofline import decode_step_cost

# Exercise 08.2: Llama-3-8B's attention layers, a batch at a long context, in bf16, on a stated copy rate
LLAMA_8B_LAYERS = 32
BATCH, CONTEXT, DTYPE = 8, 32_768, "bf16"
COPY_RATE = 3.35e12  # bytes per second: an H100's memory bandwidth, stated in the exercise

# Exercise 08.1: DeepSeek's cache in bf16 against the practical ridge FlashMLA's authors give for an H800
RIDGE = 865e12 / 3.35e12  # FLOPs per byte


def _number(value, what: str) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), (
        f"{what} must be a number, got {type(value).__name__}"
    )
    assert math.isfinite(value) and value > 0, f"{what} must be a finite positive number, got {value!r}"
    return float(value)


def _llama_8b_layers() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):  # counted, never run
        return {
            "GQA": GroupedQueryAttention(4096, 32, 8, head_dim=128),
            "MLA": MultiHeadLatentAttention(
                4096, 32, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
            ),
        }


def _why_off(ratio: float) -> str:
    """A hint for an answer that is ``ratio`` times the truth, from the slips this question invites."""
    hints = (
        (1 / BATCH, f"that is one sequence's rate: every step gives each of the {BATCH} sequences a token"),
        (BATCH, "a step gives each sequence one token, so the batch makes b tokens per step, not b² or b per token"),
        (float(LLAMA_8B_LAYERS), f"a step reads all {LLAMA_8B_LAYERS} layers, not one"),
        (0.5, "in bf16 an element is 2 bytes (4 would be fp32)"),
        (2.0, "in bf16 an element is 2 bytes, not 1"),
    )
    for factor, hint in hints:
        if abs(ratio / factor - 1) < 0.02:
            return f" ({hint})"
    return ""


@exercise("05.2")
def tokens_per_second_at_the_copy_rate(answer) -> str:
    """{"GQA": tokens/s, "MLA": tokens/s}: batch tokens per second if a step took exactly its bytes / COPY_RATE."""
    assert isinstance(answer, dict) and set(answer) == {"GQA", "MLA"}, (
        'the answer is a dict {"GQA": tokens per second, "MLA": tokens per second}'
    )
    truth = {}
    for name, layer in _llama_8b_layers().items():
        cost = decode_step_cost(layer, BATCH, CONTEXT, DTYPE)  # one layer: its weights and its cache, once
        seconds = LLAMA_8B_LAYERS * cost.bytes / COPY_RATE  # a step reads every layer
        truth[name] = BATCH / seconds  # each step makes one token for each sequence
    for name, expected in truth.items():
        got = _number(answer[name], f"answer[{name!r}]")
        assert abs(got / expected - 1) <= 0.01, (
            f"{name}: {got:,.0f} tokens/s is not what its bytes allow at {COPY_RATE:.3g} B/s: "
            f"{expected:,.0f}{_why_off(got / expected)}"
        )
    return (
        f"GQA {truth['GQA']:,.0f} and MLA {truth['MLA']:,.0f} tokens/s "
        f"({truth['MLA'] / truth['GQA']:.2f}x): decode_step_cost's bytes of {LLAMA_8B_LAYERS} layers at the copy rate"
    )


def _attention_intensity(n_heads: int) -> float:
    """Attention FLOPs per cache byte of an absorbed decode step with DeepSeek's cache (512 + 64) in bf16."""
    with torch.device("meta"):
        layer = MultiHeadLatentAttention(
            1024, n_heads, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
        )
    cost = decode_step_cost(layer, 1, 4096, "bf16")
    return cost.attention_flops / cost.cache_bytes


@exercise("05.1")
def heads_at_the_ridge(answer) -> str:
    """The smallest n_h whose absorbed attention (d_c = 512, d_R = 64, bf16) has RIDGE FLOPs per cache byte."""
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"the answer is a number of heads, an int; got {type(answer).__name__}"
    )
    assert answer >= 1, f"a layer has at least one head, got {answer}"
    # the intensity is proportional to n_h: find the first n_h at the ridge, then confirm it and its predecessor
    smallest = math.ceil(RIDGE / _attention_intensity(1))
    while _attention_intensity(smallest) < RIDGE:
        smallest += 1
    while smallest > 1 and _attention_intensity(smallest - 1) >= RIDGE:
        smallest -= 1
    at_answer = _attention_intensity(answer)
    assert at_answer >= RIDGE, (
        f"at n_h = {answer} the absorbed attention does {at_answer:.1f} FLOPs per cache byte, below the ridge "
        f"{RIDGE:.1f}: it is still held by its bytes"
    )
    assert answer == smallest, (
        f"n_h = {answer} reaches the ridge, but so does n_h = {answer - 1} "
        f"({_attention_intensity(answer - 1):.1f} FLOPs per byte ≥ {RIDGE:.1f}): not the smallest"
    )
    return (
        f"n_h = {smallest}: {_attention_intensity(smallest):.1f} FLOPs per cache byte ≥ {RIDGE:.1f}, "
        f"n_h = {smallest - 1}: {_attention_intensity(smallest - 1):.1f} (decode_step_cost)"
    )
