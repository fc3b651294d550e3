"""The MLA decode kernels: the PyTorch reference, the Triton kernel against it, paged against contiguous,
the dispatcher and its input checks.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1); with
one they are compiled and run on CUDA tensors.  The interpreter is slow, so the shapes are tiny and the
cases few.

Tolerances, kernel against reference (both accumulate in fp32; only the order of the additions differs,
plus, in low precision, the kernel's rounding of the probabilities to the input dtype before p · c):
- fp32: rtol = atol = 1e-5, a few fp32 ulps over sums of ≤ 100 terms.
- bf16 out: rtol = atol = 2e-2.  bf16 rounds at 2^-8 = 3.9e-3 relative, once for p and once for the
  output, so a few roundings' worth.  fp16 out: rtol = atol = 5e-3, the same count of roundings at fp16's
  2^-11 = 4.9e-4, with room to spare.
- lse in low precision: rtol = atol = 1e-4.  Scores come from the same bf16/fp16 inputs, whose products are
  exact in fp32, so only fp32 summation order differs.
"""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

# Triton decides when a kernel is decorated (when mla_ref.kernels.triton_decode is imported) whether it
# is compiled or interpreted, so without a GPU the variable must be set before that import.  A value the
# caller already set is kept.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mla_ref.attention import grouped_attention  # noqa: E402
from mla_ref.kernels import gather_pages, mla_decode, mla_decode_reference  # noqa: E402
from mla_ref.testing import copies_of  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if not HAVE_TRITON:
    TRITON_SKIP_REASON = "triton is not installed; the Triton kernel is not tested"
else:
    from mla_ref.kernels import triton_decode

    if DEVICE == "cpu" and not triton_decode.INTERPRETED:
        TRITON_SKIP_REASON = (
            "no GPU, and mla_ref.kernels.triton_decode was imported without TRITON_INTERPRET=1, so its kernels "
            "cannot run on CPU tensors"
        )
    else:
        TRITON_SKIP_REASON = ""
needs_triton = pytest.mark.skipif(bool(TRITON_SKIP_REASON), reason=TRITON_SKIP_REASON or "triton runs here")

D_N = 16  # the per-head position-free query size the scale assumes: MLA's scale is 1/√(d_N + d_R)
TOLERANCES = {  # (out, lse), each (rtol, atol); see the module docstring
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
    torch.bfloat16: ((2e-2, 2e-2), (1e-4, 1e-4)),
    torch.float16: ((5e-3, 5e-3), (1e-4, 1e-4)),
}


def softmax_scale(d_r: int) -> float:
    return 1.0 / math.sqrt(D_N + d_r)


