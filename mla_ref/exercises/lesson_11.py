"""Checks of lesson 11's exercises (notebooks/11_a_real_small_model.ipynb): the bytes a converted SmolLM2 caches for
a prompt, the attention-sink layers in other windows than the lesson's, and the roped key's share of an eighth of
the cache, defended by a measurement.

Each check computes the truth with the package: the recipe's ``candidate_sizes`` for SmolLM2's shape, the fetched
model's own forward pass (``load_model``, ``attention_inputs``) and the recipe's layer converter (``recipe_convert``,
``output_error``).  Exercises 11.2 and 11.3 read the fetched SmolLM2 (``make models``).
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange

from mla_ref.attention import GroupedQueryAttention, grouped_attention
from mla_ref.convert import get_method
from mla_ref.convert.methods.recipe import recipe_convert
from mla_ref.convert.refit import output_error
from mla_ref.data import load_corpus, validation_windows
from mla_ref.exercises import exercise
from mla_ref.hf import load_model, text_tokens
from mla_ref.model_shapes import load_model_shape
from mla_ref.pipelines.fetch import default_fetch_problem, default_model_dir
from mla_ref.rope import apply_rope, rope_inv_freq

# Exercise 11.1: the 25% conversion, loaded as the lesson loads it (fp32), after a prompt of this many tokens
PROMPT_TOKENS, BUDGET_11_1, FP32_BYTES = 1000, 0.25, 4

# Exercise 11.2: the windows after the lesson's four, and the lesson's two marks of a sink
WINDOW, FIRST_WINDOW, WINDOWS = 128, 4, 4  # windows 4-7 of 128 tokens: validation tokens 512-1023
SMALLER, MORE_ATTENTION = 2.5, 8.0  # median/first latent norm above 2.5, attention on the first position above 8×

# Exercise 11.3: layer 20 at an eighth of the cache, calibrated on 16 windows of the train split, measured on 4
# windows of the validation split
BUDGET_11_3, LAYER, CALIBRATION_WINDOWS, HELD_OUT_WINDOWS = 0.125, 20, 16, 4


def _smollm2_dir():
    problem = default_fetch_problem("smollm2-135m")
    if problem is not None:
        raise FileNotFoundError(
            f"this exercise reads SmolLM2-135M, which is not fetched ({problem}): run `make models`"
        )
    return default_model_dir("smollm2-135m")


@functools.cache
def _smollm2():
    model = load_model(_smollm2_dir())
    model.requires_grad_(False)
    return model


def _token_windows(split: str, count: int) -> torch.Tensor:
    """``count`` windows of WINDOW + 1 tokens from the start of the corpus's ``split`` (SmolLM2's tokenizer)."""
    corpus = load_corpus()
    text = corpus.val if split == "val" else corpus.train
    tokens = text_tokens(_smollm2_dir(), text[: 16 * 1024 * (1 + count // 8)], _smollm2().config.vocab_size)
    return validation_windows(tokens, WINDOW, count * WINDOW)  # (count, WINDOW + 1)


def recipe_sizes(budget: float) -> list[dict]:
    """The recipe's candidate splits of ``budget`` for SmolLM2's attention, the anchor's element reserved."""
    shape = load_model_shape("smollm2-135m")
    attention = GroupedQueryAttention(shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim)
    return get_method("recipe").candidate_sizes(attention, budget=budget, reserve=1)


@exercise("11.1")
def cache_bytes_after_a_prompt(answer) -> str:
    """Bytes of the 25% conversion's whole cache (all layers, fp32) after PROMPT_TOKENS tokens."""
    assert isinstance(answer, int) and not isinstance(answer, bool), f"give a whole number of bytes, got {answer!r}"
    shape = load_model_shape("smollm2-135m")
    sizes = recipe_sizes(BUDGET_11_1)[0]
    per_layer = sizes["kv_lora_rank"] + 1 + sizes["rope_dim"]  # d_c (with the anchor) + d_R
    truth = per_layer * shape.layers * FP32_BYTES * PROMPT_TOKENS
    source = 2 * shape.n_kv_heads * shape.head_dim * shape.layers * FP32_BYTES * PROMPT_TOKENS
    assert answer != source, "that is the source's GQA cache (2 · n_kv · d_h per layer), not the conversion's"
    assert answer != truth // 2, "that is the cache in bf16; the lesson's load_model holds it in fp32 (4 bytes)"
    assert answer != truth // shape.layers, "that is one layer's cache; every one of the 30 layers keeps its own"
    assert answer != (per_layer - 1) * shape.layers * FP32_BYTES * PROMPT_TOKENS, (
        "the anchor is one more cached element of every layer's latent: it is in d_c"
    )
    assert answer == truth, (
        f"{answer:,} B is not what the caches hold (a fraction {answer / source:.3f} of the source's)"
    )
    return f"{per_layer} elements × {shape.layers} layers × 4 B × {PROMPT_TOKENS:,} tokens = {truth:,} B"


