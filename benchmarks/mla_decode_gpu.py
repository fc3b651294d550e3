"""One decode step of MLA on a GPU: the Triton kernel against PyTorch paths and a GQA baseline.

Paths, for each configuration (batch b, cached tokens t, query heads h; d_c + d_R = 512 + 64, bf16):

- ``triton``: mla_ref.kernels' flash-decoding kernel over the latent cache (absorbed MLA).
- ``torch``:  the PyTorch absorbed path, ``mla_decode_reference``: the same math, fp32 softmax.
- ``naive``:  up-project the latent into per-head keys and values with a random kv_b_proj
  (d_N = d_v = 128, DeepSeek-V3's sizes), then ``scaled_dot_product_attention``.
- ``gqa``:    a GQA decode whose cache is as wide per token as MLA's (n_kv KV heads of
  (d_c + d_R) / (2 n_kv) dims; 4 heads of 72 by default), through ``scaled_dot_product_attention``.

Every sequence holds all t tokens (the SDPA paths take no ragged lengths).  For each path the table
gives the time per step (``triton.testing.do_bench``, median, L2 flushed between runs), the bytes it
must move (the cache read once, plus queries and outputs; the naive path also reads kv_b_proj), the
resulting GB/s, TFLOPS, and GB/s as a fraction of a device-to-device copy measured in the same run.
The "max|Δ|" column of a triton row is its largest difference from the torch path.  Configurations whose
working set would not fit in free GPU memory (estimated, or found out by running out) are skipped,
with a line saying so.

Without a CUDA device the script prints one line and exits with code 0, so that ``make bench`` on a
machine without a GPU reports rather than fails; the CPU correctness tests are in tests/test_kernels.py.

    python benchmarks/mla_decode_gpu.py                                  # the full sweep
    python benchmarks/mla_decode_gpu.py --batch 1,16 --tokens 4K --heads 128 --paths triton,torch
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

NO_GPU_MESSAGE = "no CUDA device: this benchmark needs a GPU; the CPU correctness tests are in tests/test_kernels.py"
PATHS: tuple[str, ...] = ("triton", "torch", "naive", "gqa")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
D_NOPE = 128  # d_N, per-head position-free query/key size (DeepSeek-V3)
D_V = 128  # d_v, per-head value size (DeepSeek-V3)
HEADROOM = 0.85  # use at most this fraction of the free GPU memory


@dataclass(frozen=True)
class Config:
    batch: int
    tokens: int
    heads: int
    d_c: int
    d_r: int
    gqa_kv_heads: int
    dtype: torch.dtype

    @property
    def width(self) -> int:
        """d_c + d_R: elements per cached token."""
        return self.d_c + self.d_r

    @property
    def gqa_head_dim(self) -> int:
        """d_h of the GQA baseline: 2 · n_kv · d_h = d_c + d_R."""
        return self.width // (2 * self.gqa_kv_heads)

    @property
    def softmax_scale(self) -> float:
        """MLA's 1/√(d_N + d_R), on the absorbed path too."""
        return 1.0 / math.sqrt(D_NOPE + self.d_r)

    @property
    def itemsize(self) -> int:
        return torch.finfo(self.dtype).bits // 8


# ---- what each path moves and computes ------------------------------------------------------------------


def bytes_moved(path: str, c: Config) -> int:
    """The cache read once, plus queries and outputs (and the kv_b_proj weight for the naive path)."""
    b, t, h, e = c.batch, c.tokens, c.heads, c.itemsize
    cache = b * t * c.width * e
    if path in ("triton", "torch"):
        return cache + b * h * c.width * e + b * h * c.d_c * e + b * h * 4  # q, out, fp32 lse
    if path == "naive":
        weight = h * (D_NOPE + D_V) * c.d_c * e
        return cache + weight + b * h * (D_NOPE + c.d_r) * e + b * h * D_V * e
    return cache + 2 * b * h * c.gqa_head_dim * e  # gqa: the K/V cache (same size), q, out


def flops(path: str, c: Config) -> int:
    """Multiply-adds × 2 of one decode step."""
    b, t, h = c.batch, c.tokens, c.heads
    if path in ("triton", "torch"):
        return 2 * b * h * t * (c.width + c.d_c)  # q·[c ; k^R] and p·c
    if path == "naive":
        up_projection = 2 * b * t * c.d_c * h * (D_NOPE + D_V)
        return up_projection + 2 * b * h * t * (D_NOPE + c.d_r + D_V)
    return 2 * b * h * t * 2 * c.gqa_head_dim


def working_set(path: str, c: Config) -> int:
    """A generous estimate of the bytes a path allocates, to skip what cannot fit."""
    b, t, h, e = c.batch, c.tokens, c.heads, c.itemsize
    cache = b * t * c.width * e
    if path == "triton":
        return cache + b * h * 64 * (c.d_c + 1) * 4  # at most 64 fp32 partial results per (b, h)
    if path == "torch":
        return cache + 2 * b * t * c.width * 4 + 3 * b * h * t * 4  # fp32 copies, scores and probabilities
    if path == "naive":
        return cache + 2 * b * h * t * (D_NOPE + D_V + c.d_r) * e + b * h * t * 4
    return 2 * cache + b * h * t * 4  # K and V copied out of the rows; scores if SDPA takes the math kernel