def make_inputs(batch, heads, d_c, d_r, lengths, dtype, *, tokens=None, seed=0, device=DEVICE):
    """q (b, h, d_c + d_R), cache (b, t, d_c + d_R) with NaN in every row past a sequence's length, lengths (b,)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = max(lengths) + 3 if tokens is None else tokens
    q = torch.randn(batch, heads, d_c + d_r, generator=generator)
    cache = torch.randn(batch, tokens, d_c + d_r, generator=generator)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    unused = torch.arange(tokens)[None, :] >= lengths[:, None]  # (b, t)
    cache[unused] = float("nan")  # what uninitialised memory may hold: it must never reach the result
    return q.to(device, dtype), cache.to(device, dtype), lengths.to(device)


def assert_matches(out, lse, expected_out, expected_lse):
    (out_rtol, out_atol), (lse_rtol, lse_atol) = TOLERANCES[out.dtype]
    assert out.dtype == expected_out.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, rtol=out_rtol, atol=out_atol)
    torch.testing.assert_close(lse, expected_lse, rtol=lse_rtol, atol=lse_atol)


# ---- the reference: what "correct" means -------------------------------------------------------------


def test_reference_matches_grouped_attention():
    """With equal lengths the reference is the absorbed path of mla.py: MQA over the rows, last query position."""
    batch, heads, d_c, d_r, tokens = 2, 3, 12, 4, 9
    q, cache, lengths = make_inputs(batch, heads, d_c, d_r, [tokens] * batch, torch.float32, tokens=tokens)
    out, _ = mla_decode_reference(q, cache, lengths, kv_lora_rank=d_c, softmax_scale=softmax_scale(d_r))
    expected = grouped_attention(
        q[:, :, None], cache[:, None], cache[:, None, :, :d_c], scale=softmax_scale(d_r), q_offset=tokens - 1
    )  # (b, h, 1, d_c)
    # fp32, sums of 9 terms computed in a different order: 1e-5
    torch.testing.assert_close(out, expected[:, :, 0], rtol=1e-5, atol=1e-5)


@given(
    heads=st.integers(1, 4),
    d_c=st.integers(1, 24),
    d_r=st.integers(0, 8),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_reference_ragged_batch_equals_each_sequence_alone(heads, d_c, d_r, lengths, seed):
    """Each sequence of a ragged batch gets what it would get alone, and lse is log Σ exp(scale · score)."""
    q, cache, lengths_t = make_inputs(len(lengths), heads, d_c, d_r, lengths, torch.float32, seed=seed, device="cpu")
    scale = softmax_scale(d_r)
    out, lse = mla_decode_reference(q, cache, lengths_t, kv_lora_rank=d_c, softmax_scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    for b, length in enumerate(lengths):
        rows = cache[b, :length].double()  # (t, d_c + d_R), the rows this sequence uses
        scores = scale * torch.einsum("hd,td->ht", q[b].double(), rows)  # (h, t)
        expected_lse = torch.log(torch.exp(scores).sum(dim=-1))  # (h,)
        expected_out = torch.softmax(scores, dim=-1) @ rows[:, :d_c]  # (h, d_c)
        # fp32 against fp64 over ≤ 12 terms: 1e-5
        torch.testing.assert_close(lse[b].double(), expected_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[b].double(), expected_out, rtol=1e-5, atol=1e-5)


def two_product_reference(q, cache, lengths, *, kv_lora_rank, softmax_scale):
    """The same attention with the row split in two: q_c · c_t and q_R · k^R_t as separate products, every unused
    row masked and zeroed.  The one-product reference must give the same numbers up to fp32 rounding."""
    d_c, d_r = kv_lora_rank, q.shape[-1] - kv_lora_rank
    q_latent, q_rope = q.float().split([d_c, d_r], dim=-1)
    latent, rope_key = cache.float().split([d_c, d_r], dim=-1)
    in_use = torch.arange(cache.shape[1])[None, :] < lengths[:, None]  # (b, t)
    scores = torch.einsum("bhc,btc->bht", q_latent, latent) + torch.einsum("bhr,btr->bht", q_rope, rope_key)
    scores = (scores * softmax_scale).masked_fill(~in_use[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    values = latent.masked_fill(~in_use[..., None], 0.0)
    return torch.einsum("bht,btc->bhc", torch.exp(scores - lse[..., None]), values).to(q.dtype), lse


# id: lengths, tokens the buffer holds (rows past each length are NaN)
ROW_CASES = {
    "every-row-in-use": ([40, 40, 40], 40),
    "equal-lengths-in-a-longer-buffer": ([33, 33], 48),
    "ragged": ([1, 40, 17], 48),
}


@pytest.mark.parametrize("case", ROW_CASES.values(), ids=ROW_CASES.keys())
def test_one_product_over_the_rows_equals_two_products_over_their_halves(case):
    lengths, tokens = case
    q, cache, lengths_t = make_inputs(len(lengths), 4, 24, 8, lengths, torch.float32, tokens=tokens, device="cpu")
    arguments = dict(kv_lora_rank=24, softmax_scale=softmax_scale(8))
    out, lse = mla_decode_reference(q, cache, lengths_t, **arguments)
    expected_out, expected_lse = two_product_reference(q, cache, lengths_t, **arguments)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # fp32, ≤ 48 terms summed in another order (and the scale applied to q, not to the scores): 1e-6
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)


def test_reference_copies_the_cache_only_for_a_ragged_batch():
    """Rows are read where they are stored; only a batch whose sequences leave rows unused pays for a masked copy."""
    arguments = dict(kv_lora_rank=24, softmax_scale=softmax_scale(8))
    for lengths, tokens, expected in (
        ([64, 64], 64, []),  # every row in use
        ([50, 50], 64, []),  # the rows past the longest sequence are left out by a view
        ([50, 20], 64, ["masked_fill -> (2, 50, 32)"]),  # rows 20…49 of sequence 1 are NaN: zeroed in a copy
    ):
        q, cache, lengths_t = make_inputs(2, 4, 24, 8, lengths, torch.float32, tokens=tokens, device="cpu")
        with copies_of(cache) as copies:
            out, _ = mla_decode_reference(q, cache, lengths_t, **arguments)
        assert copies == expected, lengths
        assert torch.isfinite(out).all()


# id: lengths, tokens the buffer holds (rows past each length are NaN), rows per block
BLOCK_CASES = {
    "one-row-blocks": ([9, 9], 9, 1),
    "a-partial-last-block": ([40, 40], 40, 16),
    "ragged-with-empty-blocks": ([1, 40, 17], 48, 8),  # sequence 0 uses no row of blocks 1…4
    "ragged-uneven-blocks": ([5, 33, 30], 40, 7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_reference_in_blocks_equals_one_block_over_every_row(case, dtype):
    """Merging the blocks' partial sums gives the softmax over all the rows, also where a sequence uses none of a
    block's rows (its terms are exp(−∞) = 0, never NaN)."""
    lengths, tokens, block_rows = case
    q, cache, lengths_t = make_inputs(len(lengths), 4, 24, 8, lengths, dtype, tokens=tokens, device="cpu")
    arguments = dict(kv_lora_rank=24, softmax_scale=softmax_scale(8))
    out, lse = mla_decode_reference(q, cache, lengths_t, block_rows=block_rows, **arguments)
    whole_out, whole_lse = mla_decode_reference(q, cache, lengths_t, block_rows=tokens, **arguments)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # both fp32 inside, ≤ 40 terms summed in another order: 1e-6 on the fp32 results; bf16 out is then rounded
    # once, and a 1e-6 difference can move it by one bf16 step (2^-8 relative): 1e-2
    out_tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, whole_out, **out_tolerance)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-6, atol=1e-6)
    expected_out, expected_lse = two_product_reference(q, cache, lengths_t, **arguments)
    torch.testing.assert_close(out, expected_out, **out_tolerance)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)


