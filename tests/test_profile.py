"""Measured KV-cache bytes against the calculator, tokens-that-fit arithmetic, and the timing helpers' logic.

Timings are never asserted beyond being positive and finite: they depend on the machine.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mla_ref import MLA, GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from mla_ref.calculator import report
from mla_ref.dtypes import DTYPES
from mla_ref.model_shapes import PRESETS, ModelShape
from mla_ref.profile import (
    MEASURED_BY_CUDA,
    MEASURED_BY_TENSORS,
    calculator_bytes,
    calculator_relative_difference,
    device_memory_budget,
    fill_cache,
    measure_cache_bytes,
    relative_difference,
    resolve_device,
    time_call,
    time_decode_step,
    tokens_that_fit,
)
from mla_ref.roofline import (
    DecodeStepCost,
    achieved_bandwidth,
    copy_bandwidth,
    decode_bytes_read,
    decode_step_cost,
    matmul_rate,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA measurements skipped")

# One small layer of each kind; cache elements per token per layer written out by hand.
SMALL_MODULES = {
    "MHA": (lambda: MultiHeadAttention(32, 4, head_dim=8), 64),  # 2 · 4 · 8
    "GQA": (lambda: GroupedQueryAttention(32, 4, 2, head_dim=8), 32),  # 2 · 2 · 8
    "MQA": (lambda: MultiQueryAttention(32, 4, head_dim=8), 16),  # 2 · 1 · 8
    "MLA": (
        lambda: MLA(32, 4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        20,  # 16 + 4
    ),
}


def llama_3_8b_attention() -> GroupedQueryAttention:
    """Llama-3-8B's attention shape, on the meta device: a cache needs the shape, not the weights."""
    with torch.device("meta"):
        return GroupedQueryAttention(4096, 32, 8, 128)


