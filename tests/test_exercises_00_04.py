"""The exercises of lessons 00–04: for each, a right answer passes, a plausible wrong one is refused with a reason,
and the placeholder None is reported as not answered yet."""

import copy
import importlib
import importlib.util

import pytest
import torch
from einops import rearrange

from mla_ref import apply_rope
from mla_ref.exercises import check_exercise

# ---- lesson 01 ----------------------------------------------------------------------------------------------------


def prefill_in_chunks(attn, x, sizes):
    cache, pieces, lengths, start = attn.new_cache(), [], [], 0
    with torch.no_grad():
        for size in sizes:
            pieces.append(attn(x[:, start : start + size], cache))
            lengths.append(cache.length)
            start += size
    return torch.cat(pieces, dim=1), lengths


def prefill_in_chunks_fresh_cache_each(attn, x, sizes):
    # wrong: every chunk starts a new cache, so later chunks do not see the earlier tokens
    pieces, lengths, start, total = [], [], 0, 0
    with torch.no_grad():
        for size in sizes:
            pieces.append(attn(x[:, start : start + size], attn.new_cache()))
            start += size
            total += size
            lengths.append(total)
    return torch.cat(pieces, dim=1), lengths


def head_terms(attn, x):
    terms = []
    for i in range(attn.n_heads):
        only_i = copy.deepcopy(attn)
        keep = torch.zeros_like(only_i.o_proj.weight)
        keep[:, i * attn.head_dim : (i + 1) * attn.head_dim] = 1.0
        with torch.no_grad():
            only_i.o_proj.weight.mul_(keep)
            terms.append(only_i(x))
    return terms


def without_head(attn, head):
    without = copy.deepcopy(attn)
    with torch.no_grad():
        without.o_proj.weight[:, head * attn.head_dim : (head + 1) * attn.head_dim] = 0.0
    return without


def remove_loudest_head(attn, x):
    terms = head_terms(attn, x)
    loudest = max(range(attn.n_heads), key=lambda i: terms[i].norm().item())
    return loudest, without_head(attn, loudest)


def remove_quietest_head(attn, x):
    terms = head_terms(attn, x)
    quietest = min(range(attn.n_heads), key=lambda i: terms[i].norm().item())
    return quietest, without_head(attn, quietest)


def remove_loudest_head_in_place(attn, x):
    loudest, _ = remove_loudest_head(attn, x)
    with torch.no_grad():
        attn.o_proj.weight[:, loudest * attn.head_dim : (loudest + 1) * attn.head_dim] = 0.0
    return loudest, attn


def remove_loudest_head_rows(attn, x):
    # wrong: zeroes the head's rows of o_proj.weight (output features), not its columns
    loudest, _ = remove_loudest_head(attn, x)
    without = copy.deepcopy(attn)
    with torch.no_grad():
        without.o_proj.weight[loudest * attn.head_dim : (loudest + 1) * attn.head_dim] = 0.0
    return loudest, without


# ---- lesson 03 ----------------------------------------------------------------------------------------------------


def rms_norm(v, norm):
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def mla_output_at_scale(attn, x, scale):
    # lesson 03's naive MLA forward from the equations, with the softmax scale given
    n_h, d_c, d_n = attn.n_heads, attn.kv_lora_rank, attn.qk_nope_head_dim
    positions = torch.arange(x.shape[1])
    rope = dict(theta=attn.rope_theta, layout=attn.rope_layout)
    w_dkv_kr = attn.kv_a_proj_with_mqa.weight.T
    c, k_r = x @ w_dkv_kr[:, :d_c], apply_rope(x @ w_dkv_kr[:, d_c:], positions, **rope)
    if attn.latent_norm:
        c = rms_norm(c, attn.kv_a_layernorm)
    w_ukv = rearrange(attn.kv_b_proj.weight.T, "c (h e) -> h c e", h=n_h)
    k_n = torch.einsum("btc,hcd->bhtd", c, w_ukv[..., :d_n])
    v = torch.einsum("btc,hcd->bhtd", c, w_ukv[..., d_n:])
    if attn.q_lora_rank is None:
        q_in, w_q = x, attn.q_proj.weight.T
    else:
        q_in, w_q = rms_norm(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm), attn.q_b_proj.weight.T
    q = torch.einsum("bsi,hie->bhse", q_in, rearrange(w_q, "i (h e) -> h i e", h=n_h))
    q_n, q_r = q[..., :d_n], apply_rope(q[..., d_n:], positions, **rope)
    scores = (q_n @ k_n.transpose(-1, -2) + q_r @ k_r[:, None].transpose(-1, -2)) * scale
    future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    w_o = rearrange(attn.o_proj.weight.T, "(h e) o -> h e o", h=n_h)
    return torch.einsum("bhsd,hdo->bso", probs @ v, w_o)