# ---- the Triton kernel against the reference ---------------------------------------------------------

# id: batch, heads, d_c, d_R, lengths, num_splits (None: mla_decode's own choice), dtype
KERNEL_CASES = {
    "one-head": (1, 1, 32, 16, [37], 1, torch.float32),  # 37 is not a multiple of the 16-token tile
    "ragged-with-length-1": (3, 4, 32, 16, [1, 70, 33], 3, torch.float32),  # uneven and empty splits
    "many-heads-odd-dc": (2, 20, 48, 8, [50, 17], 2, torch.float32),  # 20 heads: a full and a partial head block
    "no-rope": (2, 2, 40, 0, [9, 16], None, torch.float32),  # d_R = 0, through the dispatcher
    "bf16-batch-4": (4, 16, 64, 16, [5, 64, 17, 100], 3, torch.bfloat16),
    "fp16-ragged": (3, 4, 24, 8, [1, 70, 33], 2, torch.float16),
}


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_triton_matches_reference(case):
    batch, heads, d_c, d_r, lengths, num_splits, dtype = case
    q, cache, lengths_t = make_inputs(batch, heads, d_c, d_r, lengths, dtype)
    arguments = dict(kv_lora_rank=d_c, softmax_scale=softmax_scale(d_r))
    if num_splits is None:
        out, lse = mla_decode(q, cache, lengths_t, backend="triton", **arguments)
    else:
        out, lse = triton_decode.mla_decode_triton(q, cache, lengths_t, num_splits=num_splits, block_n=16, **arguments)
    expected_out, expected_lse = mla_decode_reference(q, cache, lengths_t, **arguments)
    assert out.shape == (batch, heads, d_c) and lse.shape == (batch, heads)
    assert_matches(out, lse, expected_out, expected_lse)


