"""The checks of lessons 05, 09 and 10's exercises: a right answer passes, a plausible wrong one is refused with its reason,
and the placeholder None is reported as not answered yet."""

import math

import pytest
import torch

from mla_ref import MLA, GroupedQueryAttention
from mla_ref.exercises import check_exercise
from mla_ref.roofline import decode_step_cost

EXERCISES = ("05.1", "05.2", "09.1", "09.2", "10.1", "10.2", "10.3")


@pytest.mark.parametrize("key", EXERCISES)
def test_none_is_not_answered_yet(key, capsys):
    assert check_exercise(key, None) is False
    assert f"exercise {key}: not answered yet" in capsys.readouterr().out


def refused(key, answer, reason):
    with pytest.raises(AssertionError, match=reason):
        check_exercise(key, answer)


def test_08_1_heads_at_the_ridge():
    assert check_exercise("05.1", 137)  # 258.2 / (1088 / 576) = 136.7
    refused("05.1", 128, "below the ridge")  # the 2 n_h rounding of FlashMLA's note
    refused("05.1", 138, "not the smallest")
    refused("05.1", 137.0, "an int")


def tokens_per_second(dtype="bf16", batch=8, layers=32):
    with torch.device("meta"):
        modules = {
            "GQA": GroupedQueryAttention(4096, 32, 8, head_dim=128),
            "MLA": MLA(4096, 32, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        }
    return {
        name: batch / (layers * decode_step_cost(module, 8, 32768, dtype).bytes / 3.35e12)
        for name, module in modules.items()
    }


def test_08_2_tokens_per_second_at_the_copy_rate():
    assert check_exercise("05.2", tokens_per_second())
    refused("05.2", tokens_per_second(batch=1), "one sequence's rate")
    refused("05.2", tokens_per_second(dtype="fp32"), "2 bytes")
    refused("05.2", tokens_per_second(layers=1), "all 32 layers")
    refused("05.2", {"GQA": 1.0}, "a dict")


def soft_gradient(student, teacher, tau):  # d/dz_s of τ² · mean_n KL(p_t^τ ‖ p_s^τ)
    return tau * ((student / tau).softmax(-1) - (teacher / tau).softmax(-1)) / student.shape[0]


def test_09_1_gradient_of_the_soft_term():
    assert check_exercise("09.1", soft_gradient)
    refused("09.1", lambda s, t, tau: tau * soft_gradient(s, t, tau), "chain rule")  # τ² (p_s − p_t) / n
    refused("09.1", lambda s, t, tau: soft_gradient(s, t, tau) * s.shape[0], "averages")  # a sum over positions
    refused("09.1", lambda s, t, tau: -soft_gradient(s, t, tau), "sign")
    refused("09.1", lambda s, t, tau: soft_gradient(s, t, 1.0), "τ = 2")  # no temperature at all
    refused("09.1", lambda s, t, tau: soft_gradient(s, t, tau)[0], "shape")


def test_09_2_cache_of_a_conversion():
    right = {"rope_dim": 8, "kv_lora_rank": 8, "bytes_per_token": 128}  # r = 2 pairs x 2 KV heads x 2; 4 layers
    assert check_exercise("09.2", right)
    refused("09.2", {**right, "rope_dim": 2}, "rotary pairs")  # r itself
    refused("09.2", {**right, "kv_lora_rank": 14}, "d_R takes")
    refused("09.2", {**right, "bytes_per_token": 256}, "bf16")  # fp32 bytes
    refused("09.2", {"rope_dim": 8}, "a dict")


def test_10_1_rope_theta_of_a_recipe_conversion():
    assert check_exercise("10.1", 500_000.0 ** (64 / 128))
    refused("10.1", 500_000.0 ** (128 / 64), "slot 1")  # d_h / d_R upside down
    refused("10.1", 500_000.0, "slot 1")  # the source's θ kept
    refused("10.1", "707", "a number")


def test_10_2_anchor_of_a_layer():
    assert check_exercise("10.2", 2.0**27)  # 8192 · 50 · 3 · √4096 = 78.6M → 2^27
    refused("10.2", 2.0 ** math.ceil(math.log2(8192 * 50 * 3)), "√D")  # the bound without √D
    refused("10.2", 8192 * 50 * 3 * 64.0, "power of two")  # the bound itself, not rounded up
    refused("10.2", 2.0**26, "is not the anchor")


def test_10_3_budget_with_the_anchor():
    right = {"informative_elements": 15, "bytes_per_token": 128}
    assert check_exercise("10.3", right)
    refused("10.3", {**right, "informative_elements": 16}, "anchor's coordinate is one of them")
    refused("10.3", {**right, "bytes_per_token": 136}, "the anchor included")  # 17 elements: the anchor on top
    refused("10.3", {"bytes_per_token": 128}, "a dict")