def llama_3_8b_as_mla() -> MLA:
    with torch.device("meta"):
        return MLA(4096, 32, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


# ---- measured bytes == the calculator, on the CPU ------------------------------------------------------
@pytest.mark.parametrize("kind", list(SMALL_MODULES))
@pytest.mark.parametrize("context", [1, 7, 64])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_measured_bytes_equal_calculator_on_cpu(kind, context, dtype):
    make, elements = SMALL_MODULES[kind]
    module = make()
    measured = measure_cache_bytes(module, batch=2, context=context, dtype=dtype, device="cpu", layers=3)
    # bytes = elements · L · bytes/element · T · b, by hand
    by_hand = elements * 3 * DTYPES[dtype].itemsize * context * 2
    assert measured.shape.attention == kind
    assert measured.method == MEASURED_BY_TENSORS
    assert measured.bytes == measured.tensor_bytes == measured.reserved_bytes == by_hand
    assert measured.elements_per_token_per_layer == elements
    assert calculator_bytes(measured) == by_hand
    # On the CPU the measurement is the tensors' own byte count: exact, so the difference is 0.
    assert calculator_relative_difference(measured) == 0.0


@given(
    n_kv=st.integers(1, 4),
    group=st.integers(1, 3),
    half_head=st.integers(1, 8),
    batch=st.integers(1, 3),
    context=st.integers(1, 40),
    layers=st.integers(1, 3),
    dtype=st.sampled_from(list(DTYPES)),
)
def test_gqa_family_measured_bytes_within_one_percent(n_kv, group, half_head, batch, context, layers, dtype):
    module = GroupedQueryAttention(8, n_kv * group, n_kv, head_dim=2 * half_head)
    measured = measure_cache_bytes(module, batch, context, dtype, layers=layers)
    assert measured.elements_per_token_per_layer == module.cache_elements_per_token()
    assert calculator_relative_difference(measured) <= 0.01
    assert measured.bytes == calculator_bytes(measured)  # exact on the CPU


@given(
    kv_lora_rank=st.integers(1, 24),
    half_rope=st.integers(0, 6),
    batch=st.integers(1, 3),
    context=st.integers(1, 40),
    dtype=st.sampled_from(list(DTYPES)),
)
def test_mla_measured_bytes_within_one_percent(kv_lora_rank, half_rope, batch, context, dtype):
    module = MLA(8, 2, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=4, qk_rope_head_dim=2 * half_rope, v_head_dim=4)
    measured = measure_cache_bytes(module, batch, context, dtype)
    # d_R counts: the cache holds d_c + d_R elements per token
    assert measured.elements_per_token_per_layer == kv_lora_rank + 2 * half_rope
    assert calculator_relative_difference(measured) <= 0.01
    assert measured.bytes == calculator_bytes(measured)


@pytest.mark.parametrize("context", [16, 300])
def test_llama_3_8b_one_layer_scales_to_the_preset(context):
    measured = measure_cache_bytes(llama_3_8b_attention(), 1, context, "bf16")
    preset = PRESETS["llama-3-8b"]
    # one layer measured, scaled to the preset's 32 layers: 131,072 bf16 bytes per token (2 · 8 · 128 · 32 · 2)
    assert measured.bytes_for_layers(preset.layers) == 131_072 * context
    assert calculator_relative_difference(measured, preset) == 0.0


def test_llama_3_8b_mla_conversion_is_576_elements_per_token():
    mla = llama_3_8b_as_mla()
    measured = measure_cache_bytes(mla, 1, 64, "bf16", layers=2)
    assert measured.elements_per_token_per_layer == 512 + 64
    whole_model = ModelShape.from_module(mla, layers=32)
    assert calculator_relative_difference(measured, whole_model) == 0.0
    # the GQA preset describes a different cache: the helper must say so, not hide it
    assert calculator_relative_difference(measured, PRESETS["llama-3-8b"]) > 0.5


# ---- the agreement helper ----------------------------------------------------------------------------------
def test_relative_difference_by_hand():
    assert relative_difference(101, 100) == pytest.approx(0.01, rel=1e-12)
    assert relative_difference(99, 100) == pytest.approx(0.01, rel=1e-12)
    assert relative_difference(640, 640) == 0.0
    for bad in (0, -1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="expected must be a positive number"):
            relative_difference(1, bad)


def test_calculator_relative_difference_sees_a_wrong_measurement():
    # GQA, n_kv 2, d_h 4, b 1, T 10, fp32, one layer: 2 · 2 · 4 · 10 · 4 = 640 bytes
    measured = measure_cache_bytes(GroupedQueryAttention(8, 2, 2, head_dim=4), 1, 10, "fp32")
    assert measured.bytes == 640
    off_by_six = dataclasses.replace(measured, bytes=646)
    assert calculator_relative_difference(off_by_six) == pytest.approx(6 / 640, rel=1e-12)
    assert calculator_relative_difference(off_by_six) <= 0.01
    off_by_two_percent = dataclasses.replace(measured, bytes=653)  # 13 / 640 ≈ 2.0%
    assert calculator_relative_difference(off_by_two_percent) > 0.01


def test_bytes_per_token_and_scaling():
    measured = measure_cache_bytes(GroupedQueryAttention(8, 2, 1, head_dim=4), 3, 5, "fp16", layers=2)
    # 2 · 1 · 4 elements · 2 layers · 2 bytes = 32 bytes per token
    assert measured.bytes_per_token == 32
    assert measured.bytes_for_layers(6) == 3 * measured.bytes
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        measured.bytes_for_layers(0)


# ---- tokens that fit ---------------------------------------------------------------------------------------
def test_tokens_that_fit_by_hand():
    assert tokens_that_fit(1000, 64) == 15  # 15 · 64 = 960 ≤ 1000 < 1024
    assert tokens_that_fit(64, 64) == 1
    assert tokens_that_fit(63, 64) == 0
    assert tokens_that_fit(0, 64) == 0
    assert tokens_that_fit(10, 2.5) == 4
    assert tokens_that_fit(9, 2.5) == 3
    # 80 GiB of Llama-3-8B bf16 cache at 131,072 bytes per token: 80 · 2^30 / 2^17 = 655,360 tokens
    assert tokens_that_fit(80 * 2**30, 131_072) == 655_360
    # its MLA conversion, 576 elements · 32 layers · 2 bytes = 36,864 bytes per token: ⌊85,899,345,920 / 36,864⌋
    assert tokens_that_fit(80 * 2**30, 36_864) == 2_330_168


@pytest.mark.parametrize(
    ("free_bytes", "bytes_per_token", "message"),
    [
        (-1, 64, "free_bytes must be a non-negative integer"),
        (1.5, 64, "free_bytes must be a non-negative integer"),
        (100, 0, "bytes_per_token must be a finite positive number"),
        (100, -2, "bytes_per_token must be a finite positive number"),
        (100, float("inf"), "bytes_per_token must be a finite positive number"),
        (100, float("nan"), "bytes_per_token must be a finite positive number"),
        (100, True, "bytes_per_token must be a finite positive number"),
    ],
)
def test_tokens_that_fit_rejects_bad_values(free_bytes, bytes_per_token, message):
    with pytest.raises(ValueError, match=message):
        tokens_that_fit(free_bytes, bytes_per_token)


def test_cpu_memory_budget_says_where_it_comes_from():
    stated = device_memory_budget("cpu", stated_bytes=12345)
    assert (stated.free_bytes, stated.source) == (12345, "stated budget")
    machine = device_memory_budget("cpu")
    assert machine.free_bytes > 0
    assert "os.sysconf" in machine.source
    with pytest.raises(ValueError, match="stated_bytes must be a non-negative integer"):
        device_memory_budget("cpu", stated_bytes=-5)


# ---- argument checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch=0), "batch must be a positive integer"),
        (dict(context=-3), "context must be a positive integer"),
        (dict(layers=0), "layers must be a positive integer"),
        (dict(dtype=torch.int32), "dtype must be one of"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
        (dict(device="meta"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_measure_rejects_bad_values(kwargs, message):
    arguments = dict(batch=1, context=4, dtype="fp32", device="cpu", layers=1) | kwargs
    with pytest.raises(ValueError, match=message):
        measure_cache_bytes(GroupedQueryAttention(8, 2, 1), **arguments)


def test_measure_rejects_a_module_without_a_cache():
    with pytest.raises(ValueError, match="module must be a GroupedQueryAttention"):
        measure_cache_bytes(torch.nn.Linear(4, 4), 1, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no CUDA device exists")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False"):
        resolve_device("cuda")


def test_fill_cache_holds_the_context_and_the_capacity():
    gqa = GroupedQueryAttention(16, 4, 2, head_dim=4)
    cache = fill_cache(gqa, 2, 9, "fp32", capacity=12)
    assert cache.length == 9
    assert tuple(cache.keys.shape) == (2, 2, 9, 4)
    # reserved: capacity 12 tokens · 2 (K and V) · 2 heads · 4 · b 2 · 4 bytes
    assert cache.reserved_nbytes == 12 * 2 * 2 * 4 * 2 * 4
    mla = SMALL_MODULES["MLA"][0]()
    assert tuple(fill_cache(mla, 1, 5, "bf16").latent_and_rope_key.shape) == (1, 5, 20)
    with pytest.raises(ValueError, match=r"capacity \(4\) must be at least the context \(9\)"):
        fill_cache(gqa, 2, 9, capacity=4)


# ---- timing and bandwidth: logic only -------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "kwargs"), [("GQA", {}), ("MLA", {"path": "naive"}), ("MLA", {"path": "absorbed"})])
def test_time_decode_step_is_positive_and_finite(kind, kwargs):
    module = SMALL_MODULES[kind][0]()
    cache = fill_cache(module, 2, 16, "fp32", capacity=16 + 3)
    x = torch.randn(2, 1, module.d_model)
    seconds = time_decode_step(module, cache, x, warmup=1, repeats=2, **kwargs)
    assert math.isfinite(seconds) and seconds > 0
    assert cache.length == 16 + 3  # every step appended its token


def test_time_decode_step_needs_room_for_its_tokens():
    module = SMALL_MODULES["GQA"][0]()
    cache = fill_cache(module, 1, 16, "fp32")  # capacity exactly 16: no room
    with pytest.raises(ValueError, match="allocate it with capacity >= 19"):
        time_decode_step(module, cache, torch.randn(1, 1, 32), warmup=1, repeats=2)


def test_time_decode_step_rejects_bad_inputs():
    gqa, mla = SMALL_MODULES["GQA"][0](), SMALL_MODULES["MLA"][0]()
    cache = fill_cache(gqa, 2, 4, "fp32", capacity=20)
    with pytest.raises(ValueError, match=r"x must have shape \(b, 1, d_model\) = \(2, 1, 32\)"):
        time_decode_step(gqa, cache, torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match=r"x must have shape \(b, 1, d_model\) = \(2, 1, 32\)"):
        time_decode_step(gqa, cache, torch.randn(1, 1, 32))
    with pytest.raises(ValueError, match="in its dtype"):
        time_decode_step(gqa, cache, torch.randn(2, 1, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache must be a LatentCache"):
        time_decode_step(mla, cache, torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="cache holds no tokens"):
        time_decode_step(gqa, gqa.new_cache(capacity=8), torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        time_decode_step(gqa, cache, torch.randn(2, 1, 32), repeats=0)


def test_time_call_is_positive_and_finite_and_calls_the_step():
    calls = []
    seconds = time_call(lambda: calls.append(torch.ones(64).sum()), "cpu", warmup=2, repeats=3)
    assert math.isfinite(seconds) and seconds > 0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="step must be callable"):
        time_call(42)
    with pytest.raises(ValueError, match="warmup must be a non-negative integer"):
        time_call(lambda: None, warmup=-1)


def test_decode_bytes_read_by_hand():
    gqa = GroupedQueryAttention(8, 2, 1, head_dim=4)
    cache = fill_cache(gqa, 1, 5, "fp32")
    # parameters: q 8·8 + k 8·4 + v 8·4 + o 8·8 = 192 floats = 768 bytes; cache: 2 · 1 · 4 · 5 · 4 = 160 bytes
    assert decode_bytes_read(gqa, cache) == 768 + 160


def test_achieved_bandwidth_by_hand():
    assert achieved_bandwidth(1_000_000_000, 0.5) == 2e9
    assert achieved_bandwidth(0, 1.0) == 0.0
    for bad_seconds in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="seconds must be a finite positive number"):
            achieved_bandwidth(100, bad_seconds)
    with pytest.raises(ValueError, match="bytes_moved must be a non-negative number"):
        achieved_bandwidth(-1, 1.0)


def test_copy_bandwidth_is_positive_and_finite_on_cpu():
    bandwidth = copy_bandwidth(1 << 20, "cpu", warmup=1, repeats=3)
    assert math.isfinite(bandwidth) and bandwidth > 0
    with pytest.raises(ValueError, match="nbytes must be a positive integer"):
        copy_bandwidth(0)


def test_matmul_rate_is_positive_and_finite_on_cpu():
    rate = matmul_rate(64, "cpu", warmup=1, repeats=3)
    assert math.isfinite(rate) and rate > 0
    with pytest.raises(ValueError, match="n must be a positive integer"):
        matmul_rate(0)


STEP_MODULES = {  # id: (module, forward kwargs, decode_step_cost path)
    "GQA": (lambda: GroupedQueryAttention(32, 4, 2, head_dim=6), {}, "absorbed"),
    "MLA-absorbed-low-rank-query-bias": (
        lambda: MLA(32, 4, 16, 8, 4, 6, q_lora_rank=12, bias=True),
        {"path": "absorbed"},
        "absorbed",
    ),
    "MLA-naive": (lambda: MLA(32, 4, 16, 8, 4, 6), {"path": "naive"}, "naive"),
}


@pytest.mark.parametrize("kind", STEP_MODULES.values(), ids=STEP_MODULES.keys())
def test_decode_step_cost_counts_what_a_step_reads_and_multiplies(kind):
    """The FLOPs are exactly those of the step's matrix products as torch counts them; the bytes decode_bytes_read's."""
    make, kwargs, path = kind
    torch.manual_seed(0)
    module = make()
    batch, context = 3, 10
    cache = fill_cache(module, batch, context, capacity=context + 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.randn(batch, 1, 32), cache, **kwargs)  # attends over context + 1 rows, its own included
    cost = decode_step_cost(module, batch, context + 1, "fp32", path=path)
    assert cost.flops == counter.get_total_flops()
    assert cost.bytes == decode_bytes_read(module, cache)


def test_decode_step_cost_of_deepseek_v3_attention_by_hand():
    with torch.device("meta"):  # counted, never read
        module = MLA(2048, 16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    cost = decode_step_cost(module, 1, 8192, "fp32")
    # weights: q_proj 2048·16·192 + kv_a 2048·576 + kv_a_layernorm 512 + kv_b 512·16·256 + o_proj 2048·2048
    assert cost.weight_bytes == 4 * (6_291_456 + 1_179_648 + 512 + 2_097_152 + 4_194_304) == 55_052_288
    assert cost.cache_bytes == 4 * 8192 * 576 == 18_874_368
    # FLOPs: 2 · (13,762,560 matrix elements + 16 heads · 8192 rows · (576 + 512))
    assert cost.projection_flops == 2 * 13_762_560
    assert cost.attention_flops == 2 * 16 * 8192 * 1088
    assert cost.flops == 312_737_792
    # at 24.5 GB/s and 89 GFLOP/s the arithmetic is the floor: 312.7 MFLOP / 89 GFLOP/s = 3.51 ms
    assert cost.floor_seconds(24.5e9, 89e9) == pytest.approx(312_737_792 / 89e9)
    assert cost.floor_seconds(24.5e9, 89e9) == pytest.approx(3.514e-3, rel=1e-3)
    # and in bf16 the bytes halve, the FLOPs do not
    half = decode_step_cost(module, 1, 8192, torch.bfloat16)
    assert half.bytes * 2 == cost.bytes and half.flops == cost.flops
    # the naive path up-projects the other 8191 latents: (8192 − 1) · 512 · 4096 multiply-adds more, about 33x
    naive = decode_step_cost(module, 1, 8192, "fp32", path="naive")
    assert naive.bytes == cost.bytes
    assert naive.projection_flops == cost.projection_flops
    assert naive.attention_flops == 2 * (8191 * 2_097_152 + 16 * 8192 * (192 + 128))


def test_floor_seconds_is_the_larger_of_the_two_times():
    cost = DecodeStepCost(weight_bytes=600, cache_bytes=400, projection_flops=1000, attention_flops=2000)
    assert cost.bytes == 1000 and cost.flops == 3000
    assert cost.floor_seconds(copy_rate=100.0, matmul_rate=1000.0) == 10.0  # 1000 B at 100 B/s > 3000 at 1000/s
    assert cost.floor_seconds(copy_rate=1000.0, matmul_rate=100.0) == 30.0  # 3000 FLOP at 100/s > 1000 at 1000/s
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="copy_rate must be a finite positive number"):
            cost.floor_seconds(bad, 1.0)
        with pytest.raises(ValueError, match="matmul_rate must be a finite positive number"):
            cost.floor_seconds(1.0, bad)


def test_decode_step_cost_rejects_bad_values():
    module = MLA(32, 4, 16, 8, 4, 6)
    with pytest.raises(ValueError, match="path must be one of"):
        decode_step_cost(module, 1, 8, path="fast")
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        decode_step_cost(module, 1, 0)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        decode_step_cost(module, 0, 8)
    with pytest.raises(ValueError, match="module must be"):
        decode_step_cost(torch.nn.Linear(2, 2), 1, 8)


def test_report_and_measurement_agree_for_every_gqa_preset_at_one_layer():
    # Each GQA preset's attention, one layer on the meta device, against the calculator's per-token figure.
    for name, shape in PRESETS.items():
        if shape.attention == "MLA":
            continue
        with torch.device("meta"):
            module = GroupedQueryAttention(shape.d_model, shape.n_heads, shape.n_kv_heads, head_dim=shape.head_dim)
        measured = measure_cache_bytes(module, 1, 8, "bf16")
        per_token = report(shape, context=8, dtype="bf16")["variants"][0]["bytes_per_token"]
        assert measured.bytes_for_layers(shape.layers) == per_token * 8, name


# ---- CUDA: measured with memory_allocated ------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("kind", list(SMALL_MODULES))
@pytest.mark.parametrize("context", [4096, 32768])
def test_cuda_measured_bytes_within_one_percent(kind, context):
    module = SMALL_MODULES[kind][0]().cuda()
    measured = measure_cache_bytes(module, 4, context, "bf16", device="cuda", layers=2)
    assert measured.method == MEASURED_BY_CUDA
    assert measured.tensor_bytes == calculator_bytes(measured)
    # the allocator rounds each buffer up to a multiple of 512 bytes: well inside 1% at these sizes
    assert calculator_relative_difference(measured) <= 0.01


@needs_cuda
def test_cuda_timing_and_budget():
    module = SMALL_MODULES["MLA"][0]().cuda()
    cache = fill_cache(module, 2, 256, "fp32", "cuda", capacity=256 + 4)
    seconds = time_decode_step(module, cache, torch.randn(2, 1, 32, device="cuda"), warmup=1, repeats=3)
    assert math.isfinite(seconds) and seconds > 0
    bandwidth = copy_bandwidth(1 << 24, "cuda", warmup=1, repeats=3)
    assert math.isfinite(bandwidth) and bandwidth > 0
    budget = device_memory_budget("cuda")
    assert budget.free_bytes > 0 and "mem_get_info" in budget.source