# ---- the paged layout ---------------------------------------------------------------------------------


def make_paged(cache, lengths, page_size, *, spare_pages=3, seed=0):
    """Scatter a contiguous cache into shuffled pages: pages (num_pages, page_size, w), block_table (b, n) int32.

    Pages nobody uses hold NaN, and table entries past a sequence's last block are -1 (never read).
    """
    batch, tokens, width = cache.shape
    max_blocks = tokens // page_size
    num_pages = batch * max_blocks + spare_pages
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(num_pages, generator=generator)[: batch * max_blocks].reshape(batch, max_blocks)
    pages = torch.full((num_pages, page_size, width), float("nan"), dtype=cache.dtype)
    pages[shuffled] = cache.cpu().reshape(batch, max_blocks, page_size, width)
    in_use = torch.arange(max_blocks)[None, :] * page_size < lengths.cpu()[:, None]
    block_table = torch.where(in_use, shuffled, -1).to(torch.int32)
    return pages.to(cache.device), block_table.to(cache.device)


PAGE_SIZE = 64  # what serving engines use


def test_gather_pages_restores_the_contiguous_cache():
    q, cache, lengths = make_inputs(3, 2, 8, 4, [1, 150, 64], torch.float32, tokens=3 * PAGE_SIZE, device="cpu")
    pages, block_table = make_paged(cache, lengths, PAGE_SIZE)
    gathered = gather_pages(pages, block_table, lengths)
    for b, length in enumerate(lengths.tolist()):  # a copy, so exact: tolerance 0
        torch.testing.assert_close(gathered[b, :length], cache[b, :length], rtol=0, atol=0)
    arguments = dict(kv_lora_rank=8, softmax_scale=softmax_scale(4))
    paged = mla_decode(q, pages, lengths, block_table=block_table, backend="torch", **arguments)
    contiguous = mla_decode(q, cache, lengths, backend="torch", **arguments)
    for got, expected in zip(paged, contiguous, strict=True):  # the same numbers in the same order: exact
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_paged_matches_contiguous(dtype):
    """Lengths 1, 150 (three pages, the last partial) and 64 (exactly one page) through a shuffled block table."""
    d_c, d_r = 32, 16
    q, cache, lengths = make_inputs(3, 4, d_c, d_r, [1, 150, 64], dtype, tokens=3 * PAGE_SIZE)
    pages, block_table = make_paged(cache, lengths, PAGE_SIZE)
    arguments = dict(kv_lora_rank=d_c, softmax_scale=softmax_scale(d_r), num_splits=2, block_n=16)
    paged = triton_decode.mla_decode_triton(q, pages, lengths, block_table=block_table, **arguments)
    contiguous = triton_decode.mla_decode_triton(q, cache, lengths, **arguments)
    # The same tiles in the same order; only the addresses the rows are read from differ.  Allow one ulp
    # of the output dtype in case a compiler orders the fp32 additions differently for the two layouts.
    out_rtol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(paged[0], contiguous[0], rtol=out_rtol, atol=1e-6)
    torch.testing.assert_close(paged[1], contiguous[1], rtol=1e-6, atol=1e-6)
    expected = mla_decode_reference(q, cache, lengths, kv_lora_rank=d_c, softmax_scale=softmax_scale(d_r))
    assert_matches(*paged, *expected)


