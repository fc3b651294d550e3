"""Checks of lesson 01's exercises (multi-head attention and the KV cache).

Each check builds its own layer and input (under a fixed seed, leaving the caller's random state alone), computes the
truth with the package, and compares the learner's answer with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from mla_ref import MultiHeadAttention
from mla_ref.exercises import exercise


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise AssertionError(reason)


def _require_int(answer: object, what: str) -> int:
    _require(isinstance(answer, int) and not isinstance(answer, bool), f"answer with an int ({what}), got {answer!r}")
    return answer


def _require_callable(answer: object, signature: str) -> Callable:
    _require(callable(answer), f"answer with a function {signature}, got {type(answer).__name__}")
    return answer


@exercise("01.1")
def predict_cache_bytes(answer: object) -> str:
    """The bytes ``KVCache.nbytes`` reports for an MHA layer d = 48, n_h = 6, d_h = 8 over b = 3, T = 7, bf16."""
    predicted = _require_int(answer, "the cache's bytes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        layer = MultiHeadAttention(48, 6, 8).to(torch.bfloat16)
        cache = layer.new_cache()
        with torch.no_grad():
            layer(torch.randn(3, 7, 48, dtype=torch.bfloat16), cache)
    truth = cache.nbytes
    _require(predicted > 0, f"a cache of 21 tokens takes a positive number of bytes, got {predicted}")
    if predicted != truth:
        hints = {
            truth // 2: "that is half the cache: it holds a key and a value for every head",
            truth * 2: "that is twice the cache: a bf16 element takes 2 bytes, not 4",
            truth // 3: "that is one sequence's share: the batch holds b = 3 sequences",
        }
        raise AssertionError(
            hints.get(predicted, f"the filled cache holds {truth / predicted:.3g} times your prediction")
            + " (bytes = b · T · 2 · n_kv · d_h · bytes per element)"
        )
    return f"a bf16 MHA layer's cache of 3 sequences of 7 tokens holds {truth} bytes, as predicted"


@exercise("01.2")
def prompt_in_chunks(answer: object) -> str:
    """A function ``(attn, x, sizes) -> (outputs, lengths)`` that prefills x in chunks through one cache."""
    prefill_in_chunks = _require_callable(answer, "prefill_in_chunks(attn, x, sizes) -> (outputs, lengths)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        attn = MultiHeadAttention(32, 4, 8)
        x = torch.randn(2, 10, 32)
    with torch.no_grad():
        one_pass = attn(x)
        for sizes in ((3, 3, 4), (10,), (1,) * 10, (6, 1, 3)):
            result = prefill_in_chunks(attn, x, sizes)
            _require(
                isinstance(result, tuple) and len(result) == 2, "return a pair: (outputs (b, T, d), cache lengths)"
            )
            outputs, lengths = result
            expected_lengths = [sum(sizes[: j + 1]) for j in range(len(sizes))]
            _require(
                list(lengths) == expected_lengths,
                f"chunks {sizes}: the cache should hold {expected_lengths} tokens after each chunk, got {list(lengths)}",
            )
            _require(
                isinstance(outputs, torch.Tensor) and outputs.shape == one_pass.shape,
                f"chunks {sizes}: outputs should be one tensor of shape {tuple(one_pass.shape)} (concatenate the chunks)",
            )
            try:  # fp32: only the softmax rows' lengths differ from the one-pass run; ~1e-6 relative
                torch.testing.assert_close(outputs, one_pass, rtol=1e-5, atol=1e-5)
            except AssertionError:
                raise AssertionError(
                    f"chunks {sizes}: the outputs differ from one pass over the whole prompt — does every chunk go "
                    "through the same cache, in order?"
                ) from None
    return (
        "on the check's own layer and prompt, your chunks (3, 3, 4), (10,), 10 × (1,) and (6, 1, 3) through one "
        "cache each equal one pass"
    )


@exercise("01.3")
def remove_the_loudest_head(answer: object) -> str:
    """A function ``(attn, x) -> (i, without)``: the head whose term has the largest norm, and a copy of ``attn``
    without it (its columns of ``o_proj.weight`` zeroed)."""
    remove_loudest_head = _require_callable(answer, "remove_loudest_head(attn, x) -> (head, module without it)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        attn = MultiHeadAttention(32, 4, 8)
        x = torch.randn(2, 10, 32)
    before = copy.deepcopy(attn.state_dict())
    d_h = attn.head_dim
    with torch.no_grad():
        # head i's term: the module with every other head's columns of W_O zeroed
        terms = []
        for i in range(attn.n_heads):
            only_i = copy.deepcopy(attn)
            keep = torch.zeros_like(only_i.o_proj.weight)
            keep[:, i * d_h : (i + 1) * d_h] = 1.0
            only_i.o_proj.weight.mul_(keep)
            terms.append(only_i(x))
        loudest = max(range(attn.n_heads), key=lambda i: terms[i].norm().item())
        result = remove_loudest_head(attn, x)
        _require(isinstance(result, tuple) and len(result) == 2, "return a pair: (head index, module without it)")
        head, without = result
        _require(
            all(torch.equal(before[name], value) for name, value in attn.state_dict().items()),
            "your function changed attn itself: zero the columns in a copy",
        )
        norms = ", ".join(f"{term.norm().item():.2f}" for term in terms)
        _require(head == loudest, f"head {head} is not the loudest: the terms' norms are {norms}")
        _require(isinstance(without, torch.nn.Module), "the second item should be the module without the head")
        try:  # fp32: a difference of two module outputs against one head's term; ~1e-6 absolute
            torch.testing.assert_close(attn(x) - without(x), terms[loudest], rtol=1e-4, atol=1e-5)
        except AssertionError:
            raise AssertionError(
                f"o - o_without should be exactly head {loudest}'s term: zero its d_h columns of o_proj.weight, "
                f"columns {loudest * d_h} … {(loudest + 1) * d_h - 1}, and nothing else"
            ) from None
    return (
        f"on the check's own layer your function found the loudest head ({loudest}), and removing it takes exactly "
        "its term off the output"
    )