# ---- the paths: each returns a function that runs one decode step ------------------------------------------


def make_inputs(c: Config, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(c.dtype)

    return {
        "q_absorbed": randn(c.batch, c.heads, c.width),  # (b, h, d_c + d_R)
        "cache": randn(c.batch, c.tokens, c.width),  # (b, t, d_c + d_R)
        "lengths": torch.full((c.batch,), c.tokens, dtype=torch.int32, device=device),  # (b,)
    }


def triton_path(c: Config, inputs: dict[str, torch.Tensor], num_splits: int | None) -> Callable[[], torch.Tensor]:
    from mla_ref.kernels import mla_decode
    from mla_ref.kernels.triton_decode import mla_decode_triton

    arguments = dict(kv_lora_rank=c.d_c, softmax_scale=c.softmax_scale)
    q, cache, lengths = inputs["q_absorbed"], inputs["cache"], inputs["lengths"]
    mla_decode(q, cache, lengths, backend="triton", **arguments)  # checks the inputs once, outside the timing
    return lambda: mla_decode_triton(q, cache, lengths, num_splits=num_splits, **arguments)[0]


def torch_path(c: Config, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    from mla_ref.kernels import mla_decode_reference

    q, cache, lengths = inputs["q_absorbed"], inputs["cache"], inputs["lengths"]
    return lambda: mla_decode_reference(q, cache, lengths, kv_lora_rank=c.d_c, softmax_scale=c.softmax_scale)[0]


def naive_path(c: Config, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    device = inputs["cache"].device
    generator = torch.Generator(device=device).manual_seed(1)
    # kv_b_proj: (h · (d_N + d_v), d_c), W_UK and W_UV per head
    w_kv_b = (torch.randn(c.heads * (D_NOPE + D_V), c.d_c, generator=generator, device=device) / c.d_c**0.5).to(c.dtype)
    q = torch.randn(c.batch, c.heads, 1, D_NOPE + c.d_r, generator=generator, device=device).to(c.dtype)
    cache = inputs["cache"]

    def step() -> torch.Tensor:
        latent, rope_key = cache.split([c.d_c, c.d_r], dim=-1)  # (b, t, d_c), (b, t, d_R)
        # [k_i^N ; v_i] = c W_UK^i, c W_UV^i for every head and every cached token
        kv = rearrange(latent @ w_kv_b.T, "b t (h e) -> b h t e", h=c.heads)  # (b, h, t, d_N + d_v)
        k_nope, v = kv.split([D_NOPE, D_V], dim=-1)
        k = torch.cat([k_nope, rope_key[:, None].expand(-1, c.heads, -1, -1)], dim=-1)  # (b, h, t, d_N + d_R)
        return F.scaled_dot_product_attention(q, k, v, scale=c.softmax_scale)  # (b, h, 1, d_v)

    return step


def gqa_path(c: Config, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    device = inputs["cache"].device
    generator = torch.Generator(device=device).manual_seed(2)
    d_h, n_kv = c.gqa_head_dim, c.gqa_kv_heads
    q = torch.randn(c.batch, c.heads, 1, d_h, generator=generator, device=device).to(c.dtype)  # (b, h, 1, d_h)
    # the K and V cache together are exactly as large as MLA's latent cache
    k, v = rearrange(inputs["cache"], "b t (two g d) -> two b g t d", two=2, g=n_kv)  # (b, n_kv, t, d_h) each
    k, v = k.contiguous(), v.contiguous()
    return lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d_h), enable_gqa=True)


# ---- timing -----------------------------------------------------------------------------------------------


def time_ms(step: Callable[[], object], rep_ms: int) -> float:
    """Median milliseconds per call: triton.testing.do_bench when triton is there, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(step, warmup=max(rep_ms // 4, 5), rep=rep_ms, return_mode="median"))
    for _ in range(3):
        step()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(device: torch.device, rep_ms: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), on up to 1 GiB."""
    free, _ = torch.cuda.mem_get_info(device)
    n_bytes = min(1 << 30, int(free * HEADROOM) // 2)
    source = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), rep_ms)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


# ---- the sweep ----------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """'1K,4K,512' -> [1024, 4096, 512]."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        factor = 1024 if item.upper().endswith("K") else 1
        number = item.upper().removesuffix("K")
        if not number.isdigit() or int(number) == 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive integers, optionally with K; got {item!r}")
        sizes.append(int(number) * factor)
    return sizes


def parse_paths(text: str) -> list[str]:
    paths = [item.strip() for item in text.split(",")]
    unknown = [path for path in paths if path not in PATHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=parse_sizes, default=[1, 16, 64, 128], help="batch sizes (default 1,16,64,128)")
    parser.add_argument("--tokens", type=parse_sizes, default=parse_sizes("1K,4K,16K,32K"), help="cached tokens")
    parser.add_argument("--heads", type=parse_sizes, default=[16, 128], help="query heads (default 16,128)")
    parser.add_argument("--paths", type=parse_paths, default=list(PATHS), help=f"subset of {','.join(PATHS)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--d-c", type=int, default=512, help="kv_lora_rank d_c (default 512)")
    parser.add_argument("--d-r", type=int, default=64, help="rope key size d_R (default 64)")
    parser.add_argument("--gqa-kv-heads", type=int, default=4, help="KV heads of the GQA baseline (default 4)")
    parser.add_argument("--num-splits", type=int, default=None, help="Triton token splits (default: automatic)")
    parser.add_argument("--rep-ms", type=int, default=100, help="milliseconds of repetitions per measurement")
    args = parser.parse_args(argv)
    if (args.d_c + args.d_r) % (2 * args.gqa_kv_heads) != 0:
        parser.error(f"--gqa-kv-heads {args.gqa_kv_heads} must divide (d_c + d_R) / 2 = {(args.d_c + args.d_r) / 2}")
    bad_heads = [h for h in args.heads if h % args.gqa_kv_heads != 0]
    if bad_heads:
        parser.error(f"--heads {bad_heads} are not multiples of --gqa-kv-heads {args.gqa_kv_heads}")
    return args


def run_path(path: str, c: Config, inputs: dict[str, torch.Tensor], args: argparse.Namespace):
    if path == "triton":
        return triton_path(c, inputs, args.num_splits)
    if path == "torch":
        return torch_path(c, inputs)
    if path == "naive":
        return naive_path(c, inputs)
    return gqa_path(c, inputs)


def measure(
    path: str,
    c: Config,
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, torch.Tensor],
    args: argparse.Namespace,
    copy_gbs: float,
) -> str:
    """Time one path on one configuration; return its table row, or a line saying why it was skipped."""
    where = f"{path} b={c.batch} t={c.tokens} h={c.heads}"
    free, _ = torch.cuda.mem_get_info(inputs["cache"].device)
    if working_set(path, c) > free * HEADROOM:
        return f"skip   {where}: needs ~{working_set(path, c) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    try:
        step = run_path(path, c, inputs, args)
        if path in ("triton", "torch"):
            outputs[path] = step().float()
        ms = time_ms(step, args.rep_ms)
    except torch.cuda.OutOfMemoryError:
        return f"skip   {where}: ran out of GPU memory"
    finally:
        step = None
        torch.cuda.empty_cache()
    gbs = bytes_moved(path, c) / (ms * 1e-3) / 1e9
    tflops = flops(path, c) / (ms * 1e-3) / 1e12
    error = ""
    if path == "triton" and "torch" in outputs:
        error = f"{(outputs['triton'] - outputs['torch']).abs().max().item():.1e}"
    row = f"{path:<7}{c.batch:>6}{c.tokens:>8}{c.heads:>6}{ms:>10.4f}{bytes_moved(path, c) / 1e6:>10.1f}"
    return row + f"{gbs:>8.0f}{gbs / copy_gbs:>7.0%}{tflops:>8.1f}{error:>10}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0
    # torch runs before triton so that the triton row can show its difference from it
    paths = sorted(args.paths, key=["torch", "triton", "naive", "gqa"].index)
    if "triton" in paths:
        try:
            import triton  # noqa: F401
        except ImportError:
            print("triton is not installed: skipping the triton path")
            paths.remove("triton")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    copy_gbs = copy_bandwidth_gbs(device, args.rep_ms)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(f"d_c + d_R = {args.d_c} + {args.d_r}, {args.dtype}; every sequence holds all its tokens\n")

    header = f"{'path':<7}{'batch':>6}{'tokens':>8}{'heads':>6}{'ms':>10}{'MB':>10}{'GB/s':>8}{'%copy':>7}"
    header += f"{'TFLOPS':>8}{'max|Δ|':>10}"
    print(header)
    print("-" * len(header))
    for heads in args.heads:
        for batch in args.batch:
            for tokens in args.tokens:
                c = Config(batch, tokens, heads, args.d_c, args.d_r, args.gqa_kv_heads, DTYPES[args.dtype])
                free, _ = torch.cuda.mem_get_info(device)
                if c.batch * c.tokens * c.width * c.itemsize > free * HEADROOM:
                    print(f"skip   b={batch} t={tokens} h={heads}: the cache alone would not fit in free memory")
                    continue
                inputs = make_inputs(c, device)
                outputs: dict[str, torch.Tensor] = {}  # the triton and torch results, to compare
                for path in paths:
                    print(measure(path, c, inputs, outputs, args, copy_gbs))
                del inputs, outputs
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