def mla_output_scaling_only_the_position_free_part(attn, x, scale):
    # wrong: the rotary part of the score keeps the module's own scale
    n_h, d_n = attn.n_heads, attn.qk_nope_head_dim
    rescaled = copy.deepcopy(attn)
    with torch.no_grad():
        w = rearrange(rescaled.q_b_proj.weight, "(h e) i -> h e i", h=n_h)
        w[:, :d_n] *= scale / attn.softmax_scale
    return rescaled(x, path="naive")


# ---- lesson 04 ----------------------------------------------------------------------------------------------------


def absorb_query(attn, same_key_map_for_every_head=False):
    n_h, d_n = attn.n_heads, attn.qk_nope_head_dim
    w_q_nope = rearrange(attn.q_proj.weight, "(h e) m -> h m e", h=n_h)[..., :d_n]  # W_Q^{N,i}: (n_h, d, d_N)
    w_uk = rearrange(attn.kv_b_proj.weight, "(h e) c -> h c e", h=n_h)[..., :d_n]  # W_UK^i: (n_h, d_c, d_N)
    if same_key_map_for_every_head:  # wrong: head 0's W_UK for all
        w_uk = w_uk[:1].expand_as(w_uk)
    return torch.einsum("hmn,hcn->hmc", w_q_nope, w_uk)


V3_MERGED = 128 * 512 * 7168
V3_FACTORED = 128 * 512 * 128 + 128 * 128 * 7168


RIGHT = {
    "04.1": absorb_query,
    "04.2": (V3_MERGED, V3_FACTORED),
    "04.3": 135,
    "04.4": [0],
    "03.1": {"a": 28, "b": 16, "c": 64},
    "03.2": mla_output_at_scale,
    "03.3": 44,
    "02.1": ([0, 1, 2, 3], 5),
    "02.2": [6, 7, 8],
    "02.3": {8: True, 4: True, 2: True, 1: False},
    "01.1": 3 * 7 * 2 * 6 * 8 * 2,
    "01.2": prefill_in_chunks,
    "01.3": remove_loudest_head,
}