@torch.no_grad()
def _weight_on_first(layer, x: torch.Tensor) -> float:
    """Each query's attention weight on key 0, averaged over the heads and the queries after it."""
    positions = torch.arange(x.shape[1])
    rope = dict(theta=layer.rope_theta, layout=layer.rope_layout, inv_freq=rope_inv_freq(layer.rope_frequencies))
    q = apply_rope(rearrange(layer.q_proj(x), "b s (h d) -> b h s d", h=layer.n_heads), positions, **rope)
    k = apply_rope(rearrange(layer.k_proj(x), "b s (g d) -> b g s d", g=layer.n_kv_heads), positions, **rope)
    one_hot = torch.zeros(x.shape[0], layer.n_kv_heads, x.shape[1], 1)
    one_hot[:, :, 0] = 1.0  # v_t = 1 at t = 0 and 0 elsewhere: the output is the weight on key 0
    return grouped_attention(q, k, one_hot, scale=layer.head_dim**-0.5)[:, :, 1:, 0].mean().item()


@functools.cache
@torch.no_grad()
def sink_measures() -> tuple[list[float], list[float], float]:
    """Per layer, on windows FIRST_WINDOW … FIRST_WINDOW + WINDOWS − 1: median ‖c‖ of the other tokens over the first
    token's mean ‖c‖ (c = x [W_K | W_V]), the attention weight on the first position, and the uniform share."""
    model = _smollm2()
    windows = _token_windows("val", FIRST_WINDOW + WINDOWS)[FIRST_WINDOW:, :-1]  # (4, 128)
    ratios, shares = [], []
    for layer, x in zip(model.layers, model.attention_inputs(windows), strict=True):
        attention = layer.self_attn
        norms = torch.cat([attention.k_proj(x), attention.v_proj(x)], dim=-1).norm(dim=-1)  # (4, 128)
        ratios.append((norms[:, 1:].flatten().median() / norms[:, 0].mean()).item())
        shares.append(_weight_on_first(attention, x))
    uniform = (1.0 / torch.arange(2, WINDOW + 1)).mean().item()
    return ratios, shares, uniform


@exercise("11.2")
def sink_layers_elsewhere(answer) -> str:
    """The layers whose first position is a sink in windows 4-7: a latent SMALLER× below the median, MORE_ATTENTION×
    the uniform share of attention."""
    assert isinstance(answer, list | tuple | set) and all(isinstance(i, int) for i in answer), (
        f"give the layer numbers as a list of ints, got {answer!r}"
    )
    ratios, shares, uniform = sink_measures()
    truth = sorted(
        i for i, (r, s) in enumerate(zip(ratios, shares, strict=True)) if r > SMALLER and s > MORE_ATTENTION * uniform
    )
    missing, extra = sorted(set(truth) - set(answer)), sorted(set(answer) - set(truth))
    assert not extra, "not sinks in these windows: " + ", ".join(
        f"layer {i} (median/first {ratios[i]:.1f}, attention on the first position {shares[i] / uniform:.1f}× uniform)"
        for i in extra
    )
    assert not missing, f"layers {missing} are sinks here too: both marks hold in them"
    return f"layers {_ranges(truth)} ({len(truth)} layers): the sink is a property of the position, in any window"


def _ranges(numbers: list[int]) -> str:
    """[4, 9, 12, 13, 14] -> "4, 9, 12-14"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


@functools.cache
@torch.no_grad()
def split_errors() -> dict[int, float]:
    """d_R → layer LAYER's output error E_l on held-out windows, converted by the recipe at each candidate split of
    an eighth of the cache (calibrated on CALIBRATION_WINDOWS windows of the train split)."""
    model = _smollm2()
    calibration = model.attention_inputs(_token_windows("train", CALIBRATION_WINDOWS)[:, :-1])[LAYER]
    held_out = model.attention_inputs(_token_windows("val", HELD_OUT_WINDOWS)[:, :-1])[LAYER]
    source = model.layers[LAYER].self_attn
    errors = {}
    for sizes in recipe_sizes(BUDGET_11_3):
        converted = recipe_convert(source, calibration, kv_lora_rank=sizes["kv_lora_rank"], rope_dim=sizes["rope_dim"])
        errors[sizes["rope_dim"]] = output_error(converted, held_out, source(held_out))
    return errors


@exercise("11.3")
def rope_share_of_an_eighth(answer) -> str:
    """The d_R of the recipe's two candidates at 12.5% whose layer-20 output error on held-out text is lower."""
    errors = split_errors()
    assert answer in errors, f"the recipe's candidates at 12.5% are d_R {sorted(errors)}; got {answer!r}"
    best = min(errors, key=errors.get)
    measured = ", ".join(f"d_R {d}: E_l {e:.3f}" for d, e in sorted(errors.items()))
    assert answer == best, f"measured on held-out text, {measured}: the other split loses less"
    return f"{measured} (layer {LAYER}, held-out windows)"
