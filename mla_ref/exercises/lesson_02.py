"""Checks of lesson 02's exercises (multi-query and grouped-query attention, mean-pooling).

Each check builds its own layers (under a fixed seed, leaving the caller's random state alone), measures the truth
with the package, and compares the learner's answer with it.
"""

from __future__ import annotations

import copy

import torch
from einops import rearrange

from mla_ref import GroupedQueryAttention, MultiHeadAttention
from mla_ref.convert import mean_pool_kv_heads
from mla_ref.exercises import exercise
from mla_ref.measures import relative_error

# fp32: two computations of the same function differ by rounding, ~1e-7 relative; anything above 1e-5 is a change
EXACT = 1e-5


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise AssertionError(reason)


def _head_term(attn: GroupedQueryAttention, x: torch.Tensor, head: int) -> torch.Tensor:
    """Query head ``head``'s term of the output: the module with every other head's columns of W_O zeroed."""
    only = copy.deepcopy(attn)
    keep = torch.zeros_like(only.o_proj.weight)
    keep[:, head * attn.head_dim : (head + 1) * attn.head_dim] = 1.0
    with torch.no_grad():
        only.o_proj.weight.mul_(keep)
        return only(x)


def _secret_gqa(seed: int, n_heads: int = 8, groups: int = 2, head_dim: int = 8, d_model: int = 64):
    """An MHA whose key and value heads are equal within each of ``groups`` groups of consecutive heads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mha = MultiHeadAttention(d_model, n_heads, head_dim)
        x = torch.randn(2, 12, d_model)
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            heads = rearrange(proj.weight, "(kv g d) i -> kv g d i", kv=groups, d=head_dim)
            proj.weight.copy_(rearrange(heads[:, :1].expand_as(heads), "kv g d i -> (kv g d) i"))
    return mha, x


def _list_of_ints(answer: object, what: str) -> list[int]:
    _require(
        isinstance(answer, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in answer),
        f"{what} should be a list of head numbers (ints), got {answer!r}",
    )
    return sorted(answer)


@exercise("02.1")
def which_heads_pooling_hurts(answer: object) -> str:
    """(heads whose terms pooling leaves exact, the head whose term it changes most) for an MHA with equal heads in
    groups of 4, head 5's keys and values nudged by 10 %, pooled to n_kv = 2."""
    _require(
        isinstance(answer, tuple | list) and len(answer) == 2,
        "answer with a pair: (list of heads left exact, the most changed head)",
    )
    exact_heads, most = _list_of_ints(answer[0], "the first item"), answer[1]
    mha, x = _secret_gqa(21)
    d_h, nudged = mha.head_dim, 5
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(22)
        for proj in (mha.k_proj, mha.v_proj):
            rows = proj.weight[nudged * d_h : (nudged + 1) * d_h]
            rows.add_(0.1 * rows.norm() * torch.randn_like(rows) / rows.numel() ** 0.5)  # 10 % of its size
    pooled = mean_pool_kv_heads(mha, 2)
    with torch.no_grad():
        changes = [relative_error(_head_term(pooled, x, i), _head_term(mha, x, i)) for i in range(mha.n_heads)]
    truly_exact = [i for i, change in enumerate(changes) if change < EXACT]
    truly_most = max(range(mha.n_heads), key=changes.__getitem__)
    if exact_heads != truly_exact:
        moved = sorted(set(exact_heads) - set(truly_exact))
        if moved:
            raise AssertionError(
                f"heads {moved} change too: pooling replaces every head of a group by the group's mean, and the "
                "nudged head moved its group's mean"
            )
        raise AssertionError(
            f"heads {sorted(set(truly_exact) - set(exact_heads))} stay exact: their group's heads are all equal, "
            "so its mean is each of them"
        )
    _require(
        most == truly_most,
        f"head {most} is not the most changed: the mean moves by δ/g for the others but by (1 - 1/g)·δ for the "
        "nudged head itself",
    )
    return (
        f"on the check's own layer, heads {truly_exact} stay exact, and head {truly_most} changes most (relative change "
        f"{changes[truly_most]:.2f}, the others of its group {max(c for i, c in enumerate(changes) if i not in truly_exact and i != truly_most):.2f})"
    )


@exercise("02.2")
def silent_query_heads(answer: object) -> str:
    """The query heads of a GQA layer n_h = 12, n_kv = 4 that output exactly nothing once KV head 2's values are 0."""
    predicted = _list_of_ints(answer, "the answer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(23)
        layer = GroupedQueryAttention(96, 12, 4, 8)
        x = torch.randn(2, 6, 96)
    with torch.no_grad():
        layer.v_proj.weight[2 * 8 : 3 * 8] = 0.0  # v_2 = 0
        silent = [i for i in range(layer.n_heads) if _head_term(layer, x, i).abs().max().item() == 0.0]
    if predicted != silent:
        if predicted == [i for i in range(layer.n_heads) if i % layer.n_kv_heads == 2]:
            raise AssertionError(
                "query head i reads KV head ⌊i / g⌋, not i mod n_kv: a group is g consecutive query heads"
            )
        raise AssertionError(f"heads {predicted} are not the silent ones: which query heads read KV head 2?")
    return f"on the check's own layer, query heads {silent} read KV head 2 and fall silent without its values"


@exercise("02.3")
def exact_group_sizes(answer: object) -> str:
    """{n_kv: whether mean-pooling is exact} for n_kv = 8, 4, 2, 1, on an MHA with equal heads in groups of 4."""
    _require(
        isinstance(answer, dict) and set(answer) == {8, 4, 2, 1},
        "answer with a dict {n_kv: True if pooling to n_kv is exact, else False} for n_kv = 8, 4, 2 and 1",
    )
    mha, x = _secret_gqa(24)
    with torch.no_grad():
        reference = mha(x)
        errors = {n_kv: relative_error(mean_pool_kv_heads(mha, n_kv)(x), reference) for n_kv in (8, 4, 2, 1)}
    for n_kv, error in errors.items():
        _require(error < EXACT or error > 0.1, f"n_kv = {n_kv}: a relative error of {error:.2g} is neither")
        exact = error < EXACT
        if answer[n_kv] is not exact:
            g = mha.n_heads // n_kv
            why = (
                f"each group of {g} lies inside one group of 4 equal heads, so its mean is each of them"
                if exact
                else f"a group of {g} mixes heads of different groups of 4, whose mean is none of them"
            )
            raise AssertionError(f"pooling to n_kv = {n_kv} is {'exact' if exact else 'not exact'}: {why}")
    return (
        "on the check's own layer, pooling is exact when every group of g lies inside one group of equal heads: "
        + ", ".join(
            f"n_kv = {n_kv} {'exact' if error < EXACT else f'off by {error:.2f}'}" for n_kv, error in errors.items()
        )
    )