WRONG = [
    ("04.1", lambda attn: attn.absorbed_query_proj(), "mind the orientation"),
    ("04.1", lambda attn: absorb_query(attn, same_key_map_for_every_head=True), "differs from q_i\\^N"),
    ("04.1", torch.zeros(3, 48, 20), "a function"),
    ("04.2", (V3_MERGED // 128, V3_FACTORED), "one head's"),
    ("04.2", (V3_MERGED, 128 * 128 * 7168), "W_UV holds"),
    ("04.2", V3_MERGED, "a pair of ints"),
    ("04.3", 134, "still below"),
    ("04.3", 136, "already reached"),
    ("04.3", 135.5, "a positive int"),
    ("04.4", [7], "lost R_t"),
    ("04.4", [], "only where R_t is the identity"),
    ("04.4", 0, "a list of positions"),
    ("03.1", {"a": 28, "b": 28, "c": 64}, "above n_h · d_N"),
    ("03.1", {"a": 28, "b": 16, "c": 96}, "above d"),
    ("03.1", {"a": 20, "b": 16, "c": 64}, "smallest of d_c"),
    ("03.1", [28, 16, 64], "a dict"),
    ("03.2", lambda attn, x, scale: attn(x, path="naive"), "not the layer's output with that softmax scale"),
    ("03.2", mla_output_scaling_only_the_position_free_part, "rotary parts alike"),
    ("03.2", lambda attn, x, scale: mla_output_at_scale(attn, x, scale)[0], "return the \\(b, T, d\\) output"),
    ("03.3", 43, "too small"),
    ("03.3", 60, "look for a smaller one"),
    ("03.3", 44.0, "an int"),
    ("02.1", ([0, 1, 2, 3, 4, 6, 7], 5), "change too"),
    ("02.1", ([0, 1, 2], 5), "stay exact"),
    ("02.1", ([0, 1, 2, 3], 4), "not the most changed"),
    ("02.1", [0, 1, 2, 3], "a pair"),
    ("02.2", [2, 6, 10], "not i mod n_kv"),
    ("02.2", [4, 5, 6, 7], "not the silent ones"),
    ("02.2", 6, "list of head numbers"),
    ("02.3", {8: True, 4: False, 2: True, 1: False}, "n_kv = 4 is exact"),
    ("02.3", {8: True, 4: True, 2: True, 1: True}, "n_kv = 1 is not exact"),
    ("02.3", {4: True, 2: True, 1: False}, "a dict"),
    ("01.1", 3 * 7 * 6 * 8 * 2, "a key and a value"),
    ("01.1", 3 * 7 * 2 * 6 * 8 * 4, "2 bytes, not 4"),
    ("01.1", 7 * 2 * 6 * 8 * 2, "b = 3 sequences"),
    ("01.1", 4000, "times your prediction"),
    ("01.1", "4032", "an int"),
    ("01.2", prefill_in_chunks_fresh_cache_each, "same cache"),
    ("01.2", lambda attn, x, sizes: prefill_in_chunks(attn, x, sizes)[0], "return a pair"),
    ("01.2", 3, "a function"),
    ("01.3", remove_quietest_head, "not the loudest"),
    ("01.3", remove_loudest_head_in_place, "changed attn itself"),
    ("01.3", remove_loudest_head_rows, "columns"),
]


@pytest.mark.parametrize("key", sorted(RIGHT))
def test_a_right_answer_passes(key, capsys):
    assert check_exercise(key, RIGHT[key]) is True
    assert f"exercise {key}: right" in capsys.readouterr().out


@pytest.mark.parametrize(("key", "answer", "reason"), WRONG, ids=[f"{key}-{reason}" for key, _, reason in WRONG])
def test_a_wrong_answer_is_refused_with_its_reason(key, answer, reason):
    with pytest.raises(AssertionError, match=f"exercise {key}: not right yet: .*{reason}"):
        check_exercise(key, answer)


@pytest.mark.parametrize("key", sorted(RIGHT))
def test_none_is_not_answered_yet(key, capsys):
    assert check_exercise(key, None) is False
    assert f"exercise {key}: not answered yet" in capsys.readouterr().out


def test_every_exercise_of_lessons_00_to_04_is_tested():
    from mla_ref.exercises import _CHECKS

    lessons = ("00", "01", "02", "03", "04")
    for lesson in lessons:
        if importlib.util.find_spec(f"mla_ref.exercises.lesson_{lesson}") is not None:
            importlib.import_module(f"mla_ref.exercises.lesson_{lesson}")  # registers its checks
    registered = {key for key in _CHECKS if key[:2] in lessons}
    assert registered == set(RIGHT)
    assert {key for key, _, _ in WRONG} == set(RIGHT)


def test_a_check_leaves_the_callers_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_exercise("01.1", RIGHT["01.1"])
    assert torch.equal(torch.rand(3), expected)