# ---- the dispatcher --------------------------------------------------------------------------------------


def test_dispatcher_cpu_path_is_the_reference():
    q, cache, lengths = make_inputs(2, 3, 16, 8, [5, 11], torch.float32, device="cpu")
    arguments = dict(kv_lora_rank=16, softmax_scale=softmax_scale(8))
    expected = mla_decode_reference(q, cache, lengths, **arguments)
    for backend in ("auto", "torch"):  # "auto" on CPU tensors must run the reference itself: exact
        got = mla_decode(q, cache, lengths, backend=backend, **arguments)
        for tensor, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(tensor, reference, rtol=0, atol=0)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_backend_on_cpu_without_interpreter_says_what_to_do():
    """In a fresh process without TRITON_INTERPRET, backend='triton' on CPU tensors raises a RuntimeError."""
    program = textwrap.dedent(
        """
        import torch
        from mla_ref.kernels import mla_decode
        q, cache, lengths = torch.zeros(1, 1, 24), torch.zeros(1, 4, 24), torch.tensor([4])
        try:
            mla_decode(q, cache, lengths, kv_lora_rank=16, softmax_scale=0.2, backend="triton")
        except RuntimeError as error:
            print(error)
        """
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "backend='torch'" in result.stdout, result.stdout


# ---- bad input ----------------------------------------------------------------------------------------


def _valid():
    q, cache, lengths = make_inputs(2, 3, 8, 4, [3, 5], torch.float32, tokens=6, device="cpu")
    return dict(q=q, cache=cache, lengths=lengths, kv_lora_rank=8, softmax_scale=0.2)


def _paged():
    arguments = _valid()
    arguments["cache"] = torch.zeros(4, 4, 12)  # 4 pages of 4 rows
    arguments["block_table"] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # up to 8 tokens each
    return arguments


BAD_INPUTS = {  # id: (change to the valid arguments, words the message must contain)
    "q-not-a-tensor": (lambda a: a.update(q=a["q"].tolist()), "q must be a torch.Tensor"),
    "q-2d": (lambda a: a.update(q=a["q"][:, 0]), "q must have shape"),
    "cache-4d": (lambda a: a.update(cache=a["cache"][None]), "cache must have shape"),
    "q-float64": (lambda a: a.update(q=a["q"].double(), cache=a["cache"].double()), "q.dtype"),
    "cache-dtype-differs": (lambda a: a.update(cache=a["cache"].half()), "cache.dtype"),
    "width-differs": (lambda a: a.update(cache=a["cache"][..., :-1]), "as wide as q"),
    "batch-differs": (lambda a: a.update(cache=a["cache"][:1]), "cache batch size"),
    "kv-lora-rank-zero": (lambda a: a.update(kv_lora_rank=0), "kv_lora_rank"),
    "kv-lora-rank-too-big": (lambda a: a.update(kv_lora_rank=13), "kv_lora_rank"),
    "scale-zero": (lambda a: a.update(softmax_scale=0.0), "softmax_scale"),
    "scale-nan": (lambda a: a.update(softmax_scale=float("nan")), "softmax_scale"),
    "scale-string": (lambda a: a.update(softmax_scale="0.2"), "softmax_scale"),
    "lengths-2d": (lambda a: a.update(lengths=a["lengths"][:, None]), "lengths must have shape"),
    "lengths-float": (lambda a: a.update(lengths=a["lengths"].float()), "lengths.dtype"),
    "length-zero": (lambda a: a["lengths"].__setitem__(0, 0), "lengths must lie in"),
    "length-past-cache": (lambda a: a["lengths"].__setitem__(1, 7), "lengths must lie in"),
    "lengths-other-device": (lambda a: a.update(lengths=a["lengths"].to("meta")), "one device"),
    "backend-unknown": (lambda a: a.update(backend="cuda"), "backend"),
}
BAD_PAGED_INPUTS = {
    "table-batch-differs": (lambda a: a.update(block_table=a["block_table"][:1]), "block_table must have shape"),
    "table-float": (lambda a: a.update(block_table=a["block_table"].float()), "block_table.dtype"),
    "page-out-of-range": (lambda a: a["block_table"].__setitem__((1, 1), 4), "block_table entries"),
    "length-past-table": (lambda a: a["lengths"].__setitem__(0, 9), "lengths must lie in"),
}


@pytest.mark.parametrize(
    ("make", "change", "message"),
    [(_valid, *case) for case in BAD_INPUTS.values()] + [(_paged, *case) for case in BAD_PAGED_INPUTS.values()],
    ids=list(BAD_INPUTS) + list(BAD_PAGED_INPUTS),
)
def test_bad_input_raises_value_error(make, change, message):
    arguments = make()
    mla_decode(**arguments)  # valid as made
    change(arguments)
    with pytest.raises(ValueError, match=message):
        mla_decode(**arguments)


def test_unused_block_table_entries_are_not_checked():
    arguments = _paged()
    arguments["block_table"][0, 1] = -1  # sequence 0 has 3 tokens: its second block is unused
    out, _ = mla_decode(**arguments)
    assert torch.isfinite(out).all()


@needs_triton
@pytest.mark.parametrize(
    ("setting", "message"),
    [(dict(block_n=24), "block_n"), (dict(block_h=8), "block_h"), (dict(num_splits=0), "num_splits")],
    ids=["block-n-not-power-of-two", "block-h-below-16", "no-splits"],
)
def test_bad_tile_sizes_raise_value_error(setting, message):
    arguments = _valid()
    q, cache, lengths = arguments.pop("q"), arguments.pop("cache"), arguments.pop("lengths")
    with pytest.raises(ValueError, match=message):
        triton_decode.mla_decode_triton(q, cache, lengths, **arguments, **setting)


# ---- the compiled path, without a GPU ---------------------------------------------------------------

COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mla_ref.kernels import triton_decode

def signature(kernel, pointers, constants):
    types = {"softmax_scale": "fp32"}
    return {
        name: "constexpr" if name in constants else pointers.get(name, types.get(name, "i32"))
        for name in kernel.arg_names
    }

def compile_for_h100(kernel, pointers, constants):
    source = ASTSource(
        fn=kernel,
        signature=signature(kernel, pointers, constants),
        constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})

assert not triton_decode.INTERPRETED
pointers = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "block_table_ptr": "*i32", "lengths_ptr": "*i32",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}
for paged in (False, True):
    constants = dict(D_C=512, D_R=64, BLOCK_H=16, BLOCK_N=32, BLOCK_C=512, BLOCK_R=64, NUM_SPLITS=8,
                     PAGED=paged, PAGE_SIZE=64 if paged else 1, UPCAST_DOTS=False)
    split = compile_for_h100(triton_decode._mla_decode_split_kernel, pointers, constants)
    print("paged" if paged else "contiguous", "tensor-core mma:", "mma.sync" in split.asm["ptx"] or "wgmma" in split.asm["ptx"])
constants = dict(D_C=512, BLOCK_C=512, NUM_SPLITS=8, BLOCK_S=8)
merge = compile_for_h100(triton_decode._mla_decode_merge_kernel, pointers, constants)
print("merge compiled:", "cubin" in merge.asm)
"""


def _has_nvidia_backend() -> bool:
    if not HAVE_TRITON:
        return False
    from triton.backends import backends

    return "nvidia" in backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend cannot compile for sm_90")
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter cannot see compile errors; compiling (not running) for sm_90 in a fresh process can.

    Both layouts at DeepSeek's sizes (d_c + d_R = 512 + 64, bf16), and both dots on tensor cores.
    """
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == [
        "contiguous tensor-core mma: True",
        "paged tensor-core mma: True",
        "merge compiled: True",
    ], result.stdout
